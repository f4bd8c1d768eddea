"""A classical lung mask from Hounsfield units (no learned weights: none can be downloaded).

Works on a volume in the display view of `volume.geometry` (rows towards the patient's left,
columns towards posterior, slices towards superior), so "right" and "left" come from the affine.

  1. body      voxels above BODY_HU, opened slice by slice with a TABLE_MM disk (the patient table
               and its thin plates come off the patient), the largest 3D component, holes filled
               slice by slice (so the lungs and airways inside it are part of it);
  2. air       voxels below AIR_HU inside the body, at least WALL_MM under its surface (lungs lie
               inside the chest wall: air at the skin, in the table's padding or outside is not lung);
  3. airways   per slice, air regions smaller than AIRWAY_MAX_MM2 whose mean is below AIRWAY_HU
               (nearly pure air: trachea and main bronchi; aerated lung averages about -850 HU) and
               that lie in the middle third of the body left to right, are removed;
  4. not lung  3D components rejected: smaller than MIN_LUNG_ML; bowel or stomach gas (more than
               GAS_FRACTION of the voxels below GAS_HU, i.e. pure gas, and shorter than GAS_MAX_MM
               along z -- lungs are taller and hold tissue); partial-volume rims (median above RIM_HU:
               fat or table padding against air, never aerated lung);
  5. lungs     the two largest components are the lungs when they lie either side of the body's
               midline and the smaller reaches up to the larger's mid-height (bowel under the
               diaphragm does not); else the largest is both lungs touching in front of the heart, cut
               slice by slice at its narrowest row near the midline; right is the one towards the
               patient's right (smaller row index in the display view);
  6. filling   each lung is closed with a disk of CLOSE_MM and its holes filled slice by slice, which
               takes in vessels, airway walls and dense infection enclosed by aerated lung;
  7. dense     per slice, dense regions (below DENSE_MAX_HU: not bone) in each lung's convex hull that
               touch it, lie on its side of the midline, in the body's outer half, are thicker than
               DENSE_MIN_MM and lie mostly further out than the lung along the rays from the body's
               centre (consolidation or effusion at the pleura -- not the heart, the liver dome or the
               mediastinum, which lie inwards of the lung) are lung;
  8. wall      per slice, dense regions (above WALL_MIN_HU: not fat) touching a lung that lie between it and
               its ribs -- along the ray from the body's centre further out than any of the lung and nearer
               than the first bone beyond it, bone within RIB_Z_MM along z included -- are lung (dependent
               consolidation with a flat or convex front against the chest wall, outside the hull);
               `Lungs.dense` holds what steps 7 and 8 added.
  After the network, `attach_infection` gives each lung the infection that touches it or lies in its
  hull, within ATTACH_MM, inside the rib cage (convex hull of bone above BONE_HU) and not inwards of it.

Thresholds: -500 HU separates air-filled from soft tissue (midway between lung, -850, and fat, -100);
-320 HU is the lung threshold of Hu et al. (IEEE TMI 2001) and lungmask's preprocessing; -950 HU is
close to pure air (the trachea and bowel gas are -1000; emphysema's lungs, in COPDGene, have a fifth of
their voxels below it, bowel gas more than half). Limits (docs/volumes.md): a lung that is almost entirely
consolidated is not air-filled and is missed; consolidation with no rib beyond it (under the costal
cartilages) is added by the network's infection (or --mask) only; oblique scans are handled at the nearest axis.
"""
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

