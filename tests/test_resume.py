"""Runs that work the first time: an exact --resume from the script's options alone, one-line errors,
Ctrl-C's resume command, devices and RNG with other GPU counts, equal batches per DDP rank, and
pseudo-label rounds that write no resumable checkpoint."""
import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
from slices import copy_doctor_slices

import MyTrain_LungInf as script
from Code.model_lung_infection import engine as engine_module
from Code.model_lung_infection import runtime
from Code.model_lung_infection import train as train_module
from Code.model_lung_infection.cli import run_main
from Code.model_lung_infection.engine import EpochSliceSampler
from Code.model_lung_infection.errors import TrainingInterrupted, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "timm:resnet18"


def _copy_slices(data_root, dst, n=4):
    copy_doctor_slices(data_root, dst, n)
    return dst


def _options(data, snap):
    # Every one differs from its default: --resume must bring them all back.
    return ["--train_path", str(data), "--trainsize", "64", "--batchsize", "2", "--epoch", "2", "--seed", "7",
            "--lr", "3e-4", "--backbone", SMALL, "--snapshot_prefix", "Mine", "--snapshot_root", str(snap),
            "--no-reverse_attention", "--save_every", "1", "--no-progress"]


def _interrupt_after(monkeypatch, n_batches):
    """Ctrl-C inside the training step of batch n_batches + 1."""
    real = train_module.multi_scale_step

    def step_factory(cfg):
        step, calls = real(cfg), []

        def interrupted(engine, batch):
            calls.append(1)
            if len(calls) > n_batches:
                raise KeyboardInterrupt
            return step(engine, batch)
        return interrupted
    monkeypatch.setattr(train_module, "multi_scale_step", step_factory)


def test_resume_with_only_the_run_name_equals_an_uninterrupted_run(data_root, tmp_path, monkeypatch, capsys):
    data, snap = _copy_slices(data_root, tmp_path / "d"), tmp_path / "snap"
    script.main(_options(data, snap) + ["--train_save", "full"])

    # 4 slices in batches of 2: Ctrl-C in epoch 2's second batch, after epoch 1 was saved.
    with monkeypatch.context() as m:
        _interrupt_after(m, 3)
        with pytest.raises(SystemExit) as stop:
            run_main(script.main, _options(data, snap) + ["--train_save", "split"])
    assert stop.value.code == 130
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: "))
    assert len(err.splitlines()) == 1 and "epoch 2 of 2" in err and "holds epoch 1" in err
    command = f"python MyTrain_LungInf.py --resume --train_save split --snapshot_root {snap}"
    assert err.endswith(command)

    cfg = script.config_from_args(script.parse_args(command.split()[2:]))
    assert (cfg.train_path, cfg.trainsize, cfg.batchsize, cfg.epoch, cfg.seed, cfg.lr, cfg.backbone,
            cfg.snapshot_prefix, cfg.reverse_attention, cfg.scales) == \
        ([str(data)], 64, 2, 2, 7, 3e-4, SMALL, "Mine", False, (0.75, 1.0, 1.25))
    script.main(command.split()[2:])

    full = torch.load(snap / "save_weights/full/Mine-2.pth", weights_only=True)
    resumed = torch.load(snap / "save_weights/split/Mine-2.pth", weights_only=True)
    assert list(full) == list(resumed)
    assert all(torch.equal(full[k], resumed[k]) for k in full), [k for k in full if not torch.equal(full[k],
                                                                                                   resumed[k])][:5]

    # Given options that differ from the run's are refused, by name; --epoch extends, --device runs elsewhere.
    run = ["--resume", "--train_save", "split", "--snapshot_root", str(snap)]
    with pytest.raises(UserError, match=r"^--trainsize 96 differs from 64.*split/checkpoint.pth") as e:
        script.config_from_args(script.parse_args(run + ["--trainsize", "96"]))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="--scales"):
        script.config_from_args(script.parse_args(run + ["--no-multi_scale"]))
    assert script.config_from_args(script.parse_args(run + ["--trainsize", "64"])).trainsize == 64  # the same
    more = script.config_from_args(script.parse_args(run + ["--epoch", "3", "--device", "cpu"]))
    assert (more.epoch, more.device, more.trainsize, more.resume) == (3, "cpu", 64, True)


def test_resume_without_a_run_name_uses_the_stage_default(tmp_path):
    with pytest.raises(FileNotFoundError, match="Inf-Net/checkpoint.pth"):
        script.config_from_args(script.parse_args(["--resume", "--snapshot_root", str(tmp_path)]))


