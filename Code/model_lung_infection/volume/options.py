"""The volume stage's options (VolumeConfig) and its command-line arguments; light, for `--help`."""
import argparse
from dataclasses import dataclass, fields

from .window import DEFAULT_WINDOW, parse_window

THRESHOLD = 0.5


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


def add_volume_args(parser):
    """The options only volumes use (MyTest_LungInf.py already has --pth_path, --data_path, --save_path,
    --testsize, --batchsize, --backbone, --device, --amp, --fuse_bn, --channels_last, --progress)."""
    from ..cli import add_bool, positive_float
    g = parser.add_argument_group("CT volumes (NIfTI / DICOM --data_path)")
    g.add_argument("--mask", default=None, help="quantify this infection mask (NIfTI, aligned with the scan); "
                                                "no network")
    g.add_argument("--multiclass_pth", default=None, help="multi-class network: adds GGO and consolidation")
    g.add_argument("--window", type=parse_window, default=None,
                   help=f"lung window LOW,HIGH in HU (default {DEFAULT_WINDOW[0]:g},{DEFAULT_WINDOW[1]:g}, measured "
                        f"on the training slices; docs/volumes.md)")
    g.add_argument("--threshold", type=positive_float, default=THRESHOLD, help="probability threshold of a mask")
    g.add_argument("--series", default=None, help="DICOM SeriesInstanceUID to read when a folder holds several")
    add_bool(g, "--save_probabilities", False, "also write probability.nii.gz (float32)")
    add_bool(g, "--crop", True, "crop around the lungs and skip slices without lung (False: whole slices)")
    return g
