"""Derive the default HU -> gray lung window from the training slices (docs/volumes.md, "The window").

    python bench/measure_window.py [--data ../shared/COVID-SemiSeg/TrainingSet/LungInfection-Train]

For every slice in Doctor-label/Imgs and Pseudo-label/Imgs it measures four gray levels:
  lung     median gray of the dark pixels (below the slice's Otsu threshold) not connected to the image
           border (the border-connected dark region is outside air);
  air      median gray of that border-connected dark region (slices without any: skipped);
  soft     the mode of the histogram above the Otsu threshold and below its 95th percentile
           (mediastinum and muscle: blood / muscle ~ +40 HU);
  bone     99.5th percentile of the slice (cortical bone, often clipped at 255).
The window is the straight line gray = a * HU + b through (lung, -850 HU) and (soft tissue, +40 HU),
two anchors that are always visible and never clipped; air (-1000 HU) and bone (~+700 HU) check it.
  LOW = -b / a, HIGH = (255 - b) / a
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

HU = {"air": -1000.0, "lung": -850.0, "soft": 40.0, "bone": 700.0}  # literature values (see docs)


def otsu(gray):
    hist = np.bincount(gray.ravel(), minlength=256).astype(float)
    p = hist / hist.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    return int(np.nanargmax(sigma))


def levels(gray):
    t = otsu(gray)
    dark = gray <= t
    lab, n = ndimage.label(dark)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    outside = np.isin(lab, border[border > 0])
    inside = dark & ~outside
    bright = gray[(gray > t)]
    out = {"bone": float(np.percentile(gray, 99.5))}
    out["lung"] = float(np.median(gray[inside])) if inside.sum() > 100 else np.nan
    out["air"] = float(np.median(gray[outside])) if outside.sum() > 100 else np.nan
    if bright.size > 100:
        hi = np.percentile(bright, 95)
        body = bright[bright <= hi]
        out["soft"] = float(np.argmax(np.bincount(body, minlength=256)))
    else:
        out["soft"] = np.nan
    return out


def fit(measured):
    """(low, high) of the line through (lung, -850) and (soft, +40), from the medians."""
    g_lung, g_soft = measured["lung"], measured["soft"]
    a = (g_soft - g_lung) / (HU["soft"] - HU["lung"])
    b = g_lung - a * HU["lung"]
    return -b / a, (255 - b) / a


def measure(folder, contains=""):
    rows = [levels(np.array(Image.open(p).convert("L"))) for p in sorted(Path(folder).iterdir())
            if p.suffix.lower() in (".jpg", ".png") and contains in p.name]
    med = {k: float(np.nanmedian([r[k] for r in rows])) for k in HU}
    iqr = {k: [float(v) for v in np.nanpercentile([r[k] for r in rows], [25, 75])] for k in HU}
    low, high = fit(med)
    return {"slices": len(rows), "median_gray": med, "iqr_gray": iqr, "window": [round(low), round(high)]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[2] / "shared/COVID-SemiSeg/TrainingSet/LungInfection-Train"
    p.add_argument("--data", default=str(root))
    a = p.parse_args(argv)
    groups = {"Doctor-label": ("Doctor-label", ""), "Pseudo-label": ("Pseudo-label", ""),
              # the pseudo-label pool mixes two sources exported with different windows
              "Pseudo-label coronacases": ("Pseudo-label", "coronacases"),
              "Pseudo-label radiopaedia": ("Pseudo-label", "radiopaedia")}
    result = {name: measure(Path(a.data) / folder / "Imgs", contains) for name, (folder, contains) in groups.items()}
    for name, r in result.items():
        low, high = r["window"]
        pred = {k: float(np.clip((HU[k] - low) / (high - low) * 255, 0, 255)) for k in HU}
        r["window_predicts_gray"] = {k: round(v, 1) for k, v in pred.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
