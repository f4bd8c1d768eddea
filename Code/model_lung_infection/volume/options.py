"""The volume stage's command-line arguments (their values are configs.TestConfig's volume-only fields); light, for
`--help`."""
import argparse
from pathlib import Path

from ..configs import THRESHOLD
from ..errors import OptionError
from .io import is_volume_file
from .window import DEFAULT_WINDOW, parse_window


def threshold_value(value):
    """argparse type: a probability threshold, 0 < t <= 1 (masks are probabilities >= t)."""
    try:
        t = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability 0 < t <= 1, got '{value}'") from None
    if not 0 < t <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability 0 < t <= 1 (masks are probabilities >= t; an 8-bit "
                                         f"--mask is divided by 255 first), got '{value}'")
    return t


def check_mask_file(mask):
    """A --mask that is missing, a folder or no volume file: one line, before any scan is read."""
    if mask and not is_volume_file(mask):
        what = "no such file" if not Path(mask).exists() else "not a NIfTI, MetaImage or NRRD file"
        raise OptionError(f"--mask {mask}: {what}; give the infection mask as a NIfTI (.nii, .nii.gz), MetaImage "
                          f"(.mha, .mhd) or NRRD file aligned with the scan (e.g. an infection.nii.gz this stage "
                          f"wrote for it)")


def add_volume_args(parser):
    """The options only volumes use (MyTest_LungInf.py already has --pth_path, --data_path, --save_path,
    --testsize, --batchsize, --backbone, --device, --amp, --fuse_bn, --channels_last, --progress)."""
    from ..cli import add_bool
    g = parser.add_argument_group("CT volumes (NIfTI / MetaImage / NRRD / DICOM --data_path)")
    g.add_argument("--mask", default=None, help="quantify this infection mask (NIfTI, MetaImage or NRRD, aligned "
                                                "with the scan); no network")
    g.add_argument("--multiclass_pth", default=None, help="multi-class network: adds GGO and consolidation")
    g.add_argument("--window", type=parse_window, default=None,
                   help=f"lung window LOW,HIGH in HU (default {DEFAULT_WINDOW[0]:g},{DEFAULT_WINDOW[1]:g}, measured "
                        f"on the training slices; docs/volumes.md)")
    g.add_argument("--threshold", type=threshold_value, default=THRESHOLD,
                   help="infection where the probability >= this (0 < t <= 1); also for --mask maps")
    g.add_argument("--series", default=None, help="DICOM SeriesInstanceUID to read when a folder holds several")
    add_bool(g, "--save_probabilities", False, "also write probability.nii.gz (float32)")
    add_bool(g, "--crop", True, "crop around the lungs and skip slices without lung (False: whole slices)")
    return g
