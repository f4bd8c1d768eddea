"""Evaluate a folder of prediction maps against a folder of GT masks, and write reports."""
import csv
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from Code.model_lung_infection.atomic import atomic_write, is_temporary  # plain Python: no PyTorch here

from .metrics import CURVE_KEYS, FIXED_KEYS, FIXED_THRESHOLD, THRESHOLDS, evaluate_pair
from .record import RecordError, check_maps

# Order of the scalars in reports: the release line's six, then precision and the maxima, then Dice, Sen and
# Spe at the fixed threshold 0.5 of the map as stored (metrics.fixed_threshold).
FIXED_SUMMARY_KEYS = tuple("fixed" + k for k in FIXED_KEYS)
SUMMARY_KEYS = ("meanDic", "meanSen", "meanSpe", "Sm", "meanEm", "MAE",
                "meanPrec", "maxDic", "maxSen", "maxSpe", "maxPrec", "maxEm") + FIXED_SUMMARY_KEYS
PER_IMAGE_KEYS = ("meanDic", "meanSen", "meanSpe", "meanPrec", "meanEm", "maxDic", "Sm", "MAE") + FIXED_SUMMARY_KEYS


class EvaluationError(Exception):
    """Bad input: a missing or empty folder, a missing counterpart, an unreadable image."""


def read_image(path):
    """Read an image the way MATLAB's imread hands it to main.m (palette PNGs as indices,
    1-bit PNGs as logical, 16-bit PNGs as uint16)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            arr = np.array(im)
    except (OSError, ValueError, SyntaxError) as err:   # PIL raises all three on bad files
        raise EvaluationError(f"cannot read image {path}: {err}") from None
    if arr.dtype == np.int32:  # Pillow's 32-bit container for some 16-bit files
        if arr.min() < 0 or arr.max() > 65535:
            raise EvaluationError(f"cannot read image {path}: unsupported 32-bit integer data")
        arr = arr.astype(np.uint16)
    return arr


def _resize_like(pred, shape):
    """Bicubic resize of a prediction's first channel to `shape` (H, W), in memory only."""
    first = pred[..., 0] if pred.ndim == 3 else pred
    size = (shape[1], shape[0])
    if first.dtype == np.uint8:   # MATLAB's imresize keeps uint8 maps uint8
        return np.array(Image.fromarray(first).resize(size, Image.BICUBIC))
    if first.dtype == bool:
        first = first.astype(np.float32)
    elif first.dtype == np.uint16:
        first = first / 65535.0
    resized = np.array(Image.fromarray(first.astype(np.float32)).resize(size, Image.BICUBIC))
    return np.clip(resized, 0.0, 1.0).astype(np.float64)


def _png_names(folder, what):
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{what} folder not found: {folder}")
    # a killed run's temporaries (".tmp-<hex>.png", our atomic writes) are not maps; the next run removes them
    names = sorted(p.name for p in folder.iterdir()
                   if p.suffix.lower() == ".png" and p.is_file() and not is_temporary(p.name))
    if not names:
        raise EvaluationError(f"{what} folder has no PNG files: {folder}")
    return names


def _describe(names, limit=10):
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def pair_names(gt_dir, pred_dir):
    """Names present in both folders; every GT needs a prediction and vice versa."""
    gt_names = _png_names(gt_dir, "GT")
    pred_names = _png_names(pred_dir, "prediction")
    no_pred = sorted(set(gt_names) - set(pred_names))
    if no_pred:
        raise EvaluationError(f"missing prediction in {pred_dir} for: {_describe(no_pred)}")
    no_gt = sorted(set(pred_names) - set(gt_names))
    if no_gt:
        raise EvaluationError(f"missing GT in {gt_dir} for: {_describe(no_gt)}")
    return gt_names


def _evaluate_one(gt_path, pred_path, em_strict):
    gt = read_image(gt_path)
    pred = read_image(pred_path)
    resized = pred.shape[:2] != gt.shape[:2]
    if resized:
        pred = _resize_like(pred, gt.shape[:2])
    result = evaluate_pair(pred, gt, em_strict=em_strict)
    result["gt_max"] = None if gt.dtype == bool else int(gt.max())
    return result, resized


def _warn_if_gt_is_0_1(gt_dir, results):
    """GT stored as 0/1 instead of 0/255 reads as empty (the toolbox thresholds GT at 128, and so do we, to keep
    its figures): say so once, naming the folder and the fix."""
    maxima = [r["gt_max"] for r, _ in results if r["gt_max"] is not None]
    if maxima and max(maxima) == 1:
        warnings.warn(f"{gt_dir}: every GT mask holds only the values 0 and 1, not 0 and 255; the toolbox reads GT as "
                      f"> 128, so each mask is empty and Dice is 0: rescale the masks to 0/255 (mask * 255) and "
                      f"evaluate again", stacklevel=3)


