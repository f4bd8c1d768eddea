"""CT volumes from real archives: every series of a patient / study / series tree is a case with a safe name,
an unreadable one is named and skipped, untagged DICOM, broken headers and non-finite voxels get one line,
and the options that would be silently ignored are refused. Real files: ../shared/realct (copied into
tmp_path, never into the repository)."""
import argparse
import csv
import shutil
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import SHARED, _need  # noqa: E402

from Code.model_lung_infection import Inf_Net  # noqa: E402
from Code.model_lung_infection.checkpoint import atomic_save  # noqa: E402
from Code.model_lung_infection.errors import DataError, OptionError  # noqa: E402
from Code.model_lung_infection.volume import add_volume_args, run_volumes  # noqa: E402
from Code.model_lung_infection.volume.io import (  # noqa: E402
    find_cases,
    is_volume_input,
    read_dicom,
    read_nifti,
    read_volume_file,
)
from Code.model_lung_infection.volume.window import to_gray  # noqa: E402

REALCT = SHARED / "realct"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def copd():
    """The COPDGene 64x64x79 scan: its DICOM series folder, NIfTI file and CIP's lung labels (1 right, 2 left)."""
    root = _need(REALCT / "copdgene-64")
    return dict(dicom=root / "ct-64Dicom", nifti=root / "ct-64.nii.gz", labels=root / "lm-64_right1_left2.nii.gz")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    atomic_save({"model": Inf_Net(backbone="timm:resnet18").eval().state_dict(),
                 "config": {"model": "inf_net", "backbone": "timm:resnet18"}}, path)
    return path


def _rewrite(src, dst, **tags):
    """Copy a DICOM file with some tags changed (a new SOPInstanceUID each time)."""
    import pydicom
    from pydicom.uid import generate_uid
    ds = pydicom.dcmread(str(src))
    for key, value in tags.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(dst))
    return dst


def _archive(copd, root):
    """A TCIA-like tree: two series in one study (folders with spaces), a stray text file, a corrupt file,
    three single-slice series in one folder, a NIfTI file deeper down."""
    from pydicom.uid import generate_uid
    study = root / "Patient 001" / "Study 2006-01-01 CT Chest"
    shutil.copytree(copd["dicom"], study / "Series 1 lung")
    files = sorted(copd["dicom"].iterdir())
    resliced = generate_uid()
    for f in files[30:50]:
        _rewrite(f, study / "Series 2 part" / f.name, SeriesInstanceUID=resliced, SeriesNumber=2)
    (study / "notes.txt").write_text("not a scan")
    broken = root / "Patient 002" / "Study A" / "Series 9" / "broken.dcm"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(files[0].read_bytes()[:200])  # cut inside the header: no series, no pixels
    for n, f in enumerate(files[38:41]):
        _rewrite(f, root / "key images" / f"key{n}.dcm", SeriesInstanceUID=generate_uid(), SeriesNumber=10 + n)
    (root / "Patient 003" / "nifti").mkdir(parents=True)
    shutil.copy(copd["nifti"], root / "Patient 003" / "nifti" / "ct 64.nii.gz")
    # the scanner's localizers: a series of its own, and one that went into the axial series
    scouts = generate_uid()
    for n, iop in enumerate((CORONAL, SAGITTAL)):
        _scout(files[n], study / "Series 0 scout" / f"scout{n}.dcm", iop, SeriesInstanceUID=scouts, SeriesNumber=0)
    _scout(files[0], study / "Series 1 lung" / "scout.dcm", CORONAL)
    # and its dose report: a structured report (no image) and a colour screenshot
    from pydicom.data import get_testdata_file
    (study / "Series 99 dose").mkdir()
    shutil.copy(get_testdata_file("test-SR.dcm"), study / "Series 99 dose" / "report.dcm")
    _rewrite(get_testdata_file("SC_rgb_small_odd.dcm"), study / "Series 98 dose screen" / "IM1", Modality="CT")
    return root


