"""Reading CT volumes: NIfTI files (nibabel) and DICOM series (pydicom), in Hounsfield units.

A `Volume` holds the voxels in the file's own voxel order (nibabel's convention: i, j, k) and the
affine that maps voxel indices to RAS+ millimetres, so every output can be written back with
exactly the input's shape and geometry. DICOM is read into the same convention (i = column,
j = row, k = slice ordered along the slice normal; LPS patient coordinates turned into RAS).

Each problem is one line naming the file: a 4D image, an unreadable file, a folder without any
scan, a modality other than CT (errors); several series in one folder, gaps or uneven spacing
along z (warnings naming the series / the gap).
"""
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
DICOM_SUFFIXES = (".dcm", ".ima", "")  # DICOM files often have no extension at all
SPACING_TOLERANCE = 0.01  # relative: slice steps differing by more than 1% are "uneven"


@dataclass
class Volume:
    data: np.ndarray      # float32 (i, j, k), HU (or 0..255 gray when the file holds that)
    affine: np.ndarray    # 4x4, voxel index -> RAS+ mm
    name: str             # case name: the file name without .nii/.nii.gz, or the DICOM folder's name
    source: Path
    notes: list = field(default_factory=list)  # what was done on reading, for the report

    @property
    def spacing(self):
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def voxel_ml(self):
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0


def case_name(path):
    path = Path(path)
    for suffix in NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem if path.is_file() else path.name


def is_nifti(path):
    return Path(path).is_file() and Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom_file(path):
    """A file with the DICOM preamble ('DICM' at byte 128), or a .dcm file (some omit the preamble)."""
    path = Path(path)
    if not path.is_file() or path.name.startswith("."):
        return False
    try:
        with open(path, "rb") as f:
            f.seek(128)
            if f.read(4) == b"DICM":
                return True
    except OSError:
        return False
    return path.suffix.lower() == ".dcm"


def _dicom_files(folder):
    return [p for p in sorted(Path(folder).iterdir()) if is_dicom_file(p)]