BODY_HU = -500.0
AIR_HU = -320.0
AIRWAY_HU = -950.0
AIRWAY_MAX_MM2 = 600.0
MIN_LUNG_ML = 5.0
CLOSE_MM = 5.0
TABLE_MM = 3.0           # opening radius: table plates and padding are thinner than this, a patient is not
WALL_MM = 3.0            # skin and chest wall: no lung within this depth of the body surface
GAS_HU = -950.0
GAS_FRACTION = 0.5
GAS_MAX_MM = 150.0       # a lung is 200-300 mm tall; bowel gas in a chest CT's field of view is shorter
RIM_HU = -500.0
DENSE_MAX_HU = 100.0     # consolidation and effusion are 0-40 HU; ribs and contrast are above 100
ANGLE_BINS = 180        # 2 degree rays from the body's centre
DENSE_MIN_MM = 3.0      # opening radius: slivers along the outline (partial volume) are not consolidation
DENSE_MAX_SHARE = 1.0   # a dense region is no bigger than the lung's aerated part in that slice
DENSE_MIN_OUT = 0.5     # and lies in the outer half of the body (the pleura; not the hila's vessels)
OUTER_SHARE = 0.5       # a dense region is pleural when most of it lies outwards of the lung
JUNCTION_BAND = 0.1     # touching lungs are cut within this share of the body's width of its midline
ATTACH_MM = 40.0        # infection adds to a lung at most this far from it (a consolidated base)
BONE_HU = 300.0         # cortical and trabecular bone; muscle and consolidation are below 100
CAGE_MIN_PIXELS = 20
WALL_MIN_HU = -50.0     # fat (about -100 HU) between a lung and its ribs is not consolidation
RIB_Z_MM = 15.0          # bone this close along z bridges the intercostal gaps (ribs run obliquely, ~25 mm apart)
RIGHT, LEFT = 1, 2


@dataclass
class Lungs:
    labels: np.ndarray   # uint8, 1 right / 2 left, display view
    dense: np.ndarray    # bool, what the dense-lung step added (a subset of labels > 0)
    inner: np.ndarray    # bool, the body without its outer WALL_MM (bounds what infection may add)


def _disk(radius_mm, spacing):
    r = max(1, int(round(radius_mm / min(spacing[0], spacing[1]))))
    radius_mm = max(radius_mm, r * min(spacing[0], spacing[1]))  # never a single pixel: at least a cross
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    # a relative margin: spacings read from DICOM tags and from a NIfTI header differ in the last digits, and
    # a pixel exactly on the circle must not flip in or out with them (a cross would become a single pixel)
    inside = (yy * spacing[0]) ** 2 + (xx * spacing[1]) ** 2 <= radius_mm ** 2 * (1 + 1e-6)
    return inside.astype(np.uint8), r


