"""Missing, truncated and wrong weights files: a CheckpointError (one line) that names the file and
what was expected, whichever loader reads it; the test script prints it on one line and exits 2."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import MyTest_MulClsLungInf_UNet as multiclass_test_script
from Code.model_lung_infection import Inf_Net, Inf_Net_UNet, save_release_weights
from Code.model_lung_infection.checkpoint import extract_state_dict, load_checkpoint
from Code.model_lung_infection.cli import run_main
from Code.model_lung_infection.errors import CheckpointError, UserError
from Code.model_lung_infection.infer import load_inf_net
from Code.model_lung_infection.multiclass import load_multiclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "timm:resnet18"


@pytest.fixture(scope="module")
def unet_file(tmp_path_factory):
    """A real release-format file: a 6-channel multi-class U-Net's state dict."""
    path = tmp_path_factory.mktemp("weights") / "unet_model_200.pkl"
    save_release_weights(Inf_Net_UNet(n_channels=6, n_classes=3), path)
    return path


@pytest.fixture
def truncated(unet_file, tmp_path):
    path = tmp_path / "run" / "checkpoint.pth"
    path.parent.mkdir()
    path.write_bytes(unet_file.read_bytes()[:1000])  # what a full disk or a killed copy leaves
    return path


def _one_line(error):
    msg = str(error)
    assert "\n" not in msg and isinstance(error, UserError)
    return msg


def test_truncated_file_is_named_by_every_loader(truncated):
    loaders = [lambda p: load_checkpoint(Inf_Net_UNet(n_channels=6, n_classes=3), p),
               extract_state_dict, load_multiclass]
    for load in loaders:
        with pytest.raises(CheckpointError) as e:
            load(truncated)
        msg = _one_line(e.value)
        assert msg.startswith(f"{truncated} cannot be read as a PyTorch checkpoint (truncated or not a checkpoint)")


def test_a_text_file_is_named_without_the_unpicklers_number(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("junk\n")  # torch's unpickler fails with KeyError(<a number read off these bytes>)
    with pytest.raises(CheckpointError) as e:
        extract_state_dict(path)
    assert _one_line(e.value) == (f"{path} cannot be read as a PyTorch checkpoint (truncated or not a checkpoint): "
                                  f"its bytes are neither a zip archive nor a pickle")


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.pth"
    for load in (lambda p: load_checkpoint(Inf_Net_UNet(n_channels=3, n_classes=3), p), load_multiclass):
        with pytest.raises(CheckpointError) as e:
            load(path)
        assert _one_line(e.value).startswith(f"no weights at {path}: ")
        assert isinstance(e.value, FileNotFoundError)  # callers testing for a missing file still see one


def test_weights_of_another_network_name_the_file_and_the_keys(unet_file):
    model = Inf_Net(backbone=SMALL)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, unet_file)
    msg = _one_line(e.value)
    n_own = len(model.state_dict())
    assert msg.startswith(f"{unet_file} does not fit Inf_Net: {n_own} missing keys (")
    assert "unexpected keys (inc.double_conv.0.weight" in msg and "expected Inf_Net weights" in msg


def test_weights_read_first_and_loaded_later_still_name_their_file(unet_file):
    # the "<state dict>" case: loaders read the file, inspect it, then load the dict they got
    state, name, _ = extract_state_dict(unet_file)
    assert name == str(unet_file)
    with pytest.raises(CheckpointError, match=rf"^{unet_file} does not fit Inf_Net_UNet: 1 shape mismatches"):
        load_checkpoint(Inf_Net_UNet(n_channels=3, n_classes=3), state)
    plain = {k: v for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"^given\.pth does not fit"):
        load_checkpoint(Inf_Net_UNet(n_channels=3, n_classes=3), plain, name="given.pth")
    with pytest.raises(CheckpointError) as e:
        load_inf_net(unet_file)  # MyTest_LungInf.py's loader, given a multi-class U-Net
    assert _one_line(e.value).startswith(f"{unet_file} does not fit Inf_Net:")


def test_wrong_network_for_the_multiclass_loader(tmp_path):
    path = tmp_path / "Inf-Net-100.pth"
    save_release_weights(Inf_Net(backbone=SMALL), path)
    with pytest.raises(CheckpointError, match=rf"^{path}: neither a multi-class U-Net nor an FCN8s"):
        load_multiclass(path)


def test_weights_read_by_us_save_and_load_as_plain_state_dicts(unet_file, tmp_path):
    state, _, _ = extract_state_dict(unet_file)
    torch.save(state, tmp_path / "copy.pth")
    again = torch.load(tmp_path / "copy.pth", map_location="cpu", weights_only=True)
    assert type(again).__name__ == "OrderedDict" and again.keys() == state.keys()


def test_test_script_without_weights_says_so_on_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "MyTest_MulClsLungInf_UNet.py", "--pth_path", str(tmp_path / "missing.pth"),
                           "--data_path", str(tmp_path), "--save_path", str(tmp_path / "out"), "--progress", "False"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: no weights at {tmp_path / 'missing.pth'}") and "--pth_path" in lines[0]
    assert not (tmp_path / "out").exists()


def _a_slice(path):
    """A small gray ramp: an image the test stages take for a slice (a constant one would read as a mask)."""
    Image.fromarray(np.arange(40 * 48, dtype=np.uint16).reshape(48, 40).astype(np.uint8)).save(path)


def test_test_script_with_truncated_weights_names_the_file(truncated, tmp_path, capsys):
    (tmp_path / "slices").mkdir()
    _a_slice(tmp_path / "slices" / "1.png")
    argv = ["--pth_path", str(truncated), "--data_path", str(tmp_path / "slices"), "--progress", "False",
            "--save_path", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        run_main(multiclass_test_script.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {truncated} cannot be read as a PyTorch checkpoint")
    with pytest.raises(CheckpointError):  # --debug: the exception itself, with its traceback
        run_main(multiclass_test_script.main, argv + ["--debug"])


def test_multiclass_test_names_an_unknown_infnet_backbone_on_one_line(unet_file, tmp_path, capsys):
    (tmp_path / "slices").mkdir()
    _a_slice(tmp_path / "slices" / "1.png")
    with pytest.raises(SystemExit) as e:
        run_main(multiclass_test_script.main, ["--pth_path", str(unet_file), "--infnet_pth", str(unet_file),
                                               "--infnet_backbone", "nope", "--data_path", str(tmp_path / "slices"),
                                               "--save_path", str(tmp_path / "out"), "--progress", "False"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --infnet_backbone 'nope': choose one of") and not (tmp_path / "out").exists()


def test_a_release_format_snapshot_of_another_encoder_tests_without_backbone(tmp_path):
    """Snapshots (<prefix>-<epoch>.pth) are bare state dicts: the encoder is read off their keys, so a run trained
    with --backbone mobilenetv2 tests without repeating it (it was a key report of hundreds of names)."""
    torch.manual_seed(0)
    model = Inf_Net(backbone="mobilenetv2").eval()
    path = tmp_path / "Inf-Net-1.pth"
    save_release_weights(model, path)
    loaded = load_inf_net(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[3], model(x)[3])
    assert loaded.resnet.__class__ is model.resnet.__class__
