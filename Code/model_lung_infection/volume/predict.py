"""The volume stage: CT scans in, infection (and class) masks and a quantification report out.

For each case: read (HU), turn into the training slices' view, lung mask (classical, HU), window to
8 bits, crop one box around the lungs, run the network on the slices that hold lung in batches,
threshold the sigmoid probabilities at 0.5 (never a per-slice stretch: most slices of a scan hold no
infection), paste back, write in the input's own voxel order, quantify. See docs/volumes.md.

A case that cannot be read is reported in one line and skipped; the others are processed, and
OUT/summary.csv lists every case with its status. OUT holds one run's results (output_folder.py):
another run's are refused unless --overwrite, and a rerun of the same inputs keeps the cases it
finished. A case run again has its earlier outputs removed first, and summary.json is written last,
so a case folder without it is unfinished.
"""
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..configs import SLICES, THRESHOLD, TestConfig
from ..data import normalize_image, resize
from ..errors import DataError, OptionError, UserError
from ..infer import default_amp, default_streams, load_for_test, probabilities, side_by_side
from ..models import read_model
from ..multiclass.predict import predict_probabilities
from ..quantify import report
from ..quantify.lungs import attach_infection, fill_summary, find_lungs
from ..runtime import pick_device
from . import geometry
from .io import find_cases, read_case, read_volume_file, save_nifti
from .options import check_mask_file
from .output_folder import OUTPUTS, TABLE_NAME, OutputRoot, run_key
from .window import DEFAULT_WINDOW, gray_volume, is_already_gray, not_a_scan

# ------------------------------------------------------------------------------------- networks

class Networks:
    """The Inf-Net (and optional multi-class) model, loaded once for every case (models.read_model)."""

    def __init__(self, cfg):
        self.device = pick_device(cfg.device)
        self.amp = default_amp(self.device) if cfg.amp is None else cfg.amp
        self.cfg = cfg
        self.model = load_for_test(cfg.pth_path, cfg.backbone, self.device, cfg.channels_last, cfg.fuse_bn,
                                   cfg.compile, self.amp, cfg.tta)  # the slice stage's model, the same maps
        self.multiclass = None
        if cfg.multiclass_pth:
            self.multiclass, arch, config, _ = read_model(cfg.multiclass_pth, expect="multiclass", device=self.device)
            self.mc_info = {"n_channels": arch["in_channels"], "trainsize": config.get("trainsize")}

    def infection(self, slices):
        """Sigmoid probabilities (n, h, w) float32 of uint8 gray slices (n, h, w), as the 2D path computes
        them (infer.probabilities): PIL-bilinear resize to testsize, ImageNet normalisation, S_3 logits
        resized back (bilinear) before the sigmoid; no min-max stretch."""
        size = (self.cfg.testsize, self.cfg.testsize)
        x = torch.stack([normalize_image(resize(np.repeat(s[..., None], 3, axis=2), size)) for s in slices])
        x = x.to(self.device)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        probs = probabilities(self.model, x, [slices.shape[1:]] * len(slices), self.amp, self.device)
        return torch.stack(probs)[:, 0].cpu().numpy()

    def classes(self, gray, infection):
        """uint8 labels (1 GGO, 2 consolidation) of one slice, the infection mask as the prior."""
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

    def infection(chunk):
        return chunk, nets.infection(np.moveaxis(gray[r0:r1, c0:c1, chunk], 2, 0))

    chunks = _batches(todo, cfg.batchsize, cfg.progress, f"{name}: network")
    for chunk, p in side_by_side(infection, chunks, default_streams(nets.device, len(chunks))):
        prob[r0:r1, c0:c1, chunk] = np.moveaxis(p, 0, 2)
    infection = prob >= cfg.threshold
    classes = None
    if nets.multiclass is not None:
        classes = np.zeros(gray.shape, np.uint8)
        for z in todo:
            classes[r0:r1, c0:c1, z] = nets.classes(gray[r0:r1, c0:c1, z], infection[r0:r1, c0:c1, z])
    return infection, (prob if cfg.save_probabilities else None), classes


# ---------------------------------------------------------------------------------------- cases

MAX_LUNG_ML = 12000.0  # two adult lungs at full inspiration hold about 6-8 L: more is a geometry error
LABEL_MAX = 15  # a --mask of whole numbers up to this is a label map (e.g. classes.nii.gz: 1 GGO, 2 consolidation)


