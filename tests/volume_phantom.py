"""A synthetic chest CT in HU for the volume tests: written as NIfTI (permuted, flipped axes) and as a
DICOM series (pydicom), with analytic lung volumes.

World coordinates are RAS+ mm: +x towards the patient's Right (DICOM's LPS has +x towards the Left).
"""
import random

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

# RAS+: x grows towards the patient's Right, so the right lung is at x > 0.
RIGHT_X = +1

SPACING = (1.6, 1.4, 3.0)       # base grid: i towards Left, j towards Posterior, k towards Superior
SHAPE = (128, 112, 48)
BODY = (90.0, 70.0)             # body: elliptic cylinder semi-axes (x, y), mm
LUNGS = {"right": ((RIGHT_X * 40.0, 0.0, 0.0), (30.0, 45.0, 55.0)),
         "left": ((-RIGHT_X * 40.0, 5.0, 0.0), (28.0, 42.0, 50.0))}
VESSELS = [(RIGHT_X * 35.0, -10.0, 3.0), (-RIGHT_X * 42.0, 12.0, 2.5)]   # along z: x, y, radius
TRACHEA = (0.0, -30.0, 8.0, 20.0)  # x, y, radius, from z up
INFECTION = ((RIGHT_X * 50.0, 15.0, 10.0), 12.0)  # sphere centre, radius: inside the right lung
HU_AIR, HU_BODY, HU_LUNG, HU_VESSEL, HU_GGO = -1000, 40, -850, 40, -300
# the file's voxel order: axes permuted and flipped relative to the base grid
FILE_ORNT = np.array([[2, -1], [0, 1], [1, -1]])


def base_affine():
    """RAS affine of the base grid (voxel centres symmetric around 0)."""
    a = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    a[:3, 3] = -a[:3, :3] @ ((np.array(SHAPE) - 1) / 2.0)
    return a


def world(shape, affine):
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return [c.reshape(shape) for c in xyz]


