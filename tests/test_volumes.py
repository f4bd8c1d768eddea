"""CT volumes (issue 15): NIfTI / DICOM in HU -> lung and infection masks aligned with the input, and the
quantification report. Every scan here is a real file written by the test (tests/volume_phantom.py)."""
import argparse
import inspect
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import volume_phantom as vp  # noqa: E402

from Code.model_lung_infection import Inf_Net  # noqa: E402
from Code.model_lung_infection.checkpoint import atomic_save  # noqa: E402
from Code.model_lung_infection.errors import DataError, UserError  # noqa: E402
from Code.model_lung_infection.tta import with_tta  # noqa: E402
from Code.model_lung_infection.volume import add_volume_args, is_volume_input, run_volumes  # noqa: E402
from Code.model_lung_infection.volume.io import read_dicom, read_nifti  # noqa: E402
from Code.model_lung_infection.volume.window import DEFAULT_WINDOW, parse_window  # noqa: E402

SMALL = "timm:resnet18"
SIZE = 64
SUMMARY_KEYS = {"lung_ml", "right_lung_ml", "left_lung_ml", "infection_ml", "infection_percent",
                "right_infection_percent", "left_infection_percent", "slices_with_infection", "spacing_mm", "shape"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one thread is faster on a busy CPU


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """The phantom as NIfTI (permuted, flipped axes) plus its infection mask, in the file's voxel order."""
    root = tmp_path_factory.mktemp("phantom")
    hu, affine = vp.base_phantom()
    data, file_affine = vp.to_file_order(hu, affine)
    scan = vp.write_nifti(root / "chest.nii.gz", data, file_affine)
    x, y, z = vp.world(hu.shape, affine)
    mask, _ = vp.to_file_order(vp.infection_mask(x, y, z).astype(np.uint8), affine)
    mask_path = vp.write_nifti(root / "blob.nii.gz", mask, file_affine)
    return dict(root=root, hu=hu, affine=affine, scan=scan, mask=mask_path, mask_array=mask,
                file_affine=file_affine, shape=data.shape)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random-init Inf-Net (ResNet-18 encoder) in our checkpoint format (weights + config)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    atomic_save({"model": Inf_Net(backbone=SMALL).eval().state_dict(),
                 "config": {"model": "inf_net", "backbone": SMALL}}, path)
    return path


def _script_args(argv):
    """The arguments MyTest_LungInf.py will pass: its own options plus add_volume_args."""
    p = argparse.ArgumentParser()
    p.add_argument("--pth_path")
    p.add_argument("--data_path")
    p.add_argument("--save_path")
    p.add_argument("--testsize", type=int, default=352)
    p.add_argument("--batchsize", type=int, default=1)
    p.add_argument("--backbone", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default=None)
    p.add_argument("--fuse_bn", default=True)
    p.add_argument("--channels_last", default=True)
    p.add_argument("--progress", default=False)
    add_volume_args(p)
    return p.parse_args(argv)


def _load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _world_x(mask, affine):
    ijk = np.argwhere(mask).T.astype(float)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4])[0]


# ------------------------------------------------------------------------------------ the phantom

