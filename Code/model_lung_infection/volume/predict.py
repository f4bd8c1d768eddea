"""The volume stage: CT scans in, infection (and class) masks and a quantification report out.

For each case: read (HU), turn into the training slices' view, lung mask (classical, HU), window to
8 bits, crop one box around the lungs, run the network on the slices that hold lung in batches,
threshold the sigmoid probabilities at 0.5 (never a per-slice stretch: most slices of a scan hold no
infection), paste back, write in the input's own voxel order, quantify. See docs/volumes.md.
"""
import argparse
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import normalize_image, resize
from ..errors import DataError, UserError
from ..quantify import report
from ..quantify.lungs import lung_mask
from . import geometry
from .io import find_cases, read_case, read_nifti, save_nifti
from .window import DEFAULT_WINDOW, gray_volume, is_already_gray, parse_window

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


# ------------------------------------------------------------------------------------- networks

class Networks:
    """The Inf-Net (and optional multi-class) model, loaded once for every case."""

    def __init__(self, cfg):
        from ..fast_inference import prepare_for_inference
        from ..infer import default_amp, load_inf_net
        from ..runtime import pick_device
        self.device = pick_device(cfg.device)
        self.amp = default_amp(self.device) if cfg.amp is None else cfg.amp
        self.cfg = cfg
        self.model = prepare_for_inference(load_inf_net(cfg.pth_path, cfg.backbone, self.device),
                                           channels_last=cfg.channels_last, fuse_bn=cfg.fuse_bn, inplace=True)
        self.multiclass = None
        if cfg.multiclass_pth:
            from ..multiclass import load_multiclass
            self.multiclass, self.mc_info = load_multiclass(cfg.multiclass_pth, self.device)

    def infection(self, slices):
        """Sigmoid probabilities (n, h, w) float32 of uint8 gray slices (n, h, w), as the 2D path computes
        them: PIL-bilinear resize to testsize, ImageNet normalisation, S_3 logits resized back (bilinear)
        before the sigmoid; no min-max stretch."""
        size = (self.cfg.testsize, self.cfg.testsize)
        x = torch.stack([normalize_image(resize(np.repeat(s[..., None], 3, axis=2), size)) for s in slices])
        x = x.to(self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        from ..infer import final_logits
        from ..runtime import autocast
        with torch.inference_mode(), autocast(self.device, self.amp):
            logits = final_logits(self.model(x)).float()
        logits = F.interpolate(logits, size=slices.shape[1:], mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[:, 0].cpu().numpy()

    def classes(self, gray, infection):
        """uint8 labels (1 GGO, 2 consolidation) of one slice, the infection mask as the prior."""
        from ..multiclass import predict_probabilities
        rgb = np.repeat(gray[..., None], 3, axis=2)
        prior = infection.astype(np.uint8) * 255 if self.mc_info["n_channels"] == 6 else None
        testsize = self.mc_info.get("trainsize") or self.cfg.testsize
        prob = predict_probabilities(self.multiclass, rgb, prior, testsize, True, self.device, self.amp)
        return prob.argmax(0).astype(np.uint8)


def _batches(indices, size, progress, desc):
    chunks = [indices[i:i + size] for i in range(0, len(indices), size)]
    if progress:
        from tqdm import tqdm
        return tqdm(chunks, desc=desc, unit="batch", leave=False)
    return chunks


def predict_case(nets, gray, lungs, cfg, name, spacing=(1.0, 1.0, 1.0)):
    """(infection bool, probabilities float32 or None, classes uint8 or None) in the display view."""
    rows, cols, n = gray.shape
    if cfg.crop:
        r0, r1, c0, c1 = geometry.lung_box(lungs, spacing)
        todo = geometry.slices_with(lungs)
    else:
        r0, r1, c0, c1 = 0, rows, 0, cols
        todo = np.arange(n)
    prob = np.zeros(gray.shape, np.float32)
    for chunk in _batches(todo, cfg.batchsize, cfg.progress, f"{name}: network"):
        crop = np.moveaxis(gray[r0:r1, c0:c1, chunk], 2, 0)
        prob[r0:r1, c0:c1, chunk] = np.moveaxis(nets.infection(crop), 0, 2)
    infection = prob >= cfg.threshold
    classes = None
    if nets.multiclass is not None:
        classes = np.zeros(gray.shape, np.uint8)
        for z in todo:
            classes[r0:r1, c0:c1, z] = nets.classes(gray[r0:r1, c0:c1, z], infection[r0:r1, c0:c1, z])
    return infection, (prob if cfg.save_probabilities else None), classes


# ---------------------------------------------------------------------------------------- cases

def _read_mask(path, volume):
    mask = read_nifti(path)
    if mask.data.shape != volume.data.shape or not np.allclose(mask.affine, volume.affine, atol=1e-3):
        raise DataError(f"{path}: mask of shape {mask.data.shape} does not align with {volume.source} "
                        f"(shape {volume.data.shape}); give the mask written for this scan")
    return mask.data > 0


def run_case(kind, path, cfg, nets, out_root):
    """Process one scan; returns (summary, timings in seconds)."""
    t = {}
    start = time.perf_counter()
    volume = read_case(kind, path, cfg.series)
    orient = geometry.orientation(volume.affine, volume.data.shape)
    data = orient.display(volume.data)
    window = cfg.window or DEFAULT_WINDOW
    already_gray = is_already_gray(data)
    if already_gray:
        print(f"[volume] {volume.source}: values within 0..255, read as gray levels already windowed "
              f"(no HU window applied; lungs found at the window's HU equivalents)")
        hu = window[0] + data * ((window[1] - window[0]) / 255.0)
    else:
        hu = data
    t["read"] = time.perf_counter() - start

    start = time.perf_counter()
    spacing = orient.spacing
    lungs = lung_mask(hu, spacing)
    if not lungs.any():
        warnings.warn(f"{volume.source}: no lungs found (no air-filled region inside the body below -320 HU); "
                      f"percentages are 0 -- is this a chest CT in HU?")
    t["lungs"] = time.perf_counter() - start

    start = time.perf_counter()
    gray = gray_volume(data, window, already_gray)
    prob = classes = None
    if cfg.mask:
        infection = orient.display(_read_mask(cfg.mask, volume))
    else:
        infection, prob, classes = predict_case(nets, gray, lungs, cfg, volume.name, spacing)
    t["network"] = time.perf_counter() - start

    start = time.perf_counter()
    out = Path(out_root) / volume.name
    existing = [p.name for p in sorted(out.glob("*")) if p.is_file()] if out.is_dir() else []
    if existing:
        print(f"[volume] replacing {len(existing)} existing file(s) in {out}")
    if not cfg.mask:
        save_nifti(orient.file_order(infection), volume.affine, out / "infection.nii.gz")
    save_nifti(orient.file_order(lungs), volume.affine, out / "lungs.nii.gz")
    if classes is not None:
        save_nifti(orient.file_order(classes), volume.affine, out / "classes.nii.gz")
    if prob is not None:
        save_nifti(orient.file_order(prob), volume.affine, out / "probability.nii.gz", dtype=np.float32)
    t["write"] = time.perf_counter() - start

    start = time.perf_counter()
    z_mm = orient.slice_z_mm()
    rows, summary = report.quantify(lungs, infection, volume.voxel_ml, spacing[0] * spacing[1], z_mm,
                                    orient.file_slice_index(), volume.spacing, volume.data.shape, classes)
    summary["window_hu"] = None if already_gray else [float(v) for v in window]
    report.write_csv(out / "slices.csv", rows)
    report.write_summary(out / "summary.json", summary)
    report.overview(out / "overview.png", gray, lungs, infection, z_mm, spacing, classes)
    t["report"] = time.perf_counter() - start
    return volume.name, summary, t


def run_volumes(args_or_config=None, **overrides):
    """The volume stage of MyTest_LungInf.py: every case of `data_path` into `save_path`/<case>/, then
    `save_path`/summary.csv. Returns {case: summary}. Takes the script's parsed arguments, a
    VolumeConfig, a dict or keywords."""
    cfg = args_or_config if isinstance(args_or_config, VolumeConfig) else VolumeConfig.from_any(args_or_config,
                                                                                               **overrides)
    cases = find_cases(cfg.data_path)
    names = {}
    for kind, path in cases:
        from .io import case_name
        other = names.setdefault(case_name(path), path)
        if other != path:
            raise DataError(f"{path}: same case name as {other}; rename one (outputs go to OUT/<case>/)")
    if cfg.mask and len(cases) > 1:
        raise UserError(f"--mask {cfg.mask}: give one scan as --data_path, not a folder of {len(cases)}")
    if not cfg.mask and not cfg.pth_path:
        raise UserError("give --pth_path (the network) or --mask (a mask to quantify)")
    save_path = Path(cfg.save_path or Path("Results") / "Volumes")
    nets = None if cfg.mask else Networks(cfg)
    summaries, timings = {}, {}
    for kind, path in cases:
        name, summary, t = run_case(kind, path, cfg, nets, save_path)
        summaries[name], timings[name] = summary, t
        print(f"[volume] {name}: lungs {summary['lung_ml']:.0f} mL (right {summary['right_lung_ml']:.0f}, left "
              f"{summary['left_lung_ml']:.0f}), infection {summary['infection_ml']:.1f} mL = "
              f"{summary['infection_percent']:.2f}% -> {save_path / name}")
    report.write_summary_table(save_path / "summary.csv", summaries)
    run_volumes.last_timings = timings  # for bench/bench_volume.py
    return summaries
