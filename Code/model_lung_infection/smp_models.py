"""Baselines of Tables II and III built from segmentation-models-pytorch (smp), registered by name.

Each constructor takes (in_channels, num_classes) like the project's other models (registry.create_model)
and returns one logit map of the input's size. smp never downloads here: encoders start from random
weights unless `pretrained` names a local torchvision ImageNet file (vgg16-397923af.pth,
densenet161-8d451a50.pth, resnet50-0676ba61.pth), whose key names smp's encoders share.

Table II: unet (VGG-16), unetplusplus (VGG-16), dense_unet (U-Net on DenseNet-161).
Table III: deeplabv3plus_os8 / deeplabv3plus_os16 (ResNet-50 encoder, output stride 8 / 16).
"""
import re

from .checkpoint import extract_state_dict, load_checkpoint
from .registry import MODELS

_CLASSIFIER_PREFIXES = ("classifier.", "fc.")  # ImageNet heads the encoders do not have
# torchvision's published DenseNet files name "norm.1" what the modules call "norm1" (torchvision remaps too)
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _smp():
    import segmentation_models_pytorch as smp  # 2 s to import: only when one of these networks is built
    return smp


def smp_encoder(name, n_channels=3):
    return _smp().encoders.get_encoder(name, in_channels=n_channels, weights=None)


def load_encoder_weights(encoder, path):
    """Load a local torchvision ImageNet file into an smp encoder (its classifier dropped); strict otherwise."""
    state, name, _ = extract_state_dict(path)
    state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    # files saved before PyTorch 0.4.1 have no BN step counters; they only matter for momentum=None
    own = encoder.state_dict()
    state.update({k: v for k, v in own.items() if k.endswith("num_batches_tracked") and k not in state})
    return load_checkpoint(encoder, state, name=name)


def load_smp_imagenet(model, path):
    """The registry's ImageNet loader of a network whose encoder is `model.encoder`."""
    load_encoder_weights(model.encoder, path)


def _build(arch, encoder_name, in_channels, num_classes, **kw):
    return getattr(_smp(), arch)(encoder_name=encoder_name, encoder_weights=None, in_channels=in_channels,
                                 classes=num_classes, **kw)


@MODELS.register("unet", imagenet=load_smp_imagenet)
def unet(in_channels=3, num_classes=1):
    return _build("Unet", "vgg16", in_channels, num_classes)


@MODELS.register("unetplusplus", imagenet=load_smp_imagenet)
def unetplusplus(in_channels=3, num_classes=1):
    model = _build("UnetPlusPlus", "vgg16", in_channels, num_classes)
    # smp builds a decoder.center block for VGG encoders that the forward pass never uses: frozen (its keys
    # stay in the checkpoints), since DDP fails on a trainable parameter that gets no gradient.
    model.decoder.center.requires_grad_(False)
    return model


@MODELS.register("dense_unet", imagenet=load_smp_imagenet)
def dense_unet(in_channels=3, num_classes=1):
    return _build("Unet", "densenet161", in_channels, num_classes)


@MODELS.register("deeplabv3plus_os8", imagenet=load_smp_imagenet)
def deeplabv3plus_os8(in_channels=3, num_classes=3):
    return _build("DeepLabV3Plus", "resnet50", in_channels, num_classes, encoder_output_stride=8)


@MODELS.register("deeplabv3plus_os16", imagenet=load_smp_imagenet)
def deeplabv3plus_os16(in_channels=3, num_classes=3):
    return _build("DeepLabV3Plus", "resnet50", in_channels, num_classes, encoder_output_stride=16)
