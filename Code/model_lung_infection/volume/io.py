"""Reading CT volumes: NIfTI files (nibabel) and DICOM series (pydicom), in Hounsfield units.

A `Volume` holds the voxels in the file's own voxel order (nibabel's convention: i, j, k) and the
affine that maps voxel indices to RAS+ millimetres, so every output can be written back with
exactly the input's shape and geometry. DICOM is read into the same convention (i = column,
j = row, k = slice ordered along the slice normal; LPS patient coordinates turned into RAS).

`find_cases` turns any folder (an archive of patient / study / series folders, at any depth) into
cases: every NIfTI file and every DICOM series (by SeriesInstanceUID, wherever its files lie), each
named by one safe path component made from its path. Each problem is one line naming the file: a
4D image, an unreadable file, a singular affine, non-finite voxels, a folder without any scan, a
modality other than CT (errors); a file without Modality whose values are HU, several series in
one folder read directly, gaps or uneven spacing along z, implausible voxel sizes (warnings).
An Enhanced CT file (multi-frame) is a series of its own: its frames are the slices, placed by their
functional groups. Files that hold no CT slice (localizers, colour screenshots such as dose reports,
objects without an image such as SR) are left out of every series, and a series of them is no case (a
note names them); slices in another orientation than the series' own are left out with a note.
"""
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")  # MetaImage (grand-challenge, LUNA16) and NRRD (3D Slicer)
DICOM_SUFFIXES = (".dcm", ".ima", "")  # DICOM files often have no extension at all
SPACING_TOLERANCE = 0.01  # relative: slice steps differing by more than 1% are "uneven"
# Voxel sizes outside this range (mm) are not a CT scanner's: a broken header, or a unit mistake (cm, m).
PLAUSIBLE_VOXEL_MM = (0.1, 20.0)
# A file without Modality is read as CT when its values are HU: air (1st percentile at most AIR_HU_MAX)
# and nothing beyond dense bone and contrast at the 99th percentile. MR, PET, ultrasound and
# radiographs store non-negative values, so they never pass.
AIR_HU_MAX, DENSE_HU_MAX = -500.0, 4000.0
NAME_MAX = 150  # characters of a case name (a folder name); longer ones are cut and end with a hash
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory: an index of the files, not an image
ORIENTATION_TOLERANCE = 1e-3  # direction cosines closer than this are one orientation
# objects without an image: structured reports (dose), key-object lists, presentation states, documents, RT
NO_IMAGE_MODALITIES = {"SR", "KO", "PR", "DOC", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "PLAN", "FID"}


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


@dataclass
class Case:
    """One scan to process: a NIfTI file, a DICOM series (its files), or a file that could not be read."""
    kind: str             # "file" (NIfTI, MetaImage, NRRD), "dicom" or "unreadable"
    path: Path            # the file, or the folder holding the series
    name: str             # the output folder's name: one safe path component, unique in the run
    files: tuple = ()     # DICOM: the series' files
    series: str = None    # DICOM: SeriesInstanceUID
    error: str = None     # "unreadable": why


def case_name(path):
    path = Path(path)
    for suffix in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem if path.is_file() else path.name


def safe_component(text):
    """`text` as one safe path component: letters, digits and . _ + - only (every other run of
    characters becomes '_'), no leading dot or dash (never '.' or '..'), at most NAME_MAX characters."""
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("._-") or "case"
    if len(name) > NAME_MAX:
        name = f"{name[:NAME_MAX - 9]}_{hashlib.sha1(str(text).encode()).hexdigest()[:8]}"
    return name


def is_nifti(path):
    return Path(path).is_file() and Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def is_volume_file(path):
    """A volume in one file (a .mhd's data file beside it aside): NIfTI, MetaImage or NRRD."""
    return Path(path).is_file() and Path(path).name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES)


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


def is_output_folder(folder):
    """True for the volume stage's output folders (their record), with everything below them."""
    from .output_folder import RECORD_NAME
    return (Path(folder) / RECORD_NAME).is_file()


def _scan_files(root, skip=()):
    """(kind, path) of every NIfTI and DICOM-looking file below `root`, in sorted order; hidden files
    and folders, the folders in `skip` (this run's output) and any earlier run's output folder (its
    masks are not scans) are left out."""
    skip = {os.path.realpath(p) for p in skip}
    for folder, dirs, files in os.walk(root):
        if is_output_folder(folder):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(Path(folder, d)) not in skip)
        for f in sorted(files):
            p = Path(folder, f)
            if is_volume_file(p):
                yield "file", p
            elif is_dicom_file(p):
                yield "dicom", p


