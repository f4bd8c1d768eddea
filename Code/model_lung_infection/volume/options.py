"""The volume stage's options (VolumeConfig) and its command-line arguments; light, for `--help`."""
import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import OptionError
from .io import is_nifti
from .window import DEFAULT_WINDOW, parse_window

THRESHOLD = 0.5
# Options only the volume stage reads, with their defaults: given on a folder of slices they would do
# nothing, so the run refuses them (check_slice_options).
VOLUME_ONLY = {"mask": None, "multiclass_pth": None, "window": None, "threshold": THRESHOLD, "series": None,
               "save_probabilities": False, "crop": True}


@dataclass
class VolumeConfig:
    data_path: str
    save_path: str = None
    pth_path: str = None
    mask: str = None
    multiclass_pth: str = None
    window: tuple = None          # (low, high) HU; None: DEFAULT_WINDOW
    threshold: float = THRESHOLD
    series: str = None
    save_probabilities: bool = False
    crop: bool = True             # False: whole slices, every slice (the 2D path's view, for comparisons)
    testsize: int = 352
    batchsize: int = 8
    backbone: str = None
    device: str = "auto"
    amp: bool = None
    fuse_bn: bool = True
    channels_last: bool = True
    progress: bool = True
    overwrite: bool = False       # delete the results of another run in save_path first (output_folder.py)

    @classmethod
    def from_any(cls, source=None, **overrides):
        """From an argparse Namespace (the script's), a dict or keywords; unknown names are ignored."""
        values = vars(source) if isinstance(source, argparse.Namespace) else dict(source or {})
        values.update(overrides)
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in values.items() if k in names and v is not None})
        if isinstance(cfg.window, str):
            cfg.window = parse_window(cfg.window)
        return cfg


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


def check_config(cfg):
    """Refuse options the run would ignore or cannot honour (one line)."""
    try:
        threshold = float(cfg.threshold)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0 < threshold <= 1:
        raise OptionError(f"--threshold {cfg.threshold}: expected a probability 0 < t <= 1 (masks are probabilities "
                          f">= t; an 8-bit --mask is divided by 255 first)")
    if cfg.mask:
        ignored = [o for o, on in (("--multiclass_pth", cfg.multiclass_pth), ("--save_probabilities",
                                                                              cfg.save_probabilities)) if on]
        if ignored:
            raise OptionError(f"{' and '.join(ignored)} need the network, and --mask quantifies a given mask "
                              f"without it: drop {' and '.join(ignored)}, or --mask to run the network")


def check_mask_file(mask):
    """A --mask that is missing, a folder or not NIfTI: one line, before any scan is read."""
    if mask and not is_nifti(mask):
        what = "no such file" if not Path(mask).exists() else "not a NIfTI file (.nii, .nii.gz)"
        raise OptionError(f"--mask {mask}: {what}; give the infection mask as a NIfTI file aligned with the scan "
                          f"(e.g. an infection.nii.gz this stage wrote for it)")


def check_slice_options(args):
    """A folder of 2D slices: refuse the volume-only options given (they would be silently ignored)."""
    given = [f"--{k}" for k, default in VOLUME_ONLY.items() if getattr(args, k, default) != default]
    if given:
        raise OptionError(f"{', '.join(given)}: option(s) of CT volumes, and --data_path {args.data_path} is a "
                          f"folder of 2D slices (no NIfTI or DICOM); drop them, or give a CT volume")


def add_volume_args(parser):
    """The options only volumes use (MyTest_LungInf.py already has --pth_path, --data_path, --save_path,
    --testsize, --batchsize, --backbone, --device, --amp, --fuse_bn, --channels_last, --progress)."""
    from ..cli import add_bool
    g = parser.add_argument_group("CT volumes (NIfTI / DICOM --data_path)")
    g.add_argument("--mask", default=None, help="quantify this infection mask (NIfTI, aligned with the scan); "
                                                "no network")
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
