"""Training-side guards: every output belongs to one run, every bad input stops before work is done.

One run per folder (a lock naming its holder, a dead holder's lock taken over), --overwrite clears the
earlier run, a killed run's temporaries are removed, 0/1 masks and truncated JPEGs are found in the data
check, non-finite options and losses stop the run, and a read-only folder, a full disk, an unknown device
or backbone and out-of-range sizes, seeds and counts are one line before any data is read."""
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slices import copy_doctor_slices

import MyTrain_LungInf as script
import MyTrain_MulClsLungInf_UNet as multiclass_script
import PseudoGenerator as pseudo_script
from Code.model_lung_infection import engine as engine_module
from Code.model_lung_infection import run_folder
from Code.model_lung_infection import train as train_module
from Code.model_lung_infection.cli import run_main
from Code.model_lung_infection.configs import MultiClassConfig, TrainConfig
from Code.model_lung_infection.data import DataError, InfectionTrainSet
from Code.model_lung_infection.engine import check_run_folder
from Code.model_lung_infection.errors import OptionError, UserError
from Code.model_lung_infection.multiclass import MultiClassTrainSet
from Code.model_lung_infection.pseudo import _clean_temporaries

ROOT = Path(__file__).resolve().parents[1]
SMALL = "timm:resnet18"
MULTICLASS = "TrainingSet/MultiClassInfection-Train"


def _options(data, snap, *extra):
    return ["--train_path", str(data), "--trainsize", "64", "--batchsize", "2", "--epoch", "1", "--backbone", SMALL,
            "--snapshot_root", str(snap), "--no-multi_scale", "--no-progress", "--no-amp", "--train_save", "run",
            *extra]


def _one_line_error(capsys, main, argv):
    """run_main(main, argv) must stop with exit status 2 and one error line on stderr (warnings, each a line of
    their own, may come before it); returns (the error line, stdout)."""
    with pytest.raises(SystemExit) as stop:
        run_main(main, argv)
    out, err = capsys.readouterr()
    assert stop.value.code == 2, err
    errors = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0], out


@pytest.fixture
def data(data_root, tmp_path):
    copy_doctor_slices(data_root, tmp_path / "d", n=2)
    return tmp_path / "d"


# ------------------------------------------------------------------ one run per folder