def _discovery_header(path):
    """The few tags discovery needs, or None for a DICOM index (DICOMDIR). Raises DataError."""
    import pydicom
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
                                            "ImageType", "Modality", "SamplesPerPixel"])
    except Exception as e:
        raise DataError(f"{path}: cannot read as DICOM ({' '.join(str(e).split())})") from e
    sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or getattr(ds, "SOPClassUID", ""))
    if sop == DICOMDIR_SOP_CLASS or path.name.upper() == "DICOMDIR":
        return None
    return ds


def is_localizer(ds):
    """A localizer (scout, topogram): ImageType's third value in the CT Image IOD is LOCALIZER (AXIAL for
    slices). A projection through the whole body, so never a slice of a volume."""
    image_type = getattr(ds, "ImageType", None) or []
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return any(str(v).strip().upper() == "LOCALIZER" for v in image_type)


def no_slice_reason(ds):
    """Why a DICOM file holds no CT slice (a few words), or None. Archives hold such files beside every
    scan: reports and other objects without an image, colour screenshots (dose reports), localizers."""
    modality = str(getattr(ds, "Modality", "") or "").strip().upper()
    if modality in NO_IMAGE_MODALITIES:
        return f"{modality} objects (no image)"
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) > 1:
        return "colour images (screenshots, dose reports)"
    if is_localizer(ds):
        return "localizer (scout) images (projections)"
    return None


def _split_off_non_slices(members):
    """(the (path, header) members that may be CT slices, {reason: [path]} of the others)."""
    kept, left_out = [], {}
    for p, ds in members:
        reason = no_slice_reason(ds)
        if reason:
            left_out.setdefault(reason, []).append(p)
        else:
            kept.append((p, ds))
    return kept, left_out


def _note_left_out(where, left_out, root=None):
    for reason, paths in left_out.items():
        first = paths[0].relative_to(root) if root else paths[0].name
        warnings.warn(f"{where}: left out {len(paths)} file(s) of {reason}, not CT slices ({first}"
                      f"{', ...' if len(paths) > 1 else ''})")


def _label(parts):
    return "__".join(safe_component(p) for p in parts)


def _relative_parts(path, root):
    rel = Path(path).relative_to(root) if Path(path) != Path(root) else Path(".")
    parts = list(rel.parts)
    if parts and Path(path).is_file():
        parts[-1] = case_name(path)
    return parts or [case_name(root)]


def _series_tag(ds):
    number = str(getattr(ds, "SeriesNumber", "") or "")
    desc = str(getattr(ds, "SeriesDescription", "") or "")
    text = "_".join(t for t in (f"series{number}" if number else "", desc if desc.lower() != "none" else "") if t)
    return text or str(getattr(ds, "SeriesInstanceUID", ""))[-12:] or "series"


def _unique_names(cases):
    """Names made unique in the run (case-insensitively, for case-insensitive file systems) by _2, _3 ..."""
    taken = {"summary.csv"}  # OUT/summary.csv sits beside the case folders
    for case in cases:
        name, n = case.name, 1
        while name.lower() in taken:
            n += 1
            name = f"{case.name}_{n}"
        taken.add(name.lower())
        case.name = name
    return cases