def _largest(mask):
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    return lab == int(np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def _fill_holes_2d(m):
    """Holes of a 2D bool mask filled: what the outside (flooded from the border) does not reach."""
    pad = np.pad(m.astype(np.uint8), 1)
    flood = pad.copy()
    cv2.floodFill(flood, None, (0, 0), 2)
    return (flood != 2)[1:-1, 1:-1]


def body_mask(hu, spacing=(1.0, 1.0, 1.0)):
    dense = (hu > BODY_HU).astype(np.uint8)
    disk, _ = _disk(TABLE_MM, spacing)
    for z in range(dense.shape[2]):
        dense[..., z] = cv2.morphologyEx(dense[..., z], cv2.MORPH_OPEN, disk)
    body = _largest(dense.view(bool))
    for z in np.flatnonzero(body.any(axis=(0, 1))):
        body[..., z] = _fill_holes_2d(body[..., z])
    return body


def _inner(body, spacing):
    """The body without its outer WALL_MM (slice by slice)."""
    disk, _ = _disk(WALL_MM, spacing)
    out = np.zeros_like(body)
    for z in np.flatnonzero(body.any(axis=(0, 1))):
        out[..., z] = cv2.erode(body[..., z].view(np.uint8), disk).view(bool)
    return out


def _regions(mask2d):
    """(labels, count incl. background) of a 2D mask, 8-connected."""
    return cv2.connectedComponents(mask2d.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)


def _remove_airways(candidates, hu, body, spacing):
    pixel_mm2 = spacing[0] * spacing[1]
    out = candidates.copy()
    for z in np.flatnonzero(candidates.any(axis=(0, 1))):
        rows = np.flatnonzero(body[..., z].any(axis=1))
        if not rows.size:
            continue
        third = (rows[-1] - rows[0]) / 3.0
        n, lab = _regions(candidates[..., z])
        if n <= 1:
            continue
        # per region: pixel count, mean HU, mean row (bincount: one pass over the slice)
        flat = lab.ravel()
        count = np.bincount(flat, minlength=n)[1:]
        area = count * pixel_mm2
        mean = np.bincount(flat, weights=hu[..., z].ravel(), minlength=n)[1:] / count
        row_index = np.repeat(np.arange(lab.shape[0]), lab.shape[1])
        centre = np.bincount(flat, weights=row_index, minlength=n)[1:] / count
        middle = (centre > rows[0] + third) & (centre < rows[-1] - third)
        airway = np.flatnonzero((area < AIRWAY_MAX_MM2) & (mean < AIRWAY_HU) & middle) + 1
        if airway.size:
            out[..., z] &= ~np.isin(lab, airway)
    return out


def _lung_components(candidates, hu, spacing):
    """(labels, ids, mL) of the 3D components that pass the not-lung rules (step 4)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lab, n = ndimage.label(candidates)
    if n == 0:
        return lab, np.zeros(0, int), np.zeros(0)
    flat = lab.ravel()
    count = np.bincount(flat, minlength=n + 1)
    ml = count * voxel_ml
    big = np.flatnonzero(ml >= MIN_LUNG_ML)
    big = big[big > 0]
    keep = []
    objects = ndimage.find_objects(lab)
    for i in big:
        box = objects[i - 1]
        inside = lab[box] == i
        values = hu[box][inside]
        height_mm = (box[2].stop - box[2].start) * spacing[2]
        gas = np.mean(values < GAS_HU) > GAS_FRACTION and height_mm < GAS_MAX_MM
        rim = np.median(values) > RIM_HU
        if not (gas or rim):
            keep.append(i)
    keep = np.array(keep, int)
    return lab, keep, ml[keep] if keep.size else np.zeros(0)


def _split(lab, ids, ml, body):
    """Label volume 1 = right, 2 = left from the accepted components (`ids`, their mL)."""
    out = np.zeros(lab.shape, np.uint8)
    if not ids.size:
        return out
    order = np.argsort(-ml)
    big, big_ml = ids[order][:2], ml[order][:2]
    rows = np.flatnonzero(body.any(axis=(1, 2)))
    mid = (rows[0] + rows[-1]) / 2.0
    if len(big) == 2 and big_ml[1] > 0.2 * big_ml[0]:
        centres = [c[0] for c in ndimage.center_of_mass(np.isin(lab, big), lab, big)]
        first, second = (np.flatnonzero(np.any(lab == i, axis=(0, 1))) for i in big)
        # the two lungs: one each side of the midline, both reaching up as far as the other's middle (bowel
        # under the diaphragm does not)
        if (centres[0] - mid) * (centres[1] - mid) < 0 and second[-1] >= (first[0] + first[-1]) / 2:
            right, left = (big[0], big[1]) if centres[0] < centres[1] else (big[1], big[0])
            out[lab == right] = RIGHT
            out[lab == left] = LEFT
            return out
    # one mass (lungs touching in front of the heart): cut each slice at its narrowest row near the midline
    whole = lab == big[0]
    out[whole] = LEFT
    band = max(1, int(round(JUNCTION_BAND * (rows[-1] - rows[0]))))
    lo, hi = max(0, int(mid) - band), min(lab.shape[0], int(mid) + band + 1)
    for z in np.flatnonzero(whole.any(axis=(0, 1))):
        width = whole[lo:hi, :, z].sum(axis=1)
        narrowest = lo + np.flatnonzero(width == width.min())
        cut = int(narrowest[np.argmin(np.abs(narrowest - mid))]) + 1  # ties: the row nearest the midline
        out[:cut, :, z][whole[:cut, :, z]] = RIGHT
    return out


def _slice_frame(body2d):
    """(centre row, centre col, half height, half width) of the body in one slice, or None."""
    rows, cols = np.flatnonzero(body2d.any(1)), np.flatnonzero(body2d.any(0))
    return _frame(rows, cols) if rows.size else None


def _frame(rows, cols):
    return ((rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0,
            max(1.0, (rows[-1] - rows[0]) / 2.0), max(1.0, (cols[-1] - cols[0]) / 2.0))


def _outwardness(shape, frame, r0=0, c0=0):
    """Elliptic radius from the body's centre (0 at the centre, 1 at its edge) on a (r0, c0) box."""
    cr, cc, hr, hc = frame
    rr = (np.arange(shape[0]) + r0 - cr) / hr
    cc_ = (np.arange(shape[1]) + c0 - cc) / hc
    return np.sqrt(rr[:, None] ** 2 + cc_[None, :] ** 2)


def _hull(mask2d):
    hull = np.zeros(mask2d.shape, np.uint8)
    points = cv2.findNonZero(mask2d.view(np.uint8))
    if points is not None:
        cv2.fillConvexPoly(hull, cv2.convexHull(points), 1)
    return hull.view(bool)


def _own_side(shape, frame, side, r0=0):
    rows = np.arange(shape[0]) + r0
    half = rows <= frame[0] if side == RIGHT else rows >= frame[0]
    return np.broadcast_to(half[:, None], shape)


def _angle_bins(shape, frame, r0, c0):
    cr, cc, hr, hc = frame
    rr = (np.arange(shape[0]) + r0 - cr)[:, None] / hr
    cc_ = (np.arange(shape[1]) + c0 - cc)[None, :] / hc
    angle = np.arctan2(rr, cc_)
    return np.minimum(((angle + np.pi) / (2 * np.pi) * ANGLE_BINS).astype(np.int64), ANGLE_BINS - 1)


def _rays(lung, frame, r0=0, c0=0):
    """(outwardness of each pixel, the outwardness of the lung's furthest pixel on the pixel's ray from the
    body's centre, 0 where the ray meets no lung) for one lung in one slice, on the (r0, c0) box."""
    out = _outwardness(lung.shape, frame, r0, c0)
    bins = _angle_bins(lung.shape, frame, r0, c0)
    return out, _furthest(lung, out, bins)[bins]


def _furthest(lung, out, bins):
    """Per angle bin, the outwardness of the lung's furthest pixel on that ray (0 where it meets no lung)."""
    furthest = np.zeros(ANGLE_BINS)
    np.maximum.at(furthest, bins[lung], out[lung])
    return furthest


def _pleural_regions(candidates, lung, out, outer=None):
    """The regions of `candidates` (one slice) that touch `lung`, are no bigger than it (DENSE_MAX_SHARE), lie in
    the body's outer part (mean outwardness `out` above DENSE_MIN_OUT) and, where `outer` is given, lie mostly
    in it (OUTER_SHARE)."""
    n, lab = _regions(candidates)
    touch = cv2.dilate(lung.view(np.uint8), np.ones((3, 3), np.uint8)).view(bool)
    flat = lab.ravel()
    count = np.bincount(flat, minlength=n)

    def share(mask):  # per region, the share of its pixels in `mask` (or its mean, for a float map)
        return np.bincount(flat, weights=mask.ravel(), minlength=n) / np.maximum(count, 1)
    keep = (share(touch) > 0) & (count <= DENSE_MAX_SHARE * lung.sum()) & (share(out) > DENSE_MIN_OUT)
    if outer is not None:
        keep &= share(outer) >= OUTER_SHARE
    keep[0] = False
    return keep[lab]


def _dense_lung(labels, hu, inner, spacing):
    """Step 7: uint8 side labels of the dense regions in each lung's hull that lie between it and the
    chest wall: along the ray from the body's centre, further out than any of the lung."""
    dense = np.zeros(labels.shape, np.uint8)
    thin, _ = _disk(DENSE_MIN_MM, spacing)
    for z in np.flatnonzero(labels.any(axis=(0, 1))):
        frame = _slice_frame(inner[..., z])
        if frame is None:
            continue
        for side in (RIGHT, LEFT):
            m = labels[..., z] == side
            if m.sum() < 3:
                continue
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            lung = m[box]
            gap = (_hull(lung) & ~lung & (labels[..., z][box] == 0) & (hu[..., z][box] < DENSE_MAX_HU)
                   & inner[..., z][box] & _own_side(lung.shape, frame, side, rows[0]))
            gap = cv2.morphologyEx(gap.view(np.uint8), cv2.MORPH_OPEN, thin).view(bool)
            if not gap.any():
                continue
            out, furthest = _rays(lung, frame, rows[0], cols[0])
            outer = gap & (furthest > 0) & (out > furthest)  # lung inwards along the ray, none outwards
            dense[..., z][box][_pleural_regions(gap, lung, out, outer)] = side
    return dense


def _ribs_near(hu, inner, spacing):
    """Bone (above BONE_HU) inside the body, spread over RIB_Z_MM along z: a slice between two ribs sees them."""
    bone = ((hu > BONE_HU) & inner).view(np.uint8)
    k = int(round(RIB_Z_MM / spacing[2]))
    return (ndimage.maximum_filter1d(bone, 2 * k + 1, axis=2) if k else bone).view(bool)


def _wall_lung(labels, hu, inner, spacing):
    """Step 8: uint8 side labels of the dense regions between a lung and its ribs: along the ray from the body's
    centre, further out than any of the lung and nearer than the first bone beyond it. This is dependent
    consolidation whose front against the chest wall is flat or convex (no aerated lung outwards of it, so
    outside the lung's hull); a ray with no bone beyond the lung (cartilage, a gap in the scan) adds nothing."""
    dense = np.zeros(labels.shape, np.uint8)
    thin, _ = _disk(DENSE_MIN_MM, spacing)
    ribs = _ribs_near(hu, inner, spacing)
    body_rows, body_cols = inner.any(axis=1), inner.any(axis=0)  # (row, z), (col, z): one pass, not one per slice
    for z in np.flatnonzero(labels.any(axis=(0, 1))):
        rows, cols = np.flatnonzero(body_rows[:, z]), np.flatnonzero(body_cols[:, z])
        if not rows.size:
            continue
        frame = _frame(rows, cols)
        box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1, z]
        # z is the last axis: one contiguous copy of each slice, not a strided read per use
        slab, shu, sribs = (np.ascontiguousarray(a[box]) for a in (labels, hu, ribs))
        out = _outwardness(slab.shape, frame, rows[0], cols[0])
        bins = _angle_bins(slab.shape, frame, rows[0], cols[0])
        free = (slab == 0) & (shu > WALL_MIN_HU) & (shu < DENSE_MAX_HU) & inner[box]
        for side in (RIGHT, LEFT):
            lung = slab == side
            if lung.sum() < 3:
                continue
            furthest = _furthest(lung, out, bins)[bins]
            beyond = out > furthest
            bone = sribs & beyond & (furthest > 0)
            first_bone = np.full(ANGLE_BINS, np.inf)
            np.minimum.at(first_bone, bins[bone], out[bone])
            first_bone[np.isinf(first_bone)] = 0  # a ray with no bone beyond the lung: nothing
            band = (free & beyond & (out < first_bone[bins])
                    & _own_side(lung.shape, frame, side, rows[0]))
            band = cv2.morphologyEx(band.view(np.uint8), cv2.MORPH_OPEN, thin).view(bool)
            if not band.any():
                continue
            dense[box][_pleural_regions(band, lung, out)] = side
    return dense