HOLDER = """
import sys, time
from Code.model_lung_infection.run_folder import lock_folder
lock_folder(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_a_folder_in_use_names_the_process_that_holds_it(data, tmp_path, capsys):
    run_dir = tmp_path / "snap/save_weights/run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err, out = _one_line_error(capsys, script.main, _options(data, tmp_path / "snap"))
    finally:
        holder.kill()
        holder.wait()
    assert f"{run_dir} is in use by process {holder.pid} on host {socket.gethostname()}" in err
    assert "choose another --train_save" in err
    assert "[train]" not in out  # before any data was read


def test_a_second_pseudo_labelling_run_on_a_save_path_in_use_is_refused(data, data_root, tmp_path, capsys):
    from Code.model_lung_infection.checkpoint import save_release_weights
    from Code.model_lung_infection.inf_net import Inf_Net
    pool = tmp_path / "pool"
    pool.mkdir()
    for p in sorted((data_root / "TrainingSet/LungInfection-Train/Pseudo-label/Imgs").iterdir())[:2]:
        shutil.copy(p, pool)
    save_release_weights(Inf_Net(backbone=SMALL), tmp_path / "init.pth")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err, _ = _one_line_error(capsys, pseudo_script.main, [
            "--init", str(tmp_path / "init.pth"), "--backbone", SMALL, "--unlabeled_path", str(pool),
            "--labeled_path", str(data), "--save_path", str(out), "--trainsize", "64", "--no-progress"])
    finally:
        holder.kill()
        holder.wait()
    assert f"{out} is in use by process {holder.pid}" in err and "choose another --save_path" in err
    assert not (out / "GT").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(data, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    run_dir = tmp_path / "snap/save_weights/run"
    run_dir.mkdir(parents=True)
    (run_dir / run_folder.LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                            "since": "yesterday", "command": "killed"}))
    script.main(_options(data, tmp_path / "snap"))
    out = capsys.readouterr().out
    assert f"taking over the lock of process {pid} on host {socket.gethostname()}" in out
    assert (run_dir / "Inf-Net-1.pth").is_file()
    assert not (run_dir / run_folder.LOCK_NAME).exists()  # released when the run ended


def test_overwrite_deletes_the_earlier_run_and_removes_a_killed_runs_temporaries(data, tmp_path, capsys):
    snap = tmp_path / "snap"
    run_dir, events = snap / "save_weights/run", snap / "tensorboard/run"
    run_dir.mkdir(parents=True)
    events.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 20, "rng": {},
                "config": {"snapshot_prefix": "Old"}}, run_dir / "checkpoint.pth")
    earlier = ["Old-10.pth", "Old-ema-20.pth", "Inf-Net-20.pth", "val.csv"]
    for name in earlier:
        (run_dir / name).write_bytes(b"earlier run")
    (events / "events.out.tfevents.1.host").write_bytes(b"earlier run")
    stale = run_dir / ".tmp-0123456789abcdef.pth"  # what kill -9 leaves of an atomic checkpoint write
    stale.write_bytes(b"\0" * 1000)
    kept = [run_dir / "notes.txt", run_dir / ".tmp-mine.pth"]  # not ours: never deleted
    for p in kept:
        p.write_text("mine")

    err, _ = _one_line_error(capsys, script.main, _options(data, snap))  # without --overwrite: refused
    assert "checkpoint.pth exists" in err and "--overwrite" in err
    assert not stale.exists()  # the next run in the folder removed the half-written file

    script.main(_options(data, snap, "--overwrite"))
    out = capsys.readouterr().out
    assert "--overwrite: deleted 6 file(s) of the earlier run" in out
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(["Inf-Net-1.pth", "checkpoint.pth"] +
                                                               [p.name for p in kept])
    assert torch.load(run_dir / "checkpoint.pth", weights_only=True)["epoch"] == 1
    assert [p.name for p in events.iterdir()] != ["events.out.tfevents.1.host"]


def test_snapshots_without_a_checkpoint_are_not_overwritten_silently(tmp_path):
    cfg = TrainConfig(snapshot_root=str(tmp_path), train_save="Inf-Net")
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "Inf-Net-100.pth").write_bytes(b"the release's weights")  # the run would write this name
    with pytest.raises(FileExistsError, match=r"holds another run's files \(Inf-Net-100.pth\).*--overwrite"):
        check_run_folder(cfg)


@pytest.mark.parametrize("trainer", [script, multiclass_script])
def test_resume_and_overwrite_together_are_refused(trainer, tmp_path):
    argv = ["--snapshot_root", str(tmp_path), "--resume", "--overwrite"]
    with pytest.raises(OptionError, match="--resume continues the run in .* and --overwrite deletes it"):
        trainer.config_from_args(trainer.parse_args(argv))


def test_a_resumed_multiclass_run_checks_the_options_given_with_its_own(tmp_path):
    """--resume --train_save NAME --pretrained W of an FCN8s run: checked with its own --arch (FCN8s has an
    ImageNet encoder), not with the default U-Net's (which has none)."""
    run = MultiClassConfig(arch="fcn8s", pretrained="vgg16.pth", train_save="fcn", snapshot_root=str(tmp_path))
    run.run_dir.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "rng": {}, "config": run.as_dict()},
               run.checkpoint_path)
    again = ["--resume", "--train_save", "fcn", "--snapshot_root", str(tmp_path), "--pretrained"]
    cfg = multiclass_script.config_from_args(multiclass_script.parse_args(again + ["vgg16.pth"]))
    assert (cfg.arch, cfg.pretrained, cfg.resume) == ("fcn8s", "vgg16.pth", True)
    with pytest.raises(UserError, match="--pretrained other.pth differs from vgg16.pth, which the run"):
        multiclass_script.config_from_args(multiclass_script.parse_args(again + ["other.pth"]))


def test_pseudo_labelling_removes_only_its_own_temporaries(tmp_path):
    out = tmp_path / "out"
    ours = [out / ".tmp-00112233445566aa.json", out / "GT" / ".tmp-00112233445566bb.png"]
    theirs = [out / "GT" / ".tmp-notes.png", out / "Imgs" / "0.jpg"]
    for p in ours + theirs:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    _clean_temporaries(out)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)


