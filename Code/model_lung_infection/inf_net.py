"""Inf-Net (Fan et al., IEEE TMI 2020), Section III-A and Fig. 2.

Data flow, for an input of H x W (multiples of 32):
  encoder -> f2 (H/4), f3 (H/8), f4 (H/16), f5 (H/32)
  edge attention:  f2 -> three conv layers -> edge features e (64 ch) -> edge map S_e
  RFB on f3, f4, f5 -> parallel partial decoder -> global map S_g (H/8)
  reverse attention, deepest first: R_i = (1 - sigmoid(S_{i+1} resized)) * f_i,
      concatenated with e resized, refined by convs, plus S_{i+1} -> S_i
  outputs (logits, all resized to H x W): S_g, S_5, S_4, S_3 (final), S_e

Module names follow the release so `Inf-Net-100.pth` / `Semi-Inf-Net-100.pth` load as they are.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoders import create_encoder, feature_taps
from .layers import ConvBN, ParallelPartialDecoder, ReceptiveFieldBlock, upsample_to
from .registry import MODELS


def reverse_attention(prior, feature):
    """Erase what the coarser map already found: weight features by 1 - sigmoid(prior)."""
    return (1 - torch.sigmoid(prior)) * feature


class Inf_Net(nn.Module):  # noqa: N801 -- the release's class name, which users import
    """Inf-Net. `forward(x)` returns logits `(lateral_map_5, lateral_map_4, lateral_map_3,
    lateral_map_2, lateral_edge)` = (S_g, S_5, S_4, S_3, S_e), each of x's height and width;
    `lateral_map_2` is the prediction.

    backbone: an encoder name from `encoders.ENCODERS` (or `timm:<name>`);
    pretrained: path of the encoder's ImageNet weights; without it the encoder is random.
    """

    def __init__(self, channel=32, n_class=1, backbone="res2net50_v1b_26w_4s", pretrained=None):
        super().__init__()
        if n_class != 1:
            # Reverse attention erases with one foreground map, as in the paper and release.
            raise ValueError(f"Inf_Net segments one foreground class (n_class=1), got n_class={n_class}")
        self.backbone = backbone
        # Attribute named `resnet` whatever the encoder: that is the release's checkpoint key prefix.
        self.resnet = create_encoder(backbone, pretrained=pretrained)
        self.taps, (c2, c3, c4, c5) = feature_taps(self.resnet)

        self.rfb2_1 = ReceptiveFieldBlock(c3, channel)
        self.rfb3_1 = ReceptiveFieldBlock(c4, channel)
        self.rfb4_1 = ReceptiveFieldBlock(c5, channel)
        self.ParDec = ParallelPartialDecoder(channel, n_class)

        # Reverse-attention branch on f5 (5x5 convs), then on f4 and f3 (3x3 convs);
        # each conv2 input adds the 64 edge-attention channels.
        self.ra4_conv1 = ConvBN(c5, 256, 1)
        self.ra4_conv2 = ConvBN(256 + 64, 256, 5, padding=2)
        self.ra4_conv3 = ConvBN(256, 256, 5, padding=2)
        self.ra4_conv4 = ConvBN(256, 256, 5, padding=2)
        self.ra4_conv5 = ConvBN(256, n_class, 1)
        self.ra3_conv1 = ConvBN(c4, 64, 1)
        self.ra3_conv2 = ConvBN(64 + 64, 64, 3, padding=1)
        self.ra3_conv3 = ConvBN(64, 64, 3, padding=1)
        self.ra3_conv4 = ConvBN(64, n_class, 3, padding=1)
        self.ra2_conv1 = ConvBN(c3, 64, 1)
        self.ra2_conv2 = ConvBN(64 + 64, 64, 3, padding=1)
        self.ra2_conv3 = ConvBN(64, 64, 3, padding=1)
        self.ra2_conv4 = ConvBN(64, n_class, 3, padding=1)

        # Edge attention on the low-level feature f2 (no activations between, as released).
        self.edge_conv1 = ConvBN(c2, 64, 1)
        self.edge_conv2 = ConvBN(64, 64, 3, padding=1)
        self.edge_conv3 = ConvBN(64, 64, 3, padding=1)
        self.edge_conv4 = ConvBN(64, n_class, 3, padding=1)

    def encode(self, x):
        return self.resnet.forward_intermediates(x, indices=self.taps, intermediates_only=True, stop_early=True)

    def forward(self, x):
        f2, f3, f4, f5 = self.encode(x)
        size = x.shape[-2:]

        edge_feat = self.edge_conv3(self.edge_conv2(self.edge_conv1(f2)))
        lateral_edge = upsample_to(self.edge_conv4(edge_feat), size)

        global_map = self.ParDec(self.rfb4_1(f5), self.rfb3_1(f4), self.rfb2_1(f3))
        lateral_map_5 = upsample_to(global_map, size)

        # Branch on f5: prior = S_g shrunk to f5's scale.
        prior = upsample_to(global_map, f5)
        x = torch.cat((self.ra4_conv1(reverse_attention(prior, f5)), upsample_to(edge_feat, f5)), 1)
        x = F.relu(self.ra4_conv2(x))
        x = F.relu(self.ra4_conv3(x))
        x = F.relu(self.ra4_conv4(x))
        s5 = self.ra4_conv5(x) + prior
        lateral_map_4 = upsample_to(s5, size)

        prior = upsample_to(s5, f4)
        x = torch.cat((self.ra3_conv1(reverse_attention(prior, f4)), upsample_to(edge_feat, f4)), 1)
        x = F.relu(self.ra3_conv2(x))
        x = F.relu(self.ra3_conv3(x))
        s4 = self.ra3_conv4(x) + prior
        lateral_map_3 = upsample_to(s4, size)

        prior = upsample_to(s4, f3)
        x = torch.cat((self.ra2_conv1(reverse_attention(prior, f3)), upsample_to(edge_feat, f3)), 1)
        x = F.relu(self.ra2_conv2(x))
        x = F.relu(self.ra2_conv3(x))
        s3 = self.ra2_conv4(x) + prior
        lateral_map_2 = upsample_to(s3, size)

        return lateral_map_5, lateral_map_4, lateral_map_3, lateral_map_2, lateral_edge


@MODELS.register("inf_net")
def inf_net(**kw):
    return Inf_Net(**kw)