def _fill(labels, spacing):
    disk, r = _disk(CLOSE_MM, spacing)
    out = labels.copy()
    for side in (RIGHT, LEFT):
        m = labels == side
        for z in np.flatnonzero(m.any(axis=(0, 1))):
            rows, cols = np.flatnonzero(m[..., z].any(1)), np.flatnonzero(m[..., z].any(0))
            box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1, z]  # work on the lung's box only
            padded = np.pad(m[box].astype(np.uint8), r)
            closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk)[r:-r, r:-r].view(bool)
            filled = _fill_holes_2d(closed)
            target = out[box]
            target[filled & (target == 0)] = side
    return out


def find_lungs(hu, spacing):
    """Lungs(labels, dense) in the display view: labels 1 = the patient's right lung, 2 = the left lung."""
    body = body_mask(hu, spacing)
    inner = _inner(body, spacing)
    candidates = (hu < AIR_HU) & inner
    candidates = _remove_airways(candidates, hu, body, spacing)
    lab, ids, ml = _lung_components(candidates, hu, spacing)
    labels = _split(lab, ids, ml, body)
    labels = _fill(labels, spacing)
    dense = _dense_lung(labels, hu, inner, spacing)
    wall = _wall_lung(labels, hu, inner, spacing)
    dense = np.where(dense > 0, dense, wall)
    labels = np.where(labels > 0, labels, dense)
    return Lungs(labels, dense > 0, inner)