def test_phantom_mask_quantified_exactly_lungs_analytic_and_sided(phantom, tmp_path):
    out = tmp_path / "out"
    summary = run_volumes(_script_args(["--data_path", str(phantom["scan"]), "--mask", str(phantom["mask"]),
                                        "--save_path", str(out)])).summaries["chest"]
    assert set(summary) >= SUMMARY_KEYS
    on_disk = json.loads((out / "chest/summary.json").read_text())
    assert on_disk == summary
    analytic = vp.analytic_ml()
    assert summary["right_lung_ml"] == pytest.approx(analytic["right"], rel=0.03)
    assert summary["left_lung_ml"] == pytest.approx(analytic["left"], rel=0.03)
    # the lung mask is aligned with the input and its right lung is on the patient's right (RAS x > 0)
    lungs, affine = _load(out / "chest/lungs.nii.gz")
    assert lungs.shape == phantom["shape"] and lungs.dtype == np.uint8
    assert np.allclose(affine, phantom["file_affine"])
    assert (_world_x(lungs == 1, affine) > 0).all() and (_world_x(lungs == 2, affine) < 0).all()
    # --mask: exact to the voxel
    voxel_ml = abs(np.linalg.det(phantom["file_affine"][:3, :3])) / 1000
    blob = phantom["mask_array"] > 0
    assert summary["infection_ml"] == pytest.approx(blob.sum() * voxel_ml, abs=1e-4)
    assert summary["right_infection_percent"] == pytest.approx(100 * blob.sum() / (lungs == 1).sum(), abs=1e-3)
    assert summary["left_infection_percent"] == 0 and summary["infection_outside_lungs_ml"] == 0
    assert summary["shape"] == list(phantom["shape"])
    rows = (out / "chest/slices.csv").read_text().splitlines()
    assert rows[0] == "slice,z_mm,lung_mm2,infection_mm2,infection_percent"
    assert len(rows) == 1 + vp.SHAPE[2]
    assert summary["slices_with_infection"] == sum(float(r.split(",")[3]) > 0 for r in rows[1:])
    assert Image.open(out / "chest/overview.png").size[0] >= 400
    assert (out / "summary.csv").read_text().splitlines()[1].startswith("chest,")
    assert not (out / "chest/infection.nii.gz").exists()  # --mask: the given mask is not rewritten


def test_network_outputs_aligned_with_the_input(phantom, checkpoint, tmp_path):
    out = tmp_path / "out"
    args = _script_args(["--pth_path", str(checkpoint), "--data_path", str(phantom["scan"]), "--save_path", str(out),
                         "--testsize", str(SIZE), "--batchsize", "8", "--threshold", "0.5", "--save_probabilities",
                         "--window=-1150,250"])  # '=': argparse reads a leading '-' as an option
    done = run_volumes(args)
    summary = done.summaries["chest"]
    assert set(done.timings["chest"]) == {"read", "lungs", "network", "write", "report"}  # returned, per step
    assert all(t > 0 for t in done.timings["chest"].values()) and done.save_path == out
    for name, dtype in (("infection", np.uint8), ("lungs", np.uint8), ("probability", np.float32)):
        data, affine = _load(out / f"chest/{name}.nii.gz")
        assert data.shape == phantom["shape"] and data.dtype == dtype and np.allclose(affine, phantom["file_affine"])
    infection, _ = _load(out / "chest/infection.nii.gz")
    prob, _ = _load(out / "chest/probability.nii.gz")
    assert np.array_equal(infection > 0, prob >= 0.5)  # a fixed threshold, no stretch
    assert set(summary) >= SUMMARY_KEYS


# ------------------------------------------------------------------------------------------ DICOM

def test_dicom_series_same_report_as_nifti_and_series_choice(phantom, tmp_path):
    folder = tmp_path / "series"
    main = vp.write_dicom_series(folder, phantom["hu"], phantom["affine"], slope=0.5, intercept=-1200.0)
    other = vp.write_dicom_series(folder, phantom["hu"][:, :, :3], phantom["affine"], series_uid=None,
                                  keep=[0, 1, 2], shuffle_seed=1, description="scout")
    with pytest.warns(UserWarning, match=other):
        volume = read_dicom(folder)
    assert np.array_equal(volume.data, phantom["hu"].astype(np.float32))
    assert np.allclose(volume.affine, phantom["affine"])
    with pytest.raises(UserError, match="not a folder of 2"):  # two series: two cases, and --mask fits one
        run_volumes(dict(data_path=str(folder), save_path=str(tmp_path / "d"), mask=str(phantom["mask"])))
    from_dicom = run_volumes(dict(data_path=str(folder), save_path=str(tmp_path / "d"), series=main,
                                  mask=str(_dicom_mask(phantom, tmp_path)))).summaries["series__phantom"]
    from_nifti = run_volumes(dict(data_path=str(phantom["scan"]), mask=str(phantom["mask"]),
                                  save_path=str(tmp_path / "n"))).summaries["chest"]
    for key in SUMMARY_KEYS - {"spacing_mm", "shape"}:
        assert from_dicom[key] == from_nifti[key], key
    assert (tmp_path / "d/series__phantom/slices.csv").read_text() != ""
    chosen = read_dicom(folder, series=other)
    assert chosen.data.shape == (*vp.SHAPE[:2], 3)