# ------------------------------------------------------------------ data checked before the first step

def _zero_one(path):
    a = np.array(Image.open(path).convert("L"))
    Image.fromarray((a >= 128).astype(np.uint8)).save(path)


def test_gt_stored_as_zero_and_one_is_refused_naming_the_folder(data_root, tmp_path):
    copy_doctor_slices(data_root, tmp_path, n=3)
    for p in (tmp_path / "GT").iterdir():
        _zero_one(p)
    with pytest.raises(DataError, match=rf"{tmp_path / 'GT'}: all 3 masks hold only the values 0 and 1.*"
                                        r"save them as 0/255"):
        InfectionTrainSet(tmp_path, trainsize=64)
    # the same masks as 0/255 pass, and soft pseudo labels are not taken for 0/1 ones
    InfectionTrainSet(data_root / "TrainingSet/LungInfection-Train/Doctor-label", trainsize=64)


def test_multiclass_priors_stored_as_zero_and_one_are_refused_too(data_root, tmp_path):
    src = data_root / MULTICLASS
    stems = sorted(p.stem for p in (src / "Imgs").iterdir())[:2]
    for sub in ("Imgs", "GT", "Prior"):
        (tmp_path / sub).mkdir()
        for s in stems:
            shutil.copy(next((src / sub).glob(s + ".*")), tmp_path / sub)
    for p in (tmp_path / "Prior").iterdir():
        _zero_one(p)
    with pytest.raises(DataError, match=rf"{tmp_path / 'Prior'}: all 2 masks hold only the values 0 and 1"):
        MultiClassTrainSet(tmp_path, trainsize=64)


def test_truncated_jpeg_is_caught_before_training(data_root, tmp_path):
    stems = copy_doctor_slices(data_root, tmp_path, n=2)
    jpeg = tmp_path / "Imgs" / f"{stems[1]}.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:-300])  # the header and most of the scan are there
    with pytest.raises(DataError, match=rf"1 problem in the training data: .*Imgs[/\\]{stems[1]}\.jpg cannot be "
                                        r"read as an image \(image file is truncated"):
        InfectionTrainSet(tmp_path, trainsize=64)


# ------------------------------------------------------------------ non-finite options and losses

@pytest.mark.parametrize("trainer, argv", [
    (script, ["--lr", "inf"]), (script, ["--clip", "nan"]), (script, ["--time_budget", "inf"]),
    (multiclass_script, ["--weight_decay", "nan"]), (multiclass_script, ["--momentum", "inf"]),
    (pseudo_script, ["--init", "w.pth", "--lr", "nan"])])
def test_non_finite_options_are_refused_by_the_parser(trainer, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        trainer.parse_args(argv)
    assert stop.value.code == 2 and "expected a number" in capsys.readouterr().err


def test_non_finite_options_are_refused_by_the_configs():
    with pytest.raises(OptionError, match="clip nan: must be a finite number; lr inf: must be a finite number"):
        TrainConfig(lr=float("inf"), clip=float("nan"))
    with pytest.raises(OptionError, match="weight_decay nan: must be a finite number"):
        MultiClassConfig(weight_decay=float("nan"))


def test_a_loss_that_turns_non_finite_stops_the_run_keeping_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    real = train_module.multi_scale_step

    def poisoned(cfg):  # epoch 2 starts from weights with a NaN in them, as a diverged update leaves them
        step = real(cfg)

        def wrapped(engine, batch):
            if engine.epoch == 2:
                with torch.no_grad():
                    next(engine.model.parameters()).fill_(float("nan"))
            return step(engine, batch)
        return wrapped
    monkeypatch.setattr(train_module, "multi_scale_step", poisoned)
    snap = tmp_path / "snap"
    with pytest.raises(engine_module.TrainingDiverged,
                       match=r"non-finite \(total nan.*in epoch 2, batch 1 of 1: training stopped; .*checkpoint.pth "
                             r"keeps epoch 1, the last good one"):
        script.main(_options(data, snap, "--epoch", "3", "--save_every", "1"))
    run_dir = snap / "save_weights/run"
    state = torch.load(run_dir / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values()
                                       if t.is_floating_point())
    assert sorted(p.name for p in run_dir.glob("*.pth")) == ["Inf-Net-1.pth", "checkpoint.pth"]


# ------------------------------------------------------------------ one line, before any data is read

def test_a_read_only_output_folder_is_one_line_before_any_data_is_read(data, tmp_path, capsys):
    blocker = tmp_path / "file"  # a file where a folder should be: no writes there, even for root
    blocker.write_text("")
    err, out = _one_line_error(capsys, script.main, _options(data, blocker / "snap"))
    assert err.startswith(f"error: cannot write to {blocker / 'snap/save_weights/run'}") and \
        "give a writable --snapshot_root" in err
    assert "[train]" not in out

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        (read_only / "probe").touch()
        (read_only / "probe").unlink()
        pytest.skip("running as root: a folder without write permission is still writable")
    except PermissionError:
        pass
    err, out = _one_line_error(capsys, script.main, _options(data, read_only / "snap"))
    assert "cannot write to" in err and "Permission denied" in err and "[train]" not in out


def test_a_disk_without_room_for_a_checkpoint_stops_before_the_first_epoch(data, tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2 ** 30, 2 ** 30 - 2 ** 20, 2 ** 20))
    err, out = _one_line_error(capsys, script.main, _options(data, tmp_path / "snap"))
    assert "1 MB free, but a checkpoint and the snapshots of an epoch need about" in err
    assert "[train] epoch" not in out
    assert not list((tmp_path / "snap/save_weights/run").glob("*.pth"))