def find_cases(path, series=None, skip=()):
    """Every scan below `path` as a list of Case: a NIfTI file, a DICOM file or series folder, or any
    folder (an archive of patient / study / series folders at any depth) holding NIfTI files and DICOM
    series. A series is every file with one SeriesInstanceUID, so several series in one folder are
    several cases. Names come from the path below `path` (patient__study__series; the series' number
    and description are added where a folder holds several). A file that cannot be read becomes an
    "unreadable" case (the run reports and skips it). `series`: only the DICOM series with that UID.
    `skip`: folders to leave out (the run's own --save_path). A folder without any scan is an error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    if path.is_dir() and is_output_folder(path):
        raise DataError(f"{path}: an output folder of the volume stage (it holds {path / 'volume_run.json'}); its "
                        f"masks are not scans: give the scans' folder as --data_path")
    if path.is_file() and not (is_volume_file(path) or is_dicom_file(path)):
        raise DataError(f"{path}: not a CT volume file: NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd, "
                        f".nhdr) or DICOM")
    root = path.parent if path.is_file() else path
    found = [("file" if is_volume_file(path) else "dicom", path)] if path.is_file() else _scan_files(path, skip)
    cases, groups = [], {}
    for kind, p in found:
        if kind == "file":
            cases.append(Case("file", p, _label(_relative_parts(p, root))))
            continue
        try:
            ds = _discovery_header(p)
        except DataError as e:
            cases.append(Case("unreadable", p, _label(_relative_parts(p, root)), error=str(e)))
            continue
        if ds is not None:
            uid = str(getattr(ds, "SeriesInstanceUID", "") or f"file:{p}")  # no UID: the file is its own series
            groups.setdefault(uid, []).append((p, ds))
    left_out, no_slice_series = {}, {}
    for uid, members in list(groups.items()):
        groups[uid], left = _split_off_non_slices(members)
        for reason, paths in left.items():
            left_out.setdefault(reason, []).extend(paths)
        if not groups[uid]:
            del groups[uid]
            no_slice_series[uid] = ", ".join(left)
    _note_left_out(path, left_out, root)
    folders = {uid: _common_folder(members) for uid, members in groups.items()}
    per_folder = {}
    for uid, folder in folders.items():
        per_folder.setdefault(folder, []).append(uid)
    for uid, members in groups.items():
        folder = folders[uid]
        if path.is_file():
            parts = [case_name(path)]
        elif uid.startswith("file:"):  # a file of its own: named by its path
            parts = _relative_parts(members[0][0], root)
        else:
            parts = _relative_parts(folder, root)
        if len(per_folder[folder]) > 1 and not uid.startswith("file:"):
            parts.append(_series_tag(members[0][1]))
        cases.append(Case("dicom", folder, _label(parts), tuple(p for p, _ in members),
                          None if uid.startswith("file:") else uid))
    if series is not None:
        chosen = [c for c in cases if c.series == series]
        if not chosen and series in no_slice_series:
            raise DataError(f"{path}: DICOM series {series} holds no CT slice, only {no_slice_series[series]}")
        if not chosen:
            uids = sorted(c.series for c in cases if c.series)
            raise DataError(f"{path}: no DICOM series with UID {series} (found: {', '.join(uids) or 'none'})")
        cases = chosen
    if not cases:
        only = "; only " + ", ".join(f"{len(v)} file(s) of {k}" for k, v in left_out.items()) if left_out else ""
        raise DataError(f"{path}: no scan found (expected NIfTI files .nii/.nii.gz or DICOM files, in this "
                        f"folder or below it{only})")
    cases.sort(key=lambda c: str(c.path))
    return _unique_names(cases)


def _common_folder(members):
    return Path(os.path.commonpath([str(p.parent) for p, _ in members]))


def is_volume_input(path):
    """True when `path` is a CT volume or a folder with one at any depth (NIfTI / DICOM), False for 2D
    slices. Looks at file names and DICOM preambles only (fast: no header is parsed)."""
    path = Path(path)
    if path.is_file():
        return is_volume_file(path) or is_dicom_file(path)
    if not path.is_dir() or (path / "Imgs").is_dir():
        return False
    if is_output_folder(path):  # the volume stage names it (find_cases) rather than the slice stage
        return True
    return next(_scan_files(path), None) is not None


def read_case(case):
    """The Volume of a Case (named by the case), its voxels and geometry checked."""
    if case.kind == "unreadable":
        raise DataError(case.error)
    volume = read_volume_file(case.path) if case.kind == "file" else read_dicom(case.path, case.series, case.files)
    volume.name = case.name
    return volume


def check_volume(volume):
    """Refuse what cannot be measured, warn about what is implausible; one line each, naming the file.

    Non-finite voxels (NaN, inf) are refused: any value put in their place would be invented HU, and
    air there (the usual fill) becomes lung inside the body and changes the lung volume itself."""
    affine = volume.affine
    if not np.isfinite(affine).all() or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-9:
        sizes = ", ".join(f"{v:g}" for v in np.linalg.norm(np.nan_to_num(affine[:3, :3]), axis=0))
        raise DataError(f"{volume.source}: its voxel-to-mm matrix (affine) is singular or not finite (voxel sizes "
                        f"{sizes} mm): a zero voxel size or axes in one plane; fix the header's pixdim/sform/qform "
                        f"(DICOM: PixelSpacing, ImageOrientationPatient)")
    bad = volume.data.size - int(np.isfinite(volume.data).sum())
    if bad:
        raise DataError(f"{volume.source}: {bad} of {volume.data.size} voxels are not finite (NaN or inf); their HU "
                        f"are unknown and would change the lung volume. Replace them (e.g. with -1024 outside the "
                        f"field of view) and run again")
    low, high = PLAUSIBLE_VOXEL_MM
    spacing = volume.spacing
    if not all(low <= s <= high for s in spacing):
        warnings.warn(f"{volume.source}: voxel size {' x '.join(f'{s:g}' for s in spacing)} mm is outside "
                      f"{low:g}..{high:g} mm, not a CT scanner's: volumes in mL will be wrong; check the header's "
                      f"spacing (pixdim / PixelSpacing, slice positions)")
    return volume


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
        codes = [int(img.header.get(f"{form}_code", 1)) for form in ("sform", "qform")]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read as NIfTI ({' '.join(str(e).split())})") from e
    if codes == [0, 0]:
        warnings.warn(f"{path}: the header holds no orientation (sform and qform codes 0), so the axes are nibabel's "
                      f"guess from the voxel sizes: right/left lung and the upper/lower thirds may be swapped, and the "
                      f"slices shown to the network turned; write the file with its orientation (e.g. by dcm2niix)")
    return check_volume(Volume(data, img.affine.astype(np.float64), case_name(path), path))


def read_itk(path):
    """A MetaImage (.mha, .mhd) or NRRD (.nrrd, .nhdr) volume through SimpleITK, in the NIfTI convention: the
    file's voxel order (i, j, k) and a RAS affine (ITK's physical space is LPS, as DICOM's)."""
    import SimpleITK as sitk
    path = Path(path)
    data_file = _detached_data_file(path)
    if data_file is not None and not data_file.is_file():
        raise DataError(f"{path}: its voxels are in {data_file.name}, which is not beside it; copy the header "
                        f"together with its data file")
    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:
        reason = " ".join(str(e).split()).rpartition("ERROR: ")[2]  # ITK's message, without its source location
        raise DataError(f"{path}: cannot read as {path.suffix[1:]} ({reason})") from e
    size, components = img.GetSize(), img.GetNumberOfComponentsPerPixel()
    if img.GetDimension() != 3 or components != 1:
        raise DataError(f"{path}: a {img.GetDimension()}D image of size {size}"
                        f"{f' with {components} values per voxel' if components != 1 else ''}; expected one 3D CT "
                        f"volume of gray values")
    data = np.asarray(sitk.GetArrayViewFromImage(img), dtype=np.float32).transpose(2, 1, 0)  # (k, j, i) -> (i, j, k)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    return check_volume(Volume(data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, case_name(path), path))