def _dicom_mask(phantom, tmp_path):
    """The infection blob on the DICOM volume's grid (the base grid)."""
    x, y, z = vp.world(vp.SHAPE, phantom["affine"])
    return vp.write_nifti(tmp_path / "blob_base.nii.gz", vp.infection_mask(x, y, z).astype(np.uint8),
                          phantom["affine"])


def test_pydicom_samples_ct_reads_in_hu_and_mr_is_refused():
    from pydicom.data import get_testdata_file
    ct = read_dicom(get_testdata_file("CT_small.dcm"))
    assert ct.data.shape == (128, 128, 1)
    assert -1100 < ct.data.min() < -500 and 500 < ct.data.max() < 3000  # HU, RescaleIntercept -1024 applied
    with pytest.raises(DataError, match=r"MR_small\.dcm.*modality MR, not CT"):
        read_dicom(get_testdata_file("MR_small.dcm"))


def test_gap_along_z_is_a_warning_naming_the_files(phantom, tmp_path):
    keep = [k for k in range(10) if k != 5]
    vp.write_dicom_series(tmp_path / "gap", phantom["hu"][:, :, :10], phantom["affine"], keep=keep)
    gap = r"a gap along z between IM\d+ \(.* mm\) and IM\d+ .*6\.00 mm instead of 3\.00"
    with pytest.warns(UserWarning, match=gap):
        read_dicom(tmp_path / "gap")


# ------------------------------------------------------------------------------------- bad input

def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path):
    four_d = vp.write_nifti(tmp_path / "fmri.nii.gz", np.zeros((8, 8, 4, 3), np.int16), np.eye(4))
    with pytest.raises(DataError, match=r"fmri\.nii\.gz: a 4D image"):
        read_nifti(four_d)
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 not really a gzip file")
    with pytest.raises(DataError, match=r"broken\.nii\.gz: cannot read as NIfTI"):
        read_nifti(corrupt)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no scan here")
    with pytest.raises(DataError, match=r"empty: no scan found"):
        run_volumes(dict(data_path=str(empty), mask="x"))
    with pytest.raises(UserError, match="--pth_path"):
        run_volumes(dict(data_path=str(four_d)))
    for error in (DataError("x"),):
        assert "\n" not in str(error)


def test_dispatcher_and_window_option(phantom, test_slices):
    slices, _ = test_slices(1)
    assert is_volume_input(phantom["scan"]) and is_volume_input(phantom["root"])
    assert not is_volume_input(slices) and not is_volume_input(slices / "Imgs")
    assert parse_window("-1000,400") == (-1000.0, 400.0)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_window("400,-1000")
    assert DEFAULT_WINDOW == (-1150.0, 250.0)


