"""The per-case report: volumes in mL, percentages of lung, slices.csv, summary.json, overview.png.

Millilitres are voxel counts x the voxel volume from the header's spacing. Percentages are of lung
volume, and only infection inside the lung mask counts towards them; infection the network finds
outside the lung mask is reported separately (`infection_outside_lungs_ml`), never dropped silently.
"""
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_write
from .lungs import LEFT, RIGHT

GGO, CONSOLIDATION = 1, 2
COLOURS = {"infection": (255, 40, 40), GGO: (255, 40, 40), CONSOLIDATION: (40, 220, 40)}
OVERVIEW_SLICES = 3
PANEL = 256
SUMMARY_KEYS = ("lung_ml", "right_lung_ml", "left_lung_ml", "infection_ml", "infection_percent",
                "right_infection_percent", "left_infection_percent", "slices_with_infection", "spacing_mm", "shape")


def _percent(part, whole):
    return round(100.0 * part / whole, 4) if whole else 0.0


def quantify(lungs, infection, voxel_ml, pixel_mm2, z_mm, file_index, spacing_mm, shape, classes=None):
    """(rows of slices.csv, summary dict) from display-view volumes (rows, cols, slices).

    lungs: uint8 1 right / 2 left; infection: bool; classes: uint8 1 GGO / 2 consolidation or None;
    z_mm, file_index: per display slice; spacing_mm, shape: of the input, in its own voxel order."""
    in_lung = infection & (lungs > 0)
    per_slice = lambda m: m.sum(axis=(0, 1)) * pixel_mm2  # noqa: E731
    lung_mm2, inf_mm2 = per_slice(lungs > 0), per_slice(in_lung)
    extra = {}
    if classes is not None:
        extra = {"ggo_mm2": per_slice((classes == GGO) & (lungs > 0)),
                 "consolidation_mm2": per_slice((classes == CONSOLIDATION) & (lungs > 0))}
    rows = []
    for d in np.argsort(file_index):
        row = {"slice": int(file_index[d]), "z_mm": round(float(z_mm[d]), 3), "lung_mm2": round(float(lung_mm2[d]), 3),
               "infection_mm2": round(float(inf_mm2[d]), 3),
               "infection_percent": _percent(float(inf_mm2[d]), float(lung_mm2[d]))}
        row.update({k: round(float(v[d]), 3) for k, v in extra.items()})
        rows.append(row)
    n = {side: int((lungs == side).sum()) for side in (RIGHT, LEFT)}
    n_inf = {side: int((in_lung & (lungs == side)).sum()) for side in (RIGHT, LEFT)}
    total, total_inf = n[RIGHT] + n[LEFT], n_inf[RIGHT] + n_inf[LEFT]
    summary = {"lung_ml": round(total * voxel_ml, 4), "right_lung_ml": round(n[RIGHT] * voxel_ml, 4),
               "left_lung_ml": round(n[LEFT] * voxel_ml, 4), "infection_ml": round(total_inf * voxel_ml, 4),
               "infection_percent": _percent(total_inf, total),
               "right_infection_percent": _percent(n_inf[RIGHT], n[RIGHT]),
               "left_infection_percent": _percent(n_inf[LEFT], n[LEFT]),
               "slices_with_infection": int((inf_mm2 > 0).sum()),
               "spacing_mm": [round(float(s), 6) for s in spacing_mm], "shape": [int(s) for s in shape],
               "infection_outside_lungs_ml": round(int((infection & (lungs == 0)).sum()) * voxel_ml, 4)}
    if classes is not None:
        for key, c in (("ggo_ml", GGO), ("consolidation_ml", CONSOLIDATION)):
            summary[key] = round(int(((classes == c) & (lungs > 0)).sum()) * voxel_ml, 4)
    return rows, summary


def _write_text(path, text):
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_csv(path, rows):
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return _write_text(path, buf.getvalue())


def write_summary(path, summary):
    return _write_text(path, json.dumps(summary, indent=1) + "\n")


def write_summary_table(path, summaries):
    """OUT/summary.csv: one row per case (list-valued fields joined with 'x')."""
    rows = []
    for case, s in summaries.items():
        row = {"case": case}
        row.update({k: "x".join(str(v) for v in s[k]) if isinstance(s[k], list) else s[k] for k in s})
        rows.append(row)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    return write_csv(path, rows)


def _panel(gray, masks, aspect):
    """One slice (display view, rows x cols) with masks tinted, resized to PANEL high."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for mask, colour in masks:
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array(colour, np.float32)
    img = Image.fromarray(np.round(rgb).astype(np.uint8))
    w = max(1, int(round(PANEL * gray.shape[1] * aspect / gray.shape[0])))
    return img.resize((w, PANEL), Image.BILINEAR)


def _plot(z_mm, percent, width):
    img = Image.new("RGB", (width, 160), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = 40, width - 10, 10, 130
    d.rectangle([x0, y0, x1, y1], outline="black")
    top = max(1.0, float(np.max(percent)) if len(percent) else 1.0)
    if len(z_mm) > 1:
        zs = (np.asarray(z_mm) - min(z_mm)) / (max(z_mm) - min(z_mm) or 1)
        pts = [(x0 + z * (x1 - x0), y1 - p / top * (y1 - y0)) for z, p in sorted(zip(zs, percent))]
        d.line(pts, fill=(200, 0, 0), width=2)
    d.text((x0, y1 + 6), f"infected % of lung per slice along z (inferior -> superior), max {top:.1f}%", fill="black")
    d.text((2, y0), f"{top:.0f}%", fill="black")
    return img


def overview(path, gray, lungs, infection, z_mm, spacing, classes=None):
    """overview.png: the most infected slices (infection, or GGO red / consolidation green, over the CT;
    lung outline in blue) and the infected percent of lung along z."""
    lung_area = (lungs > 0).sum(axis=(0, 1))
    inf_area = (infection & (lungs > 0)).sum(axis=(0, 1))
    percent = np.where(lung_area > 0, 100.0 * inf_area / np.maximum(lung_area, 1), 0.0)
    order = np.argsort(-inf_area if inf_area.any() else -lung_area, kind="stable")[:OVERVIEW_SLICES]
    panels = []
    for z in sorted(order):
        lung = lungs[..., z] > 0
        from scipy import ndimage
        outline = lung & ~ndimage.binary_erosion(lung)
        masks = [(outline, (60, 120, 255))]
        if classes is not None:
            masks += [(classes[..., z] == c, COLOURS[c]) for c in (GGO, CONSOLIDATION)]
        else:
            masks.append((infection[..., z], COLOURS["infection"]))
        panel = _panel(gray[..., z], masks, spacing[1] / spacing[0])
        ImageDraw.Draw(panel).text((4, 4), f"z {z_mm[z]:.1f} mm  {percent[z]:.1f}%", fill=(255, 255, 0))
        panels.append(panel)
    width = max(sum(p.width for p in panels), 400)
    canvas = Image.new("RGB", (width, PANEL + 160), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    canvas.paste(_plot(z_mm, percent, width), (0, PANEL))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