CORONAL, SAGITTAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0], [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def _scout(src, dst, orientation, **tags):
    """A localizer made of a slice's file: ImageType LOCALIZER, another orientation, in front of the chest."""
    return _rewrite(src, dst, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ImageOrientationPatient=orientation,
                    ImagePositionPatient=[-250.0, -250.0, 300.0], **tags)


def test_every_series_of_an_archive_is_a_case_and_the_corrupt_one_is_named_and_skipped(copd, checkpoint,
                                                                                        tmp_path):
    archive = _archive(copd, tmp_path / "archive")
    out = archive / "results"  # inside --data_path: never read back as scans
    with pytest.raises(DataError, match=r"1 of 7 case\(s\) skipped \(Patient_002__Study_A__Series_9__broken\)"):
        run_volumes(dict(data_path=str(archive), pth_path=str(checkpoint), save_path=str(out), testsize=64,
                         batchsize=16, device="cpu", amp=False, progress=False))
    with open(out / "summary.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    study = "Patient_001__Study_2006-01-01_CT_Chest__"
    expected = {study + "Series_1_lung", study + "Series_2_part", "Patient_002__Study_A__Series_9__broken",
                "Patient_003__nifti__ct_64", "key_images__series10", "key_images__series11", "key_images__series12"}
    assert set(rows) == expected
    assert rows["Patient_002__Study_A__Series_9__broken"]["status"].startswith("skipped: ")
    assert "broken.dcm" in rows["Patient_002__Study_A__Series_9__broken"]["status"]
    for name in expected - {"Patient_002__Study_A__Series_9__broken"}:
        assert rows[name]["status"] == "ok" and (out / name / "summary.json").is_file(), name
    assert rows[study + "Series_2_part"]["shape"] == "64x64x20"
    assert rows["key_images__series11"]["shape"] == "64x64x1"
    # the same voxels as DICOM and as NIfTI: the same lungs (the DICOM tags round the spacing to 1e-4)
    assert float(rows[study + "Series_1_lung"]["lung_ml"]) == pytest.approx(float(rows["Patient_003__nifti__ct_64"]
                                                                                 ["lung_ml"]), rel=2e-4)
    assert sorted(p.name for p in out.iterdir()) == sorted(expected - {"Patient_002__Study_A__Series_9__broken"}
                                                            | {"summary.csv", "volume_run.json"})
    assert len(find_cases(archive, skip=[out])) == 7  # a rerun does not take our outputs for scans


def test_an_archives_scouts_and_dose_reports_are_left_out_with_one_note_each(copd, tmp_path):
    import pydicom
    archive = _archive(copd, tmp_path / "archive")
    with pytest.warns(UserWarning) as record:
        cases = find_cases(archive)
    assert len(cases) == 7 and not any("scout" in c.name or "dose" in c.name for c in cases)
    notes = sorted(str(w.message) for w in record)
    study = Path("Patient 001", "Study 2006-01-01 CT Chest")
    scouts = pydicom.dcmread(str(archive / study / "Series 0 scout" / "scout0.dcm")).SeriesInstanceUID
    with pytest.raises(DataError, match=f"series {scouts} holds no CT slice, only localizer \\(scout\\) images"):
        find_cases(archive, series=scouts)
    assert notes == sorted(f"{archive}: left out {n} file(s) of {what}, not CT slices ({study / first}{more})" for
                           n, what, first, more in [
                               (3, "localizer (scout) images (projections)", "Series 0 scout/scout0.dcm", ", ..."),
                               (1, "SR objects (no image)", "Series 99 dose/report.dcm", ""),
                               (1, "colour images (screenshots, dose reports)", "Series 98 dose screen/IM1", "")])


def test_localizers_and_files_in_another_orientation_are_left_out_with_a_note(copd, tmp_path):
    files = sorted(copd["dicom"].iterdir())
    series = tmp_path / "series"
    shutil.copytree(copd["dicom"], series)
    _scout(files[0], series / "scout.dcm", CORONAL)
    _rewrite(files[5], series / "reformat.dcm", ImageOrientationPatient=SAGITTAL)  # no ImageType: by orientation
    with pytest.warns(UserWarning) as record:
        volume = read_dicom(series)
    assert volume.data.shape == (64, 64, 79)
    assert np.array_equal(volume.data, read_dicom(copd["dicom"]).data)
    notes = " ".join(str(w.message) for w in record)
    assert "left out 1 file(s) of localizer (scout) images (projections), not CT slices (scout.dcm)" in notes
    assert "left out 1 slice(s) in another orientation than the series' 79 (reformat.dcm)" in notes
    scouts_only = tmp_path / "scouts"
    for n, iop in enumerate((CORONAL, SAGITTAL)):
        _scout(files[n], scouts_only / f"s{n}.dcm", iop)
    with pytest.raises(DataError, match=r"no CT slice: 2 file\(s\) of localizer \(scout\) images"):
        read_dicom(scouts_only)
    with pytest.warns(UserWarning, match=r"left out 2 file\(s\) of localizer"), \
            pytest.raises(DataError, match=r"no scan found .*only 2 file\(s\) of localizer \(scout\) images"):
        find_cases(scouts_only)


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless"])
def test_a_compressed_series_reads_the_same_hu(copd, tmp_path, syntax):
    import pydicom
    import pydicom.uid
    uid = getattr(pydicom.uid, syntax)
    for f in sorted(copd["dicom"].iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.compress(uid)
        ds.save_as(str(tmp_path / f.name))
    assert pydicom.dcmread(str(tmp_path / f.name)).file_meta.TransferSyntaxUID == uid
    assert np.array_equal(read_dicom(tmp_path).data, read_dicom(copd["dicom"]).data)


def test_jpeg_ls_pixels_are_decoded_and_an_undecodable_compression_is_one_line(copd, tmp_path):
    """pylibjpeg-libjpeg decodes JPEG-LS and JPEG Lossless: pydicom's JPEG-LS sample (64x64, 16 bit signed, as
    the COPDGene slices) put into a CT slice's file reads as that sample's uncompressed twin."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEGLSLossless
    src = sorted(copd["dicom"].iterdir())[40]
    sample = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    assert sample.file_meta.TransferSyntaxUID == JPEGLSLossless
    ds = pydicom.dcmread(str(src))
    ds.PixelData, ds.file_meta.TransferSyntaxUID = sample.PixelData, JPEGLSLossless
    ds["PixelData"].VR = "OB"  # encapsulated
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.save_as(str(tmp_path / "jls.dcm"))
    twin = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    assert np.array_equal(read_dicom(tmp_path / "jls.dcm").data[:, :, 0], twin.T.astype(np.float32) - 1024)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG-2: no decoder for CT slices
    ds.save_as(str(tmp_path / "mpeg.dcm"))
    with pytest.raises(DataError, match=r"mpeg.dcm: cannot read the DICOM pixels .*compressed as MPEG2.*"
                                        r"install the DICOM decoders of requirements.txt"):
        read_dicom(tmp_path / "mpeg.dcm")


def _enhanced_ct(series, dst):
    """The series as one Enhanced CT file (what newer scanners export): frames stored last slice first, each
    frame's position in its own functional group, orientation, spacing and rescale in the shared one (the
    intercept there -1000, the stored values shifted to match), none of them at the top level."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    slices = [pydicom.dcmread(str(f)) for f in sorted(series.iterdir())]
    ds = pydicom.dcmread(str(sorted(series.iterdir())[0]))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]

    def group(**tags):
        item = Dataset()
        for key, value in tags.items():
            setattr(item, key, value)
        return Sequence([item])

    shared = Dataset()
    shared.PixelMeasuresSequence = group(PixelSpacing=ds.PixelSpacing, SliceThickness=ds.SliceThickness)
    shared.PlaneOrientationSequence = group(ImageOrientationPatient=ds.ImageOrientationPatient)
    shared.PixelValueTransformationSequence = group(RescaleSlope=1, RescaleIntercept=-1000, RescaleType="HU")
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope",
                "RescaleIntercept"):
        delattr(ds, key)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = slices[::-1]
    per_frame = []
    for frame in frames:
        item = Dataset()
        item.PlanePositionSequence = group(ImagePositionPatient=frame.ImagePositionPatient)
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.stack([f.pixel_array + 1000 for f in frames]).astype(np.int16).tobytes()
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(dst))
    return dst