def test_the_script_gives_slices_and_volumes_one_config(phantom, checkpoint, test_slices, monkeypatch, tmp_path):
    """MyTest_LungInf.py builds one configs.TestConfig from its arguments, for either kind of input."""
    import MyTest_LungInf
    from Code.model_lung_infection import infer
    from Code.model_lung_infection.configs import TestConfig
    from Code.model_lung_infection.volume import predict
    seen = []
    monkeypatch.setattr(predict, "run_volumes", seen.append)
    monkeypatch.setattr(infer, "run_test", seen.append)
    MyTest_LungInf.main(["--pth_path", str(checkpoint), "--data_path", str(phantom["scan"]), "--threshold", "0.3",
                         "--batchsize", "3", "--window=-1000,300", "--compile", "--save_path", str(tmp_path / "v")])
    MyTest_LungInf.main(["--pth_path", str(checkpoint), "--data_path", str(test_slices(1)[0]), "--normalize",
                         "minmax", "--num_workers", "0"])  # slices: the slice stage gets the same class
    volume, slices = seen
    assert type(volume) is type(slices) is TestConfig
    assert (volume.threshold, volume.batchsize, volume.window, volume.compile) == (0.3, 3, (-1000.0, 300.0), True)
    assert (slices.normalize, slices.num_workers) == ("minmax", 0)
    assert volume.options_only_for("volumes") == ["window", "threshold"] and slices.options_only_for("volumes") == []
    with pytest.raises(TypeError, match="windw"):  # a misspelt option is an error, not ignored
        run_volumes(dict(data_path=str(phantom["scan"]), windw=(-1000, 300)))


# ------------------------------------------------------------------------- volume path = slice path

@pytest.mark.parametrize("tta", ["none", "hflip"])
def test_volume_path_equals_slice_path(checkpoint, test_slices, tmp_path, tta):
    """Test slices stacked into a 0..255 volume (display orientation), cropping off: slice for slice the
    same probabilities and masks as the 2D path on the same slices, test-time flips (--tta) included."""
    from Code.model_lung_infection import infer
    from Code.model_lung_infection.data import SliceSet
    folder, names = test_slices(3)
    imgs = [np.array(Image.open(folder / "Imgs" / n).convert("L")) for n in names]
    h, w = min(i.shape[0] for i in imgs), min(i.shape[1] for i in imgs)
    same = tmp_path / "same"
    (same / "Imgs").mkdir(parents=True)
    for n, im in zip(names, imgs):
        Image.fromarray(im[:h, :w]).save(same / "Imgs" / (Path(n).stem + ".png"))
    stack = np.stack([im[:h, :w] for im in imgs], axis=2).astype(np.uint8)
    scan = vp.write_nifti(tmp_path / "stack.nii.gz", stack, np.diag([-0.7, -0.7, 5.0, 1.0]))  # L, P, S: as shown
    run_volumes(dict(data_path=str(scan), pth_path=str(checkpoint), save_path=str(tmp_path / "out"), testsize=SIZE,
                     crop=False, save_probabilities=True, amp=False, fuse_bn=False, channels_last=False,
                     device="cpu", progress=False, tta=tta))
    prob, _ = _load(tmp_path / "out/stack/probability.nii.gz")
    infection, _ = _load(tmp_path / "out/stack/infection.nii.gz")

    model = with_tta(infer.load_inf_net(str(checkpoint), device="cpu"), tta)
    dataset = SliceSet(same, SIZE)
    for z in range(len(dataset)):
        image, stem, size = dataset[z]
        if "normalize" in inspect.signature(infer.probability_maps).parameters:
            expected = infer.probability_maps(model, image[None], [size], normalize="none")[0]
        else:  # before the unstretched maps landed in infer.py: the same steps, written out
            with torch.inference_mode():
                logit = infer.final_logits(model(image[None])).float()
            expected = torch.sigmoid(torch.nn.functional.interpolate(logit, size=tuple(size), mode="bilinear",
                                                                     align_corners=False))[0, 0].numpy()
        assert np.abs(prob[:, :, z] - expected).max() < 1e-5
        decided = np.abs(expected - 0.5) > 1e-4
        assert np.array_equal((infection[:, :, z] > 0)[decided], (expected >= 0.5)[decided])