def evaluate_folder(gt_dir, pred_dir, em_strict=False, workers=None, dataset=None, model=None):
    """Evaluate every PNG of `pred_dir` against the same-named PNG of `gt_dir`.

    Returns a summary dict: the scalars of SUMMARY_KEYS (each "mean" is the mean over the 256
    thresholds of the mean over images, each "max" the maximum over thresholds of that mean
    curve; Sm and MAE are means over images), 'curves' (mean over images per threshold),
    'image_curves' (n_images x 256 per metric), 'per_image' rows, 'names', 'n_images',
    'thresholds' and the given dataset/model labels.
    """
    names = pair_names(gt_dir, pred_dir)
    try:
        check_maps(pred_dir, names)  # a folder whose test_run.json lists other maps mixes runs
    except RecordError as err:
        raise EvaluationError(str(err)) from None
    gt_dir, pred_dir = Path(gt_dir), Path(pred_dir)
    workers = workers or min(4, os.cpu_count() or 1)

    def job(name):
        return _evaluate_one(gt_dir / name, pred_dir / name, em_strict)

    # PNG decoding and the large NumPy passes release the GIL, so threads use both cores.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(job, names))

    _warn_if_gt_is_0_1(gt_dir, results)
    for name, (_, resized) in zip(names, results):
        if resized:
            warnings.warn(f"{pred_dir / name}: size differs from its GT; the prediction was "
                          "resized (bicubic) in memory, the file is left untouched", stacklevel=2)

    image_curves = {k: np.stack([r["curves"][k] for r, _ in results]) for k in CURVE_KEYS}
    curves = {k: v.mean(axis=0) for k, v in image_curves.items()}
    summary = {"dataset": dataset, "model": model, "gt_dir": str(gt_dir), "pred_dir": str(pred_dir),
               "n_images": len(names), "names": names, "thresholds": THRESHOLDS,
               "curves": curves, "image_curves": image_curves}
    for k in CURVE_KEYS:
        summary["mean" + k] = float(curves[k].mean())
        summary["max" + k] = float(curves[k].max())
    summary["Sm"] = float(np.mean([r["Sm"] for r, _ in results]))
    summary["MAE"] = float(np.mean([r["MAE"] for r, _ in results]))
    for k in FIXED_KEYS:
        summary["fixed" + k] = float(np.mean([r["fixed"][k] for r, _ in results]))

    summary["per_image"] = [
        {"name": name, "meanDic": image_curves["Dic"][i].mean(), "meanSen": image_curves["Sen"][i].mean(),
         "meanSpe": image_curves["Spe"][i].mean(), "meanPrec": image_curves["Prec"][i].mean(),
         "meanEm": image_curves["Em"][i].mean(), "maxDic": image_curves["Dic"][i].max(),
         "Sm": r["Sm"], "MAE": r["MAE"], "resized": resized, **{"fixed" + k: r["fixed"][k] for k in FIXED_KEYS}}
        for i, (name, (r, resized)) in enumerate(zip(names, results))]
    bad = [row["name"] for row in summary["per_image"]
           if any(np.isnan(row[k]) for k in PER_IMAGE_KEYS)]
    if bad:
        warnings.warn(f"{pred_dir}: NaN metrics (degenerate GT, as in the MATLAB toolbox) for "
                      f"{_describe(bad)}", stacklevel=2)
    return summary


def release_line(summary, dataset=None, model=None):
    """The MATLAB toolbox's result line, byte for byte in format."""
    s = summary
    return ("(Dataset:{}; Model:{}) meanDic:{:.3f};meanSen:{:.3f};meanSpe:{:.3f};Sm:{:.3f};"
            "meanEm:{:.3f};MAE:{:.3f}.").format(dataset or s["dataset"], model or s["model"],
                                                s["meanDic"], s["meanSen"], s["meanSpe"],
                                                s["Sm"], s["meanEm"], s["MAE"])


def extra_line(summary):
    """What the release line leaves out: precision and the maxima over thresholds."""
    return "    " + ";".join(f"{k}:{summary[k]:.3f}" for k in SUMMARY_KEYS[6:12]) + "."


def fixed_figures(summary):
    """'Dice:...;Sen:...;Spec:...' of a summary's figures at the fixed threshold."""
    return ";".join(f"{label}:{summary['fixed' + k]:.3f}" for label, k in zip(("Dice", "Sen", "Spec"), FIXED_KEYS))


def fixed_line(summary):
    """Dice, Sen, Spec at the fixed threshold 0.5, labelled apart from the toolbox's means over 256 thresholds."""
    return (f"    at threshold {FIXED_THRESHOLD:g} (map >= 128/255 as stored; what most later papers report): "
            f"{fixed_figures(summary)}. meanDic above: the toolbox's mean over 256 thresholds (what the paper "
            f"reports).")

def safe_name(name):
    return str(name).replace(os.sep, "_").replace(" ", "_")


def write_atomically(path, text):
    """Write a text report through a temporary file and a rename (atomic.atomic_write): a full disk or a kill
    leaves the old file, or none, never half a report; permissions follow the umask."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, newline=""))


def write_per_image_csv(summary, path):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(("name",) + PER_IMAGE_KEYS + ("resized",))
    for row in summary["per_image"]:
        writer.writerow([row["name"]] + [repr(float(row[k])) for k in PER_IMAGE_KEYS] + [int(row["resized"])])
    return write_atomically(path, buf.getvalue())
