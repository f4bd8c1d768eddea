"""Faster CPU inference for a trained model: fused Conv-BN, channels-last, optional torch.compile.

    fast = prepare_for_inference(model)          # a copy; `model` is left as it was
    with torch.inference_mode():
        outputs = fast(images)

Batch normalisation at inference is an affine map per channel, so it folds into the weights and
bias of the convolution in front of it (`torch.nn.utils.fusion.fuse_conv_bn_eval`). Folded are
every `ConvBN` of the Inf-Net heads and every conv -> BN pair of the encoder (found by running
the model once on a small probe and checking that each BN reads exactly one conv's output).
The folded model is checked against the original on that probe; a pair that turns out to be
unsafe (a conv whose output is also read elsewhere) makes it fall back to the heads' `ConvBN`s,
which are conv -> BN by construction. Outputs match the unfused fp32 model to ~1e-5 (the golden
tolerance is 1e-4): only the rounding of the folded weights differs.
"""
import contextlib
import copy
import time
import warnings

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .layers import ConvBN
from .runtime import cpu_has_native_bf16  # noqa: F401 -- exported here too

__all__ = ["prepare_for_inference", "fuse_conv_bn", "precast_convolutions", "count_batchnorms",
           "cpu_has_native_bf16"]

_BN = nn.BatchNorm2d  # exactly: subclasses such as timm's BatchNormAct2d also apply an activation


def count_batchnorms(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _set_submodule(root, name, new):
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[attr] = new  # also works for ModuleList / Sequential entries ("0", "1", ...)


def _foldable(conv, bn):
    return (type(conv) is nn.Conv2d and type(bn) is _BN and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


def _head_pairs(model):
    """(conv name, bn name) of every ConvBN: conv -> bn by construction."""
    return [(f"{n}.conv" if n else "conv", f"{n}.bn" if n else "bn")
            for n, m in model.named_modules() if isinstance(m, ConvBN) and _foldable(m.conv, m.bn)]


def _traced_pairs(model, probe):
    """([(conv name, bn name)] where, on `probe`, the BN's input is the very tensor the conv returned
    and each of them ran once; the model's outputs on `probe`)."""
    names = {m: n for n, m in model.named_modules()}
    conv_out, calls, bn_in, hooks = {}, {}, {}, []

    def conv_hook(mod, args, out):
        calls[mod] = calls.get(mod, 0) + 1
        conv_out[id(out)] = (mod, out)  # keep `out` alive so its id stays unique

    def bn_hook(mod, args):
        calls[mod] = calls.get(mod, 0) + 1
        bn_in[mod] = id(args[0])

    for m in model.modules():
        if type(m) is nn.Conv2d:
            hooks.append(m.register_forward_hook(conv_hook))
        elif type(m) is _BN:
            hooks.append(m.register_forward_pre_hook(bn_hook))
    try:
        with torch.no_grad():
            out = model(probe)
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for bn, key in bn_in.items():
        conv = conv_out.get(key, (None,))[0]
        if conv is not None and calls[conv] == 1 and calls[bn] == 1 and _foldable(conv, bn):
            pairs.append((names[conv], names[bn]))
    return pairs, out


def _folded(conv, bn):
    """A new conv whose weights fold in `bn` (torch's fuse_conv_bn_weights); it shares nothing that changes
    with `conv`, which is kept as it is (a shallow copy: deep-copying 157 convs took a fifth of the set-up)."""
    fused = copy.copy(conv)
    fused._parameters = dict(conv._parameters)  # own dict: setting its weights leaves `conv`'s alone
    fused.weight, fused.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                    bn.eps, bn.weight, bn.bias)
    return fused


def _fold(model, pairs):
    """Replace each conv by its BN-folded copy and the BN by Identity; returns the replaced modules."""
    replaced = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        _set_submodule(model, conv_name, _folded(conv, bn))  # a new conv: `conv` is kept as is
        _set_submodule(model, bn_name, nn.Identity())
        replaced += [(conv_name, conv), (bn_name, bn)]
    return replaced


def _tensors(out):
    if out is None:  # maps of switched-off Inf-Net components
        return []
    return [out] if torch.is_tensor(out) else [t for o in out for t in _tensors(o)]


def _max_abs(out):
    return max(t.float().abs().max().item() for t in _tensors(out))


def _max_abs_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(_tensors(a), _tensors(b)))