def test_a_disk_that_fills_up_during_the_run_is_one_line_saying_what_is_kept(data, tmp_path, monkeypatch, capsys):
    usage, full = namedtuple("usage", "total used free"), []
    real = engine_module.save_release_weights

    def save(model, path):  # the disk fills up while epoch 2's snapshot is written
        if path.name == "Inf-Net-2.pth":
            full.append(path)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 123 vs 456")
        return real(model, path)
    monkeypatch.setattr(engine_module, "save_release_weights", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2 ** 40, 0, 2 ** 20 if full else 2 ** 40))
    argv = _options(data, tmp_path / "snap", "--epoch", "2", "--save_every", "1")
    err, _ = _one_line_error(capsys, script.main, argv)
    assert "epoch 2 could not be saved" in err and "1 MB free" in err and "checkpoint.pth still holds epoch 1" in err


def test_running_out_of_memory_is_one_line_saying_what_to_lower(data, tmp_path, monkeypatch, capsys):
    def step_factory(cfg):
        def step(engine, batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB")
        return step
    monkeypatch.setattr(train_module, "multi_scale_step", step_factory)
    err, _ = _one_line_error(capsys, script.main, _options(data, tmp_path / "snap"))
    assert err == ("error: out of memory in epoch 1, batch 1 on cpu (CUDA out of memory): lower --batchsize or "
                   "--trainsize")
    # the memory malloc keeps when asked to is the third thing to give up (not set here: it would last the suite)
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: True)
    err, _ = _one_line_error(capsys, script.main, _options(data, tmp_path / "snap2") + ["--keep_freed_memory"])
    assert err.endswith("lower --batchsize or --trainsize (or give --keep_freed_memory False)")


@pytest.mark.parametrize("extra, message", [
    (["--device", "banana"], "--device banana: not a device"),
    (["--device", "cuda:7"], "--device cuda:7: this machine has"),
    (["--backbone", "banana"], "backbone 'banana': choose one of"),
    (["--backbone", "timm:banana"], "backbone 'timm:banana': timm has no model 'banana'"),
    (["--trainsize", "1"], "trainsize 1: must lie between 32"),
    (["--trainsize", "1000000"], "trainsize 1000000: must lie between 32"),
    (["--warmup_epochs", "5"], "warmup_epochs 5: more than --epoch (1)"),
])
def test_bad_options_are_one_line_before_any_data_is_read(data, tmp_path, capsys, extra, message):
    err, out = _one_line_error(capsys, script.main, _options(data, tmp_path / "snap", *extra))
    assert err.startswith(f"error: {message}"), err
    assert "[train]" not in out