def lung_mask(hu, spacing):
    """uint8 labels in the display view: 1 = the patient's right lung, 2 = the left lung, 0 = other."""
    return find_lungs(hu, spacing).labels


def _cage(hu2d, inner2d):
    """The rib cage in one slice: the convex hull of its bone (spine, ribs, sternum) inside the body; the
    body's inner part where a slice shows too little bone to draw one."""
    bone = (hu2d > BONE_HU) & inner2d
    if bone.sum() < CAGE_MIN_PIXELS:
        return inner2d
    return _hull(bone) & inner2d


def _reach(lungs, hu, z, side, spacing, frame, cage):
    """(distance in mm from the lung in slice z, the lung's hull, where infection touching the lung may add to
    it: within ATTACH_MM inside the rib cage, on its side of the midline, not bone (below DENSE_MAX_HU) and
    not inwards of the lung (heart, mediastinum, liver dome))."""
    lung = lungs.labels[..., z] == side
    if not lung.any():
        return np.full(lung.shape, np.inf), lung, lung
    d = cv2.distanceTransform((~lung).view(np.uint8), cv2.DIST_L2, 5) * float(min(spacing[:2]))
    out, furthest = _rays(lung, frame)
    adjacent = d <= 1.5 * float(min(spacing[:2]))  # touching it in the slice, whatever the ray says
    near = ((d <= ATTACH_MM) & cage & _own_side(lung.shape, frame, side)
            & (hu[..., z] < DENSE_MAX_HU) & ((out >= furthest) | adjacent))
    return d, _hull(lung), near


