"""Attention-gated U-Nets, the two Table II baselines no well-kept library provides.

attention_unet: Attention U-Net (Oktay et al., MIDL 2018) on a VGG-16 encoder, as the paper's
    Table II lists it: every skip connection passes an additive attention gate driven by the
    coarser decoder feature before it is concatenated.
gated_unet: the lightweight attention-gated network of Schlemper et al. (MedIA 2019) that the
    paper cites as Gated-UNet (175K parameters there): the same gates on a narrow plain
    encoder (widths 8..128).
Both return one logit map of the input's size. The encoders come from
segmentation-models-pytorch (VGG-16) or are two-conv blocks (plain); random init unless a local
ImageNet file is given (smp_models.load_encoder_weights).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import upsample_to
from .registry import MODELS
from .smp_models import load_smp_imagenet, smp_encoder


def conv_bn_relu(in_ch, out_ch):
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class AttentionGate(nn.Module):
    """alpha = sigmoid(psi(relu(theta(skip) + phi(gate)))); returns skip * alpha (one weight per pixel)."""

    def __init__(self, skip_ch, gate_ch, inter_ch):
        super().__init__()
        self.theta = nn.Conv2d(skip_ch, inter_ch, 1, bias=False)
        self.phi = nn.Conv2d(gate_ch, inter_ch, 1)
        self.psi = nn.Conv2d(inter_ch, 1, 1)

    def forward(self, skip, gate):
        alpha = torch.sigmoid(self.psi(F.relu(self.theta(skip) + upsample_to(self.phi(gate), skip))))
        return skip * alpha


class GatedDecoderBlock(nn.Module):
    """Up-sample x to the skip's scale, concatenate the gated skip, two conv-BN-ReLU."""

    def __init__(self, in_ch, skip_ch, out_ch):
        super().__init__()
        self.gate = AttentionGate(skip_ch, in_ch, max(skip_ch // 2, 1))
        self.convs = nn.Sequential(conv_bn_relu(in_ch + skip_ch, out_ch), conv_bn_relu(out_ch, out_ch))

    def forward(self, x, skip):
        return self.convs(torch.cat((upsample_to(x, skip), self.gate(skip, x)), 1))


class PlainEncoder(nn.Module):
    """Two conv-BN-ReLU per level, max-pooling between; features finest first."""

    def __init__(self, in_ch, widths):
        super().__init__()
        self.out_channels = list(widths)
        chans = [in_ch, *widths]
        self.levels = nn.ModuleList(nn.Sequential(conv_bn_relu(a, b), conv_bn_relu(b, b))
                                    for a, b in zip(chans[:-1], chans[1:]))

    def forward(self, x):
        feats = []
        for i, level in enumerate(self.levels):
            x = level(F.max_pool2d(x, 2) if i else x)
            feats.append(x)
        return feats


class AttentionUNet(nn.Module):
    """U-Net decoder with attention-gated skips over `encoder` (a module returning features finest
    first, with an `out_channels` list); the deepest feature is the first gating signal."""

    def __init__(self, encoder, n_classes=1):
        super().__init__()
        self.encoder = encoder
        chans = list(encoder.out_channels)
        self.blocks = nn.ModuleList()
        x_ch = chans[-1]
        for skip_ch in reversed(chans[:-1]):
            out_ch = max(skip_ch // 2, 8) if skip_ch >= 16 else skip_ch
            self.blocks.append(GatedDecoderBlock(x_ch, skip_ch, out_ch))
            x_ch = out_ch
        self.head = nn.Conv2d(x_ch, n_classes, 1)

    def forward(self, x):
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            y = block(y, skip)
        return upsample_to(self.head(y), x)


@MODELS.register("attention_unet", imagenet=load_smp_imagenet)
def attention_unet(in_channels=3, num_classes=1):
    return AttentionUNet(smp_encoder("vgg16", in_channels), num_classes)


@MODELS.register("gated_unet")  # no ImageNet encoder: trained from scratch
def gated_unet(in_channels=3, num_classes=1):
    return AttentionUNet(PlainEncoder(in_channels, (8, 16, 32, 64, 128)), num_classes)