def ellipsoid(x, y, z, centre, axes):
    return ((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2 + ((z - centre[2]) / axes[2]) ** 2 <= 1


def infection_mask(x, y, z):
    (cx, cy, cz), r = INFECTION
    return (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 <= r ** 2


def base_phantom(seed=0):
    """(HU int16 array on the base grid, its affine)."""
    affine = base_affine()
    x, y, z = world(SHAPE, affine)
    hu = np.full(SHAPE, HU_AIR, np.float64)
    hu[(x / BODY[0]) ** 2 + (y / BODY[1]) ** 2 <= 1] = HU_BODY
    for centre, axes in LUNGS.values():
        hu[ellipsoid(x, y, z, centre, axes)] = HU_LUNG
    for vx, vy, r in VESSELS:
        inside = ((x - vx) ** 2 + (y - vy) ** 2 <= r ** 2) & (hu == HU_LUNG)
        hu[inside] = HU_VESSEL
    tx, ty, tr, tz = TRACHEA
    hu[((x - tx) ** 2 + (y - ty) ** 2 <= tr ** 2) & (z >= tz)] = HU_AIR
    hu[infection_mask(x, y, z)] = HU_GGO
    rng = np.random.default_rng(seed)
    hu += rng.integers(-20, 21, size=hu.shape)  # noise, integer HU
    return hu.astype(np.int16), affine


def analytic_ml():
    return {side: 4 / 3 * np.pi * np.prod(axes) / 1000.0 for side, (_, axes) in LUNGS.items()}


def to_file_order(array, affine):
    """(array, affine) with the file's permuted / flipped axes (FILE_ORNT)."""
    return ornt.apply_orientation(array, FILE_ORNT), affine @ ornt.inv_ornt_aff(FILE_ORNT, array.shape)


def write_nifti(path, array, affine, dtype=None):
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype or array.dtype), affine)
    nib.save(img, str(path))
    return path


def write_phantom_nifti(path, seed=0):
    hu, affine = base_phantom(seed)
    data, file_affine = to_file_order(hu, affine)
    return write_nifti(path, data, file_affine)


def write_dicom_series(folder, hu, affine, slope=0.5, intercept=-1200.0, series_uid=None, modality="CT",
                       keep=None, shuffle_seed=0, description="phantom"):
    """One file per axial slice of `hu` (base grid: i along LPS +x, j along LPS +y, k along +z), stored as
    (HU - intercept) / slope in uint16, under shuffled file names. keep: slice indices to write."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    row_dir = lps[:3, 0] / np.linalg.norm(lps[:3, 0])
    col_dir = lps[:3, 1] / np.linalg.norm(lps[:3, 1])
    keep = list(range(hu.shape[2])) if keep is None else list(keep)
    names = [f"IM{n:04d}" for n in random.Random(shuffle_seed).sample(range(1000, 9999), len(keep))]
    for name, k in zip(names, keep):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, study_uid
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.PixelSpacing = [float(np.linalg.norm(lps[:3, 1])), float(np.linalg.norm(lps[:3, 0]))]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, 2]))
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        stored = np.round((hu[:, :, k].T.astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / name, enforce_file_format=True)
    return series_uid


# A chest with dependent dense consolidation: adult-sized lungs on a coarser grid; the right lung's posterior
# cap is consolidated (HU of soft tissue: the air threshold cannot see it) and holds a ground-glass blob; the
# left lung has a dense pleural-based nodule biting into its lateral border (lung on both sides of it).
DENSE_SPACING = (2.0, 2.0, 4.0)
DENSE_SHAPE = (170, 120, 52)
DENSE_BODY = (165.0, 112.0)
DENSE_LUNGS = {"right": ((RIGHT_X * 65.0, 0.0, 0.0), (50.0, 80.0, 80.0)),
               "left": ((-RIGHT_X * 65.0, 0.0, 0.0), (45.0, 75.0, 75.0))}
CAP_FROM = 0.55                     # consolidated: posterior of centre - CAP_FROM x the lung's half depth
GGO_BLOB = ((RIGHT_X * 60.0, 20.0, 20.0), 18.0)
PLEURAL_NODULE = ((-RIGHT_X * 110.0, 0.0, 0.0), 20.0)   # centred on the left lung's lateral border
HU_CONSOLIDATION = 30
HU_FAT = -100
MEDIASTINUM_MM = 15.0         # half width of the soft-tissue mediastinum between the lungs
RIBS = (140.0, 100.0, 6.0)           # the rib cage: an elliptic ring (semi-axes, thickness mm), in arcs
HU_BONE = 700


def dense_phantom(seed=0):
    """(HU int16 on the base-grid convention, affine, truth) where truth holds bool masks 'right', 'left'
    (the lungs' true extent), 'consolidation', 'ggo' (both in the right lung) and 'nodule' (in the left)."""
    affine = np.diag([-DENSE_SPACING[0], -DENSE_SPACING[1], DENSE_SPACING[2], 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(DENSE_SHAPE) - 1) / 2.0)
    x, y, z = world(DENSE_SHAPE, affine)
    hu = np.full(DENSE_SHAPE, HU_AIR, np.float64)
    hu[(x / DENSE_BODY[0]) ** 2 + (y / DENSE_BODY[1]) ** 2 <= 1] = HU_BODY
    radius = np.sqrt((x / RIBS[0]) ** 2 + (y / RIBS[1]) ** 2)
    # inside the ribs, around the lungs: fat (the extrapleural fat and the fat of the mediastinum's edges),
    # the mediastinum in the middle soft tissue
    hu[(radius * RIBS[1] < RIBS[1] - RIBS[2] / 2) & (np.abs(x) > MEDIASTINUM_MM)] = HU_FAT
    arcs = np.sin(9 * np.arctan2(y, x) + z / 10.0) > -0.3   # ribs with intercostal gaps, oblique along z
    hu[(np.abs(radius - 1) * RIBS[1] <= RIBS[2] / 2) & arcs] = HU_BONE
    truth = {side: ellipsoid(x, y, z, c, a) for side, (c, a) in DENSE_LUNGS.items()}
    for m in truth.values():
        hu[m] = HU_LUNG
    (cx, cy, _), (_, by, _) = DENSE_LUNGS["right"]
    truth["consolidation"] = truth["right"] & (y < cy - CAP_FROM * by)   # RAS: posterior is -y
    (gx, gy, gz), r = GGO_BLOB
    truth["ggo"] = truth["right"] & ((x - gx) ** 2 + (y - gy) ** 2 + (z - gz) ** 2 <= r ** 2)
    (nx, ny, nz), r = PLEURAL_NODULE
    truth["nodule"] = truth["left"] & ((x - nx) ** 2 + (y - ny) ** 2 + (z - nz) ** 2 <= r ** 2)
    hu[truth["consolidation"] | truth["nodule"]] = HU_CONSOLIDATION
    hu[truth["ggo"]] = HU_GGO
    hu += np.random.default_rng(seed).integers(-20, 21, size=hu.shape)
    return hu.astype(np.int16), affine, truth