@contextlib.contextmanager
def tf32_off():
    """fp32 convolutions and matmuls in full fp32 on CUDA for the fusion check, the flags restored after.
    TF32 (cuDNN's default for fp32 convolutions on Ampere and newer GPUs) rounds inputs to 10 mantissa bits,
    ~1e-3 relative, which would hide whether folding kept the outputs (it changes them by ~1e-6) and make
    every check fail. No effect on CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def fuse_conv_bn(model, probe=None, encoder=True, atol=1e-4, rtol=1e-4):
    """Fold BatchNorm into the preceding convolution, IN PLACE (eval mode). Returns `model`.

    encoder: also fold the conv -> BN pairs found by tracing a forward pass on `probe`
    (default: one 3 x 32 x 32 random image, the smallest every encoder takes); the result is
    checked against the unfused model on the probe and, if it differs by more than
    atol + rtol * (largest output magnitude) (folding only rounds differently, ~1e-6 relative),
    only the `ConvBN` modules are folded. The check runs with TF32 off (`tf32_off`).
    """
    model.eval()
    pairs = _head_pairs(model)
    if not encoder:
        _fold(model, pairs)
        return model
    if probe is None:
        probe = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    probe = probe.to(next(model.parameters()).device)
    with tf32_off():
        traced, expected = _traced_pairs(model, probe)
        traced = [p for p in traced if p not in pairs]
        _fold(model, pairs)
        replaced = _fold(model, traced)
        with torch.no_grad():
            err = _max_abs_diff(model(probe), expected)
    if err > atol + rtol * _max_abs(expected):
        warnings.warn(f"fusing the encoder's conv/BN pairs changed the outputs by {err:.2e}: "
                      "folding only the ConvBN modules")
        for name, module in replaced:
            _set_submodule(model, name, module)
    return model


def precast_convolutions(model, dtype):
    """Hold every convolution's weight and bias in `dtype`, IN PLACE: the dtype the model will always run under
    autocast in, which otherwise casts them anew at every call (about 5% of a bf16 forward pass of Inf-Net on a
    2-core CPU). The outputs stay bit for bit the same: autocast casts a convolution's input, weight and bias to
    its dtype anyway (a no-op for those already in it); only when changes. Without autocast such a model fails
    (an fp32 input meets bf16 weights). Returns `model`."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            m.to(dtype)
    return model


def prepare_for_inference(model, channels_last=True, fuse_bn=True, compile=False, inplace=False,
                          probe=None, verbose=False, autocast_dtype=None):
    """An eval-mode model for fast inference with the same outputs (fp32: within ~1e-5).

    channels_last: NHWC weights (oneDNN's preferred layout; inputs are converted by the first conv,
        or pass them channels-last yourself).
    fuse_bn: fold every BatchNorm that follows a convolution into it (see `fuse_conv_bn`).
    compile: wrap in `torch.compile` with inductor's weight freezing (constant-folds the weights,
        prepacks them for oneDNN and fuses the element-wise ops). Needs a C compiler on CPU. The
        first call compiles (about 100 s on a loaded 2-core machine; again for bf16 autocast and for
        each new input shape), so it pays off only over many slices. Frozen means later changes
        to the weights are not seen: prepare again after loading other weights.
    inplace: modify and return `model` itself; by default a deep copy is prepared and `model`
        (e.g. one still being trained) is left untouched.
    autocast_dtype: the dtype of the autocast every call will run under (None: none): the convolutions' weights
        are cast to it once here (`precast_convolutions`), the same outputs.
    Parameters of the result have requires_grad=False: it is for inference only.
    """
    start = time.perf_counter()
    if not inplace:
        model = copy.deepcopy(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if fuse_bn:
        model = fuse_conv_bn(model, probe=probe)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if autocast_dtype is not None:
        precast_convolutions(model, autocast_dtype)
    if compile:
        # Freezing applies when called under torch.inference_mode()/no_grad(), as for inference.
        model = torch.compile(model, dynamic=False, options={"freezing": True})
    if verbose:
        print(f"[fast_inference] prepared in {time.perf_counter() - start:.2f} s "
              f"(fuse_bn={fuse_bn}, channels_last={channels_last}, compile={compile}; "
              f"{count_batchnorms(model)} BatchNorm left)")
    return model