def test_resume_command_names_the_script_and_the_launcher(monkeypatch):
    from Code.model_lung_infection.multiclass import MultiClassConfig
    from Code.model_lung_infection.train import TrainConfig
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert engine_module.resume_command(TrainConfig(train_save="My Run"), world_size=2) == \
        "torchrun --nproc_per_node=2 MyTrain_LungInf.py --resume --train_save 'My Run'"
    assert engine_module.resume_command(MultiClassConfig(snapshot_root="/s")) == \
        "python MyTrain_MulClsLungInf_UNet.py --resume --train_save Semi-Inf-Net_UNet --snapshot_root /s"


def test_multiclass_resume_restores_and_checks_too(tmp_path):
    import MyTrain_MulClsLungInf_UNet as mc
    from Code.model_lung_infection.checkpoint import atomic_save
    from Code.model_lung_infection.multiclass import MultiClassConfig
    saved = MultiClassConfig(train_path="/data/mc", trainsize=64, batchsize=2, snapshot_root=str(tmp_path))
    atomic_save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "rng": {}, "config": saved.as_dict()},
                saved.checkpoint_path)
    cfg = mc.config_from_args(mc.parse_args(["--resume", "--snapshot_root", str(tmp_path)]))
    assert (cfg.train_path, cfg.trainsize, cfg.batchsize, cfg.lr, cfg.resume) == ("/data/mc", 64, 2, 1e-2, True)
    with pytest.raises(UserError, match="^--batchsize 4 differs from 2"):
        mc.config_from_args(mc.parse_args(["--resume", "--snapshot_root", str(tmp_path), "--batchsize", "4"]))


def test_precision_and_gpu_options_may_change_on_resume(tmp_path):
    # A run started on a laptop in fp32 finishes on a GPU: --amp/--amp_dtype given reset the other one.
    from Code.model_lung_infection.checkpoint import atomic_save
    from Code.model_lung_infection.train import TrainConfig
    saved = TrainConfig(train_path=["/data/x"], snapshot_root=str(tmp_path), amp=False, sync_bn=False,
                        keep_freed_memory=True)
    atomic_save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "rng": {}, "config": saved.as_dict()},
                saved.checkpoint_path)
    run = ["--resume", "--snapshot_root", str(tmp_path)]
    cfg = script.config_from_args(script.parse_args(run + ["--amp_dtype", "float16", "--sync_bn", "--deterministic"]))
    assert (cfg.amp, cfg.amp_dtype, cfg.sync_bn, cfg.deterministic, cfg.train_path) == \
        (None, "float16", True, True, ["/data/x"])
    cfg = script.config_from_args(script.parse_args(run))
    assert (cfg.amp, cfg.amp_dtype, cfg.sync_bn) == (False, None, False)  # not given: the run's own
    # this session's alone: the machine a run resumes on may have less memory
    assert not cfg.keep_freed_memory
    assert script.config_from_args(script.parse_args(run + ["--keep_freed_memory"])).keep_freed_memory