def _detached_data_file(path):
    """The data file a detached header (.mhd, .nhdr) names, when it names one file; else None. Checked before
    ITK reads, whose error for a missing data file names the header ('No such file or directory')."""
    if not path.name.lower().endswith((".mhd", ".nhdr")):
        return None
    key = "elementdatafile" if path.name.lower().endswith(".mhd") else "datafile"
    with open(path, "rb") as f:
        head = f.read(65536).decode("latin-1")
    for line in head.splitlines():
        name, sep, value = line.partition("=" if key == "elementdatafile" else ":")
        value = value.strip()
        if sep and name.strip().lower().replace(" ", "") == key:
            # LOCAL: the voxels follow the header; LIST or a %d pattern: several files, left to ITK
            if value.upper() in ("LOCAL", "") or value.upper().startswith("LIST") or "%" in value or " " in value:
                return None
            return path.parent / value
    return None


def read_volume_file(path):
    """A volume stored in one file: NIfTI (nibabel), MetaImage or NRRD (SimpleITK)."""
    return read_nifti(path) if is_nifti(path) else read_itk(path)


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


def _one_orientation(folder, slices):
    """The slices in the series' main orientation (the most slices'); the others, left out, are named."""
    groups = {}
    for s in slices:
        groups.setdefault(tuple(np.round(s.orientation / ORIENTATION_TOLERANCE).astype(int)), []).append(s)
    if len(groups) == 1:
        return slices
    main = max(groups.values(), key=len)
    others = [s for g in groups.values() if g is not main for s in g]
    warnings.warn(f"{folder}: left out {len(others)} slice(s) in another orientation than the series' {len(main)} "
                  f"({others[0].label}{', ...' if len(others) > 1 else ''}): one volume has one orientation")
    return main


def _check_ct(path, ds):
    """Refuse a modality other than CT; True when the file has no Modality (checked on its values later)."""
    modality = str(getattr(ds, "Modality", "") or "").strip()
    if not modality:
        return True
    if modality != "CT":
        raise DataError(f"{path}: modality {modality}, not CT; this tool reads CT scans only (Hounsfield units)")
    return False


