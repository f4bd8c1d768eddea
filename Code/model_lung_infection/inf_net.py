"""Inf-Net (Fan et al., IEEE TMI 2020), Section III-A and Fig. 2.

Data flow, for an input of H x W (multiples of 32):
  encoder -> f2 (H/4), f3 (H/8), f4 (H/16), f5 (H/32)
  edge attention:  f2 -> three conv layers -> edge features e (64 ch) -> edge map S_e
  RFB on f3, f4, f5 -> parallel partial decoder -> global map S_g (H/8)
  reverse attention, deepest first: R_i = (1 - sigmoid(S_{i+1} resized)) * f_i,
      concatenated with e resized, refined by convs, plus S_{i+1} -> S_i
  outputs (logits, all resized to H x W): S_g, S_5, S_4, S_3 (final), S_e

Module names follow the release so `Inf-Net-100.pth` / `Semi-Inf-Net-100.pth` load as they are.

Ablation switches (paper Table IV); what the network is with a component off:
  partial_decoder=False: no RFBs / PPD; S_g is a 1x1 convolution of f5 (the backbone's own head).
  reverse_attention=False: no reverse-attention branches; S_5 and S_4 are absent (None) and the
      prediction is S_g, refined by the edge features when edge attention is on (below); with
      neither, S_g is returned once, as the prediction.
  edge_attention=False: no edge branch, no S_e (None), and the branches' conv2 take only their
      erased features (no +64 edge channels).
  edge attention without reverse attention: the prediction is S_g plus a 3x3 convolution of
      [edge features, S_g] at f2's scale (edge_fuse), the simplest use of the edge features that
      keeps the paper's "EA feeds the prediction" without its RA branches.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoders import create_encoder, feature_taps, load_pretrained
from .layers import ConvBN, ParallelPartialDecoder, ReceptiveFieldBlock, resize_to_each, upsample_to
from .registry import MODELS


def reverse_attention(prior, feature):
    """Erase what the coarser map already found: weight features by 1 - sigmoid(prior)."""
    return (1 - torch.sigmoid(prior)) * feature


class Inf_Net(nn.Module):  # noqa: N801 -- the release's class name, which users import
    """Inf-Net. `forward(x)` returns logits `(lateral_map_5, lateral_map_4, lateral_map_3,
    lateral_map_2, lateral_edge)` = (S_g, S_5, S_4, S_3, S_e), each of x's height and width;
    `lateral_map_2` is the prediction. Maps of components switched off are None (module docstring).

    backbone: an encoder name from `encoders.ENCODERS` (or `timm:<name>`);
    pretrained: path of the encoder's ImageNet weights, or "imagenet" (found: encoders.imagenet_weights);
        without it the encoder is random.
    """

    def __init__(self, channel=32, n_class=1, backbone="res2net50_v1b_26w_4s", pretrained=None,
                 edge_attention=True, partial_decoder=True, reverse_attention=True):
        super().__init__()
        if n_class != 1:
            # Reverse attention erases with one foreground map, as in the paper and release.
            raise ValueError(f"Inf_Net segments one foreground class (n_class=1), got n_class={n_class}")
        self.backbone = backbone
        # Attribute named `resnet` whatever the encoder: that is the release's checkpoint key prefix.
        self.resnet = create_encoder(backbone, pretrained=pretrained)
        self.taps, (c2, c3, c4, c5) = feature_taps(self.resnet)
        self.edge_attention, self.partial_decoder, self.reverse_attention = \
            edge_attention, partial_decoder, reverse_attention

        if partial_decoder:
            self.rfb2_1 = ReceptiveFieldBlock(c3, channel)
            self.rfb3_1 = ReceptiveFieldBlock(c4, channel)
            self.rfb4_1 = ReceptiveFieldBlock(c5, channel)
            self.ParDec = ParallelPartialDecoder(channel, n_class)
        else:
            self.backbone_head = nn.Conv2d(c5, n_class, 1)

        edge_ch = 64 if edge_attention else 0
        if reverse_attention:
            # Branch on f5 (5x5 convs), then on f4 and f3 (3x3 convs); conv2 adds the edge channels.
            self.ra4_conv1 = ConvBN(c5, 256, 1)
            self.ra4_conv2 = ConvBN(256 + edge_ch, 256, 5, padding=2)
            self.ra4_conv3 = ConvBN(256, 256, 5, padding=2)
            self.ra4_conv4 = ConvBN(256, 256, 5, padding=2)
            self.ra4_conv5 = ConvBN(256, n_class, 1)
            self.ra3_conv1 = ConvBN(c4, 64, 1)
            self.ra3_conv2 = ConvBN(64 + edge_ch, 64, 3, padding=1)
            self.ra3_conv3 = ConvBN(64, 64, 3, padding=1)
            self.ra3_conv4 = ConvBN(64, n_class, 3, padding=1)
            self.ra2_conv1 = ConvBN(c3, 64, 1)
            self.ra2_conv2 = ConvBN(64 + edge_ch, 64, 3, padding=1)
            self.ra2_conv3 = ConvBN(64, 64, 3, padding=1)
            self.ra2_conv4 = ConvBN(64, n_class, 3, padding=1)

        if edge_attention:
            # Edge attention on the low-level feature f2 (no activations between, as released).
            self.edge_conv1 = ConvBN(c2, 64, 1)
            self.edge_conv2 = ConvBN(64, 64, 3, padding=1)
            self.edge_conv3 = ConvBN(64, 64, 3, padding=1)
            self.edge_conv4 = ConvBN(64, n_class, 3, padding=1)
            if not reverse_attention:
                self.edge_fuse = ConvBN(64 + n_class, n_class, 3, padding=1)

    def encode(self, x):
        return self.resnet.forward_intermediates(x, indices=self.taps, intermediates_only=True, stop_early=True)

    def forward(self, x):
        f2, f3, f4, f5 = self.encode(x)
        size = x.shape[-2:]

        edge_feat = lateral_edge = None
        if self.edge_attention:
            edge_feat = self.edge_conv3(self.edge_conv2(self.edge_conv1(f2)))
            lateral_edge = upsample_to(self.edge_conv4(edge_feat), size)

        if self.partial_decoder:
            global_map = self.ParDec(self.rfb4_1(f5), self.rfb3_1(f4), self.rfb2_1(f3))
        else:
            global_map = self.backbone_head(f5)
        lateral_map_5 = upsample_to(global_map, size)

        if not self.reverse_attention:
            final = global_map
            if self.edge_attention:
                final = upsample_to(global_map, f2)
                final = final + self.edge_fuse(torch.cat((edge_feat, final), 1))
            # Backbone-only heads give one map: supervise it once, as the prediction.
            return (lateral_map_5 if self.edge_attention else None), None, None, upsample_to(final, size), lateral_edge

        # The edge features at each branch's scale (resized together: one gradient buffer in training).
        edges = dict(zip((5, 4, 3), resize_to_each(edge_feat, (f5, f4, f3)))) if edge_feat is not None else {}

        def with_edges(erased, level):
            return torch.cat((erased, edges[level]), 1) if edges else erased

        # Branch on f5: prior = S_g shrunk to f5's scale.
        prior = upsample_to(global_map, f5)
        x = with_edges(self.ra4_conv1(reverse_attention(prior, f5)), 5)
        x = F.relu(self.ra4_conv2(x))
        x = F.relu(self.ra4_conv3(x))
        x = F.relu(self.ra4_conv4(x))
        s5 = self.ra4_conv5(x) + prior
        lateral_map_4 = upsample_to(s5, size)

        prior = upsample_to(s5, f4)
        x = with_edges(self.ra3_conv1(reverse_attention(prior, f4)), 4)
        x = F.relu(self.ra3_conv2(x))
        x = F.relu(self.ra3_conv3(x))
        s4 = self.ra3_conv4(x) + prior
        lateral_map_3 = upsample_to(s4, size)

        prior = upsample_to(s4, f3)
        x = with_edges(self.ra2_conv1(reverse_attention(prior, f3)), 3)
        x = F.relu(self.ra2_conv2(x))
        x = F.relu(self.ra2_conv3(x))
        s3 = self.ra2_conv4(x) + prior
        lateral_map_2 = upsample_to(s3, size)

        return lateral_map_5, lateral_map_4, lateral_map_3, lateral_map_2, lateral_edge


def _load_imagenet(model, source):
    load_pretrained(model.resnet, source, encoder=model.backbone)


@MODELS.register("inf_net", imagenet=_load_imagenet, finds_imagenet=True)
def inf_net(in_channels=3, num_classes=1, **options):
    """Inf-Net; options: channel, backbone, edge_attention, partial_decoder, reverse_attention."""
    if in_channels != 3:
        raise ValueError(f"inf_net takes 3-channel slices (the encoder's layout), got in_channels={in_channels}")
    return Inf_Net(n_class=num_classes, **options)