def test_an_enhanced_ct_file_reads_as_its_series(copd, tmp_path):
    path = _enhanced_ct(copd["dicom"], tmp_path / "archive" / "enhanced" / "CT.dcm")
    cases = find_cases(tmp_path / "archive")
    assert [(c.kind, c.name, len(c.files)) for c in cases] == [("dicom", "enhanced", 1)]
    volume, series = read_dicom(path), read_dicom(copd["dicom"])
    assert volume.data.shape == series.data.shape == (64, 64, 79)
    assert np.array_equal(volume.data, series.data)
    np.testing.assert_allclose(volume.affine, series.affine, atol=1e-6)


def test_a_tilted_gantrys_series_keeps_its_shear_in_the_affine(copd, tmp_path):
    """With the gantry tilted, each slice lies shifted in its plane (here 0.3 mm posterior per mm along z):
    the affine's slice column follows the slices, so world coordinates stay right, and the mL do not change."""
    import pydicom
    series = read_dicom(copd["dicom"])
    for f in sorted(copd["dicom"].iterdir()):
        ds = pydicom.dcmread(str(f))
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _rewrite(f, tmp_path / f.name, ImagePositionPatient=[x, y + 0.3 * z, z])
    tilted = read_dicom(tmp_path)
    assert np.array_equal(tilted.data, series.data)
    step = series.affine[2, 2]
    np.testing.assert_allclose(tilted.affine[:3, 2], [0.0, -0.3 * step, step], atol=1e-6)  # LPS +y is RAS -y
    assert tilted.voxel_ml == pytest.approx(series.voxel_ml, rel=1e-9)


def test_slices_without_a_position_are_one_line_and_a_single_one_reads(copd, tmp_path):
    files = sorted(copd["dicom"].iterdir())
    shutil.copytree(copd["dicom"], tmp_path / "series")
    _rewrite(files[3], tmp_path / "series" / files[3].name, ImagePositionPatient=None)
    with pytest.raises(DataError, match=r"series: 1 of 79 slices have no ImagePositionPatient \(IMG0004.dcm\): "
                                        r"their order and spacing along z are unknown"):
        read_dicom(tmp_path / "series")
    single = _rewrite(files[3], tmp_path / "single" / "one.dcm", ImagePositionPatient=None)
    assert read_dicom(single).data.shape == (64, 64, 1)


