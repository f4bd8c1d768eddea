"""Res2Net-50 v1b 26w x 4s (Gao et al., TPAMI 2021), Inf-Net's encoder, without importing timm.

Importing timm (and with it torchvision) takes about a second, a quarter of the test stage on one slice,
for one network of ~100 lines; so the default encoder is built here. It is timm's `res2net50d` module for
module: the same state-dict keys (those of the release's checkpoints, `conv1.0.weight` ... `fc.bias`), the
same outputs, the same `feature_info` and `forward_intermediates`, and, modules being created and
initialised in timm's order, the same random weights for a seed (tests/test_res2net.py checks all four
against timm). timm is still imported for its ImageNet file's metadata (`pretrained_cfg`) and for every
other encoder.
"""
import torch
from torch import nn

TIMM_NAME = "res2net50d"


class Bottle2neck(nn.Module):
    """The Res2Net bottleneck: the 1x1 conv's output is split into `scale` groups of `width` channels; each
    group but the last passes a 3x3 conv after adding the previous group's output (hierarchical residuals),
    so one block sees several receptive fields. The first block of a stage (stride or width change) runs
    the groups independently and average-pools the last."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, base_width=26, scale=4):
        super().__init__()
        width = planes * base_width // 64
        self.scale, self.width = scale, width
        self.is_first = stride > 1 or downsample is not None
        # attributes in timm's order: named_modules() (and so the weight initialisation) follow it
        self.conv1 = nn.Conv2d(inplanes, width * scale, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, stride, padding=1, bias=False) for _ in range(scale - 1))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, stride, padding=1) if self.is_first else None
        self.conv3 = nn.Conv2d(width * scale, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        groups = torch.split(self.relu(self.bn1(self.conv1(x))), self.width, 1)
        out, y = [], None
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = groups[i] if i == 0 or self.is_first else y + groups[i]
            y = self.relu(bn(conv(y)))
            out.append(y)
        out.append(self.pool(groups[-1]) if self.pool is not None else groups[-1])
        out = self.bn3(self.conv3(torch.cat(out, 1)))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _downsample(inplanes, planes, stride):
    """v1b's shortcut ('d' in timm): average pooling, then a 1x1 conv (no information skipped by a strided conv)."""
    pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1 else nn.Identity()
    return nn.Sequential(pool, nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))


class Res2Net(nn.Module):
    """Res2Net v1b: a deep stem (three 3x3 convs), max pooling, four stages of Bottle2neck blocks, and the
    ImageNet classifier (`fc`, kept for the release's keys; Inf-Net never runs it)."""

    def __init__(self, layers=(3, 4, 6, 3), base_width=26, scale=4, stem_width=32, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, stem_width * 2, 3, 1, 1, bias=False))
        inplanes = stem_width * 2
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.feature_info = [dict(num_chs=inplanes, reduction=2, module="act1")]
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            downsample = _downsample(inplanes, planes * Bottle2neck.expansion, stride)  # built first, as timm does
            stage = [Bottle2neck(inplanes, planes, stride, downsample, base_width, scale)]
            inplanes = planes * Bottle2neck.expansion
            stage += [Bottle2neck(inplanes, planes, 1, None, base_width, scale) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            self.feature_info.append(dict(num_chs=inplanes, reduction=4 * 2 ** i, module=f"layer{i + 1}"))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        if not self.fc.weight.is_meta:  # (normal_ on the meta device imports torch._dynamo: a second, for nothing)
            self.init_weights()

    def init_weights(self):
        """timm's initialisation: He (fan-out) for every conv, and the last BN of each block at zero, so that
        each residual branch starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, Bottle2neck):
                nn.init.zeros_(m.bn3.weight)

    def forward_intermediates(self, x, indices=None, intermediates_only=True, stop_early=True):
        """The features of `indices` (into feature_info: 0 the stem at stride 2, 1..4 the stages), as timm's;
        only `intermediates_only` is supported, and the stages after the last index are skipped."""
        indices = list(range(5)) if indices is None else list(indices)
        if not intermediates_only:
            raise ValueError("Res2Net.forward_intermediates returns the intermediate features only")
        x = self.act1(self.bn1(self.conv1(x)))
        taken = [x] if 0 in indices else []
        x = self.maxpool(x)
        for i in range(1, max(indices) + 1 if stop_early else 5):
            x = getattr(self, f"layer{i}")(x)
            if i in indices:
                taken.append(x)
        return taken

    def forward(self, x):
        x = self.forward_intermediates(x, [4])[0]
        return self.fc(torch.flatten(self.global_pool(x), 1))

    @property
    def pretrained_cfg(self):
        """timm's metadata of its ImageNet file for this network (where `--pretrained imagenet` looks)."""
        from .encoders import _import_timm
        cfg = _import_timm().models.get_pretrained_cfg(TIMM_NAME).to_dict()
        return {**cfg, "architecture": TIMM_NAME}
