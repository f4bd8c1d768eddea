"""Parameter and FLOP counts of a registered model, measured with torch.utils.flop_counter.

    python -m Code.model_lung_infection.complexity --model inf_net --size 352

The paper's Params/FLOPs columns came from thop, which counts multiply-accumulates
(MACs = FLOPs / 2) and every parameter, including Inf-Net's unused ImageNet classifier.
"""
import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import create_model, list_models


def count_complexity(model, size=352, in_channels=3):
    """{'params', 'params_no_classifier', 'flops', 'macs'} for one forward pass of a 1 x C x size x size input."""
    params = sum(p.numel() for p in model.parameters())
    classifier = sum(p.numel() for n, p in model.named_parameters() if n.startswith("resnet.fc."))
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.zeros(1, in_channels, h, w)
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    flops = counter.get_total_flops()
    return {"params": params, "params_no_classifier": params - classifier, "flops": flops, "macs": flops // 2}


def si_units(n):
    """1234567 -> "1.235M" (the paper's Params / FLOPs style)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def report(name, c, size):
    return "\n".join([
        f"{name} at {size}x{size}:",
        f"  params                  {si_units(c['params'])}  (all weights, as thop counts them)",
        f"  params w/o classifier   {si_units(c['params_no_classifier'])}  (without the unused resnet.fc)",
        f"  MACs                    {si_units(c['macs'])}  (what the paper's 'FLOPs' column counts, via thop)",
        f"  FLOPs                   {si_units(c['flops'])}  (2 x MACs)",
        "  Counted by torch.utils.flop_counter: convolutions and matrix products only; thop adds",
        "  BN, pooling and interpolation, so the paper's MACs are slightly higher. The classifier",
        "  never runs, so MACs/FLOPs are the same with or without it.",
    ])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="inf_net", choices=list_models())
    p.add_argument("--backbone", default=None, help="encoder name (Inf-Net models only)")
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--in_channels", type=int, default=3)
    a = p.parse_args(argv)
    kw = {"backbone": a.backbone} if a.backbone else {}
    model = create_model(a.model, **kw)  # random weights: counting needs none
    name = a.model + (f" ({a.backbone})" if a.backbone else "")
    print(report(name, count_complexity(model, a.size, a.in_channels), a.size))


if __name__ == "__main__":
    main()