def test_a_nifti_without_orientation_is_warned_about(copd, tmp_path):
    img = nib.load(str(copd["nifti"]))
    assert int(img.header["sform_code"]) or int(img.header["qform_code"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        read_nifti(copd["nifti"])
    assert not any("orientation" in str(w.message) for w in record)
    bare = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    bare.set_sform(None, code=0)
    bare.set_qform(None, code=0)
    nib.save(bare, str(tmp_path / "bare.nii.gz"))
    with pytest.warns(UserWarning, match=r"bare.nii.gz: the header holds no orientation \(sform and qform codes 0\)"):
        read_nifti(tmp_path / "bare.nii.gz")


def _as_itk(nifti, path):
    """`nifti` written by SimpleITK as `path` (.mha, .mhd with its .raw, .nrrd): same voxels and geometry."""
    import SimpleITK as sitk
    img = nib.load(str(nifti))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    out = sitk.GetImageFromArray(np.asarray(img.dataobj).transpose(2, 1, 0).copy())
    out.SetSpacing(spacing.tolist())
    out.SetDirection((lps[:3, :3] / spacing).flatten().tolist())
    out.SetOrigin(lps[:3, 3].tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(path))
    return path


def test_metaimage_and_nrrd_scans_and_masks_read_as_their_nifti(copd, tmp_path):
    """Grand-challenge data (STOIC2021's COVID-19 CT, LUNA16) come as MetaImage, 3D Slicer's as NRRD."""
    nifti = read_nifti(copd["nifti"])
    for name in ("scan.mha", "scan.mhd", "scan.nrrd"):
        volume = read_volume_file(_as_itk(copd["nifti"], tmp_path / name[5:] / name))
        assert np.array_equal(volume.data, nifti.data), name
        np.testing.assert_allclose(volume.affine, nifti.affine, atol=1e-4)
    cases = find_cases(tmp_path)  # the .mhd's .raw beside it is no case
    assert sorted((c.kind, c.name) for c in cases) == [("file", f"{k}__scan") for k in ("mha", "mhd", "nrrd")]
    scan = _as_itk(copd["nifti"], tmp_path / "run" / "ct-64.mha")
    labels = _as_itk(copd["labels"], tmp_path / "masks" / "lungs.nrrd")
    reference = _mask_run(copd["nifti"], copd["labels"], tmp_path / "out_nifti")
    summary = _mask_run(scan, labels, tmp_path / "out_itk")
    assert summary["infection_ml"] == pytest.approx(reference["infection_ml"]) and summary["infection_ml"] > 4000
    written = nib.load(str(tmp_path / "out_itk" / "ct-64" / "lungs.nii.gz"))
    assert written.shape == nifti.data.shape and np.allclose(written.affine, nifti.affine, atol=1e-4)
    (tmp_path / "bad.mha").write_text("ObjectType = Image\nNDims = 3\n")
    with pytest.raises(DataError, match=r"bad.mha: cannot read as mha"):
        read_volume_file(tmp_path / "bad.mha")
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "mhd" / "scan.mhd", tmp_path / "alone")  # its scan.raw left behind
    with pytest.raises(DataError, match=r"scan.mhd: its voxels are in scan.raw, which is not beside it"):
        read_volume_file(tmp_path / "alone" / "scan.mhd")


def test_case_names_are_one_safe_component_each(tmp_path, copd):
    from Code.model_lung_infection.volume.io import safe_component
    for text in ("..", ".", "a/../b", "/etc/passwd", " spaced  name ", "-rf", "é" * 5, "x" * 400):
        name = safe_component(text)
        assert name not in (".", "..") and "/" not in name and not name.startswith(("-", "."))
        assert len(name) <= 150 and name == safe_component(name)
    shutil.copy(copd["nifti"], tmp_path / "..nii.gz")  # the old name: '.', i.e. OUT itself
    shutil.copy(copd["nifti"], tmp_path / "A.nii.gz")
    (tmp_path / "a").mkdir()
    shutil.copy(copd["nifti"], tmp_path / "a" / "..nii.gz")
    shutil.copy(copd["nifti"], tmp_path / "a.nii")
    names = [c.name for c in find_cases(tmp_path)]
    assert len({n.lower() for n in names}) == 4 and all(n == safe_component(n) for n in names)


def test_dicom_without_modality_is_read_when_its_values_are_hu(copd, tmp_path):
    from pydicom.data import get_testdata_file
    for f in sorted(copd["dicom"].iterdir()):
        _rewrite(f, tmp_path / "anon" / f.name, Modality=None)
    with pytest.warns(UserWarning, match=r"79 file\(s\) without a Modality tag .* read as CT"):
        anon = read_dicom(tmp_path / "anon")
    assert np.array_equal(anon.data, read_dicom(copd["dicom"]).data)
    mr = _rewrite(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr" / "mr.dcm", Modality=None)
    with pytest.raises(DataError, match=r"without a Modality tag.*not CT Hounsfield units"):
        read_dicom(mr)
    ct_mr = _rewrite(Path(get_testdata_file("MR_small.dcm")), tmp_path / "mr2" / "mr.dcm", Modality="MR")
    with pytest.raises(DataError, match="modality MR, not CT"):
        read_dicom(ct_mr)


def _copd_with(tmp_path, copd, name, data=None, affine=None, header=None):
    img = nib.load(str(copd["nifti"]))
    data = np.asarray(img.dataobj) if data is None else data
    out = nib.Nifti1Image(data, img.affine if affine is None else affine, header=header)
    nib.save(out, str(tmp_path / name))
    return tmp_path / name


def test_non_finite_voxels_are_refused_with_their_count(copd, tmp_path):
    data = np.asarray(nib.load(str(copd["nifti"])).dataobj).astype(np.float32)
    data[10, 20, 30:33] = np.nan
    data[0, 0, 0] = np.inf
    scan = _copd_with(tmp_path, copd, "nan.nii.gz", data)
    with pytest.raises(DataError, match=r"nan\.nii\.gz: 4 of 323584 voxels are not finite"):
        read_nifti(scan)


def test_a_zero_in_the_affine_is_one_line(copd, tmp_path):
    img = nib.load(str(copd["nifti"]))
    header = img.header.copy()
    header["srow_x"] = [0, 0, 0, 0]
    header["qform_code"], header["sform_code"] = 0, 1
    scan = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header=header), str(scan))
    with pytest.raises(DataError, match=r"flat\.nii\.gz: its voxel-to-mm matrix \(affine\) is singular"):
        run_volumes(dict(data_path=str(scan), mask=str(scan), save_path=str(tmp_path / "out")))