def attach_infection(lungs, infection, hu, spacing):
    """(labels, added): infection that touches a lung or lies in its envelope belongs to that lung --
    dense disease at the pleura or the hilum that the HU mask left out -- within the bounds of `_reach`;
    a voxel both lungs may take goes to the nearer. `lungs` is find_lungs' result; `added` is bool."""
    labels = lungs.labels
    added = np.zeros(labels.shape, bool)
    outside = infection & (labels == 0)
    if not outside.any() or not labels.any():
        return labels, added
    comp, _ = ndimage.label(outside)
    touching = np.unique(comp[ndimage.binary_dilation(labels > 0) & (comp > 0)])
    result = labels.copy()
    for z in np.flatnonzero(outside.any(axis=(0, 1))):
        frame = _slice_frame(lungs.inner[..., z])
        if frame is None:
            continue
        touches = np.isin(comp[..., z], touching)
        cage = _cage(hu[..., z], lungs.inner[..., z])
        dist = []
        for side in (RIGHT, LEFT):
            d, hull, near = _reach(lungs, hu, z, side, spacing, frame, cage)
            dist.append(np.where(hull | (near & touches), d, np.inf))
        take = outside[..., z] & np.isfinite(np.minimum(*dist)) & (hu[..., z] < DENSE_MAX_HU)  # never bone
        result[..., z][take] = np.where(dist[0] <= dist[1], RIGHT, LEFT)[take]
    added = (result > 0) & (labels == 0)
    return result, added


def fill_summary(labels, dense, added, voxel_ml):
    """The report's keys for what was added to the lungs: dense lung (steps 7 and 8) and attached infection, mL."""
    s = {}
    for key, mask in (("dense_fill_ml", dense), ("infection_fill_ml", added)):
        right, left = int((mask & (labels == RIGHT)).sum()), int((mask & (labels == LEFT)).sum())
        s.update({key: round((right + left) * voxel_ml, 4), f"right_{key}": round(right * voxel_ml, 4),
                  f"left_{key}": round(left * voxel_ml, 4)})
    return s
