"""The per-case report: volumes in mL, percentages of lung, slices.csv, summary.json, overview.png.

Millilitres are voxel counts x the voxel volume from the header's spacing. Percentages are of lung
volume, and only infection inside the lung mask counts towards them; infection the network finds
outside the lung mask is reported separately (`infection_outside_lungs_ml`), never dropped silently.

Zones: each lung is cut into thirds by height (its own superior-inferior extent) and into halves front
to back (ventral / dorsal: its own anterior-posterior extent; dorsal is the dependent lung of a supine
patient). Each third gets a score 0-5 from its infected percent with the thresholds of the lobe-based
CT severity score (0 none, 1 < 5%, 2 5-25%, 3 26-50%, 4 51-75%, 5 > 75%); the six thirds sum to the
zone score, 0-30: a lobe-free analogue (no lobes are segmented here), not the 25-point CT severity score.
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
# Lung in a scan's end slice of at least this share of the largest slice's: the scan cuts the lungs. Apices
# and basal recesses taper: our two real chest scans end at 0.7-1.1%; TotalSegmentator's abdomen at 100%.
CUT_MIN_SHARE = 0.05
PANEL = 256
THIRDS = ("upper", "middle", "lower")
HALVES = ("ventral", "dorsal")
SIDES = {RIGHT: "right", LEFT: "left"}
ZONE_SCORE_MAX = 5 * len(THIRDS) * len(SIDES)
SUMMARY_KEYS = ("lung_ml", "right_lung_ml", "left_lung_ml", "infection_ml", "infection_percent",
                "right_infection_percent", "left_infection_percent", "slices_with_infection", "spacing_mm", "shape")


def _percent(part, whole):
    return round(100.0 * part / whole, 4) if whole else 0.0


def zone_score(percent):
    """0 none, 1 under 5%, 2 5-25%, 3 over 25 to 50%, 4 over 50 to 75%, 5 over 75% (of the zone's lung)."""
    if percent <= 0:
        return 0
    return 1 + int(percent >= 5) + int(percent > 25) + int(percent > 50) + int(percent > 75)


def _fractions(coord, present, n_parts):
    """Part index (0 .. n_parts-1) of each position along one axis, equal lengths over the extent of
    `present` (voxel edges included), counted from the smallest coordinate."""
    coord = np.asarray(coord, np.float64)
    step = float(np.median(np.abs(np.diff(coord)))) if len(coord) > 1 else 1.0
    lo, hi = coord[present].min() - step / 2, coord[present].max() + step / 2
    return np.clip(((coord - lo) / (hi - lo) * n_parts).astype(int), 0, n_parts - 1)


def zones(lungs, infection, voxel_ml, z_mm):
    """{side: {zone: {lung_ml, infection_ml, infection_percent[, score]}}} and the zone score (0-30).

    Display view: columns run towards posterior (ventral first), z_mm is each slice's height."""
    out, total = {}, 0
    for side, side_name in SIDES.items():
        lung = lungs == side
        infected = lung & infection
        per_z = lung.sum(axis=(0, 1)), infected.sum(axis=(0, 1))
        per_col = lung.sum(axis=(0, 2)), infected.sum(axis=(0, 2))
        counts = {}
        if per_z[0].any():
            third = _fractions(z_mm, per_z[0] > 0, 3)  # 0 lowest .. 2 highest
            for i, zone in enumerate(reversed(THIRDS)):
                counts[zone] = (int(per_z[0][third == i].sum()), int(per_z[1][third == i].sum()))
            half = _fractions(np.arange(lung.shape[1]), per_col[0] > 0, 2)  # 0 ventral, 1 dorsal
            for i, zone in enumerate(HALVES):
                counts[zone] = (int(per_col[0][half == i].sum()), int(per_col[1][half == i].sum()))
        side_zones = {}
        for zone in THIRDS + HALVES:
            n, k = counts.get(zone, (0, 0))
            side_zones[zone] = {"lung_ml": round(n * voxel_ml, 4), "infection_ml": round(k * voxel_ml, 4),
                                "infection_percent": _percent(k, n)}
            if zone in THIRDS:
                side_zones[zone]["score"] = zone_score(100.0 * k / n if n else 0.0)  # unrounded: 1 voxel counts
                total += side_zones[zone]["score"]
        out[side_name] = side_zones
    return out, total


def lungs_cut_by_scan(lung_mm2, z_mm):
    """The scan's ends ("inferior", "superior") whose outermost slice still holds a real part of the lungs
    (CUT_MIN_SHARE of the largest slice's lung area): there the field of view cuts the lungs, and volumes,
    percentages and thirds are of the scanned part only (an abdomen scan holding the lung bases; a chest
    scan that misses the bases)."""
    order = np.argsort(z_mm)
    ends = (("inferior", order[0]), ("superior", order[-1])) if len(order) else ()
    largest = float(np.max(lung_mm2)) if len(lung_mm2) else 0.0
    return [side for side, z in ends if largest > 0 and lung_mm2[z] >= CUT_MIN_SHARE * largest]


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
    summary["lungs_cut_by_scan"] = lungs_cut_by_scan(lung_mm2, z_mm)
    summary["zones"], summary["zone_score"] = zones(lungs, infection, voxel_ml, z_mm)
    summary["zone_score_max"] = ZONE_SCORE_MAX
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


def _flat(summary):
    """summary.json's fields as table columns: lists of numbers joined with 'x' (of names with ' '), zones
    as right_upper_percent, right_upper_score ..."""
    row = {}
    for k, v in summary.items():
        if k == "zones":
            for side, per_zone in v.items():
                for zone, z in per_zone.items():
                    row[f"{side}_{zone}_percent"] = z["infection_percent"]
                    if "score" in z:
                        row[f"{side}_{zone}_score"] = z["score"]
        else:
            if isinstance(v, list):
                joiner = " " if all(isinstance(x, str) for x in v) else "x"  # names: "inferior superior"
                v = joiner.join(str(x) for x in v)
            row[k] = v
    return row


def write_summary_table(path, summaries):
    """OUT/summary.csv: one row per case (a case's `status` and `source` first when given)."""
    rows = [{"case": case, **_flat(s)} for case, s in summaries.items()]
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


SCORE_COLOURS = ((255, 255, 255), (255, 240, 200), (255, 215, 150), (255, 180, 110), (250, 130, 80), (230, 70, 60))


def _zone_table(summary, width):
    """The zones as a small table: each lung's thirds (infected %, score 0-5, tinted by score) and halves,
    and the zone score."""
    img = Image.new("RGB", (width, 176), "white")
    d = ImageDraw.Draw(img)
    x0, label_w, cell_w, row_h = 10, 110, 130, 18
    d.text((x0, 4), "infected % of each lung's zone (score 0-5)", fill="black")
    for j, side in enumerate(SIDES.values()):
        d.text((x0 + label_w + j * cell_w + 4, 4 + row_h), f"{side} lung", fill="black")
    for i, zone in enumerate(THIRDS + HALVES):
        y = 4 + (i + 2) * row_h
        d.text((x0, y + 3), f"{zone} {'third' if zone in THIRDS else 'half'}", fill="black")
        for j, side in enumerate(SIDES.values()):
            z = summary["zones"][side][zone]
            x = x0 + label_w + j * cell_w
            fill = SCORE_COLOURS[z["score"]] if "score" in z else (245, 245, 245)
            d.rectangle([x, y, x + cell_w - 4, y + row_h - 2], fill=fill, outline=(180, 180, 180))
            text = f"{z['infection_percent']:.1f}%" + (f"  ({z['score']})" if "score" in z else "")
            d.text((x + 4, y + 3), text, fill="black")
    d.text((x0 + label_w + 2 * cell_w + 10, 4 + 2 * row_h + 3),
           f"zone score {summary['zone_score']} / {summary['zone_score_max']}", fill="black")
    d.text((x0 + label_w + 2 * cell_w + 10, 4 + 3 * row_h + 3), "(six zones, lobe-free; not the", fill="black")
    d.text((x0 + label_w + 2 * cell_w + 10, 4 + 4 * row_h + 3), "25-point CT severity score)", fill="black")
    d.text((x0, 4 + 7 * row_h + 3), "slices above as radiologists view them: anterior up, the patient's right on "
                                     "the left", fill=(90, 90, 90))
    cut = " and ".join(summary.get("lungs_cut_by_scan", []))
    if cut:
        d.text((x0, 4 + 8 * row_h + 3), f"the scan's {cut} end cuts the lungs: volumes, percentages and thirds are "
                                        f"of the scanned part only", fill=(200, 0, 0))
    return img


def overview_slices(lung_area, inf_area, n=OVERVIEW_SLICES):
    """The slices overview.png shows, inferior to superior: the most infected ones, a sixth of the lungs'
    height apart where the infection allows (neighbours of one lesion say little new), else the next most
    infected; without infection, the middle slice of each third of the lungs' height (the zones' thirds)."""
    present = np.flatnonzero(lung_area)
    if not len(present):
        return np.arange(min(n, len(lung_area)))
    if not inf_area.any():
        thirds = np.array_split(present, n)
        return np.array(sorted({int(t[len(t) // 2]) for t in thirds if len(t)}))
    gap = len(present) // (2 * n)
    ranked = [int(z) for z in np.argsort(-inf_area, kind="stable") if inf_area[z]]
    chosen = []
    for z in ranked:
        if len(chosen) < n and all(abs(z - c) > gap for c in chosen):
            chosen.append(z)
    chosen += [z for z in ranked if z not in chosen][:n - len(chosen)]  # one small lesion: its next slices
    return np.array(sorted(chosen))


def overview(path, gray, lungs, infection, z_mm, spacing, classes=None, summary=None):
    """overview.png: the slices of overview_slices (infection, or GGO red / consolidation green, over the
    CT; lung outline in blue), the infected percent of lung along z and, given the summary, the zones."""
    from scipy import ndimage
    lung_area = (lungs > 0).sum(axis=(0, 1))
    inf_area = (infection & (lungs > 0)).sum(axis=(0, 1))
    percent = np.where(lung_area > 0, 100.0 * inf_area / np.maximum(lung_area, 1), 0.0)
    # a 1-voxel outline vanishes when a 512-row slice is shrunk to PANEL rows: as thick as the shrink
    width_px = max(1, int(np.ceil(gray.shape[0] / PANEL)))
    panels = []
    for z in overview_slices(lung_area, inf_area):
        lung = lungs[..., z] > 0
        outline = lung & ~ndimage.binary_erosion(lung, iterations=width_px)
        masks = [(outline, (60, 120, 255))]
        if classes is not None:
            masks += [(classes[..., z] == c, COLOURS[c]) for c in (GGO, CONSOLIDATION)]
        else:
            masks.append((infection[..., z], COLOURS["infection"]))
        # the display view (right lung on top, anterior to the left) transposed: the radiological view
        panel = _panel(gray[..., z].T, [(m.T, colour) for m, colour in masks], spacing[0] / spacing[1])
        ImageDraw.Draw(panel).text((4, 4), f"z {z_mm[z]:.1f} mm  {percent[z]:.1f}%", fill=(255, 255, 0))
        panels.append(panel)
    width = max(sum(p.width for p in panels), 560 if summary else 400)
    parts = [_plot(z_mm, percent, width)] + ([_zone_table(summary, width)] if summary else [])
    canvas = Image.new("RGB", (width, PANEL + sum(p.height for p in parts)), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width
    y = PANEL
    for p in parts:
        canvas.paste(p, (0, y))
        y += p.height
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