def test_implausible_spacing_and_lung_volume_are_warned(copd, tmp_path):
    affine = nib.load(str(copd["nifti"])).affine.copy()
    affine[2, 2] = 500.0
    scan = _copd_with(tmp_path, copd, "thick.nii.gz", affine=affine)
    mask = _copd_with(tmp_path, copd, "none.nii.gz", np.zeros((64, 64, 79), np.uint8), affine)
    with pytest.warns(UserWarning) as caught:
        summary = run_volumes(dict(data_path=str(scan), mask=str(mask),
                                   save_path=str(tmp_path / "out"))).summaries["thick"]
    text = " ".join(str(w.message) for w in caught)
    assert "voxel size 4.17187 x 4.17187 x 500 mm is outside 0.1..20 mm" in text
    assert f"{summary['lung_ml']:.0f} mL of lung, more than any human's" in text


def _mask_run(scan, mask, out, **options):
    return run_volumes(dict(data_path=str(scan), mask=str(mask), save_path=str(out), **options)).summaries["ct-64"]


def test_mask_probability_and_gray_maps_are_thresholded_and_a_scan_is_refused(copd, tmp_path):
    labels = np.asarray(nib.load(str(copd["labels"])).dataobj)
    right = labels == 1
    voxel_ml = abs(np.linalg.det(nib.load(str(copd["nifti"])).affine[:3, :3])) / 1000
    prob = np.where(right, 0.7, 0.2).astype(np.float32)  # 0.2 everywhere else: not infection at 0.5
    gray = np.where(right, 200, 40).astype(np.uint8)     # 200/255 = 0.78, 40/255 = 0.16
    for name, data in (("prob.nii.gz", prob), ("gray.nii.gz", gray)):
        mask = _copd_with(tmp_path, copd, name, data)
        summary = _mask_run(copd["nifti"], mask, tmp_path / f"out_{name}")
        in_lung = summary["infection_ml"] + summary["infection_outside_lungs_ml"]
        assert in_lung == pytest.approx(right.sum() * voxel_ml, rel=1e-6), name
        assert _mask_run(copd["nifti"], mask, tmp_path / f"out_{name}_0.8", threshold=0.8)["infection_ml"] == 0
    with pytest.raises(DataError, match=r"ct-64\.nii\.gz: values -?\d+\.\.\d+ are the scan itself, not a mask"):
        _mask_run(copd["nifti"], copd["nifti"], tmp_path / "hu")


