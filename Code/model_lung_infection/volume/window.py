"""Hounsfield units -> the 8-bit gray levels the network was trained on (a lung window).

DEFAULT_WINDOW was measured on the doctor-labelled training slices (bench/measure_window.py; how and
why in docs/volumes.md): lung parenchyma (-850 HU) sits at gray 55 and soft tissue (+40 HU) at
gray 217 there, the line through them gives -1152..249 HU, rounded to -1150..250 (width 1400,
level -450, a common lung window). The 1600 pseudo-label slices mix two exports: coronacases
(-1020..1682, a nearly full-range window) and radiopaedia (about -1264..40); `--window LOW,HIGH` takes
any other.
"""
import argparse

import numpy as np

DEFAULT_WINDOW = (-1150.0, 250.0)


def parse_window(text):
    """'LOW,HIGH' (HU) -> (low, high); argparse type."""
    try:
        low, high = (float(v) for v in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU (e.g. -1150,250), got '{text}'") from None
    if not high > low:
        raise argparse.ArgumentTypeError(f"the window's HIGH must exceed LOW, got '{text}'")
    return low, high


def is_already_gray(data):
    """True for volumes stored as 0..255 gray levels rather than HU (some public sets are): no
    negative values and nothing above 255. CT in HU always holds air at about -1000 (or padding
    below it), so a HU volume never passes."""
    lo, hi = float(data.min()), float(data.max())
    return lo >= 0 and hi <= 255 and hi > 1


# A 0..255 volume of whole numbers with at most this many distinct values is a label map (CIP's lungs 1/2,
# TotalSegmentator's organs 1..117), not a scan: 8-bit gray CT holds hundreds of levels.
LABEL_LEVELS_MAX = 64


def not_a_scan(data):
    """What `data` is when it is a mask or label map rather than a scan (HU, or 0..255 gray), else None:
    values within 0..1 (a mask, a probability map, or a scan normalised to 0..1, none of them HU), or whole
    numbers within 0..255 taking at most LABEL_LEVELS_MAX values. Read as a scan, such a volume finds no lungs
    and reports 0% behind a warning; a folder holding scans beside their labels would mix both in its table."""
    lo, hi = float(data.min()), float(data.max())
    if lo < 0 or hi > 255:
        return None
    if hi <= 1:
        return f"values {lo:g}..{hi:g}: a mask, a probability map or a scan normalised to 0..1"
    gray = data.astype(np.uint8)
    if not np.array_equal(gray, data):  # fractions: not labels
        return None
    def levels(a):
        return np.count_nonzero(np.bincount(a.ravel(), minlength=256))
    # every 4th row and column first (16x faster): a gray scan keeps hundreds of levels there
    if levels(gray[::4, ::4]) > LABEL_LEVELS_MAX:
        return None
    found = levels(gray)
    return None if found > LABEL_LEVELS_MAX else f"{found} whole values {lo:g}..{hi:g}: a label map"


def to_gray(hu, window=DEFAULT_WINDOW):
    """uint8 gray levels: LOW -> 0, HIGH -> 255, linear between, clipped outside."""
    low, high = window
    scaled = (np.asarray(hu, np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def gray_volume(data, window=DEFAULT_WINDOW, already_gray=False):
    """The volume as uint8 gray: windowed from HU, or rounded as is when already 0..255."""
    if already_gray:
        return np.clip(np.rint(data), 0, 255).astype(np.uint8)
    return to_gray(data, window)