def _read_mask(path, volume, threshold=THRESHOLD):
    """A --mask as infection (bool), by the network's rule: probabilities (0..1) and 8-bit maps (0..255,
    divided by 255) are infection where >= `threshold`; a label map (whole numbers up to LABEL_MAX)
    where non-zero. A mask holding HU (the scan itself) is refused."""
    mask = read_volume_file(path)
    if mask.data.shape != volume.data.shape or not np.allclose(mask.affine, volume.affine, atol=1e-3):
        raise DataError(f"{path}: mask of shape {mask.data.shape} does not align with {volume.source} "
                        f"(shape {volume.data.shape}); give the mask written for this scan")
    values = mask.data
    low, high = float(values.min()), float(values.max())
    same = np.array_equal(values, volume.data)
    if low < 0 or high > 255 or same:
        what = "the scan itself" if same else "Hounsfield units (a CT scan)" if low < 0 else "beyond 0..255"
        raise DataError(f"{path}: values {low:g}..{high:g} are {what}, not a mask; give the infection mask "
                        f"(probabilities 0..1, 0..255 gray or labels) aligned with {volume.source}")
    if high <= 1:
        return values >= threshold
    if high <= LABEL_MAX and np.array_equal(values, np.round(values)):
        print(f"[volume] {path}: whole numbers 0..{high:g}, read as labels (infection where not 0)")
        return values > 0
    return values / 255.0 >= threshold


def _clear_outputs(out, name):
    """Remove this case's outputs of an earlier run (our names only) and our leftover temporaries."""
    old = [p for p in (out / n for n in OUTPUTS) if p.is_file()]
    if old:
        print(f"[volume] {name}: replacing the earlier run's outputs in {out} ({', '.join(p.name for p in old)})")
    for p in old + sorted(out.glob(".tmp-*")):
        p.unlink(missing_ok=True)


def run_case(case, cfg, nets, out_root):
    """Process one scan (an io.Case); returns (name, summary, timings in seconds)."""
    t = {}
    start = time.perf_counter()
    volume = read_case(case)
    what = not_a_scan(volume.data)
    if what:
        raise DataError(f"{volume.source}: {what}, not a CT scan (Hounsfield units, or 0..255 gray levels); give "
                        f"the scan itself (an infection mask of it goes to --mask)")
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
    found = find_lungs(hu, spacing)
    lungs = found.labels
    if not lungs.any():
        warnings.warn(f"{volume.source}: no lungs found (no air-filled region inside the body below -320 HU); "
                      f"percentages are 0 -- is this a chest CT in HU?")
    t["lungs"] = time.perf_counter() - start

    start = time.perf_counter()
    gray = gray_volume(data, window, already_gray)
    prob = classes = None
    if cfg.mask:
        infection = orient.display(_read_mask(cfg.mask, volume, cfg.threshold))
    else:
        infection, prob, classes = predict_case(nets, gray, lungs, cfg, volume.name, spacing)
    t["network"] = time.perf_counter() - start
    start = time.perf_counter()
    lungs, attached = attach_infection(found, infection, hu, spacing)  # infection at a lung's border is its
    t["lungs"] += time.perf_counter() - start

    start = time.perf_counter()
    out = Path(out_root) / volume.name
    if out.is_dir():
        _clear_outputs(out, volume.name)
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
    cut = " and ".join(summary["lungs_cut_by_scan"])
    if cut:
        warnings.warn(f"{volume.source}: lung in the scan's {cut} end slice: the field of view cuts the lungs; "
                      f"volumes, percentages and zones are of the scanned part only")
    summary["window_hu"] = None if already_gray else [float(v) for v in window]
    summary.update(fill_summary(lungs, found.dense, attached, volume.voxel_ml))
    if summary["lung_ml"] > MAX_LUNG_ML:
        size = " x ".join(f"{v:g}" for v in volume.spacing)
        warnings.warn(f"{volume.source}: {summary['lung_ml']:.0f} mL of lung, more than any human's "
                      f"({MAX_LUNG_ML:.0f}): check the voxel size in the header ({size} mm)")
    report.write_csv(out / "slices.csv", rows)
    report.overview(out / "overview.png", gray, lungs, infection, z_mm, spacing, classes, summary)
    report.write_summary(out / "summary.json", summary)  # last: a case folder without it is unfinished
    t["report"] = time.perf_counter() - start
    return volume.name, summary, t


