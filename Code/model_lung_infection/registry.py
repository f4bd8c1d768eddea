"""Name -> model / encoder registries and the one model factory, `create_model`.

Every registered model is built the same way:

    create_model(name, pretrained=None, in_channels=None, num_classes=None, init=None, **options)

`in_channels` / `num_classes` left as None take the entry's defaults (3 / 1 for the single-map
networks, 6 / 3 for the multi-class ones); `options` are the architecture's own (Inf-Net's
`backbone` and component switches, FCN8s' `fc_width`); `init="xavier"` re-initialises every
convolution (the paper's multi-class recipe) before `pretrained`, a local ImageNet file, is loaded
into the encoder by the entry's own loader (Inf-Net's also takes "imagenet": encoders.imagenet_weights).
Nothing warns about random weights here: the entry points say it once (`warn_random_weights`).

Built-in entries are imported on first use (BUILTIN_MODULES), so naming a model does not import
segmentation-models-pytorch or timm; a module registers its entries with `@MODELS.register(...)`.
"""
import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class Entry:
    build: Callable                       # (in_channels=..., num_classes=..., **options) -> nn.Module
    load_imagenet: Optional[Callable]     # (model, path): a local ImageNet file into the encoder; None: none
    finds_imagenet: bool = False          # load_imagenet also takes "imagenet" (finds the weights itself)


class Registry:
    def __init__(self, kind, builtin=None):
        self.kind = kind
        self._entries = {}
        self._builtin = dict(builtin or {})  # name -> module (relative to this package) that registers it

    def register(self, name=None, imagenet=None, finds_imagenet=False):
        """Decorator: `@MODELS.register("unet", imagenet=loader)`; `imagenet(model, path)` loads ImageNet
        weights into the built model's encoder (None: the network has no ImageNet encoder);
        finds_imagenet: it also takes path="imagenet" and finds them (encoders.imagenet_weights)."""
        def wrap(fn):
            key = name or fn.__name__
            if key in self._entries:
                raise KeyError(f"{self.kind} '{key}' registered twice")
            self._entries[key] = Entry(fn, imagenet, finds_imagenet)
            return fn
        return wrap

    def entry(self, name):
        if name not in self._entries and name in self._builtin:
            importlib.import_module(self._builtin[name], __package__)
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}") from None

    def get(self, name):
        return self.entry(name).build

    def names(self):
        return sorted(set(self._entries) | set(self._builtin))

    def __contains__(self, name):
        return name in self._entries or name in self._builtin


MODELS = Registry("model", {
    "inf_net": ".inf_net", "unet_multiclass": ".unet", "fcn8s": ".fcn8s",
    "attention_unet": ".attention_unet", "gated_unet": ".attention_unet",
    # segmentation-models-pytorch: imported only when one of these is built
    "unet": ".smp_models", "unetplusplus": ".smp_models", "dense_unet": ".smp_models",
    "deeplabv3plus_os8": ".smp_models", "deeplabv3plus_os16": ".smp_models",
})
ENCODERS = Registry("encoder", {name: ".encoders" for name in (
    "res2net50_v1b_26w_4s", "resnet50", "vgg16", "vgg16_bn",
    "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenetv2")})


def xavier_init(model):
    """Xavier-uniform weights and zero biases for every Conv2d (the paper's multi-class initialisation).

    Transposed convs (FCN8s' bilinear up-samplers) and BatchNorm keep their initialisation."""
    import torch.nn as nn
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


# init= -> what is done to a freshly built network (before its ImageNet weights are loaded)
INITIALISERS = {None: lambda model: model, "default": lambda model: model, "xavier": xavier_init}


def create_model(name, *, pretrained=None, in_channels=None, num_classes=None, init=None, **options):
    """Build a registered model by name, e.g. `create_model('inf_net', backbone='resnet50')`."""
    entry = MODELS.entry(name)
    if init not in INITIALISERS:
        raise ValueError(f"init '{init}': choose one of {', '.join(k for k in INITIALISERS if k)}")
    if pretrained and entry.load_imagenet is None:
        raise ValueError(f"{name} has no ImageNet encoder (pretrained={pretrained}): it is trained from scratch")
    if pretrained == "imagenet" and not entry.finds_imagenet:
        from .errors import OptionError
        raise OptionError(f"--pretrained imagenet: the weights of {name}'s encoder are not found automatically "
                          "(only Inf-Net's are); pass its ImageNet file as --pretrained PATH")
    sizes = {k: v for k, v in (("in_channels", in_channels), ("num_classes", num_classes)) if v is not None}
    model = INITIALISERS[init](entry.build(**sizes, **options))
    if pretrained:
        entry.load_imagenet(model, pretrained)
    return model


def has_imagenet_encoder(name):
    return MODELS.entry(name).load_imagenet is not None


def warn_random_weights(name, pretrained=None):
    """The entry points' one warning when a network with an ImageNet encoder starts without its file."""
    if not pretrained and has_imagenet_encoder(name):
        warnings.warn(f"{name}: the encoder starts from RANDOM weights: no ImageNet file was given "
                      "(--pretrained PATH). Expect far lower accuracy than the paper's.", stacklevel=2)


def list_models():
    return MODELS.names()