@pytest.mark.parametrize("trainer, argv", [
    (multiclass_script, ["--train_path", "nowhere", "--device", "banana"]),
    (pseudo_script, ["--init", "nowhere.pth", "--device", "banana"])])
def test_the_other_trainers_say_an_unknown_device_before_reading_anything(trainer, argv, tmp_path, capsys):
    err, _ = _one_line_error(capsys, trainer.main, argv + ["--snapshot_root", str(tmp_path)])
    assert err.startswith("error: --device banana: not a device"), err


@pytest.mark.parametrize("trainer, argv, message", [
    (script, ["--seed", "1e23"], "expected an integer seed"),
    (script, ["--seed", str(10 ** 23)], "expected a seed from 0"),
    (script, ["--seed", "-1"], "expected a seed from 0"), (script, ["--num_workers", "-1"], "expected an integer"),
    (multiclass_script, ["--val_seed", str(2 ** 64)], "expected a seed from 0"),
    (multiclass_script, ["--num_workers", "-1"], "expected an integer")])
def test_seeds_and_workers_out_of_range_are_refused_by_the_parser(trainer, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        trainer.parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_sizes_seeds_and_workers_out_of_range_are_refused_by_the_configs():
    with pytest.raises(OptionError, match=r"seed 100000000000000000000000: must be an integer from 0"):
        TrainConfig(seed=10 ** 23)
    with pytest.raises(OptionError, match="num_workers -1: must be >= 0"):
        TrainConfig(num_workers=-1)
    with pytest.raises(OptionError, match="trainsize 4: must lie between 32"):
        MultiClassConfig(trainsize=4)
    with pytest.raises(OptionError, match="testsize 100000: must lie between 32"):
        pseudo_script.config_from_args(pseudo_script.parse_args(["--init", "w.pth", "--testsize", "100000"]))
    with pytest.raises(OptionError, match="warmup_epochs 11: more than --epoch"):
        TrainConfig(epoch=10, warmup_epochs=11)


def test_without_flock_a_lock_is_stale_when_its_process_no_longer_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_folder, "fcntl", None)  # Windows, or a file system without flock
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / "run"
        folder.mkdir()
        holder = {"pid": live.pid, "host": socket.gethostname(), "since": "now", "command": "train"}
        (folder / run_folder.LOCK_NAME).write_text(json.dumps(holder))
        with pytest.raises(run_folder.FolderInUse, match=f"in use by process {live.pid} on host"):
            run_folder.lock_folder(folder)
    finally:
        live.kill()
        live.wait()
    run_folder.lock_folder(folder)  # its process has ended: taken over
    assert f"taking over the lock of process {live.pid}" in capsys.readouterr().out
    run_folder.release_folder(folder)


def test_lock_files_are_not_left_behind(tmp_path):
    run_folder.lock_folder(tmp_path / "a")
    run_folder.lock_folder(tmp_path / "a")  # re-entrant within a process
    assert json.loads((tmp_path / "a" / run_folder.LOCK_NAME).read_text())["pid"] == os.getpid()
    run_folder.release_folder(tmp_path / "a")
    assert list((tmp_path / "a").iterdir()) == []


@pytest.mark.parametrize("bad", [["--init", "MISSING"], ["--pretrained", "MISSING"], ["--train_path", "ZERO_ONE"]])
def test_overwrite_keeps_the_earlier_run_when_an_input_is_wrong(data, tmp_path, capsys, bad):
    """--overwrite deletes the earlier run only once the data and the weights to start from have been read:
    a typo in them cost the earlier run before."""
    snap = tmp_path / "snap"
    script.main(_options(data, snap))
    run_dir = snap / "save_weights/run"
    before = sorted(p.name for p in run_dir.glob("*.pth"))
    capsys.readouterr()
    zero_one = tmp_path / "zero_one"
    shutil.copytree(data, zero_one)
    for gt in (zero_one / "GT").iterdir():
        _zero_one(gt)
    bad = [str(tmp_path / "missing.pth") if a == "MISSING" else str(zero_one) if a == "ZERO_ONE" else a
           for a in bad]
    err, out = _one_line_error(capsys, script.main, _options(data, snap, "--overwrite", *bad))
    assert "deleted" not in out and sorted(p.name for p in run_dir.glob("*.pth")) == before, out
    if "--pretrained" in bad:
        assert err.startswith(f"error: no ImageNet weights at {tmp_path / 'missing.pth'}: no such file")