def test_multiclass_adds_classes_volume_and_columns(phantom, checkpoint, tmp_path):
    from Code.model_lung_infection.checkpoint import save_release_weights
    from Code.model_lung_infection.registry import create_model
    torch.manual_seed(1)
    mc = tmp_path / "unet.pth"
    save_release_weights(create_model("unet_multiclass", in_channels=6, num_classes=3).eval(), mc)
    out = tmp_path / "out"
    summary = run_volumes(_script_args(["--pth_path", str(checkpoint), "--data_path", str(phantom["scan"]),
                                        "--save_path", str(out), "--testsize", str(SIZE), "--batchsize", "16",
                                        "--multiclass_pth", str(mc)])).summaries["chest"]
    classes, affine = _load(out / "chest/classes.nii.gz")
    assert classes.shape == phantom["shape"] and np.allclose(affine, phantom["file_affine"])
    assert set(np.unique(classes)) <= {0, 1, 2}
    assert {"ggo_ml", "consolidation_ml"} <= set(summary)
    header = (out / "chest/slices.csv").read_text().splitlines()[0]
    assert header == "slice,z_mm,lung_mm2,infection_mm2,infection_percent,ggo_mm2,consolidation_mm2"


# ------------------------------------------------------------------------ dense disease is lung

@pytest.fixture(scope="module")
def dense_chest(tmp_path_factory):
    """vp.dense_phantom as NIfTI (file order permuted / flipped) and its infection (consolidation + GGO) as
    --mask, with the truth in mL."""
    root = tmp_path_factory.mktemp("dense")
    hu, affine, truth = vp.dense_phantom()
    data, file_affine = vp.to_file_order(hu, affine)
    scan = vp.write_nifti(root / "dense.nii.gz", data, file_affine)
    infection, _ = vp.to_file_order((truth["consolidation"] | truth["ggo"]).astype(np.uint8), affine)
    mask = vp.write_nifti(root / "infection.nii.gz", infection, file_affine)
    voxel_ml = float(np.prod(vp.DENSE_SPACING)) / 1000.0
    ml = {k: float(v.sum()) * voxel_ml for k, v in truth.items()}
    return dict(scan=scan, mask=mask, ml=ml, hu=hu, affine=affine)


def test_dependent_consolidation_counts_in_its_lung(dense_chest, tmp_path):
    """A right lung whose posterior cap is consolidated (soft-tissue HU, 173 mL) plus a GGO blob, given as
    --mask: the consolidation is that lung's, so its volume and infected percent are the truth's."""
    ml = dense_chest["ml"]
    summary = run_volumes(dict(data_path=str(dense_chest["scan"]), mask=str(dense_chest["mask"]),
                               save_path=str(tmp_path / "out"))).summaries["dense"]
    assert summary["right_lung_ml"] == pytest.approx(ml["right"], rel=0.03)
    infected = ml["consolidation"] + ml["ggo"]
    assert summary["right_infection_percent"] == pytest.approx(100 * infected / ml["right"], rel=0.05)
    assert summary["infection_percent"] == pytest.approx(100 * infected / (ml["right"] + ml["left"]), rel=0.05)
    assert summary["infection_outside_lungs_ml"] == 0
    # the HU mask takes the consolidation in already (dense_fill_ml); the network's infection adds what is left
    added = summary["right_dense_fill_ml"] + summary["right_infection_fill_ml"]
    assert added == pytest.approx(ml["consolidation"], rel=0.05)
    assert summary["left_infection_fill_ml"] == 0
    lungs, _ = _load(tmp_path / "out/dense/lungs.nii.gz")  # the written mask holds the consolidation too
    assert (lungs == 1).sum() * np.prod(vp.DENSE_SPACING) / 1000 == pytest.approx(summary["right_lung_ml"])


def test_dependent_consolidation_is_lung_before_the_network(dense_chest):
    """The right lung's consolidated posterior cap has no aerated lung between it and the chest wall (outside the
    lung's hull): the HU mask takes it in as dense lung between the lung and its ribs, and stops at the ribs --
    neither the fat inside them nor the chest wall's soft tissue beyond them (through the intercostal gaps)."""
    from Code.model_lung_infection.quantify.lungs import find_lungs
    from Code.model_lung_infection.volume import geometry
    orient = geometry.orientation(dense_chest["affine"], dense_chest["hu"].shape)
    lungs = find_lungs(orient.display(dense_chest["hu"]).astype(np.float32), orient.spacing)
    truth = {k: orient.display(m) for k, m in vp.dense_phantom()[2].items()}
    voxel_ml = float(np.prod(vp.DENSE_SPACING)) / 1000.0
    right = lungs.labels == 1
    assert right.sum() * voxel_ml == pytest.approx(dense_chest["ml"]["right"], rel=0.03)
    assert (right & ~truth["right"]).sum() < 0.01 * truth["right"].sum()
    consolidation = lungs.dense & right & truth["consolidation"]
    assert consolidation.sum() >= 0.95 * truth["consolidation"].sum()