def test_a_label_map_or_mask_given_as_the_scan_is_refused(copd, tmp_path):
    """CIP's lung labels (0/1/2) or a 0..1 map as --data_path would find no lungs and report 0% infected;
    refused, naming the file. 0..255 gray (the scan windowed) still reads as a scan."""
    with pytest.raises(DataError, match=r"lm-64_right1_left2\.nii\.gz: 3 whole values 0\.\.2: a label map, not a CT "
                                        r"scan .*--mask"):
        run_volumes(dict(data_path=str(copd["labels"]), mask=str(copd["labels"]), save_path=str(tmp_path / "a")))
    labels = np.asarray(nib.load(str(copd["labels"])).dataobj)
    prob = _copd_with(tmp_path, copd, "prob.nii.gz", np.where(labels > 0, 0.9, 0.1).astype(np.float32))
    with pytest.raises(DataError, match=r"prob\.nii\.gz: values 0\.1\.\.0\.9: a mask, a probability map"):
        run_volumes(dict(data_path=str(prob), mask=str(copd["labels"]), save_path=str(tmp_path / "b")))
    hu = np.asarray(nib.load(str(copd["nifti"])).dataobj)
    gray = _copd_with(tmp_path, copd, "gray.nii.gz", to_gray(hu))
    summary = run_volumes(dict(data_path=str(gray), mask=str(copd["labels"]),
                               save_path=str(tmp_path / "c"))).summaries["gray"]
    assert summary["lung_ml"] > 1000


def test_labels_beside_their_scan_in_a_folder_are_skipped_not_measured(copd, checkpoint, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(copd["nifti"], data / "ct-64.nii.gz")
    shutil.copy(copd["labels"], data / "lm-64_right1_left2.nii.gz")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"1 of 2 case\(s\) skipped \(lm-64_right1_left2\)"):
        run_volumes(dict(data_path=str(data), pth_path=str(checkpoint), save_path=str(out), testsize=64,
                         batchsize=16, device="cpu", amp=False, progress=False))
    with open(out / "summary.csv") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert rows["ct-64"]["status"] == "ok" and float(rows["ct-64"]["lung_ml"]) > 1000
    assert "a label map" in rows["lm-64_right1_left2"]["status"]
    assert not (out / "lm-64_right1_left2").exists()