def test_multiclass_overwrite_keeps_the_earlier_run_when_the_data_is_wrong(data_root, tmp_path, capsys):
    src = data_root / MULTICLASS
    stems = sorted(p.stem for p in (src / "Imgs").iterdir())[:2]
    for sub in ("Imgs", "GT", "Prior"):
        (tmp_path / "mc" / sub).mkdir(parents=True)
        for s in stems:
            shutil.copy(next((src / sub).glob(s + ".*")), tmp_path / "mc" / sub)
    argv = ["--train_path", str(tmp_path / "mc"), "--trainsize", "64", "--batchsize", "2", "--epoch", "1",
            "--snapshot_root", str(tmp_path / "snap"), "--train_save", "mc", "--no-progress", "--no-amp"]
    multiclass_script.main(argv)
    run_dir = tmp_path / "snap/save_weights/mc"
    before = sorted(p.name for p in run_dir.glob("*.pth"))
    capsys.readouterr()
    shutil.rmtree(tmp_path / "mc" / "Prior")
    err, out = _one_line_error(capsys, multiclass_script.main, argv + ["--overwrite"])
    assert "Prior" in err and "deleted" not in out and sorted(p.name for p in run_dir.glob("*.pth")) == before


def test_warnings_of_the_scripts_are_one_line_each(tmp_path):
    """A warning is `warning: ...` on one line, as errors are (not `file:line: UserWarning:` plus a source line)."""
    proc = subprocess.run([sys.executable, "MyTrain_LungInf.py", "--train_path", str(tmp_path / "nowhere"),
                           "--snapshot_root", str(tmp_path / "snap"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert lines[0].startswith("warning: inf_net: the encoder starts from RANDOM weights") and lines[1].startswith(
        "error: ") and "UserWarning" not in proc.stderr


@pytest.mark.parametrize("trainer, holds", [(script, "Imgs/ and GT/"), (multiclass_script, "Imgs/, GT/ and Prior/")])
def test_a_missing_training_folder_names_the_option_and_where_data_goes(trainer, holds, tmp_path, capsys):
    """The first run of a new user, without Dataset/: the line says which option and what to give."""
    err, _ = _one_line_error(capsys, trainer.main, ["--train_path", str(tmp_path / "nowhere"), "--snapshot_root",
                                                    str(tmp_path / "snap"), "--no-progress"])
    assert err.startswith(f"error: --train_path: {tmp_path / 'nowhere'}/Imgs: folder not found; give the folder "
                          f"holding {holds}") and "Dataset/README.md" in err, err


def test_init_weights_of_another_encoder_say_which_backbone_they_need(data, tmp_path, capsys):
    from Code.model_lung_infection import Inf_Net, save_release_weights
    init = tmp_path / "Inf-Net-10.pth"
    save_release_weights(Inf_Net(backbone="mobilenetv2"), init)
    err, _ = _one_line_error(capsys, script.main, _options(data, tmp_path / "snap", "--init", str(init)))
    assert err == (f"error: --init {init} holds Inf-Net weights with the mobilenetv2 encoder, and this run builds "
                   f"{SMALL}: add --backbone mobilenetv2")


@pytest.mark.parametrize("trainer, option", [(script, "--train_save"), (script, "--snapshot_prefix"),
                                             (multiclass_script, "--train_save"),
                                             (multiclass_script, "--snapshot_prefix"), (pseudo_script, "--train_save")])
@pytest.mark.parametrize("name", ["../escaped", "", "a/b", "ABSOLUTE"])
def test_run_names_are_one_folder_name(trainer, option, name, tmp_path, capsys):
    """--train_save ../x trained into <snapshot_root>/x, '' into save_weights/ itself, --snapshot_prefix ../p wrote
    its snapshots beside the run folders: every name that becomes a path stays under --snapshot_root."""
    name = str(tmp_path / "elsewhere") if name == "ABSOLUTE" else name
    with pytest.raises(SystemExit) as stop:
        trainer.parse_args([option, name, "--snapshot_root", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and option in err and "one folder or file name" in err
