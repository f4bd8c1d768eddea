"""The multi-class U-Net of Inf-Net (paper Section III-C, "Semi-Inf-Net & Multi-class U-Net").

Input: the CT slice and the Semi-Inf-Net infection map, each normalised as 3 channels and
concatenated (n_channels=6); with the image alone (n_channels=3) it is the "Multi-class U-Net"
baseline of Table III. Output: raw logits (N, n_classes, H, W) for background, GGO and
consolidation (the release trains them with sigmoid + BCE against one-hot targets).

The layout is the release's (milesial's Pytorch-UNet, bilinear variant), with its module names
(`inc`, `down1`, `maxpool_conv.1.double_conv.0`, `up1.conv`, `outc.conv`, ...) because they are
the keys of the released `unet_model_200.pkl`; do not rename them.

Data flow (bilinear variant: the bottleneck and every decoder stage are halved, so the
concatenations are 512+512, 256+256, 128+128 and 64+64 channels):
  inc    6   -> 64   (H)          up1  cat(x4 512, up(x5) 512) -> 512 -> 256  (H/8)
  down1  64  -> 128  (H/2)        up2  cat(x3 256, up 256)     -> 256 -> 128  (H/4)
  down2  128 -> 256  (H/4)        up3  cat(x2 128, up 128)     -> 128 -> 64   (H/2)
  down3  256 -> 512  (H/8)        up4  cat(x1 64,  up 64)      -> 64  -> 64   (H)
  down4  512 -> 512  (H/16)       outc 1x1 conv 64 -> n_classes
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import MODELS


class DoubleConv(nn.Module):
    """(3x3 conv with bias -> BN -> ReLU) twice; the first conv may narrow to `mid_ch`."""

    def __init__(self, in_ch, out_ch, mid_ch=None):
        super().__init__()
        mid_ch = mid_ch or out_ch
        # Sequential indices 0/1 and 3/4 are the checkpoint's conv/BN keys.
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 3, padding=1),
            nn.BatchNorm2d(mid_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_ch, out_ch, 3, padding=1),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max-pool, then DoubleConv."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_ch, out_ch))

    def forward(self, x):
        return self.maxpool_conv(x)


def pad_to(x, ref):
    """Zero-pad `x` (evenly, the extra pixel right/bottom) to `ref`'s height and width.

    Only odd-sized feature maps (sides not multiples of 16) need it; a negative amount
    crops, as F.pad does, so the release's behaviour is kept in that case too.
    """
    dy = ref.shape[-2] - x.shape[-2]
    dx = ref.shape[-1] - x.shape[-1]
    if dy == 0 and dx == 0:
        return x
    return F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])


class Up(nn.Module):
    """x2 bilinear up-sampling (align_corners=True, as released), pad to the skip's size,
    concatenate [skip, upsampled], then DoubleConv narrowing to in_ch // 2 first.

    No parameters in the up-sampling: the bilinear variant has no transposed conv.
    """

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = DoubleConv(in_ch, out_ch, in_ch // 2)

    def forward(self, x, skip):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(torch.cat([skip, pad_to(x, skip)], dim=1))


class OutConv(nn.Module):
    """1x1 conv (with bias) to class logits."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x):
        return self.conv(x)


class Inf_Net_UNet(nn.Module):  # noqa: N801 -- the release's class name
    """The released multi-class U-Net; `forward(x)` returns logits (N, n_classes, H, W).

    Any input size works (sides that are multiples of 16 need no padding).
    """

    def __init__(self, n_channels=6, n_classes=3):
        super().__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.inc = DoubleConv(n_channels, 64)
        self.down1 = Down(64, 128)
        self.down2 = Down(128, 256)
        self.down3 = Down(256, 512)
        self.down4 = Down(512, 512)  # halved (1024 // 2): bilinear up-sampling keeps channels
        self.up1 = Up(1024, 256)
        self.up2 = Up(512, 128)
        self.up3 = Up(256, 64)
        self.up4 = Up(128, 64)
        self.outc = OutConv(64, n_classes)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x = self.down4(x4)
        x = self.up1(x, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return self.outc(x)


@MODELS.register("unet_multiclass")
def unet_multiclass(in_channels=6, num_classes=3):
    """Infection-guided (in_channels=6: image + prior) or image-only (in_channels=3) U-Net."""
    return Inf_Net_UNet(n_channels=in_channels, n_classes=num_classes)