def test_pleural_dense_nodule_is_lung_before_the_network(dense_chest):
    """The left lung's dense pleural-based nodule (lung on both sides of it along the pleura) is filled by the
    HU mask itself, and reported as dense_fill_ml."""
    from Code.model_lung_infection.quantify.lungs import LEFT, fill_summary, find_lungs
    from Code.model_lung_infection.volume import geometry
    orient = geometry.orientation(dense_chest["affine"], dense_chest["hu"].shape)
    lungs = find_lungs(orient.display(dense_chest["hu"]).astype(np.float32), orient.spacing)
    voxel_ml = float(np.prod(vp.DENSE_SPACING)) / 1000.0
    ml = dense_chest["ml"]
    assert (lungs.labels == LEFT).sum() * voxel_ml == pytest.approx(ml["left"], rel=0.005)
    fill = fill_summary(lungs.labels, lungs.dense, np.zeros_like(lungs.dense), voxel_ml)
    assert 0.6 * ml["nodule"] <= fill["left_dense_fill_ml"] <= 1.2 * ml["nodule"]
    assert fill["right_dense_fill_ml"] <= 1.05 * ml["consolidation"]  # the other lung: its consolidation only
    assert fill["dense_fill_ml"] == pytest.approx(fill["left_dense_fill_ml"] + fill["right_dense_fill_ml"])


def test_bowel_under_touching_lungs_is_not_the_left_lung():
    """Lungs touching in front (one air mass) and a large mottled bowel loop (not pure gas) under the left
    lung: the bowel lies below the lungs' mid-height, so it is not taken for the left lung."""
    from Code.model_lung_infection.quantify.lungs import LEFT, RIGHT, find_lungs
    spacing = (2.0, 2.0, 4.0)
    r, c, s = np.meshgrid(np.arange(150) * 2.0 - 150, np.arange(110) * 2.0 - 110, np.arange(50) * 4.0 - 120,
                          indexing="ij")  # display view, mm from the centre: rows to the left, columns posterior
    hu = np.full(r.shape, -1000.0)
    hu[(r / 145) ** 2 + (c / 105) ** 2 <= 1] = 40
    lungs = [((r - cr) / a) ** 2 + (c / 70) ** 2 + (s / 70) ** 2 <= 1 for cr, a in ((-65, 50), (60, 42))]
    bridge = (np.abs(r) < 25) & (c > -55) & (c < -35) & (np.abs(s) < 20)
    hu[lungs[0] | lungs[1] | bridge] = -850
    bowel = (((r - 70) / 55) ** 2 + (c / 70) ** 2 <= 1) & (s < -76)  # 0.5 L under the left lung: > a fifth of them
    hu[bowel] = (-700 + 150 * np.sin(r / 3.0) * np.cos(c / 3.0))[bowel]  # gas mixed with stool: not pure gas
    labels = find_lungs(hu, spacing).labels
    assert not (labels[bowel] > 0).any()
    assert (labels[lungs[0]] == RIGHT).mean() > 0.97 and (labels[lungs[1]] == LEFT).mean() > 0.97


# ------------------------------------------------------------------------------------ zones

def test_zone_score_uses_the_ct_severity_thresholds():
    from Code.model_lung_infection.quantify.report import zone_score
    cases = {0: 0, 1e-6: 1, 4.99: 1, 5: 2, 25: 2, 25.01: 3, 50: 3, 50.5: 4, 75: 4, 75.01: 5, 100: 5}
    assert {p: zone_score(p) for p in cases} == cases


