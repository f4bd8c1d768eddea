"""Orientation and cropping: from the file's voxel order to the training slices' view and back.

The training slices (COVID-SemiSeg) are axial slices shown with the patient's left-right axis running
down the image (right lung on top) and front-back across it (spine on the right) -- the view of
a NIfTI array's first two axes in LPS order. `DISPLAY_AXCODES` says that: rows run towards the
patient's Left, columns towards Posterior, slices towards Superior. Every volume is turned into this
view by whole-axis flips and transposes (no resampling: the nearest axis of an oblique scan), and
every output is turned back, so it is written in the input's own voxel order with its affine.
"""
from dataclasses import dataclass

import numpy as np
from nibabel import orientations as ornt

DISPLAY_AXCODES = ("L", "P", "S")
CROP_MARGIN = 0.08  # of the lungs' extent, each side: the training crops show the chest wall around the lungs
MIN_CROP_MM = 10.0  # and at least this much


@dataclass
class Orientation:
    to_display: np.ndarray    # nibabel ornt transform: file order -> display order
    to_file: np.ndarray       # and back
    display_affine: np.ndarray
    display_shape: tuple
    source: np.ndarray        # nibabel ornt of the file: (RAS axis, flip) per file axis

    def display(self, array):
        return np.ascontiguousarray(ornt.apply_orientation(array, self.to_display))

    def file_order(self, array):
        return np.ascontiguousarray(ornt.apply_orientation(array, self.to_file))

    @property
    def spacing(self):
        """Voxel size (row, column, slice) in mm in the display view."""
        return tuple(float(s) for s in np.linalg.norm(self.display_affine[:3, :3], axis=0))

    def slice_z_mm(self):
        """The superior-inferior (RAS z) coordinate of each display slice's centre."""
        rows, cols, n = self.display_shape
        idx = np.stack([np.full(n, (rows - 1) / 2), np.full(n, (cols - 1) / 2), np.arange(n), np.ones(n)])
        return (self.display_affine @ idx)[2]

    def file_slice_index(self):
        """For each display slice (inferior -> superior), its index along the file's own slice axis."""
        n = self.display_shape[2]
        axis = int(np.flatnonzero(self.source[:, 0] == 2)[0])  # the file axis closest to S
        return np.arange(n) if self.source[axis, 1] == 1 else np.arange(n)[::-1].copy()


def orientation(affine, shape):
    """The transforms between the file's voxel order (affine, shape) and the display view."""
    src = ornt.io_orientation(affine)
    dst = ornt.axcodes2ornt(DISPLAY_AXCODES)
    to_display = ornt.ornt_transform(src, dst)
    to_file = ornt.ornt_transform(dst, src)
    display_shape = tuple(int(shape[int(np.flatnonzero(to_display[:, 0] == d)[0])]) for d in range(3))
    display_affine = affine @ ornt.inv_ornt_aff(to_display, shape)
    return Orientation(to_display, to_file, display_affine, display_shape, src)


def lung_box(lungs, spacing, margin=CROP_MARGIN, min_mm=MIN_CROP_MM):
    """(r0, r1, c0, c1): one in-plane box for the whole volume around every slice's lungs, widened by
    `margin` of the lungs' extent (at least `min_mm`) each side; the whole slice if no lungs."""
    rows, cols = lungs.shape[:2]
    any_r = np.flatnonzero(lungs.any(axis=(1, 2)))
    any_c = np.flatnonzero(lungs.any(axis=(0, 2)))
    if not any_r.size:
        return 0, rows, 0, cols
    box = []
    for lo, hi, n, mm in ((any_r[0], any_r[-1] + 1, rows, spacing[0]), (any_c[0], any_c[-1] + 1, cols, spacing[1])):
        pad = int(np.ceil(max(margin * (hi - lo), min_mm / mm)))
        box += [max(0, lo - pad), min(n, hi + pad)]
    return tuple(int(v) for v in box)


def slices_with(mask):
    """Indices of the display slices where `mask` has any voxel."""
    return np.flatnonzero(mask.any(axis=(0, 1)))
