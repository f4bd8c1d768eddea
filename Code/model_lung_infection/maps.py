"""How a probability map is written: as it is (a true probability) or stretched as the release did, in 8 bits.

No PyTorch import: MyTest_LungInf.py's parser takes its --normalize choices from here.
"""
import numpy as np


def minmax(p):
    """The release's per-slice stretch to [0, 1]: (p - min) / (max - min + 1e-8)."""
    return (p - p.min()) / (p.max() - p.min() + 1e-8)


# How a probability map is written: as it is (a true probability), or stretched as released.
NORMALIZATIONS = {"none": lambda p: p, "minmax": minmax}


def _normalizer(normalize):
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    return NORMALIZATIONS[normalize]


def to_uint8(prob):
    return np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)