def test_zones_thirds_by_height_and_ventral_dorsal_halves():
    """Right lung: a 10 x 10 x 9 block; infection in the dorsal half of its three lowest slices."""
    from Code.model_lung_infection.quantify.report import zones
    lungs = np.zeros((24, 12, 9), np.uint8)
    lungs[1:11, 1:11, :] = 1    # right (rows towards the patient's left: right lung first)
    lungs[13:23, 1:11, 3:] = 2  # left: slices 3..8 only, so its thirds are its own
    infection = np.zeros(lungs.shape, bool)
    infection[1:11, 6:11, 0:3] = True  # columns run towards posterior: dorsal half, lower third
    infection[13:23, 1:11, 7:9] = True  # left: its upper third (slices 7, 8), whole
    z_mm = np.arange(9) * 2.0 - 30
    per, total = zones(lungs, infection, 0.001, z_mm)
    right, left = per["right"], per["left"]
    assert (right["lower"]["infection_percent"], right["lower"]["score"]) == (50.0, 3)
    assert right["middle"]["score"] == right["upper"]["score"] == 0
    assert right["dorsal"]["infection_percent"] == pytest.approx(100 / 3, abs=1e-3)
    assert right["ventral"]["infection_percent"] == 0
    assert right["lower"]["lung_ml"] == pytest.approx(0.3)
    assert (left["upper"]["infection_percent"], left["upper"]["score"]) == (100.0, 5)
    assert left["lower"]["score"] == left["middle"]["score"] == 0
    assert total == 8


def test_phantom_report_has_zones_in_summary_csv_and_overview(phantom, tmp_path):
    out = tmp_path / "out"
    summary = run_volumes(dict(data_path=str(phantom["scan"]), mask=str(phantom["mask"]),
                               save_path=str(out))).summaries["chest"]
    right = summary["zones"]["right"]
    thirds = sum(right[z]["infection_ml"] for z in ("upper", "middle", "lower"))
    halves = sum(right[z]["infection_ml"] for z in ("ventral", "dorsal"))
    assert thirds == pytest.approx(summary["infection_ml"], abs=1e-3) and halves == pytest.approx(thirds, abs=1e-3)
    assert sum(right[z]["lung_ml"] for z in ("upper", "middle", "lower")) == pytest.approx(summary["right_lung_ml"],
                                                                                          abs=1e-3)
    # the blob (centre 15 mm anterior, RAS +y, and 10 mm up; radius 12 mm): mostly ventral and middle third
    assert right["ventral"]["infection_ml"] > 2 * right["dorsal"]["infection_ml"]
    assert right["middle"]["infection_ml"] == max(right[z]["infection_ml"] for z in ("upper", "middle", "lower"))
    assert all(summary["zones"]["left"][z]["score"] == 0 for z in ("upper", "middle", "lower"))
    assert summary["zone_score"] == sum(right[z]["score"] for z in ("upper", "middle", "lower"))
    assert summary["zone_score_max"] == 30
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["case", "status", "source"]
    assert {"right_upper_percent", "right_upper_score", "left_dorsal_percent", "zone_score"} <= set(header)
    assert Image.open(out / "chest/overview.png").size[1] > 256 + 160  # the zone table below the plot