def find_cases(path):
    """[(kind, path)] with kind 'nifti' or 'dicom': a NIfTI file, a DICOM file or series folder, or a
    folder holding NIfTI files and/or DICOM series folders. A folder without any scan is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    if path.is_file():
        if is_nifti(path):
            return [("nifti", path)]
        if is_dicom_file(path):
            return [("dicom", path)]
        raise DataError(f"{path}: neither a NIfTI file (.nii, .nii.gz) nor a DICOM file")
    if _dicom_files(path):
        return [("dicom", path)]
    cases = [("nifti", p) for p in sorted(path.iterdir()) if is_nifti(p) and not p.name.startswith(".")]
    cases += [("dicom", p) for p in sorted(path.iterdir()) if p.is_dir() and _dicom_files(p)]
    if not cases:
        raise DataError(f"{path}: no scan found (expected NIfTI files .nii/.nii.gz, DICOM files, "
                        f"or folders of DICOM series)")
    return cases


def is_volume_input(path):
    """True when `path` is a CT volume or a folder of them (NIfTI / DICOM), False for 2D slices."""
    path = Path(path)
    if path.is_file():
        return is_nifti(path) or is_dicom_file(path)
    if not path.is_dir() or (path / "Imgs").is_dir():
        return False
    try:
        find_cases(path)
    except (DataError, OSError):
        return False
    return True


def read_case(kind, path, series=None):
    return read_nifti(path) if kind == "nifti" else read_dicom(path, series)


# ------------------------------------------------------------------------------------------ NIfTI

def read_nifti(path):
    """A NIfTI volume with its scaling (scl_slope/scl_inter) applied; 4D images are refused."""
    import nibabel as nib
    path = Path(path)
    try:
        img = nib.load(str(path))
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise DataError(f"{path}: a {len(img.shape)}D image of shape {img.shape}; expected one 3D CT volume "
                            f"(split the time/channel dimension into separate files)")
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)  # dataobj applies the scaling
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read as NIfTI ({' '.join(str(e).split())})") from e
    if not np.isfinite(data).all():
        data = np.nan_to_num(data, nan=-1024.0, posinf=-1024.0, neginf=-1024.0)
    return Volume(data, img.affine.astype(np.float64), case_name(path), path)


# ------------------------------------------------------------------------------------------ DICOM

def _read_header(path):
    import pydicom
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:
        raise DataError(f"{path}: cannot read as DICOM ({' '.join(str(e).split())})") from e


def _series_label(ds):
    desc = getattr(ds, "SeriesDescription", "") or ""
    return f"{ds.SeriesInstanceUID}" + (f" ('{desc}')" if desc else "")


def _pick_series(folder, headers, series):
    groups = {}
    for path, ds in headers:
        groups.setdefault(str(getattr(ds, "SeriesInstanceUID", "unknown")), []).append((path, ds))
    if series is not None:
        if series not in groups:
            raise DataError(f"{folder}: no series with UID {series} (found: {', '.join(sorted(groups))})")
        return groups[series]
    chosen = max(groups, key=lambda uid: len(groups[uid]))
    others = [f"{_series_label(g[0][1])} ({len(g)} files)" for uid, g in groups.items() if uid != chosen]
    if others:
        warnings.warn(f"{folder}: {len(groups)} series in the folder; reading {chosen} "
                      f"({len(groups[chosen])} files), skipping {'; '.join(others)} (choose with --series UID)")
    return groups[chosen]


def _check_ct(path, ds):
    modality = getattr(ds, "Modality", None)
    if modality != "CT":
        raise DataError(f"{path}: modality {modality or 'unknown'}, not CT; this tool reads CT scans only "
                        f"(Hounsfield units)")


def _geometry(path, ds):
    try:
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    except AttributeError:
        iop, ipp = np.array([1, 0, 0, 0, 1, 0], float), np.zeros(3)
    ps = [float(v) for v in getattr(ds, "PixelSpacing", [1.0, 1.0])]
    return iop, ipp, ps


def _slice_steps(folder, entries, normal):
    """Positions along the normal (sorted entries) and the step; warns about gaps / uneven steps."""
    positions = np.array([float(np.dot(e[2], normal)) for e in entries])
    if len(positions) < 2:
        thickness = float(getattr(entries[0][1], "SliceThickness", 1.0) or 1.0)
        return positions, thickness
    steps = np.diff(positions)
    if np.any(steps == 0):
        i = int(np.argmin(steps != 0))
        raise DataError(f"{folder}: two slices at the same position {positions[i]:.2f} mm "
                        f"({entries[i][0].name}, {entries[i + 1][0].name}); keep one series per folder")
    step = float(np.median(steps))
    uneven = np.abs(steps - step) > SPACING_TOLERANCE * abs(step)
    for i in np.flatnonzero(uneven):
        kind = "a gap" if steps[i] > step else "uneven spacing"
        warnings.warn(f"{folder}: {kind} along z between {entries[i][0].name} ({positions[i]:.2f} mm) and "
                      f"{entries[i + 1][0].name} ({positions[i + 1]:.2f} mm): {steps[i]:.2f} mm instead of "
                      f"{step:.2f} mm; volumes assume the median step")
    return positions, step


def read_dicom(path, series=None):
    """A DICOM series (a folder, or one file) in HU: RescaleSlope/RescaleIntercept applied, slices
    sorted by position along the slice normal, the largest series chosen unless `series` is given."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = _dicom_files(path) if path.is_dir() else [path]
    headers = [(p, _read_header(p)) for p in files]
    chosen = _pick_series(folder, headers, series)
    for p, ds in chosen:
        _check_ct(p, ds)
    iop, _, ps = _geometry(*chosen[0])
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    entries = sorted(((p, ds, _geometry(p, ds)[1]) for p, ds in chosen), key=lambda e: float(np.dot(e[2], normal)))
    positions, step = _slice_steps(folder, entries, normal)
    import pydicom
    slices = []
    for p, _, _ in entries:
        try:
            ds = pydicom.dcmread(str(p))
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as e:
            raise DataError(f"{p}: cannot read the DICOM pixels ({' '.join(str(e).split())})") from e
        if pixels.ndim != 2:
            raise DataError(f"{p}: pixel data of shape {pixels.shape}; expected one 2D slice per file")
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        slices.append(pixels * slope + intercept)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices of different sizes {sorted(shapes)} in one series")
    data = np.stack([s.T for s in slices], axis=2)  # (columns, rows, slices) = (i, j, k)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]   # i (column index) moves along the row direction, by the column spacing
    lps[:3, 1] = col_dir * ps[0]
    lps[:3, 2] = normal * step
    lps[:3, 3] = entries[0][2]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS
    name = case_name(path) if path.is_dir() else Path(path).stem
    return Volume(data.astype(np.float32), affine, name, path)


def save_nifti(array, affine, path, dtype=np.uint8):
    """Write `array` (in the input's voxel order) with the input's affine, atomically (temporary file
    beside the target, then one rename; nibabel picks gzip from the name, so the temporary keeps it)."""
    import nibabel as nib
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.header.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = Path(path)  # nibabel reads the format off the ending: the temporary file keeps ".nii.gz"
    return atomic_write(path, lambda tmp: nib.save(img, tmp), suffix="".join(path.suffixes[-2:]))
