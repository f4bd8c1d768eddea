"""FCN-8s (Long et al., CVPR 2015) on VGG-16, the "FCNs" / "Semi-Inf-Net & FCN8s" rows of Table III.

The Inf-Net release has no FCN8s, so this follows the FCN paper, with two changes so that
any input whose sides are multiples of 32 maps to logits of exactly its size, with no crops:
conv1_1 pads by 1 (not 100) and fc6 pads by 3. Data flow:
  features (torchvision's VGG-16 layout, keys `features.<i>`) -> pool3 (H/8), pool4 (H/16), pool5 (H/32)
  fc6 (7x7 conv) -> ReLU -> dropout -> fc7 (1x1 conv) -> ReLU -> dropout -> score_fr   (H/32)
  x2 up (upscore2) + score_pool4(pool4)                                               (H/16)
  x2 up (upscore_pool4) + score_pool3(pool3)                                          (H/8)
  x8 up (upscore8)                                                                    (H)
The up-sampling layers are transposed convs initialised to bilinear interpolation (and
learned), as in FCN. The output is raw logits (N, n_classes, H, W).

Nothing is downloaded. `pretrained=PATH` loads ImageNet VGG-16 weights from a local file
(torchvision's `vgg16-397923af.pth` or timm's `vgg16` state dict): the conv layers, and fc6/fc7
reshaped from the classifier when `fc_width` is 4096.
"""
import warnings

import torch
import torch.nn as nn
from torchvision.models.vgg import cfgs, make_layers

from .checkpoint import check_fit, extract_state_dict, key_mismatches
from .registry import MODELS

# Indices in `features` of the max-pools whose outputs are tapped (pool3, pool4, pool5).
POOL3, POOL4, POOL5 = 16, 23, 30


def bilinear_kernel(channels, kernel_size):
    """Weights that make a channels -> channels transposed conv a bilinear up-sampler."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    pos = torch.arange(kernel_size, dtype=torch.float32)
    filt1d = 1 - (pos - center).abs() / factor
    filt = filt1d[:, None] * filt1d[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    idx = torch.arange(channels)
    weight[idx, idx] = filt  # each class up-sampled on its own, no mixing
    return weight


def _upsampler(channels, factor):
    # kernel 2f, stride f, padding f/2: exactly f times the input size.
    up = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return up


class FCN8s(nn.Module):
    """FCN-8s. n_channels: 6 (image + infection prior) or 3 (image only);
    fc_width: channels of fc6/fc7 (4096 as in VGG-16; smaller saves memory, ~120M of the
    ~134M parameters are fc6/fc7); pretrained: path of ImageNet VGG-16 weights, or None."""

    def __init__(self, n_channels=6, n_classes=3, fc_width=4096, pretrained=None):
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.features = make_layers(cfgs["D"], batch_norm=False)
        if n_channels != 3:
            self.features[0] = nn.Conv2d(n_channels, 64, 3, padding=1)

        self.fc6 = nn.Conv2d(512, fc_width, 7, padding=3)
        self.fc7 = nn.Conv2d(fc_width, fc_width, 1)
        self.drop6 = nn.Dropout(0.5)
        self.drop7 = nn.Dropout(0.5)
        self.score_fr = nn.Conv2d(fc_width, n_classes, 1)
        self.score_pool4 = nn.Conv2d(512, n_classes, 1)
        self.score_pool3 = nn.Conv2d(256, n_classes, 1)
        self.upscore2 = _upsampler(n_classes, 2)
        self.upscore_pool4 = _upsampler(n_classes, 2)
        self.upscore8 = _upsampler(n_classes, 8)

        if pretrained:
            load_vgg16_imagenet(self, pretrained)

    def encode(self, x):
        taps = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in (POOL3, POOL4, POOL5):
                taps[i] = x
        return taps[POOL3], taps[POOL4], taps[POOL5]

    def forward(self, x):
        h, w = x.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"FCN8s needs input sides that are multiples of 32, got {h}x{w}")
        pool3, pool4, pool5 = self.encode(x)
        x = self.drop6(torch.relu(self.fc6(pool5)))
        x = self.drop7(torch.relu(self.fc7(x)))
        x = self.upscore2(self.score_fr(x)) + self.score_pool4(pool4)
        x = self.upscore_pool4(x) + self.score_pool3(pool3)
        return self.upscore8(x)


def load_vgg16_imagenet(model, path):
    """Copy ImageNet VGG-16 weights from a local file into `model`'s conv layers (and fc6/fc7).

    The first conv is skipped, with a warning, when the model does not take 3 channels.
    """
    state, name, _ = extract_state_dict(path)  # reads the file, naming it in any error
    own = model.state_dict()

    wanted = {k: v for k, v in state.items() if k.startswith("features.")}
    check_fit(name, "FCN8s' VGG-16 layers", [k for k in own if k.startswith("features.") and k not in wanted],
              expected="ImageNet VGG-16 weights")
    if own["features.0.weight"].shape != wanted["features.0.weight"].shape:
        del wanted["features.0.weight"], wanted["features.0.bias"]
        warnings.warn(f"FCN8s takes {model.n_channels} input channels, the ImageNet file 3: "
                      "conv1_1 keeps its random weights; all later VGG-16 layers are loaded.", stacklevel=3)

    # fc6/fc7: torchvision's Linear classifier (reshaped to convs) or timm's conv pre-logits.
    for ours, names in (("fc6", ("classifier.0", "pre_logits.fc1")), ("fc7", ("classifier.3", "pre_logits.fc2"))):
        src = next((n for n in names if f"{n}.weight" in state), None)
        target = own[f"{ours}.weight"]
        if src is None or state[f"{src}.weight"].numel() != target.numel():
            warnings.warn(f"FCN8s: {ours} not in {path} or of another width; it keeps random weights.", stacklevel=3)
            continue
        wanted[f"{ours}.weight"] = state[f"{src}.weight"].reshape(target.shape)
        wanted[f"{ours}.bias"] = state[f"{src}.bias"]
    wanted = {k: v for k, v in wanted.items() if k in own}
    check_fit(name, "FCN8s' VGG-16 layers", shapes=key_mismatches(own, wanted)[2], expected="ImageNet VGG-16 weights")
    model.load_state_dict(wanted, strict=False)


@MODELS.register("fcn8s", imagenet=load_vgg16_imagenet)
def fcn8s(in_channels=6, num_classes=3, fc_width=4096):
    """FCN-8s on VGG-16: infection-guided (in_channels=6) or image-only (in_channels=3)."""
    return FCN8s(n_channels=in_channels, n_classes=num_classes, fc_width=fc_width)