def _script(*args, cwd=ROOT):
    env = dict(os.environ, OMP_NUM_THREADS="1", INFNET_DEBUG="", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(ROOT, "MyTrain_LungInf.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(result, *needles):
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr[-2000:]
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def test_invalid_numbers_are_rejected_by_the_parser():
    _one_line_error(_script("--batchsize", "0"), "--batchsize", "expected an integer >= 1, got '0'")
    for bad in (["--epoch", "-1"], ["--trainsize", "0"], ["--lr", "0"], ["--save_every", "0"], ["--lr", "-1e-4"],
                ["--decay_epoch", "0"], ["--num_workers", "-1"], ["--epoch_samples", "0"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


def test_existing_run_and_truncated_checkpoint_are_one_line_errors(data_root, tmp_path):
    data, snap = _copy_slices(data_root, tmp_path / "d", 2), tmp_path / "snap"
    checkpoint = snap / "save_weights/run/checkpoint.pth"
    checkpoint.parent.mkdir(parents=True)
    torch.save({"model": _some_weights(), "optimizer": {}, "epoch": 1}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:2000])  # a copy cut short (disk full, killed transfer)
    base = ["--train_path", str(data), "--trainsize", "64", "--backbone", SMALL, "--snapshot_root", str(snap),
            "--train_save", "run", "--no-progress"]
    _one_line_error(_script(*base), str(checkpoint), "--resume", "--overwrite")
    _one_line_error(_script("--resume", "--train_save", "run", "--snapshot_root", str(snap)),
                    str(checkpoint), "cannot be read", "--overwrite")
    debug = _script("--resume", "--train_save", "run", "--snapshot_root", str(snap), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def _some_weights():
    return {f"w{i}": torch.zeros(1000) for i in range(4)}


# ------------------------------------------------------------------ DDP, devices, RNG

def test_every_trainable_parameter_gets_a_gradient_in_every_ablation():
    # What DDP needs (it fails on a trainable parameter without a gradient), with the release's encoder,
    # whose unused ImageNet classifier is kept for the checkpoint keys but frozen.
    import itertools

    from Code.model_lung_infection import Inf_Net
    from Code.model_lung_infection.losses import segmentation_loss
    gt = (torch.rand(2, 1, 64, 64) > 0.5).float()
    for switches in itertools.product((True, False), repeat=3):
        torch.manual_seed(0)
        model = Inf_Net(**dict(zip(("edge_attention", "partial_decoder", "reverse_attention"), switches)))
        segmentation_loss(model(torch.randn(2, 3, 64, 64)), gt, gt)[0].backward()
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == [], switches
        assert not model.resnet.fc.weight.requires_grad and "resnet.fc.weight" in model.state_dict()


@pytest.mark.parametrize("world_size,size,samples", [(2, 7, 5), (3, 7, 7), (3, 5, 11), (2, 3, 3)])
def test_every_rank_gets_the_same_number_of_batches(world_size, size, samples):
    # DDP waits for every rank at every update: one rank with a batch fewer hangs the others.
    for epoch in (1, 2, 3):
        ranks = [EpochSliceSampler(size, samples, world_size, r, seed=1) for r in range(world_size)]
        for s in ranks:
            s.set_epoch(epoch)
        lists = [list(s) for s in ranks]
        assert {len(x) for x in lists} == {len(ranks[0])} == {-(-samples // world_size)}
        assert set(sum(lists, [])) == set(ranks[0].epoch_indices())  # padding repeats, drops nothing
        loaders = [torch.utils.data.DataLoader(range(size), batch_size=2, sampler=s) for s in ranks]
        assert len({len(list(iter(x))) for x in loaders}) == 1


def test_cuda_device_index_is_honoured_outside_torchrun(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert runtime.Distributed().setup(torch.device("cuda:1")) == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)]
    assert runtime.Distributed().setup(torch.device("cuda")) == torch.device("cuda", 0)


@pytest.mark.parametrize("now", [1, 3])
def test_rng_state_restores_with_another_number_of_gpus(monkeypatch, now):
    saved = runtime.rng_state()
    saved["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]  # saved with 2 GPUs
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: now)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.setdefault(device, s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("needs as many GPUs as saved"))
    runtime.set_rng_state(saved)
    assert sorted(restored) == list(range(min(now, 2)))
    assert all(torch.equal(restored[i], saved["cuda"][i]) for i in restored)


# ------------------------------------------------------------------ pseudo-label rounds

def test_a_pseudo_label_round_writes_no_checkpoint(data_root, tmp_path, monkeypatch):
    from Code.model_lung_infection import Inf_Net, save_release_weights
    from Code.model_lung_infection.pseudo import PseudoConfig, generate, round_training
    train = data_root / "TrainingSet/LungInfection-Train"
    pool = tmp_path / "pool"
    pool.mkdir()
    for n in sorted(os.listdir(train / "Pseudo-label/Imgs"))[:4]:
        shutil.copy(train / "Pseudo-label/Imgs" / n, pool / n)
    seed = _copy_slices(data_root, tmp_path / "doctor", 4)
    torch.manual_seed(0)
    save_release_weights(Inf_Net(backbone=SMALL).eval(), tmp_path / "init.pth")
    written = []
    real_save = engine_module.atomic_save
    monkeypatch.setattr(engine_module, "atomic_save", lambda obj, path: (written.append(path), real_save(obj, path)))
    rounds = dataclasses.replace(round_training(), snapshot_root=str(tmp_path / "snap"), epoch=1, batchsize=4,
                                 trainsize=64, progress=False, device="cpu")
    state = generate(PseudoConfig(init=str(tmp_path / "init.pth"), unlabeled_path=str(pool), labeled_path=str(seed),
                                  save_path=str(tmp_path / "out"), k=4, max_rounds=1, backbone=SMALL, train=rounds))
    assert len(state["rounds"]) == 1 and os.path.isfile(state["checkpoint"])
    assert written == []  # the engine wrote no resumable checkpoint (the round's weights are release format)
    assert not list((tmp_path / "snap").rglob("checkpoint.pth"))


def test_training_interrupted_says_nothing_is_saved_before_the_first_epoch(data_root, tmp_path, monkeypatch):
    data, snap = _copy_slices(data_root, tmp_path / "d", 2), tmp_path / "snap"
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(TrainingInterrupted, match="epoch 1 of 2; no epoch was finished"):
        script.main(_options(data, snap) + ["--train_save", "x"])
    assert not (snap / "save_weights/x/checkpoint.pth").exists()
