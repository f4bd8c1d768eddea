"""Building blocks of Inf-Net, with the release's module names so checkpoints load.

Attribute names (`conv`, `bn`, `branch0`, `conv_cat`, ...) are part of the state-dict
format of the released `Inf-Net-100.pth`; do not rename them.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm, *without* activation.

    The release calls this `BasicConv2d`; it builds a ReLU but never applies it,
    and the callers add `F.relu` only where they want one. We keep that exactly.
    """

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x):
        return self.bn(self.conv(x))


def _rfb_branch(in_ch, out_ch, k):
    """1x1 reduce, then 1xk and kx1 convs, then a 3x3 conv dilated by k."""
    p = k // 2
    return nn.Sequential(
        ConvBN(in_ch, out_ch, 1),
        ConvBN(out_ch, out_ch, (1, k), padding=(0, p)),
        ConvBN(out_ch, out_ch, (k, 1), padding=(p, 0)),
        ConvBN(out_ch, out_ch, 3, padding=k, dilation=k),
    )


class ReceptiveFieldBlock(nn.Module):
    """The paper's modified RFB: four branches of growing receptive field (1, 3, 5, 7),
    concatenated, fused by a 3x3 conv and added to a 1x1 shortcut, then ReLU."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.branch0 = nn.Sequential(ConvBN(in_ch, out_ch, 1))
        self.branch1 = _rfb_branch(in_ch, out_ch, 3)
        self.branch2 = _rfb_branch(in_ch, out_ch, 5)
        self.branch3 = _rfb_branch(in_ch, out_ch, 7)
        self.conv_cat = ConvBN(4 * out_ch, out_ch, 3, padding=1)
        self.conv_res = ConvBN(in_ch, out_ch, 1)

    def forward(self, x):
        branches = [self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)]
        return F.relu(self.conv_cat(torch.cat(branches, 1)) + self.conv_res(x))


def upsample_to(x, ref, align_corners=False):
    """Bilinear resize of `x` to the spatial size of `ref` (a tensor) or to `ref` (a size)."""
    size = ref.shape[-2:] if torch.is_tensor(ref) else ref
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _shrink_taps(factor):
    """(offset, weight) of the pixels in each block of `factor` that an align_corners=False bilinear
    shrink by that integer factor reads: the two middle ones, or the centre one for odd factors."""
    if factor % 2:
        return ((factor // 2, 1.0),)
    return ((factor // 2 - 1, 0.5), (factor // 2, 0.5))


def _shrink(x, kh, kw):
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # as interpolate's kernels
    out = None
    for r, wr in _shrink_taps(kh):
        for s, ws in _shrink_taps(kw):
            term = x[..., r::kh, s::kw].to(acc) * (wr * ws)
            out = term if out is None else out + term
    return out.to(x.dtype)


class _BilinearShrinks(torch.autograd.Function):
    """`x` shrunk by integer factors ((kh, kw) pairs), one output each, in one autograd node.

    Separate `F.interpolate`s each zero a full-size gradient and, fed by `torch.cat`'s gradient
    slices, convert it between memory formats twice: for Inf-Net's edge features (64 channels at
    stride 4, read at three scales) about a tenth of a CPU training step. Here one buffer, in x's
    memory format, takes every scale's gradient.
    """

    @staticmethod
    def forward(ctx, x, *factors):
        ctx.factors, ctx.shape = factors, x.shape
        ctx.format = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                      and not x.is_contiguous() else torch.contiguous_format)
        return tuple(_shrink(x, kh, kw) for kh, kw in factors)

    @staticmethod
    def backward(ctx, *grads):
        given = [g for g in grads if g is not None]
        grad = torch.empty(ctx.shape, dtype=given[0].dtype, device=given[0].device,
                           memory_format=ctx.format).zero_()
        for (kh, kw), g in zip(ctx.factors, grads):
            if g is None:
                continue
            for r, wr in _shrink_taps(kh):
                for s, ws in _shrink_taps(kw):
                    grad[..., r::kh, s::kw].add_(g, alpha=wr * ws)
        return (grad,) + (None,) * len(ctx.factors)


def resize_to_each(x, refs):
    """[upsample_to(x, ref) for ref in refs], with the gradients of the shrinks by whole factors
    gathered in one node when autograd records them (`_BilinearShrinks`); equal up to rounding."""
    sizes = [tuple(r.shape[-2:]) if torch.is_tensor(r) else tuple(r) for r in refs]
    h, w = x.shape[-2:]
    whole = list(dict.fromkeys(
        (sh, sw) for sh, sw in sizes
        if (sh, sw) != (h, w) and 0 < sh <= h and 0 < sw <= w and h % sh == 0 and w % sw == 0))
    shrunk = {}
    if whole and x.requires_grad and torch.is_grad_enabled():
        shrunk = dict(zip(whole, _BilinearShrinks.apply(x, *[(h // sh, w // sw) for sh, sw in whole])))
    return [shrunk[s] if s in shrunk else upsample_to(x, s) for s in sizes]


class ParallelPartialDecoder(nn.Module):
    """The paper's parallel partial decoder (PPD): aggregates the three high-level
    features (deepest first) into the coarse global map S_g at the shallowest one's scale.

    Up-sampling here uses align_corners=True, as released (the heads use False).
    """

    def __init__(self, channel, n_class=1):
        super().__init__()
        c = channel
        self.conv_upsample1 = ConvBN(c, c, 3, padding=1)
        self.conv_upsample2 = ConvBN(c, c, 3, padding=1)
        self.conv_upsample3 = ConvBN(c, c, 3, padding=1)
        self.conv_upsample4 = ConvBN(c, c, 3, padding=1)
        self.conv_upsample5 = ConvBN(2 * c, 2 * c, 3, padding=1)
        self.conv_concat2 = ConvBN(2 * c, 2 * c, 3, padding=1)
        self.conv_concat3 = ConvBN(3 * c, 3 * c, 3, padding=1)
        self.conv4 = ConvBN(3 * c, 3 * c, 3, padding=1)
        self.conv5 = nn.Conv2d(3 * c, n_class, 1)

    def forward(self, f_deep, f_mid, f_shallow):
        up = lambda x, ref: upsample_to(x, ref, align_corners=True)  # noqa: E731
        deep_to_mid = up(f_deep, f_mid)
        deep_to_shallow = up(deep_to_mid, f_shallow)
        mid = self.conv_upsample1(deep_to_mid) * f_mid
        shallow = self.conv_upsample2(deep_to_shallow) * self.conv_upsample3(up(f_mid, f_shallow)) * f_shallow
        mid = self.conv_concat2(torch.cat((mid, self.conv_upsample4(deep_to_mid)), 1))
        shallow = self.conv_concat3(torch.cat((shallow, self.conv_upsample5(up(mid, f_shallow))), 1))
        return self.conv5(self.conv4(shallow))