def test_infection_everywhere_stays_inside_the_rib_cage(dense_chest):
    """A network that marks the whole body (a random-weight one does) must not make the body lung: what
    infection adds stays inside the rib cage, off the bone and within ATTACH_MM of aerated lung."""
    from Code.model_lung_infection.quantify.lungs import ATTACH_MM, attach_infection, find_lungs
    from Code.model_lung_infection.volume import geometry
    orient = geometry.orientation(dense_chest["affine"], dense_chest["hu"].shape)
    hu = orient.display(dense_chest["hu"]).astype(np.float32)
    lungs = find_lungs(hu, orient.spacing)
    labels, added = attach_infection(lungs, hu > -500, hu, orient.spacing)
    r, c = np.meshgrid((np.arange(hu.shape[0]) - (hu.shape[0] - 1) / 2) * orient.spacing[0],
                       (np.arange(hu.shape[1]) - (hu.shape[1] - 1) / 2) * orient.spacing[1], indexing="ij")
    beyond = (vp.RIBS[2] / 2 + max(vp.DENSE_SPACING[:2])) / vp.RIBS[1]  # the ribs' outer edge, plus a voxel
    outside_ribs = np.sqrt((r / vp.RIBS[0]) ** 2 + (c / vp.RIBS[1]) ** 2) > 1 + beyond
    assert added.any() and not (added & outside_ribs[..., None]).any()
    assert not (added & (hu > 300)).any()
    voxel_ml = float(np.prod(vp.DENSE_SPACING)) / 1000.0
    ml = dense_chest["ml"]
    assert ml["consolidation"] <= added.sum() * voxel_ml < 2 * (ml["right"] + ml["left"])
    assert ATTACH_MM <= 50


def test_overview_shows_slices_apart_and_a_lung_outline_that_survives_the_shrink(tmp_path):
    from Code.model_lung_infection.quantify.report import PANEL, overview, overview_slices
    lung_area = np.r_[np.zeros(5), np.full(60, 100), np.zeros(5)]
    # no infection: one slice in the middle of each third of the lungs' height (not three neighbours)
    assert list(overview_slices(lung_area, np.zeros(70))) == [15, 35, 55]
    # one lesion over slices 40-45 and a smaller one at 10: the lesion's peak, then other levels
    inf = np.zeros(70)
    inf[40:46] = [5, 8, 9, 8, 7, 6]
    inf[10] = 2
    assert list(overview_slices(lung_area, inf)) == [10, 41, 42]  # 10 before 41, a neighbour of 42
    inf[10] = 0  # one lesion only: its three most infected slices
    assert list(overview_slices(lung_area, inf)) == [41, 42, 43]
    # a 512-row slice is shrunk to PANEL rows: the blue outline must still be there
    rows = 2 * PANEL
    gray = np.full((rows, rows, 3), 40, np.uint8)
    lungs = np.zeros((rows, rows, 3), np.uint8)
    lungs[100:400, 60:240] = 1
    overview(tmp_path / "o.png", gray, lungs, np.zeros(lungs.shape, bool), [0.0, 1.0, 2.0], (1.0, 1.0, 1.0))
    panel = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))[:PANEL, :PANEL].astype(int)
    blue = (panel[..., 2] - panel[..., 0]) > 60
    # (the radiological view: display rows are the panel's columns)
    assert blue[:, 100 // 2 - 2:100 // 2 + 3].any() and blue[60 // 2 - 2:60 // 2 + 3].any()


def test_overview_slices_in_the_radiological_view(tmp_path):
    """The display view has the right lung on top and anterior to the left; a clinician reads slices with
    anterior up and the patient's right on the image's left: posterior infection in the right lung must
    show at the panel's left and bottom."""
    from Code.model_lung_infection.quantify.report import PANEL, overview
    rows, cols = 128, 96  # rows: patient's right -> left; cols: anterior -> posterior
    gray = np.full((rows, cols, 1), 40, np.uint8)
    lungs = np.zeros((rows, cols, 1), np.uint8)
    lungs[10:60, 10:86] = 1
    lungs[68:118, 10:86] = 2
    infection = np.zeros(lungs.shape, bool)
    infection[20:50, 60:80] = True  # right lung, dorsal
    overview(tmp_path / "o.png", gray, lungs, infection, [0.0], (1.0, 1.0, 1.0))
    img = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    width = int(round(PANEL * rows / cols))  # transposed: as wide as the display view is high
    panel = img[:PANEL, :width]
    ys, xs = np.nonzero((panel[..., 0] - panel[..., 2]) > 60)  # red
    assert xs.mean() < width / 2 and ys.mean() > PANEL / 2