def _check_values_are_hu(folder, data, untagged):
    """Files without Modality (anonymisers strip it) are read as CT when their values are HU: air below
    AIR_HU_MAX at the 1st percentile and at most DENSE_HU_MAX at the 99th (with a warning); else refused."""
    low, high = (float(v) for v in np.percentile(data, [1, 99]))
    what = f"{len(untagged)} file(s) without a Modality tag ({untagged[0].name}{', ...' if len(untagged) > 1 else ''})"
    if low <= AIR_HU_MAX and high <= DENSE_HU_MAX:
        warnings.warn(f"{folder}: {what}, read as CT since the values are Hounsfield units (1st-99th percentile "
                      f"{low:.0f}..{high:.0f} HU, air and soft tissue)")
        return
    raise DataError(f"{folder}: {what}, and the values ({low:.0f}..{high:.0f} at the 1st-99th percentile) are not CT "
                    f"Hounsfield units (no air below {AIR_HU_MAX:g}); this tool reads CT scans only")


@dataclass
class _Slice:
    """One 2D image of a series: a single-frame file, or one frame of a multi-frame (Enhanced CT) file."""
    path: Path
    frame: int            # index in the file's pixel data (0 for a single-frame file)
    frames: int           # the file's NumberOfFrames
    orientation: np.ndarray  # ImageOrientationPatient: row and column direction cosines (LPS)
    position: np.ndarray     # ImagePositionPatient (LPS mm); None where the file has none
    spacing: tuple           # PixelSpacing: (between rows, between columns) mm
    thickness: float
    rescale: tuple           # (slope, intercept): stored value -> HU

    @property
    def label(self):
        return self.path.name if self.frames == 1 else f"{self.path.name} frame {self.frame + 1}"


def _item(ds, sequence):
    """The first item of `sequence` in ds, or None."""
    seq = ds.get(sequence) if ds is not None else None
    return seq[0] if seq else None


def _frame_tag(ds, own, shared, group, name, default):
    """`name` of one frame: from its own functional group `group`, else the shared one, else the file's top
    level, else `default`."""
    for holder in (_item(own, group), _item(shared, group), ds):
        value = getattr(holder, name, None) if holder is not None else None
        if value not in (None, ""):
            return value
    return default


def _slices_of(path, ds):
    """The _Slices of one file. Enhanced CT keeps geometry and rescale in functional groups: per frame
    (PerFrameFunctionalGroupsSequence) or for all frames (SharedFunctionalGroupsSequence), the top level
    standing in for what neither holds."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    slices = []
    for i in range(frames):
        tag = partial(_frame_tag, ds, per_frame[i] if i < len(per_frame) else None, shared)
        orientation = tag("PlaneOrientationSequence", "ImageOrientationPatient", (1, 0, 0, 0, 1, 0))
        position = tag("PlanePositionSequence", "ImagePositionPatient", None)
        spacing = tag("PixelMeasuresSequence", "PixelSpacing", (1.0, 1.0))
        slope = float(tag("PixelValueTransformationSequence", "RescaleSlope", 1.0)) or 1.0
        intercept = float(tag("PixelValueTransformationSequence", "RescaleIntercept", 0.0))
        slices.append(_Slice(path, i, frames, np.array([float(v) for v in orientation]),
                             None if position is None else np.array([float(v) for v in position]),
                             tuple(float(v) for v in spacing),
                             float(tag("PixelMeasuresSequence", "SliceThickness", 1.0)) or 1.0, (slope, intercept)))
    return slices


def _slice_steps(folder, slices, normal):
    """Positions along the normal (sorted slices) and the step; warns about gaps / uneven steps."""
    positions = np.array([float(np.dot(s.position, normal)) for s in slices])
    if len(positions) < 2:
        return positions, slices[0].thickness
    steps = np.diff(positions)
    if np.any(steps == 0):
        i = int(np.argmin(steps != 0))
        raise DataError(f"{folder}: two slices at the same position {positions[i]:.2f} mm "
                        f"({slices[i].label}, {slices[i + 1].label}); keep one series per folder")
    step = float(np.median(steps))
    uneven = np.abs(steps - step) > SPACING_TOLERANCE * abs(step)
    for i in np.flatnonzero(uneven):
        kind = "a gap" if steps[i] > step else "uneven spacing"
        warnings.warn(f"{folder}: {kind} along z between {slices[i].label} ({positions[i]:.2f} mm) and "
                      f"{slices[i + 1].label} ({positions[i + 1]:.2f} mm): {steps[i]:.2f} mm instead of "
                      f"{step:.2f} mm; volumes assume the median step")
    return positions, step


def _decode(s):
    """The pixels of slice `s`'s file as stored: (rows, columns), or (frames, rows, columns)."""
    import pydicom
    ds = None
    try:
        ds = pydicom.dcmread(str(s.path))
        pixels = ds.pixel_array
    except Exception as e:
        why = " ".join(str(e).split())
        raise DataError(f"{s.path}: cannot read the DICOM pixels ({why}){_decoder_hint(ds)}") from e
    if pixels.ndim != (2 if s.frames == 1 else 3):
        raise DataError(f"{s.path}: pixel data of shape {pixels.shape} in {s.frames} frame(s); expected one gray 2D "
                        f"image per frame")
    return pixels


