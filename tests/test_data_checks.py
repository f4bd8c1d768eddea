"""Training data is checked before the first step: every file opens, every GT / Edge / Prior has its
slice's size, and all problems come back together in one DataError that names each file."""
import shutil
import time

import pytest
from PIL import Image

from Code.model_lung_infection.cli import run_main
from Code.model_lung_infection.data import DataError, InfectionTrainSet
from Code.model_lung_infection.multiclass import MultiClassTrainSet

DOCTOR = "TrainingSet/LungInfection-Train/Doctor-label"
MULTICLASS = "TrainingSet/MultiClassInfection-Train"


def _copy(src, dst, subs, n=4):
    stems = sorted(p.stem for p in (src / "Imgs").iterdir())[:n]
    for sub in subs:
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for s in stems:
            f = next((src / sub).glob(s + ".*"))
            shutil.copy(f, dst / sub / f.name)
    return stems


def _shrink(path, dw=0, dh=-7):
    """Resize a file in place (nearest, keeping its mode and palette); returns (old size, new size)."""
    with Image.open(path) as im:
        im.load()
        old = im.size
        new = (old[0] + dw, old[1] + dh)
        im.resize(new, Image.NEAREST).save(path)
    return old, new


def _wh(size):
    return f"{size[0]}x{size[1]}"


def _assert_all_named(error, expected):
    msg = str(error)
    assert "\n" not in msg
    assert msg.startswith(f"{len(expected)} problems in the training data: ")
    assert msg.endswith("fix or remove these files")
    for fragment in expected:
        assert fragment in msg, (fragment, msg)
    assert len(error.problems) == len(expected)


def test_binary_set_reports_every_size_mismatch_and_unreadable_file_at_once(data_root, tmp_path):
    stems = _copy(data_root / DOCTOR, tmp_path, ["Imgs", "GT", "Edge"])
    img_size, gt_size = _shrink(tmp_path / "GT" / f"{stems[0]}.png")
    img_size1, edge_size = _shrink(tmp_path / "Edge" / f"{stems[1]}.png", dw=5, dh=0)
    (tmp_path / "Imgs" / f"{stems[2]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as e:
        InfectionTrainSet(tmp_path, trainsize=64)  # construction alone: before any sample is read
    _assert_all_named(e.value, [
        f"GT/{stems[0]}.png is {_wh(gt_size)} but Imgs/{stems[0]}.jpg is {_wh(img_size)}",
        f"Edge/{stems[1]}.png is {_wh(edge_size)} but Imgs/{stems[1]}.jpg is {_wh(img_size1)}",
        f"Imgs/{stems[2]}.jpg cannot be read as an image",
    ])
    assert str(tmp_path / "GT" / f"{stems[0]}.png") in str(e.value)  # the full path of the bad file


def test_binary_set_checks_every_root(data_root, tmp_path):
    _copy(data_root / DOCTOR, tmp_path / "a", ["Imgs", "GT"], n=2)
    stems = _copy(data_root / "TrainingSet/LungInfection-Train/Pseudo-label", tmp_path / "b", ["Imgs", "GT"], n=2)
    _, gt_size = _shrink(tmp_path / "b" / "GT" / f"{stems[1]}.png")
    with pytest.raises(DataError, match=rf"1 problem in the training data: .*b[/\\]GT[/\\]{stems[1]}\.png is "
                                        rf"{_wh(gt_size)} but Imgs[/\\]{stems[1]}\.jpg"):
        InfectionTrainSet([tmp_path / "a", tmp_path / "b"], trainsize=64)


def test_missing_partners_and_bad_sizes_are_reported_together(data_root, tmp_path):
    stems = _copy(data_root / DOCTOR, tmp_path, ["Imgs", "GT"])
    (tmp_path / "GT" / f"{stems[0]}.png").unlink()
    _shrink(tmp_path / "GT" / f"{stems[3]}.png")
    with pytest.raises(DataError) as e:
        InfectionTrainSet(tmp_path, trainsize=64)
    assert len(e.value.problems) == 2
    assert f"{stems[0]}.jpg: no partner" in str(e.value) and f"GT/{stems[3]}.png is" in str(e.value)


def test_multiclass_set_reports_gt_prior_and_unreadable_files_at_once(data_root, tmp_path):
    stems = _copy(data_root / MULTICLASS, tmp_path, ["Imgs", "GT", "Prior"])
    img_size, gt_size = _shrink(tmp_path / "GT" / f"{stems[0]}.png")  # still a valid palette GT
    with Image.open(tmp_path / "GT" / f"{stems[0]}.png") as im:
        assert im.mode == "P"
    img_size1, prior_size = _shrink(tmp_path / "Prior" / f"{stems[1]}.png", dw=-3, dh=0)
    (tmp_path / "GT" / f"{stems[2]}.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(DataError) as e:
        MultiClassTrainSet(tmp_path, trainsize=64)
    _assert_all_named(e.value, [
        f"GT/{stems[0]}.png is {_wh(gt_size)} but Imgs/{stems[0]}.jpg is {_wh(img_size)}",
        f"Prior/{stems[1]}.png is {_wh(prior_size)} but Imgs/{stems[1]}.jpg is {_wh(img_size1)}",
        f"GT/{stems[2]}.png cannot be read as an image",
    ])
    # without priors, the Prior folder is not read at all
    with pytest.raises(DataError) as e:
        MultiClassTrainSet(tmp_path, trainsize=64, prior=False)
    assert len(e.value.problems) == 2 and "Prior" not in str(e.value)


def test_truncated_png_mask_is_caught_before_training(data_root, tmp_path):
    stems = _copy(data_root / DOCTOR, tmp_path, ["Imgs", "GT"], n=2)
    gt = tmp_path / "GT" / f"{stems[0]}.png"
    gt.write_bytes(gt.read_bytes()[:-200])  # the header still opens; the data is cut
    with pytest.raises(DataError, match=rf"GT[/\\]{stems[0]}\.png cannot be read as an image"):
        InfectionTrainSet(tmp_path, trainsize=64)


def test_data_error_is_one_line_on_stderr(data_root, tmp_path, capsys):
    stems = _copy(data_root / DOCTOR, tmp_path, ["Imgs", "GT", "Edge"], n=3)
    _shrink(tmp_path / "GT" / f"{stems[0]}.png")
    _shrink(tmp_path / "Edge" / f"{stems[2]}.png")
    with pytest.raises(SystemExit) as e:
        run_main(lambda argv: InfectionTrainSet(tmp_path, trainsize=64), [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 2 problems in the training data: ")


def test_checking_1600_pseudo_label_slices_is_fast(data_root):
    root = data_root / "TrainingSet/LungInfection-Train/Pseudo-label"
    start = time.perf_counter()
    ds = InfectionTrainSet(root, trainsize=64)
    assert len(ds) == 1600
    # PNG checksums, JPEGs decoded at 1/8 scale on a few threads, GT decoded until one holds a value above 1:
    # about 0.7 CPU-seconds here for the 4,800 files
    assert time.perf_counter() - start < 8