def _check_save_path(save_path, data_path, cases):
    """Outputs must never land where the next run would read them as scans: a --save_path inside
    --data_path is left out of discovery; one that is --data_path itself, or whose case folder is it,
    is refused."""
    data = Path(data_path).resolve()
    if not data.is_dir():
        return
    clash = [c.name for c in cases if (save_path / c.name).resolve() == data]
    if save_path.resolve() == data or clash:
        raise OptionError(f"--save_path {save_path}: the outputs{' of ' + clash[0] if clash else ''} would go into "
                          f"--data_path {data_path} itself and be read as scans next time; give a --save_path "
                          f"outside it or inside a subfolder of it")


@dataclass
class VolumeRun:
    """What run_volumes did: {case: summary} of every case finished (this run's and those kept from the run before),
    and {case: {step: seconds}} of the cases this run processed (read, lungs, network, write, report)."""
    summaries: dict
    timings: dict
    save_path: Path


def run_volumes(config=None, **overrides):
    """The volume stage of MyTest_LungInf.py: every case of `data_path` into `save_path`/<case>/, then
    `save_path`/summary.csv (every case with its status). Returns a VolumeRun; when some cases could not be
    read, raises DataError naming them after the others are done. `config`: a configs.TestConfig (the
    script's), or a dict / keywords of its fields."""
    cfg = TestConfig.from_any(config, **overrides)
    cfg.refuse_options_of(SLICES, "a CT volume (or a folder of them)")
    save_path = Path(cfg.save_path or Path("Results") / "Volumes")
    cases = find_cases(cfg.data_path, cfg.series, skip=[save_path])
    _check_save_path(save_path, cfg.data_path, cases)
    if cfg.mask and len(cases) > 1:
        raise UserError(f"--mask {cfg.mask}: give one scan as --data_path, not a folder of {len(cases)}")
    check_mask_file(cfg.mask)
    if not cfg.mask and not (cfg.pth_path and Path(cfg.pth_path).is_file()):
        raise UserError(f"--pth_path {cfg.pth_path}: no such weights file; give the network's weights (--pth_path) "
                        f"or a mask to quantify (--mask)")
    root = OutputRoot(save_path, run_key(cfg), cfg.overwrite)
    kept = root.prepare(cases)  # before any work: another run's results are refused (or --overwrite)
    nets = None if cfg.mask or len(kept) == len(cases) else Networks(cfg)
    root.start()
    summaries, timings, table, failed = {}, {}, {}, []
    for case in cases:
        if case.name in kept:
            summary = summaries[case.name] = json.loads(kept[case.name].read_text())
            table[case.name] = {"status": "ok", "source": str(case.path), **summary}
            print(f"[volume] {case.name}: finished earlier, kept ({save_path / case.name})")
            continue
        try:
            name, summary, t = run_case(case, cfg, nets, save_path)
        except DataError as e:
            if len(cases) == 1:
                raise
            message = " ".join(str(e).split())
            print(f"[volume] {case.name}: skipped: {message}")
            failed.append(case.name)
            table[case.name] = {"status": f"skipped: {message}", "source": str(case.path)}
        else:
            summaries[name], timings[name] = summary, t
            root.done(case)
            table[name] = {"status": "ok", "source": str(case.path), **summary}
            print(f"[volume] {name}: lungs {summary['lung_ml']:.0f} mL (right {summary['right_lung_ml']:.0f}, left "
                  f"{summary['left_lung_ml']:.0f}), infection {summary['infection_ml']:.1f} mL = "
                  f"{summary['infection_percent']:.2f}%, zone score {summary['zone_score']}/30 -> {save_path / name}")
        report.write_summary_table(save_path / TABLE_NAME, table)  # after every case: a killed run keeps it
    root.finish()
    if failed:
        raise DataError(f"{len(failed)} of {len(cases)} case(s) skipped ({', '.join(failed)}); the other "
                        f"{len(cases) - len(failed)} are in {save_path}; {save_path / 'summary.csv'} says why")
    return VolumeRun(summaries, timings, save_path)
