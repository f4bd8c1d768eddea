"""How a probability map is written: as it is (a true probability) or stretched as the release did, in 8 bits.

No PyTorch import: MyTest_LungInf.py's parser takes its --normalize and --tta choices from here.
"""
import numpy as np


def minmax(p):
    """The release's per-slice stretch to [0, 1]: (p - min) / (max - min + 1e-8)."""
    return (p - p.min()) / (p.max() - p.min() + 1e-8)


# How a probability map is written: as it is (a true probability), or stretched as released.
NORMALIZATIONS = {"none": lambda p: p, "minmax": minmax}


# Test-time augmentation (--tta): the views of each slice whose maps are averaged with the slice's own (tta.py):
# ("flip", dims of (N, C, H, W) reversed) or ("scale", side length's factor, rounded to a multiple of 32).
TTA_VIEWS = {"none": (),
             "hflip": (("flip", (3,)),),
             "flips": (("flip", (3,)), ("flip", (2,)), ("flip", (2, 3))),
             "scales": (("scale", 0.82), ("scale", 1.18))}  # 288 and 416 px about a --testsize of 352


def _normalizer(normalize):
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    return NORMALIZATIONS[normalize]


def to_uint8(prob):
    return np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)