def test_mask_rerun_over_a_network_run_keeps_no_stale_outputs(copd, checkpoint, tmp_path):
    out = tmp_path / "out"
    run_volumes(dict(data_path=str(copd["nifti"]), pth_path=str(checkpoint), save_path=str(out), testsize=64,
                     batchsize=16, device="cpu", amp=False, progress=False, save_probabilities=True))
    assert (out / "ct-64/infection.nii.gz").is_file() and (out / "ct-64/probability.nii.gz").is_file()
    (out / "ct-64/notes.txt").write_text("the user's own file")
    mask = _copd_with(tmp_path, copd, "none.nii.gz", np.zeros((64, 64, 79), np.uint8))
    _mask_run(copd["nifti"], mask, out, overwrite=True)
    left = sorted(p.name for p in (out / "ct-64").iterdir())
    assert left == ["lungs.nii.gz", "notes.txt", "overview.png", "slices.csv", "summary.json"]


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_an_output_folder_holds_one_run_other_runs_refused_unless_overwrite(copd, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(copd["nifti"], other / "second scan.nii.gz")
    mask = _copd_with(tmp_path, copd, "right.nii.gz", (np.asarray(nib.load(str(copd["labels"])).dataobj) == 1)
                      .astype(np.uint8))
    out = tmp_path / "out"
    _mask_run(copd["nifti"], mask, out)
    first = _tree(out)
    assert "volume_run.json" in first and "ct-64/summary.json" in first
    with pytest.raises(OptionError, match=r"already holds 1 case folder\(s\) of another run \(from .*ct-64\.nii\.gz "
                                          r"with mask .*right\.nii\.gz\).*--overwrite"):
        run_volumes(dict(data_path=str(other), mask=str(mask), save_path=str(out)))
    assert _tree(out) == first  # refused before any work
    (out / "ct-64" / "notes.txt").write_text("the user's own file")
    (out / "killed").mkdir()  # a case killed while writing its first file: ours too
    (out / "killed" / ".tmp-0123456789abcdef.gz").write_bytes(b"")
    run_volumes(dict(data_path=str(other), mask=str(mask), save_path=str(out), overwrite=True))
    assert _tree(out) == ["ct-64", "ct-64/notes.txt", "second_scan", *(f"second_scan/{n}" for n in (
        "lungs.nii.gz", "overview.png", "slices.csv", "summary.json")), "summary.csv", "volume_run.json"]
    with open(out / "summary.csv") as f:
        assert [row["case"] for row in csv.DictReader(f)] == ["second_scan"]
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.docx").write_text("x")
    for overwrite in (False, True):  # --overwrite deletes only what this stage wrote: it cannot help
        with pytest.raises(OptionError, match=r"holds 1 file\(s\) or folder\(s\) that this stage did not write "
                                              r"\(thesis\.docx\)"):
            _mask_run(copd["nifti"], mask, user, overwrite=overwrite)
    assert sorted(p.name for p in user.iterdir()) == ["thesis.docx"]


def test_a_run_that_finished_no_case_does_not_block_the_folder(copd, tmp_path):
    data = np.asarray(nib.load(str(copd["nifti"])).dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    broken = _copd_with(tmp_path, copd, "broken.nii.gz", data)
    out = tmp_path / "out"
    with pytest.raises(DataError, match="not finite"):
        run_volumes(dict(data_path=str(broken), mask=str(copd["labels"]), save_path=str(out)))
    assert _mask_run(copd["nifti"], copd["labels"], out)["lung_ml"] > 4000  # the fixed scan, same folder
    assert sorted(p.name for p in out.iterdir()) == ["ct-64", "summary.csv", "volume_run.json"]


def test_a_missing_or_non_nifti_mask_is_one_line_before_any_work(copd, tmp_path):
    out = tmp_path / "out"
    png = tmp_path / "gt.png"
    png.write_bytes(b"not read")
    for mask, what in ((tmp_path / "missing.nii.gz", "no such file"), (png, "not a NIfTI, MetaImage or NRRD file"),
                       (copd["dicom"], "not a NIfTI, MetaImage or NRRD file")):
        with pytest.raises(OptionError, match=rf"--mask .*: {what}; give the infection mask as a NIfTI "):
            run_volumes(dict(data_path=str(copd["nifti"]), mask=str(mask), save_path=str(out)))
    assert not out.exists()


def test_lungs_cut_by_the_field_of_view_are_flagged(copd, tmp_path, recwarn):
    img = nib.load(str(copd["nifti"]))
    data, affine = np.asarray(img.dataobj), img.affine  # index 0 is the inferior end (affine z > 0)
    air = np.full((64, 64, 4), -1024, data.dtype)
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ [0, 0, -4] + affine[:3, 3]
    cropped = affine.copy()
    cropped[:3, 3] = affine[:3, :3] @ [0, 0, 30] + affine[:3, 3]
    found = {}
    for name, (scan, aff) in {"padded": (np.concatenate([air, data, air], axis=2), shifted),
                              "cropped": (data[:, :, 30:], cropped)}.items():
        path = _copd_with(tmp_path, copd, f"{name}.nii.gz", scan, affine=aff)
        mask = _copd_with(tmp_path, copd, f"{name}_mask.nii.gz", np.zeros(scan.shape, np.uint8), affine=aff)
        found[name] = run_volumes(dict(data_path=str(path), mask=str(mask),
                                       save_path=str(tmp_path / name))).summaries[name]["lungs_cut_by_scan"]
    cut = {"inferior": data[:, :, 30:], "superior": data[:, :, :40], "inferior superior": data[:, :, 30:50]}
    for name, scan in cut.items():
        aff = cropped if name.startswith("inferior") else affine
        path = _copd_with(tmp_path, copd, f"{name}.nii.gz", scan, affine=aff)
        mask = _copd_with(tmp_path, copd, f"{name}_mask.nii.gz", np.zeros(scan.shape, np.uint8), affine=aff)
        found[name] = run_volumes(dict(data_path=str(path), mask=str(mask), save_path=str(tmp_path / name)))
        found[name] = found[name].summaries[name.replace(" ", "_")]["lungs_cut_by_scan"]
    # the whole scan's top slice holds 0.7% of the largest slice's lung: a tapering apex, not a cut
    assert found == {"padded": [], "cropped": ["inferior"], "inferior": ["inferior"], "superior": ["superior"],
                     "inferior superior": ["inferior", "superior"]}
    with open(tmp_path / "inferior superior" / "summary.csv") as f:
        assert next(csv.DictReader(f))["lungs_cut_by_scan"] == "inferior superior"
    warned = [str(w.message) for w in recwarn if "cuts the lungs" in str(w.message)]
    assert "cropped.nii.gz: lung in the scan's inferior end slice" in warned[0] and len(warned) == 4


def test_an_earlier_runs_outputs_inside_the_data_are_not_scans(copd, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(copd["nifti"], data / "ct-64.nii.gz")
    _mask_run(data, copd["labels"], data / "results")  # OUT inside the data folder
    assert [c.name for c in find_cases(data)] == ["ct-64"]  # another run (other --save_path) reads no masks
    with pytest.raises(DataError, match=r"results: an output folder of the volume stage .* give the scans' folder"):
        find_cases(data / "results")
    assert is_volume_input(data / "results")  # named by the volume stage, not "no images" from the slice stage


def test_a_file_as_save_path_is_one_line_before_any_work(copd, tmp_path):
    scan = tmp_path / "scan.nii.gz"
    shutil.copy(copd["nifti"], scan)
    before = scan.read_bytes()
    with pytest.raises(OptionError, match=r"--save_path .*scan\.nii\.gz is a file, not a folder"):
        run_volumes(dict(data_path=str(scan), mask=str(copd["labels"]), save_path=str(scan)))
    assert scan.read_bytes() == before


def test_rerun_of_the_same_inputs_keeps_finished_cases_and_redoes_the_rest(copd, tmp_path):
    out = tmp_path / "out"
    options = dict(data_path=str(copd["nifti"]), mask=str(copd["labels"]), save_path=str(out), window=(-1000, 200))
    run_volumes(options)
    done = (out / "ct-64" / "summary.json").stat().st_mtime_ns
    again = run_volumes(dict(options, batchsize=3))  # the batch size changes no output
    assert (out / "ct-64" / "summary.json").stat().st_mtime_ns == done  # kept, not recomputed
    assert again.summaries["ct-64"]["lung_ml"] > 4000
    (out / "ct-64" / "summary.json").unlink()  # an interrupted case is run again
    run_volumes(options)
    assert (out / "ct-64" / "summary.json").is_file()
    with pytest.raises(OptionError, match="of another run"):  # another window: another run
        run_volumes(dict(options, window=(-1100, 200)))


def _script_args(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--data_path")
    add_volume_args(p)
    return p.parse_args(argv)


def test_options_that_would_be_ignored_are_refused(checkpoint, test_slices, copd, tmp_path, capsys):
    import MyTest_LungInf
    from Code.model_lung_infection.configs import TestConfig
    with pytest.raises(SystemExit):
        _script_args(["--threshold", "1.5"])
    assert "0 < t <= 1" in capsys.readouterr().err
    for bad in (1.5, 0, float("nan")):
        with pytest.raises(OptionError, match="--threshold"):
            TestConfig(data_path="x", threshold=bad)
    for bad in ((200, -1000), "200,-1000", "lung"):  # a window as text or as a pair, checked alike
        with pytest.raises(OptionError, match="--window"):
            TestConfig(data_path="x", window=bad)
    for extra in (dict(multiclass_pth="m.pth"), dict(save_probabilities=True)):
        with pytest.raises(OptionError, match="need the network, and --mask"):
            run_volumes(dict(data_path="x", mask="m.nii.gz", **extra))
    slices, _ = test_slices(1)
    for argv in (["--window=-1000,400"], ["--threshold", "0.3"], ["--crop", "False"], ["--series", "1.2.3"],
                 ["--mask", "m.nii.gz"]):
        with pytest.raises(OptionError, match=r"option\(s\) of CT volumes.*folder of 2D slices"):
            MyTest_LungInf.main(["--pth_path", str(checkpoint), "--data_path", str(slices),
                                 "--save_path", str(tmp_path / "maps")] + argv)
    assert not (tmp_path / "maps").exists()
    for argv in (["--normalize", "minmax"], ["--num_workers", "2"]):  # and slice options on a scan
        with pytest.raises(OptionError, match=r"option\(s\) of folders of 2D slices.*is a CT volume"):
            MyTest_LungInf.main(["--pth_path", str(checkpoint), "--data_path", str(copd["nifti"]),
                                 "--save_path", str(tmp_path / "volumes")] + argv)
    assert not (tmp_path / "volumes").exists()


def test_a_series_split_over_folders_is_one_case_and_dicomdir_is_no_scan(copd, tmp_path):
    files = sorted(copd["dicom"].iterdir())
    for i, f in enumerate(files):
        dst = tmp_path / "CT 1" / ("part1" if i < 40 else "part2") / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    shutil.copy(files[0], tmp_path / "DICOMDIR")  # an index of the files, named so: not an image
    (cases,) = find_cases(tmp_path)
    assert (cases.name, len(cases.files)) == ("CT_1", 79)
    assert cases.path == tmp_path / "CT 1"


def test_outputs_never_land_in_a_scans_own_folder(copd, tmp_path):
    series = tmp_path / "ct-64"
    shutil.copytree(copd["dicom"], series)
    mask = _copd_with(tmp_path, copd, "none.nii.gz", np.zeros((64, 64, 79), np.uint8))
    for save in (tmp_path, series):  # OUT/ct-64 is the series folder itself, or lies inside it
        with pytest.raises(OptionError, match=r"would go into --data_path .*ct-64 itself"):
            run_volumes(dict(data_path=str(series), mask=str(mask), save_path=str(save)))
    assert sorted(p.name for p in series.iterdir()) == sorted(p.name for p in copd["dicom"].iterdir())


def test_warnings_on_the_command_line_are_one_line_each(copd, tmp_path, capsys):
    import MyTest_LungInf as script
    from Code.model_lung_infection.cli import run_main
    lower = _copd_with(tmp_path, copd, "lower.nii.gz", np.asarray(nib.load(str(copd["nifti"])).dataobj)[:, :, :40])
    mask = _copd_with(tmp_path, copd, "none.nii.gz", np.zeros((64, 64, 40), np.uint8))
    run_main(script.main, ["--data_path", str(lower), "--mask", str(mask), "--save_path",
                           str(tmp_path / "out"), "--progress", "False"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: ") and "superior end slice" in err[0], err
