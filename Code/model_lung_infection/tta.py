"""Test-time augmentation (MyTest_LungInf.py --tta): a model's maps averaged over views of its input.

    model = with_tta(model, "hflip")   # the slice and its left-right mirror

Each view's output maps are mapped back onto the slice's own (flipped back, or resized bilinearly to the size of
the slice's map) and the logits of all views averaged, so the wrapped model returns what the model returns (one
map, or Inf-Net's tuple of maps) and every stage that turns logits into probabilities (infer.probabilities) works
unchanged. The views are maps.TTA_VIEWS: "hflip" costs twice the network time, "flips" (left-right, up-down,
both) four times, "scales" (the slice at about 0.82 and 1.18 times --testsize too) three times. Off by default:
the paper tests each slice once.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .configs import scaled_size
from .errors import OptionError
from .maps import TTA_VIEWS


class Flip:
    """The slice mirrored along `dims`; its maps mirrored back."""

    def __init__(self, dims):
        self.dims = tuple(dims)

    def apply(self, x):
        return x.flip(self.dims)

    def undo(self, out, size):
        return out.flip(self.dims)


class Scale:
    """The slice resized by `factor` (each side rounded to a multiple of 32, as training's scales); its maps resized
    back to the slice's."""

    def __init__(self, factor):
        self.factor = factor

    def apply(self, x):
        size = [max(32, scaled_size(side, self.factor)) for side in x.shape[-2:]]
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=self.factor < 1)

    def undo(self, out, size):
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)


VIEW_KINDS = {"flip": Flip, "scale": Scale}


class AveragedViews(nn.Module):
    """`model` on its input and on each of `views` of it (Flip, Scale), the logits of each output averaged in float32
    (under autocast the maps may be bf16)."""

    def __init__(self, model, views):
        super().__init__()
        self.model, self.views = model, list(views)

    def forward(self, x):
        own = self.model(x)
        single = isinstance(own, torch.Tensor)
        own = [own] if single else list(own)
        sums = [o.float() for o in own]
        for view in self.views:
            outputs = self.model(view.apply(x))
            for total, out, ref in zip(sums, [outputs] if single else outputs, own):
                total += view.undo(out, ref.shape[-2:]).float()
        means = [total / (1 + len(self.views)) for total in sums]
        return means[0] if single else tuple(means)


def with_tta(model, name="none"):
    """`model` itself for "none", else wrapped to average the maps of the views TTA_VIEWS[name]."""
    if name not in TTA_VIEWS:
        raise OptionError(f"--tta {name}: choose one of {', '.join(TTA_VIEWS)}")
    views = [VIEW_KINDS[kind](arg) for kind, arg in TTA_VIEWS[name]]
    return AveragedViews(model, views) if views else model
