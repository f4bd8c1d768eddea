"""A classical lung mask from Hounsfield units (no learned weights: none can be downloaded).

Works on a volume in the display view of `volume.geometry` (rows towards the patient's left,
columns towards posterior, slices towards superior), so "right" and "left" come from the affine.

  1. body      voxels above BODY_HU (soft tissue and bone), the largest 3D component, holes filled
               slice by slice (so the lungs and airways inside it are part of it);
  2. air       voxels below AIR_HU inside the body and not connected to the air around it;
  3. airways   per slice, air regions smaller than AIRWAY_MAX_MM2 whose mean is below AIRWAY_HU
               (nearly pure air: trachea and main bronchi; aerated lung averages about -850 HU) and
               that lie in the middle third of the body left to right, are removed;
  4. lungs     3D components of what is left, smaller than MIN_LUNG_ML dropped; two big ones are the
               two lungs, one (lungs touching in front of the heart) is cut at the body's midline;
               right is the one towards the patient's right (smaller row index in the display view);
  5. filling   each lung is closed with a disk of CLOSE_MM and its holes filled slice by slice, which
               takes in vessels, airway walls and dense infection (consolidation at ~0 HU would
               otherwise fall outside an air threshold) enclosed by aerated lung.

Thresholds: -500 HU separates air-filled from soft tissue (midway between lung, -850, and fat, -100);
-320 HU is the lung threshold of Hu et al. (IEEE TMI 2001) and lungmask's preprocessing; -950 HU is
close to pure air (the trachea is -1000). Limits: a lung that is almost entirely consolidated is not
air-filled and is missed; oblique scans are handled at the nearest axis.
"""
import numpy as np
from scipy import ndimage

BODY_HU = -500.0
AIR_HU = -320.0
AIRWAY_HU = -950.0
AIRWAY_MAX_MM2 = 600.0
MIN_LUNG_ML = 5.0
CLOSE_MM = 5.0
RIGHT, LEFT = 1, 2


def _largest(mask):
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def _per_slice(mask, fn):
    out = np.empty_like(mask)
    for z in range(mask.shape[2]):
        out[..., z] = fn(mask[..., z]) if mask[..., z].any() else mask[..., z]
    return out


def body_mask(hu):
    return _per_slice(_largest(hu > BODY_HU), ndimage.binary_fill_holes)


def _remove_airways(candidates, hu, body, spacing):
    pixel_mm2 = spacing[0] * spacing[1]
    out = candidates.copy()
    for z in np.flatnonzero(candidates.any(axis=(0, 1))):
        rows = np.flatnonzero(body[..., z].any(axis=1))
        if not rows.size:
            continue
        third = (rows[-1] - rows[0]) / 3.0
        lab, n = ndimage.label(candidates[..., z])
        if n == 0:
            continue
        index = np.arange(1, n + 1)
        # per region: pixel count, mean HU, mean row (bincount: one pass over the slice)
        flat = lab.ravel()
        count = np.bincount(flat, minlength=n + 1)[1:]
        area = count * pixel_mm2
        mean = np.bincount(flat, weights=hu[..., z].ravel(), minlength=n + 1)[1:] / count
        row_index = np.repeat(np.arange(lab.shape[0]), lab.shape[1])
        centre = np.bincount(flat, weights=row_index, minlength=n + 1)[1:] / count
        middle = (centre > rows[0] + third) & (centre < rows[-1] - third)
        airway = index[(area < AIRWAY_MAX_MM2) & (mean < AIRWAY_HU) & middle]
        if airway.size:
            out[..., z] &= ~np.isin(lab, airway)
    return out


def _split(lungs, body, voxel_ml):
    """Label volume 1 = right, 2 = left from the connected components of `lungs`."""
    lab, n = ndimage.label(lungs)
    if n == 0:
        return np.zeros(lungs.shape, np.uint8)
    index = np.arange(1, n + 1)
    ml = ndimage.sum_labels(lungs, lab, index) * voxel_ml
    big = index[ml >= MIN_LUNG_ML]
    big = big[np.argsort(-ml[big - 1])][:2]
    out = np.zeros(lungs.shape, np.uint8)
    if len(big) == 2 and ml[big[1] - 1] > 0.2 * ml[big[0] - 1]:
        rows = [c[0] for c in ndimage.center_of_mass(lungs, lab, big)]
        right, left = (big[0], big[1]) if rows[0] < rows[1] else (big[1], big[0])
        out[lab == right] = RIGHT
        out[lab == left] = LEFT
    elif len(big):
        # one mass (lungs touching): cut at the body's left-right middle
        rows = np.flatnonzero(body.any(axis=(1, 2)))
        mid = (rows[0] + rows[-1]) / 2.0
        whole = lab == big[0]
        out[whole] = LEFT
        out[:int(np.floor(mid)) + 1][whole[:int(np.floor(mid)) + 1]] = RIGHT
    return out


def _fill(labels, spacing):
    r = max(1, int(round(CLOSE_MM / min(spacing[0], spacing[1]))))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disk = (yy * spacing[0]) ** 2 + (xx * spacing[1]) ** 2 <= CLOSE_MM ** 2
    out = labels.copy()
    for side in (RIGHT, LEFT):
        m = labels == side
        for z in np.flatnonzero(m.any(axis=(0, 1))):
            rows, cols = np.flatnonzero(m[..., z].any(1)), np.flatnonzero(m[..., z].any(0))
            box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1, z]  # work on the lung's box only
            padded = np.pad(m[box], r)
            closed = ndimage.binary_closing(padded, structure=disk)[r:-r, r:-r]
            filled = ndimage.binary_fill_holes(closed)
            target = out[box]
            target[filled & (target == 0)] = side
    return out


def lung_mask(hu, spacing):
    """uint8 labels in the display view: 1 = the patient's right lung, 2 = the left lung, 0 = other."""
    body = body_mask(hu)
    air = hu < AIR_HU
    candidates = air & body  # the body's holes are filled, so air around the body is outside it
    candidates = _remove_airways(candidates, hu, body, spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return _fill(_split(candidates, body, voxel_ml), spacing)