def _slice_offset(slices, normal, step):
    """From one slice's origin to the next (LPS mm): the normal times the step, unless the gantry was tilted,
    which shifts every slice in its plane; the affine then shears as the voxels lie (the voxel volume, and so
    every mL, is the same either way)."""
    if len(slices) < 2:
        return normal * step
    moves = np.diff([s.position for s in slices], axis=0)
    per_mm = moves / (moves @ normal)[:, None]  # per mm along the normal: gaps do not bend the direction
    return np.median(per_mm, axis=0) * step


def _read_hu(slices):
    """Each slice's pixels in HU (float32 2D arrays, in the order given)."""
    multi_frame = {}  # decoded once for all their frames
    out = []
    for s in slices:
        if s.frames == 1:
            plane = _decode(s)
        else:
            if s.path not in multi_frame:
                multi_frame[s.path] = _decode(s)
            plane = multi_frame[s.path][s.frame]
        slope, intercept = s.rescale
        out.append(plane.astype(np.float32) * slope + intercept)
    return out


def _decoder_hint(ds):
    """What to do when compressed pixels could not be decoded (pydicom needs a plugin per compression)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) if ds is not None else None
    if syntax is None or not getattr(syntax, "is_compressed", False):
        return ""
    return (f"; the pixels are compressed as {syntax.name}: install the DICOM decoders of requirements.txt "
            f"(pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg), or write the series uncompressed (gdcmconv --raw)")


def read_dicom(path, series=None, files=None):
    """A DICOM series (a folder, or one file) in HU: RescaleSlope/RescaleIntercept applied, slices
    sorted by position along the slice normal, the largest series chosen unless `series` is given.
    `files`: the series' files (find_cases), instead of the folder's."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = list(files) if files else _dicom_files(path) if path.is_dir() else [path]
    headers = [(p, _read_header(p)) for p in files]
    images, left_out = _split_off_non_slices(headers)
    if headers and not images:
        raise DataError(f"{path}: no CT slice: " + ", ".join(f"{len(v)} file(s) of {k}" for k, v in left_out.items())
                        + "; give the folder of an axial CT series")
    _note_left_out(folder, left_out)
    chosen = _pick_series(folder, images, series)
    untagged = [p for p, ds in chosen if _check_ct(p, ds)]
    slices = _one_orientation(folder, [s for p, ds in chosen for s in _slices_of(p, ds)])
    unplaced = [s for s in slices if s.position is None]
    if unplaced and len(slices) > 1:
        raise DataError(f"{folder}: {len(unplaced)} of {len(slices)} slices have no ImagePositionPatient "
                        f"({unplaced[0].label}{', ...' if len(unplaced) > 1 else ''}): their order and spacing along z "
                        f"are unknown; export the series with its geometry, or convert it to NIfTI with its affine")
    if unplaced:  # one slice: its place only moves the affine's origin
        slices[0].position = np.zeros(3)
    row_dir, col_dir = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(s.position, normal)))
    positions, step = _slice_steps(folder, slices, normal)
    planes = _read_hu(slices)
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices of different sizes {sorted(shapes)} in one series")
    data = np.stack([p.T for p in planes], axis=2)  # (columns, rows, slices) = (i, j, k)
    ps = slices[0].spacing
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]   # i (column index) moves along the row direction, by the column spacing
    lps[:3, 1] = col_dir * ps[0]
    lps[:3, 2] = _slice_offset(slices, normal, step)
    lps[:3, 3] = slices[0].position
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS
    name = case_name(path) if path.is_dir() else Path(path).stem
    volume = check_volume(Volume(data.astype(np.float32), affine, name, path))
    if untagged:
        _check_values_are_hu(folder, volume.data, untagged)
    return volume


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
