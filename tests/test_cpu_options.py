"""The opt-in options for training from random weights on a CPU budget (issue 16), each observed being
applied through the real trainer: held-out validation slices and val.csv, the time budget, augmentation,
the cosine / warm-up schedule, EMA, progressive size, the --recipe registry; that the paper recipe stays
the default; that a resumed run with all of them on equals an uninterrupted one; the sweep's table.
Synthetic slices (no shared data needed), 64-128 px, a light encoder."""
import copy
import csv
import importlib.util
import math
import os
import platform
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slices import write_synthetic_slices

import MyTrain_LungInf as script
from Code.model_lung_infection import Inf_Net
from Code.model_lung_infection import configs as configs_module
from Code.model_lung_infection import engine as engine_module
from Code.model_lung_infection.augment import augment_batch, batch_generator
from Code.model_lung_infection.configs import TrainConfig
from Code.model_lung_infection.data import IMAGENET_MEAN, IMAGENET_STD, InfectionTrainSet
from Code.model_lung_infection.encoders import create_encoder, freeze_encoder_to
from Code.model_lung_infection.engine import epochs_that_fit, fit_schedule
from Code.model_lung_infection.errors import UserError
from Code.model_lung_infection.runtime import training_precision
from Code.model_lung_infection.train import build_scheduler, train
from Code.model_lung_infection.validation import Validator, dice, hold_out

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "timm:resnet18"


def _slices(root, n=6, size=96):
    return write_synthetic_slices(root, n, size, prefix="s")


def _cfg(tmp_path, **kw):
    data = tmp_path / "data"
    if not data.exists():
        _slices(data)
    base = dict(train_path=[str(data)], snapshot_root=str(tmp_path / "snap"), train_save="run", backbone=SMALL,
                device="cpu", epoch=1, batchsize=2, trainsize=64, save_every=100, progress=False, seed=3,
                scales=(1.0,))
    base.update(kw)
    return TrainConfig(**base)


def _forward_sizes(model, record):
    model.register_forward_pre_hook(lambda mod, args: record.append(args[0].detach().clone()))
    return model


def _val_rows(cfg):
    with open(cfg.run_dir / "val.csv", newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- the paper recipe stays the default

def test_defaults_are_the_paper_recipe():
    cfg = script.config_from_args(script.parse_args([]))
    assert (cfg.recipe, cfg.augment, cfg.schedule, cfg.warmup_epochs, cfg.ema, cfg.progressive_size,
            cfg.val_split, cfg.time_budget, cfg.fit_budget) == ("paper", False, "step", 0, None, None, 0, None, False)
    assert cfg == TrainConfig(stage="doctor")
    assert configs_module.TRAIN_RECIPES["paper"] == {}
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], 1e-4)
    assert type(build_scheduler(cfg, optimizer)) is torch.optim.lr_scheduler.StepLR


def test_default_step_sees_the_data_unaugmented_at_trainsize(tmp_path):
    cfg = _cfg(tmp_path, max_steps=1)
    seen = []
    torch.manual_seed(0)
    train(cfg, model=_forward_sizes(Inf_Net(backbone=SMALL), seen))
    data = InfectionTrainSet(cfg.train_path, 64)
    order_sampler = torch.utils.data.DistributedSampler(data, 1, 0, shuffle=True, seed=cfg.seed)
    order_sampler.set_epoch(1)
    order = list(order_sampler)[:2]
    expected = torch.stack([data[i][0] for i in order])
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


# ---------------------------------------------------------------- validation hold-out

def test_val_split_holds_slices_out_scores_them_and_writes_val_csv(tmp_path, monkeypatch, capsys):
    trained = []
    real_read = InfectionTrainSet.read
    monkeypatch.setattr(InfectionTrainSet, "read",
                        lambda self, i: trained.append(self.samples[i][0]) or real_read(self, i))
    cfg = _cfg(tmp_path, epoch=2, val_split=2, val_every=1)
    train(cfg)
    held = hold_out([f"s{i}" for i in range(6)], 2, cfg.val_seed)
    assert cfg.val_stems == held and len(held) == 2
    assert set(trained) == {f"s{i}" for i in range(6)} - set(held)  # the held-out slices are never trained on
    rows = _val_rows(cfg)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "minutes", "val_dice", "val_mae", "val_mean_dice", "train_loss", "lr"]
    assert all(0 <= float(r["val_dice"]) <= 1 and float(r["minutes"]) > 0 for r in rows)
    assert float(rows[1]["minutes"]) > float(rows[0]["minutes"])
    assert "[val] epoch 002 dice" in capsys.readouterr().out
    saved = torch.load(cfg.checkpoint_path, weights_only=False)["config"]
    assert saved["val_stems"] == held

    # a resumed run keeps the split (from its checkpoint) and its earlier val.csv rows
    resumed = script.config_from_args(script.parse_args(
        ["--resume", "--train_save", "run", "--snapshot_root", cfg.snapshot_root, "--epoch", "3"]))
    assert resumed.val_stems == held and resumed.val_split == 2
    train(resumed)
    assert [int(r["epoch"]) for r in _val_rows(cfg)] == [1, 2, 3]


def test_val_size_scores_the_held_out_slices_at_that_size_not_trainsize(tmp_path, capsys):
    """A run trained at 64 px and validated at 96 (the size it will be tested at): the held-out slices reach the
    network at 96 px, val.csv holds their scores at 96, and the log says the size."""
    cfg = script.config_from_args(script.parse_args(
        ["--train_path", str(_slices(tmp_path / "data")), "--snapshot_root", str(tmp_path / "snap"),
         "--train_save", "run", "--backbone", SMALL, "--epoch", "1", "--batchsize", "2", "--trainsize", "64",
         "--multi_scale", "False", "--val_split", "2", "--val_size", "96", "--progress", "False"]))
    assert cfg.val_size == 96
    shapes = []
    model = Inf_Net(backbone=SMALL)
    model.register_forward_pre_hook(lambda mod, args: shapes.append((mod.training, tuple(args[0].shape[-2:]))))
    model = train(cfg, model=model)
    assert {shape for training, shape in shapes if training} == {(64, 64)}
    assert {shape for training, shape in shapes if not training} == {(96, 96)}
    assert "2 more held out for validation at 96 px" in capsys.readouterr().out
    root = tmp_path / "data"
    held = [(s, root / "Imgs" / f"{s}.jpg", root / "GT" / f"{s}.png") for s in cfg.val_stems]
    cpu = torch.device("cpu")
    amp = training_precision(cpu, cfg.amp, cfg.channels_last, cfg.smallest_input())[0]  # bf16 on CPUs with it
    row, scores = _val_rows(cfg)[-1], Validator(held, 96)(model, cpu, amp)
    assert float(row["val_mae"]) == pytest.approx(scores["mae"], abs=2e-6)
    with pytest.raises(ValueError, match="val_size 96: the size held-out slices are scored at; hold some out"):
        _cfg(tmp_path, val_size=96)
    with pytest.raises(ValueError, match="val_size 16: must lie between"):
        _cfg(tmp_path, val_split=2, val_size=16)


def test_validation_defaults_to_the_test_stage_size_and_older_runs_keep_trainsize(tmp_path):
    """Without --val_size the held-out slices are scored at 352 px, the test stage's size, whatever --trainsize;
    the size is recorded, and a run started before this default (its config says None) resumes at trainsize."""
    def sizes_seen(cfg):
        shapes = []
        model = Inf_Net(backbone=SMALL)
        model.register_forward_pre_hook(lambda mod, args: shapes.append((mod.training, tuple(args[0].shape[-2:]))))
        train(cfg, model=model)
        return {shape for training, shape in shapes if not training}

    cfg = _cfg(tmp_path, epoch=1, val_split=2)
    assert sizes_seen(cfg) == {(352, 352)}
    checkpoint = torch.load(cfg.checkpoint_path, weights_only=False)
    assert checkpoint["config"]["val_size"] == 352
    resume = ["--resume", "--train_save", "run", "--snapshot_root", cfg.snapshot_root, "--epoch", "2"]
    resumed = script.config_from_args(script.parse_args(resume))
    assert resumed.val_size == 352

    checkpoint["config"]["val_size"] = None  # as a run started before the default saved it
    torch.save(checkpoint, cfg.checkpoint_path)
    older = script.config_from_args(script.parse_args(resume))
    assert sizes_seen(older) == {(64, 64)}
    assert [int(r["epoch"]) for r in _val_rows(cfg)] == [1, 2]


def test_validator_scores_as_the_test_stage_thresholds_at_one_half(tmp_path):
    data = _slices(tmp_path / "d", n=2)
    samples = [(s, data / "Imgs" / f"{s}.jpg", data / "GT" / f"{s}.png") for s in ("s0", "s1")]

    class Everywhere(torch.nn.Module):  # predicts infection everywhere, at probability sigmoid(2)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.full((x.shape[0], 1, 8, 8), 2.0) + self.w

    scores = Validator(samples, testsize=64)(Everywhere(), torch.device("cpu"))
    gts = [np.array(Image.open(g)) > 128 for _, _, g in samples]
    assert scores["dice"] == pytest.approx(np.mean([2 * g.sum() / (g.size + g.sum()) for g in gts]))
    p = 1 / (1 + math.exp(-2))
    assert scores["mae"] == pytest.approx(np.mean([np.abs(p - g).mean() for g in gts]), rel=1e-5)
    # the paper's figure: the 8-bit map (round(255 p) = 225 everywhere) passes the 226 thresholds 0/255 ... 225/255
    assert round(255 * p) == 225
    assert scores["mean_dice"] == pytest.approx(226 / 256 * scores["dice"])
    assert dice(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 0.0  # the evaluation tool's rule


# ---------------------------------------------------------------- time budget

def test_time_budget_stops_after_the_epoch_that_crosses_it_and_saves(tmp_path, capsys):
    cfg = _cfg(tmp_path, epoch=5, time_budget=1e-6, val_split=2, val_every=3)
    train(cfg)
    out = capsys.readouterr().out
    assert "time budget of 1e-06 minutes reached after epoch 1" in out
    assert re.search(rf"finished at epoch 1 of the 5 planned after \d+\.\d minutes; weights "
                     rf"{re.escape(str(cfg.run_dir / 'Inf-Net-1.pth'))}\n", out)
    assert [r["epoch"] for r in _val_rows(cfg)] == ["1"]  # the last epoch is validated, off the val_every grid
    assert (cfg.run_dir / "Inf-Net-1.pth").exists()  # saved as at a normal end (save_every is 100)
    state = torch.load(cfg.checkpoint_path, weights_only=False)
    assert state["epoch"] == 1 and state["elapsed_s"] > 0
    # resumed time counts: the budget is spent, nothing more is trained
    train(_cfg(tmp_path, epoch=5, time_budget=1e-6, resume=True))
    out = capsys.readouterr().out
    assert "nothing to train" in out and "finished" not in out
    assert torch.load(cfg.checkpoint_path, weights_only=False)["epoch"] == 1


def test_fit_budget_shrinks_a_run_too_long_for_the_budget_pretraining_and_cosine_with_it(tmp_path, monkeypatch,
                                                                                        capsys):
    """A machine where every epoch takes a minute (a clock driven by the epochs) and a 10-minute budget for 40
    epochs: after epoch 2 the run is fitted to 10 epochs, the pretraining to 5 of them, the cosine to 10."""
    monkeypatch.setattr(engine_module.Engine, "_now", lambda self: 60.0 * getattr(self, "epoch", 0))
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    pre = write_synthetic_slices(tmp_path / "pre", 3, 96, prefix="p")
    seen, lrs = [], []
    real_item = InfectionTrainSet.__getitem__
    monkeypatch.setattr(InfectionTrainSet, "__getitem__",
                        lambda self, i: seen.append(self.samples[i][0][0]) or real_item(self, i))
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    cfg = _cfg(tmp_path, epoch=40, pretrain_path=str(pre), pretrain_epochs=20, schedule="cosine", lr=1e-3,
               batchsize=1, epoch_samples=1, time_budget=10.0, fit_budget=True)
    try:
        train(cfg)
    finally:
        handle.remove()
    out = capsys.readouterr().out
    assert ("--fit_budget: at 1.00 minutes per epoch the 40 planned epochs take 40 minutes, and --time_budget is "
            "10: the run now ends at epoch 10, pretrain_epochs 20 -> 5") in out
    # the last line: where the run ended against its plan, its minutes, the weights to test
    assert out.endswith(f"[train] finished at epoch 10 of the 40 planned after 10.0 minutes; weights "
                        f"{cfg.run_dir / 'Inf-Net-10.pth'}\n")
    saved = torch.load(cfg.checkpoint_path, weights_only=False)
    assert saved["epoch"] == 10 and (saved["config"]["epoch"], saved["config"]["pretrain_epochs"]) == (10, 5)
    assert (cfg.run_dir / "Inf-Net-10.pth").exists()  # the fitted last epoch is saved as the last
    assert "".join(seen) == "ppppp" + "s" * 5  # Semi-Inf-Net's two steps, both within the budget
    cosine = [0.5 * (1 + math.cos(math.pi * k / 40)) for k in range(2)]  # planned over 40 until fitted ...
    cosine += [0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(2, 10)]  # ... then over 10: it ends near 0
    assert lrs == pytest.approx([1e-3 * f for f in cosine], rel=1e-9)


def test_fit_budget_resumed_on_a_faster_machine_wins_back_the_epochs_up_to_the_plan(tmp_path, monkeypatch, capsys):
    """A first session at a minute per epoch fits 40 planned epochs into the 10-minute budget (10, pretraining 5)
    and stops after epoch 2; resumed with the command it started with, at 15 s per epoch, the run is fitted
    again from the plan, not from the first session's fit: it ends at epoch 34, pretraining at 17."""
    clock = {"pace": 60.0, "from": 0}  # seconds per epoch; the epoch this session's clock starts at
    monkeypatch.setattr(engine_module.Engine, "_now",
                        lambda self: clock["pace"] * (getattr(self, "epoch", clock["from"]) - clock["from"]))
    pre = write_synthetic_slices(tmp_path / "pre", 3, 96, prefix="p")
    cfg = _cfg(tmp_path, epoch=40, pretrain_path=[str(pre)], pretrain_epochs=20, schedule="cosine", batchsize=1,
               epoch_samples=1, time_budget=10.0, fit_budget=True, max_steps=2)
    train(cfg)
    saved = torch.load(cfg.checkpoint_path, weights_only=False)
    assert saved["epoch"] == 2 and (saved["config"]["epoch"], saved["config"]["pretrain_epochs"]) == (10, 5)
    assert saved["config"]["planned_schedule"] == {"epoch": 40, "pretrain_epochs": 20}
    capsys.readouterr()

    clock.update({"pace": 15.0, "from": 2})
    # the options the run was started with, given again: compared with the plan, not refused as changed
    resumed = script.config_from_args(script.parse_args(
        ["--resume", "--train_save", "run", "--snapshot_root", cfg.snapshot_root, "--pretrain_path", str(pre),
         "--pretrain_epochs", "20", "--epoch", "40"]))
    assert (resumed.epoch, resumed.pretrain_epochs) == (40, 5)  # the plan's end until this session's pace is known
    resumed.max_steps = None
    train(resumed)
    # after epoch 4: 2.5 of the 10 minutes used, 15 s per epoch: 30 more epochs, pretraining 20/40 of them
    assert "the run now ends at epoch 34, pretrain_epochs 5 -> 17" in capsys.readouterr().out
    saved = torch.load(cfg.checkpoint_path, weights_only=False)
    assert saved["epoch"] == 34 and (saved["config"]["epoch"], saved["config"]["pretrain_epochs"]) == (34, 17)
    # an option given alone is checked with the run's others (--pretrain_path here), not with the defaults
    again = ["--resume", "--train_save", "run", "--snapshot_root", cfg.snapshot_root]
    assert script.config_from_args(script.parse_args(again + ["--pretrain_epochs", "20"])).pretrain_epochs == 17
    with pytest.raises(UserError, match="--pretrain_epochs 30 differs from 20, which the run"):
        script.config_from_args(script.parse_args(again + ["--pretrain_epochs", "30"]))


@pytest.mark.parametrize("seconds, planned, budget, last", [
    # every third epoch validates and takes twice as long: at the mean pace alone a slow sixth would end at 480 s
    ({3: 120, 6: 120, 9: 120}, 30, 7.5, 5),
    # one busy epoch moves the end in by one epoch, less than the schedule's dead band for 100 planned epochs:
    # moved all the same (a tenth epoch would end at 615 s)
    ({6: 75}, 100, 10.0, 9)])
def test_fit_budget_ends_the_run_within_the_budget(tmp_path, monkeypatch, seconds, planned, budget, last):
    """Epochs of a minute but those in `seconds`: the fitted run's last epoch ends within --time_budget."""
    ends = [0.0]
    for epoch in range(1, 40):
        ends.append(ends[-1] + seconds.get(epoch, 60.0))
    monkeypatch.setattr(engine_module.Engine, "_now", lambda self: ends[getattr(self, "epoch", 0)])
    cfg = _cfg(tmp_path, epoch=planned, batchsize=1, epoch_samples=1, time_budget=budget, fit_budget=True)
    train(cfg)
    saved = torch.load(cfg.checkpoint_path, weights_only=False)
    assert saved["epoch"] == last and saved["config"]["epoch"] == last
    assert saved["elapsed_s"] == ends[last] <= budget * 60


def test_fit_budget_keeps_a_drifting_jittery_run_within_the_budget(tmp_path, monkeypatch):
    """Epochs of 50 s +-4 s that slow down by 3% over the run, every fifth 8 s longer (it validates): the fitted
    run ends within --time_budget, and leaves less than two epochs of it unused."""
    rng = np.random.default_rng(5)
    ends = [0.0]
    for epoch in range(1, 61):
        ends.append(ends[-1] + 50 * (1 + 0.03 * epoch / 60) + rng.uniform(-4, 4) + 8 * (epoch % 5 == 0))
    monkeypatch.setattr(engine_module.Engine, "_now", lambda self: ends[getattr(self, "epoch", 0)])
    cfg = _cfg(tmp_path, epoch=60, batchsize=1, epoch_samples=1, time_budget=35.0, fit_budget=True)
    train(cfg)
    last = torch.load(cfg.checkpoint_path, weights_only=False)["epoch"]
    assert ends[last] <= 35 * 60 < ends[last] + 2 * 60


def test_fit_budget_does_not_move_the_end_back_and_forth_with_the_pace_jitter(tmp_path, monkeypatch):
    """Epochs of 50 s +-8 s, every fifth 8 s longer, 100 planned (a dead band of 2 epochs): the end moves by less
    than the band only inward and only once it is that near (where waiting would overrun the budget); the run
    still ends within --time_budget with less than two epochs of it unused."""
    rng = np.random.default_rng(11)
    ends = [0.0]
    for epoch in range(1, 101):
        ends.append(ends[-1] + 50 + rng.uniform(-8, 8) + 8 * (epoch % 5 == 0))
    monkeypatch.setattr(engine_module.Engine, "_now", lambda self: ends[getattr(self, "epoch", 0)])
    moves, real_fit = [], engine_module.fit_schedule  # (epochs done, end before, end after) of each move

    def recording_fit(cfg, done, last, start):
        changed = real_fit(cfg, done, last, start)
        if "epoch" in changed:
            moves.append((done, *changed["epoch"]))
        return changed
    monkeypatch.setattr(engine_module, "fit_schedule", recording_fit)
    cfg = _cfg(tmp_path, epoch=100, batchsize=1, epoch_samples=1, time_budget=35.0, fit_budget=True)
    train(cfg)
    assert moves and moves[0][1] == 100 > moves[0][2]  # fitted in once the pace is known
    for done, before, after in moves[1:]:
        assert abs(after - before) >= 2 or (after < before and before - done <= 2), (done, before, after)
    last = torch.load(cfg.checkpoint_path, weights_only=False)["epoch"]
    assert ends[last] <= 35 * 60 < ends[last] + 2 * 60


def test_epochs_that_fit_give_the_last_epoch_the_time_of_the_slowest_recent_one():
    assert epochs_that_fit([60.0] * 4, 600.0) == 10
    assert epochs_that_fit([60.0, 60.0, 120.0], 600.0) == 1 + (600 - 120) // 80  # 80 s the mean
    assert epochs_that_fit([60.0, 60.0, 120.0], 119.0) == 0  # not even one: the run ends now
    # a slow epoch long ago counts in the mean, not as the last one's measure
    assert epochs_that_fit([200.0] + [60.0] * 10, 600.0) == 1 + (600 - 60) // (800 / 11)
    assert epochs_that_fit([60.0] * 3, -5.0) == 0  # the budget already passed


def test_fit_schedule_moves_the_marks_not_yet_reached_and_never_past_the_planned_run():
    cfg = TrainConfig(epoch=100, pretrain_epochs=50, pretrain_path=["p"], schedule="cosine", time_budget=60.0,
                      fit_budget=True)
    start = {"epoch": 100, "pretrain_epochs": 50}
    assert fit_schedule(cfg, 10, 120, start) == {} and cfg.epoch == 100  # it fits: never past the planned 100
    assert fit_schedule(cfg, 10, 60, start) == {"epoch": (100, 60), "pretrain_epochs": (50, 30)}
    assert fit_schedule(cfg, 12, 80, start) == {"epoch": (60, 80), "pretrain_epochs": (30, 40)}  # a busy start
    assert fit_schedule(cfg, 40, 50, start) == {"epoch": (80, 50)}  # pretraining has ended: it stays at 40
    assert fit_schedule(cfg, 45, 3, start) == {"epoch": (50, 45)} and cfg.epoch == 45  # ends now, not before
    assert fit_schedule(cfg, 45, 500, start) == {"epoch": (45, 100)}
    step = TrainConfig(epoch=100, decay_epoch=50, fit_budget=True, time_budget=60.0)
    assert fit_schedule(step, 2, 50, {"epoch": 100, "decay_epoch": 50}) == {"epoch": (100, 50),
                                                                             "decay_epoch": (50, 25)}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(step, optimizer)  # reads decay_epoch at every epoch, as fitted
    for _ in range(25):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="fit_budget.*--time_budget"):
        TrainConfig(fit_budget=True)


# ---------------------------------------------------------------- augmentation

def test_augment_transforms_image_gt_and_edge_alike_and_is_seeded():
    yy, xx = np.mgrid[:64, :64]
    gt = torch.from_numpy(((yy - 20) ** 2 + (xx - 40) ** 2 < 150).astype(np.float32))[None, None].repeat(4, 1, 1, 1)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    image = (gt.repeat(1, 3, 1, 1) * 0.8 + 0.1 - mean) / std
    out_image, out_gt, out_edge = augment_batch(image, gt, gt.clone(), batch_generator(3, 1, 0))
    torch.testing.assert_close(out_gt, out_edge)  # one geometric transform for GT and edge
    assert not torch.equal(out_gt, gt)  # it did transform
    raw = out_image * std + mean
    agree = ((raw[:, 0:1] > 0.45) == (out_gt > 0.5)).float().mean()
    assert agree > 0.98  # ... and the image moved with them
    again = augment_batch(image, gt, gt.clone(), batch_generator(3, 1, 0))
    assert all(torch.equal(a, b) for a, b in zip(again, (out_image, out_gt, out_edge)))
    other = augment_batch(image, gt, gt.clone(), batch_generator(3, 2, 0))
    assert not torch.equal(other[1], out_gt)  # another epoch, other draws


def test_augment_reaches_the_network(tmp_path):
    inputs = {}
    for augment in (False, True):
        seen = []
        torch.manual_seed(0)
        train(_cfg(tmp_path, augment=augment, max_steps=1, train_save=f"a{augment}"),
              model=_forward_sizes(Inf_Net(backbone=SMALL), seen))
        inputs[augment] = seen[0]
    assert inputs[True].shape == inputs[False].shape
    assert not torch.allclose(inputs[True], inputs[False], atol=1e-3)


# ---------------------------------------------------------------- schedule and warm-up

@pytest.mark.parametrize("schedule,warmup,expected", [
    ("cosine", 2, [0.5, 1.0, 1.0, 0.5]),
    ("step", 2, [0.5, 1.0, 0.1, 0.1]),  # warm-up then the paper's step (decay_epoch 2)
    ("cosine", 0, [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]),
])
def test_schedule_and_warmup_set_the_lr_of_every_update(tmp_path, schedule, warmup, expected):
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    lrs = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        train(_cfg(tmp_path, epoch=4, lr=1e-3, decay_epoch=2, batchsize=1, epoch_samples=1, schedule=schedule,
                   warmup_epochs=warmup, train_save=f"{schedule}{warmup}"))
    finally:
        handle.remove()
    assert lrs == pytest.approx([1e-3 * f for f in expected], rel=1e-9)


def test_cosine_phases_restarts_the_lr_where_the_pretraining_ends():
    """--schedule cosine-phases: one cosine over the pretraining epochs, another from the full lr over the rest."""
    cfg = TrainConfig(epoch=8, pretrain_epochs=4, pretrain_path=["pseudo"], schedule="cosine-phases", lr=1e-3)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler, lrs = build_scheduler(cfg, optimizer), []
    for _ in range(cfg.epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    phase = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(phase + phase, rel=1e-9)
    with pytest.raises(ValueError, match="cosine-phases.*--pretrain_epochs N"):
        TrainConfig(schedule="cosine-phases")
    with pytest.raises(ValueError, match="cosine-phases.*--pretrain_epochs N"):  # the script prints it as one line
        script.config_from_args(script.parse_args(["--schedule", "cosine-phases"]))


# ---------------------------------------------------------------- EMA

def test_ema_averages_every_update_is_validated_and_saved_beside_the_snapshots(tmp_path, monkeypatch):
    validated = []
    real_call = Validator.__call__
    monkeypatch.setattr(Validator, "__call__", lambda self, model, *a: validated.append(
        copy.deepcopy(model.state_dict())) or real_call(self, model, *a))
    torch.manual_seed(0)
    model = Inf_Net(backbone=SMALL)
    initial = copy.deepcopy(model.state_dict())
    cfg = _cfg(tmp_path, ema=0.25, batchsize=4, epoch_samples=4, val_split=2)  # one update
    final = train(cfg, model=model).state_dict()
    ema = torch.load(cfg.run_dir / "Inf-Net-ema-1.pth", weights_only=True)
    raw = torch.load(cfg.run_dir / "Inf-Net-1.pth", weights_only=True)
    for k, v in final.items():
        torch.testing.assert_close(raw[k], v, rtol=0, atol=0)  # the raw weights are the training state
        want = 0.25 * initial[k] + 0.75 * v if v.is_floating_point() else v
        torch.testing.assert_close(ema[k], want, msg=k)
        torch.testing.assert_close(validated[0][k], ema[k], rtol=0, atol=0)  # validation scores the average
    assert "ema" in torch.load(cfg.checkpoint_path, weights_only=False)


# ---------------------------------------------------------------- progressive size

def test_progressive_size_grows_to_trainsize_over_the_first_half(tmp_path):
    seen = []
    torch.manual_seed(0)
    train(_cfg(tmp_path, epoch=4, trainsize=128, progressive_size=64, batchsize=1, epoch_samples=1,
               scales=(0.75, 1.0)), model=_forward_sizes(Inf_Net(backbone=SMALL), seen))
    sides = [x.shape[-1] for x in seen]
    # epoch 1: 64, epoch 2: 96 (half way), epochs 3-4: 128; each at scales 0.75 and 1 (multiples of 32)
    assert sides == [64, 64, 64, 96, 96, 128, 96, 128]


# ---------------------------------------------------------------- pre-training on extra slices

def test_pretrain_epochs_train_on_pretrain_path_then_on_train_path(tmp_path, monkeypatch, capsys):
    pre = write_synthetic_slices(tmp_path / "pre", 6, 96, prefix="p")
    seen = []
    real_item = InfectionTrainSet.__getitem__
    monkeypatch.setattr(InfectionTrainSet, "__getitem__",
                        lambda self, i: seen.append(self.samples[i][0]) or real_item(self, i))
    cfg = _cfg(tmp_path, epoch=4, val_split=2, pretrain_path=str(pre), pretrain_epochs=2)
    train(cfg)
    train_stems = {f"s{i}" for i in range(6)} - set(cfg.val_stems)
    epochs = [seen[k:k + 4] for k in range(0, len(seen), 4)]  # 4 training slices: 4 per epoch, every epoch
    assert len(epochs) == 4
    # epochs 1-2: pretraining slices only, continuing through the set (no repeat before all 6 are seen)
    assert all(s.startswith("p") for s in epochs[0] + epochs[1])
    assert len(set(epochs[0] + epochs[1][:2])) == 6
    # epochs 3-4: each training slice once per epoch, never a held-out one
    assert set(epochs[2]) == set(epochs[3]) == train_stems
    # the log counts each source on its own (not the pretraining slices as --train_path's)
    out = capsys.readouterr().out
    assert (f"10 samples (4 from {cfg.train_path[0]}, 2 more held out for validation at 352 px; 6 in {pre}: "
            f"epochs 1..2 pretrain on 4 of them per epoch, the rest train on the 4)") in out
    # the layout the CPU trains in is said beside the precision, then the allocator (the environment's)
    assert re.search(r", channels-last(, huge pages)?; epochs 1\.\.4", out)
    saved = torch.load(cfg.checkpoint_path, weights_only=False)["config"]
    assert (saved["pretrain_path"], saved["pretrain_epochs"]) == ([str(pre)], 2)


def test_pretraining_on_the_held_out_slices_is_refused(tmp_path, capsys):
    from Code.model_lung_infection.cli import run_main
    from Code.model_lung_infection.data import DataError
    cfg = _cfg(tmp_path, epoch=2, val_split=2, pretrain_path=str(tmp_path / "data"), pretrain_epochs=1)
    with pytest.raises(DataError, match="held-out validation slices .* also in --pretrain_path"):
        train(cfg)
    missing = _cfg(tmp_path, train_save="missing", epoch=2, pretrain_path=str(tmp_path / "nope"), pretrain_epochs=1)
    with pytest.raises(DataError, match="--pretrain_path: .*nope/Imgs: folder not found .*--pretrain_epochs 0"):
        train(missing)
    with pytest.raises(ValueError, match="--pretrain_path"):
        TrainConfig(pretrain_epochs=2)
    with pytest.raises(SystemExit) as stop:  # from the command line: one line, no traceback
        run_main(script.main, ["--pretrain_epochs", "3"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: pretrain_epochs 3: give the slices to pretrain on (--pretrain_path)"]
    with pytest.raises(ValueError, match="more than --epoch"):
        TrainConfig(pretrain_path="x", pretrain_epochs=101)


def _quantiles(counts, qs=(0.05, 0.25, 0.5, 0.75, 0.95)):
    cdf = np.cumsum(counts) / counts.sum()
    return np.array([int(np.searchsorted(cdf, q)) for q in qs])


def test_match_gray_maps_the_pseudo_labelled_slices_onto_the_doctor_labelled_ones(data_root):
    """The release's pseudo-labelled slices are darker (another display window) than the doctor-labelled ones:
    matched, their gray-level quantiles are the doctor-labelled slices' within a few levels."""
    from Code.model_lung_infection.data import gray_histogram, gray_matching_lut
    train = data_root / "TrainingSet" / "LungInfection-Train"
    pseudo = sorted((train / "Pseudo-label" / "Imgs").iterdir())[::80]  # 20 slices
    doctor = sorted((train / "Doctor-label" / "Imgs").iterdir())[::2]   # 25 slices
    lut = gray_matching_lut(pseudo, doctor)
    assert lut.dtype == np.uint8 and lut.shape == (256,) and np.all(np.diff(lut.astype(int)) >= 0)
    before, target = gray_histogram(pseudo), gray_histogram(doctor)
    after = np.bincount(lut, weights=before, minlength=256)
    assert np.abs(_quantiles(before) - _quantiles(target)).max() > 40  # the two windows differ
    assert np.abs(_quantiles(after) - _quantiles(target)).max() <= 3


def test_pretrain_match_gray_maps_the_pretraining_slices_only(tmp_path):
    """--pretrain_match_gray: the pretraining slices go through the table fitted on the training slices (the
    held-out ones left out), the training slices as they are; the option is recorded with the run."""
    from Code.model_lung_infection.data import normalize_image, read_rgb, resize
    from Code.model_lung_infection.train import with_pretraining
    from Code.model_lung_infection.validation import split_validation
    pre = write_synthetic_slices(tmp_path / "pre", 4, 96, prefix="p")
    for path in (pre / "Imgs").iterdir():  # a darker window: every gray level halved
        Image.fromarray(np.asarray(Image.open(path)) // 2).save(path)
    argv = ["--train_path", str(tmp_path / "data"), "--pretrain_path", str(pre), "--pretrain_epochs", "1",
            "--pretrain_match_gray"]
    assert script.config_from_args(script.parse_args(argv)).pretrain_match_gray
    with pytest.raises(ValueError, match="pretrain_match_gray: .*--pretrain_epochs N"):
        TrainConfig(pretrain_match_gray=True)
    cfg = _cfg(tmp_path, epoch=2, val_split=2, pretrain_path=str(pre), pretrain_epochs=1, pretrain_match_gray=True)
    train_set, _ = split_validation(cfg, InfectionTrainSet(cfg.train_path, cfg.trainsize), lambda held: None)
    joined, _, described = with_pretraining(cfg, train_set)
    extra = joined.datasets[1]
    assert "gray levels matched to the training slices'" in described
    assert extra.gray_lut[100] >= 190  # halved levels go back up
    first = extra.samples[0][1]
    expected = normalize_image(resize(extra.gray_lut[read_rgb(first)], (64, 64)))
    assert torch.equal(joined[len(train_set)][0], expected)
    first_train = train_set.dataset.samples[train_set.indices[0]][1]
    assert torch.equal(joined[0][0], normalize_image(resize(read_rgb(first_train), (64, 64))))
    unmatched = with_pretraining(_cfg(tmp_path, epoch=2, val_split=2, pretrain_path=str(pre), pretrain_epochs=1),
                                 train_set)[0].datasets[1]
    assert unmatched.gray_lut is None


# ---------------------------------------------------------------- resume exactness with everything on

def test_resume_is_exact_with_every_option_on(tmp_path):
    # epoch 1 pretrains, epoch 2 trains: the resume crosses the switch
    pre = write_synthetic_slices(tmp_path / "pre", 4, 96, prefix="p")
    weights = tmp_path / "encoder.pth"
    torch.save(create_encoder(SMALL).state_dict(), weights)
    opts = dict(augment=True, schedule="cosine", warmup_epochs=1, ema=0.9, progressive_size=64, trainsize=96,
                val_split=2, epoch_samples=2, pretrain_path=str(pre), pretrain_epochs=1, pretrained=str(weights),
                freeze_encoder=8)
    full = train(_cfg(tmp_path, train_save="full", epoch=2, **opts))
    train(_cfg(tmp_path, train_save="split", epoch=1, **opts))
    resumed = train(_cfg(tmp_path, train_save="split", epoch=2, resume=True, **opts))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    run = tmp_path / "snap/save_weights"
    ema_full = torch.load(run / "full/Inf-Net-ema-2.pth", weights_only=True)
    ema_resumed = torch.load(run / "split/Inf-Net-ema-2.pth", weights_only=True)
    assert all(torch.equal(ema_full[k], ema_resumed[k]) for k in ema_full)
    dices = [[r["val_dice"] for r in _val_rows(_cfg(tmp_path, train_save=n))] for n in ("full", "split")]
    assert dices[0] == dices[1]


def test_ctrl_c_and_resume_by_run_name_is_exact_with_augment_and_ema(tmp_path, monkeypatch):
    """test_resume.py's exactness check (Ctrl-C mid-epoch, resume naming only the run) with the options on."""
    import Code.model_lung_infection.train as train_module
    from Code.model_lung_infection.cli import run_main
    data, snap = _slices(tmp_path / "d"), tmp_path / "snap"
    options = ["--train_path", str(data), "--trainsize", "64", "--batchsize", "2", "--epoch", "2", "--seed", "7",
               "--backbone", SMALL, "--snapshot_root", str(snap), "--save_every", "1", "--no-progress",
               "--no-multi_scale", "--augment", "--ema", "0.9", "--val_split", "2", "--time_budget", "60"]
    script.main(options + ["--train_save", "full"])
    real, calls = train_module.multi_scale_step, []

    def interrupted_step(cfg):
        step = real(cfg)

        def run(engine, batch):
            calls.append(1)
            if len(calls) > 3:  # 4 training slices in batches of 2: in epoch 2's second batch
                raise KeyboardInterrupt
            return step(engine, batch)
        return run
    with monkeypatch.context() as m:
        m.setattr(train_module, "multi_scale_step", interrupted_step)
        with pytest.raises(SystemExit):
            run_main(script.main, options + ["--train_save", "split"])
    script.main(["--resume", "--train_save", "split", "--snapshot_root", str(snap)])
    for name in ("Inf-Net-2.pth", "Inf-Net-ema-2.pth"):
        full = torch.load(snap / "save_weights/full" / name, weights_only=True)
        resumed = torch.load(snap / "save_weights/split" / name, weights_only=True)
        assert all(torch.equal(full[k], resumed[k]) for k in full), name


# ---------------------------------------------------------------- fixed encoder layers (--freeze_encoder)

def test_freeze_encoder_fixes_the_layers_up_to_the_stride_and_trains_the_rest(tmp_path, capsys):
    weights = tmp_path / "encoder.pth"
    torch.save(create_encoder(SMALL).state_dict(), weights)
    start = {k: v.clone() for k, v in Inf_Net(backbone=SMALL, pretrained=str(weights)).state_dict().items()}
    model = train(_cfg(tmp_path, pretrained=str(weights), freeze_encoder=4, epoch=2))
    assert "freeze_encoder 4" in capsys.readouterr().out  # the run's first line says so
    end = model.state_dict()
    # ResNet's layers up to stride 4: the stem and layer1; their weights and affine BatchNorm stay as loaded
    fixed = [k for k in start if k.startswith(("resnet.conv1.", "resnet.bn1.", "resnet.layer1."))]
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert fixed and all(torch.equal(start[k], end[k]) for k in fixed if not k.endswith(stats))
    # ... while their BatchNorm still follows the batches, and everything after trains
    assert not torch.equal(start["resnet.bn1.running_mean"], end["resnet.bn1.running_mean"])
    for k in ("resnet.layer2.0.conv1.weight", "resnet.layer4.1.conv2.weight", "edge_conv1.conv.weight",
              "ra2_conv4.conv.weight"):
        assert not torch.equal(start[k], end[k]), k
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == \
        [k for k in fixed if not k.endswith(stats)]


def test_freeze_encoder_takes_each_encoders_own_layers_and_names_the_strides_it_has():
    for name, stride, last in (("mobilenetv2", 4, "blocks.1."), ("res2net50_v1b_26w_4s", 4, "layer1."),
                               ("mobilenetv2", 32, "blocks.6.")):
        encoder = create_encoder(name)
        trained = [n for n, p in encoder.named_parameters() if p.requires_grad]  # (Res2Net's fc never trains)
        fixed = freeze_encoder_to(encoder, stride)
        frozen = [n for n in trained if not encoder.get_parameter(n).requires_grad]
        # a prefix of the layers in the order they run, ending with the tap's module
        assert frozen == trained[:len(frozen)] and frozen[-1].startswith(last), name
        assert fixed == sum(encoder.get_parameter(n).numel() for n in frozen)
    with pytest.raises(UserError, match="strides \\[2, 4, 8, 16, 32\\] only"):
        freeze_encoder_to(create_encoder("mobilenetv2"), 64)


def test_freeze_encoder_needs_weights_worth_keeping():
    with pytest.raises(UserError, match="randomly initialised"):
        TrainConfig(freeze_encoder=4)
    assert TrainConfig(freeze_encoder=4, pretrained="imagenet").freeze_encoder == 4
    assert TrainConfig(freeze_encoder=4, init="semi.pth").freeze_encoder == 4
    cfg = script.config_from_args(script.parse_args(["--recipe", "cpu-hour-imagenet", "--freeze_encoder", "4"]))
    assert (cfg.freeze_encoder, cfg.as_dict()["freeze_encoder"]) == (4, 4)  # recorded: a resume keeps it
    assert TrainConfig().freeze_encoder is None  # the paper trains the whole network


# ---------------------------------------------------------------- CLI and recipes

def test_options_reach_the_config_and_checkpoint_config():
    cfg = script.config_from_args(script.parse_args(
        ["--val_split", "5", "--val_every", "2", "--time_budget", "60", "--augment", "--schedule", "cosine",
         "--warmup_epochs", "3", "--ema", "0.999", "--progressive_size", "224", "--val_seed", "4"]))
    assert (cfg.val_split, cfg.val_every, cfg.time_budget, cfg.augment, cfg.schedule, cfg.warmup_epochs, cfg.ema,
            cfg.progressive_size, cfg.val_seed) == (5, 2, 60.0, True, "cosine", 3, 0.999, 224, 4)
    saved = cfg.as_dict()
    assert (saved["augment"], saved["ema"], saved["schedule"]) == (True, 0.999, "cosine")


@pytest.mark.parametrize("bad", [["--ema", "1"], ["--ema", "0"], ["--schedule", "linear"], ["--recipe", "nope"],
                                 ["--val_split", "-1"], ["--time_budget", "0"],
                                 ["--freeze_encoder", "3"]])
def test_bad_values_are_one_line_errors(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        script.parse_args(bad)
    assert stop.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_recipe_presets_apply_and_explicit_options_win(monkeypatch):
    monkeypatch.setitem(configs_module.TRAIN_RECIPES, "test", {"augment": True, "ema": 0.99, "warmup_epochs": 2})
    monkeypatch.setattr(script, "TRAIN_RECIPES", configs_module.TRAIN_RECIPES)
    cfg = script.config_from_args(script.parse_args(["--recipe", "test", "--no-augment"]))
    assert (cfg.recipe, cfg.augment, cfg.ema, cfg.warmup_epochs) == ("test", False, 0.99, 2)
    with pytest.raises(ValueError, match="progressive_size"):
        TrainConfig(progressive_size=16)


def test_cpu_hour_recipe_is_pretraining_on_pseudo_labels_in_an_hour_and_options_given_win():
    cfg = script.config_from_args(script.parse_args(["--recipe", "cpu-hour"]))
    # precision is left to the device: bf16 where it is native, where the recipes were chosen; fp32 elsewhere
    assert (cfg.recipe, cfg.pretrain_path, cfg.pretrain_epochs, cfg.epoch, cfg.time_budget, cfg.amp,
            cfg.channels_last, cfg.schedule) == ("cpu-hour", [configs_module.PSEUDO_LABEL], 50, 100, 60.0, None, None,
                                                 "cosine")
    assert cfg.fit_budget  # a slower CPU shrinks the epochs to the hour (above)
    assert cfg.train_path == [configs_module.DOCTOR_LABEL] and cfg.lr == 1e-4  # the rest is the paper's
    cfg = script.config_from_args(script.parse_args(
        ["--recipe", "cpu-hour", "--pretrain_path", "/data/pseudo", "--pretrain_epochs", "30", "--no-amp"]))
    assert (cfg.pretrain_path, cfg.pretrain_epochs, cfg.amp, cfg.time_budget) == (["/data/pseudo"], 30, False, 60.0)
    # the options --help shows for each preset give the same run
    from Code.model_lung_infection.cli import _as_options
    for recipe in ("cpu-hour", "cpu-hour-imagenet"):
        spelled = script.config_from_args(script.parse_args(_as_options(configs_module.TRAIN_RECIPES[recipe])))
        preset = script.config_from_args(script.parse_args(["--recipe", recipe]))
        assert {**spelled.as_dict(), "recipe": recipe} == preset.as_dict()
    # cpu-hour on MobileNetV2 with ImageNet weights; the encoder given explicitly wins, weights and all
    cfg = script.config_from_args(script.parse_args(["--recipe", "cpu-hour-imagenet"]))
    assert (cfg.backbone, cfg.pretrained, cfg.pretrain_path, cfg.pretrain_epochs, cfg.epoch, cfg.schedule,
            cfg.time_budget, cfg.release_bce) == ("mobilenetv2", "imagenet", [configs_module.PSEUDO_LABEL], 81, 162,
                                                  "cosine", 60.0, True)
    assert cfg.fit_budget
    assert not script.config_from_args(script.parse_args(["--recipe", "cpu-hour-imagenet", "--release_bce",
                                                          "False"])).release_bce  # explicit wins here too
    cfg = script.config_from_args(script.parse_args(["--recipe", "cpu-hour-imagenet", "--backbone",
                                                     "efficientnet_lite2"]))
    assert (cfg.backbone, cfg.pretrained) == ("efficientnet_lite2", "imagenet")
    # the paper recipe stays the default: none of it
    cfg = script.config_from_args(script.parse_args([]))
    assert (cfg.pretrain_path, cfg.pretrain_epochs, cfg.time_budget, cfg.amp) == (None, 0, None, None)


# ---------------------------------------------------------------- the sweep's table

def _bench(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_table_reads_final_dice_and_dice_against_minutes(tmp_path):
    sweep = _bench("cpu_hour_sweep")

    def fake(name, rows):
        path = tmp_path / name / "val.csv"
        path.parent.mkdir()
        path.write_text("epoch,minutes,val_dice,val_mae,train_loss,lr\n" +
                        "".join(f"{e},{m},{d},0.1,1.0,1e-4\n" for e, m, d in rows))
        return path

    runs = {"paper": {1: fake("p1", [(1, 3, 0.2), (2, 6, 0.4), (3, 10.5, 0.5)]), 2: fake("p2", [(1, 4, 0.3)])},
            "augment": {1: fake("a1", [(1, 2, 0.5), (2, 9, 0.7)]), 2: tmp_path / "missing.csv"}}
    table = sweep.make_table(runs, budget=10)
    lines = table.splitlines()
    assert lines[0] == ("| option | seed 1 | seed 2 | mean | vs paper | @2.5 min | @5 min | @7.5 min | @10 min "
                        "| epochs |")
    assert lines[2] == "| paper | 0.5000 | 0.3000 | 0.4000 | +0.0000 | – | 0.2500 | 0.3500 | 0.3500 | 3 |"
    assert lines[3] == "| augment | 0.7000 | – | 0.7000 | +0.3000 | 0.5000 | 0.5000 | 0.5000 | 0.7000 | 2 |"


def test_sweep_commands_run_each_option_alone_with_validation_and_budget(capsys):
    sweep = _bench("cpu_hour_sweep")
    sweep.main(["--budget", "0.2", "--trainsize", "64", "--options", "paper", "ema", "--seeds", "1", "--dry_run"])
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 2
    assert all("--val_split 5 --val_every 1 --time_budget 0.2" in c for c in commands)
    assert "--ema" not in commands[0] and commands[1].endswith("--ema 0.99")


def test_test_curve_scores_release_snapshots_at_the_minutes_of_val_csv(tmp_path):
    curve = _bench("test_curve")
    for name in ("Inf-Net-10.pth", "Inf-Net-20.pth", "Inf-Net-25.pth", "Inf-Net-ema-20.pth", "checkpoint.pth"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "val.csv").write_text("epoch,minutes,val_dice,val_mae,train_loss,lr\n10,6.5,0.5,0.1,1,1e-4\n"
                                      "20,13.25,0.6,0.1,1,1e-4\n")
    snaps = curve.snapshots(tmp_path)
    assert list(snaps) == [10, 20, 25] and snaps[20].name == "Inf-Net-20.pth"  # not the EMA copy
    assert {e: p.name for e, p in curve.snapshots(tmp_path, ema=True).items()} == {20: "Inf-Net-ema-20.pth"}
    assert curve.chosen(snaps, ["20", "last"]) == [20, 25] and curve.chosen(snaps, None) == [10, 20, 25]
    with pytest.raises(SystemExit, match=r"epoch\(s\) \[30\]"):
        curve.chosen(snaps, ["30"])
    minutes = curve.minutes_by_epoch(tmp_path)
    scores = {k: 0.5 for k, _ in curve.FIGURES}
    lines = curve.table([("run", 20, minutes[20], scores, None),
                         ("run", 25, minutes.get(25), scores, None)]).splitlines()
    assert lines[2].startswith("| run | 20 | 13.2 | 0.5000") and lines[3].startswith("| run | 25 | - |")
    lines = curve.table([("run", 20, minutes[20], scores, (2.254, 125.4))], normal=True).splitlines()
    assert lines[0].endswith("| normal scan infected |") and lines[2].endswith("| 2.25% (125 mL) |")


def test_test_curve_scores_the_held_out_slices_with_each_tta(data_root, tmp_path, capsys):
    """--held_out scores a run on the slices its checkpoint.pth records as held out (copied with their GT), once
    per --tta; the maps are the test stage's (load_for_test with that --tta)."""
    import shutil

    from Code.model_lung_infection import save_release_weights
    curve = _bench("test_curve")
    source = data_root / "TrainingSet/LungInfection-Train/Doctor-label"
    train = tmp_path / "Doctor-label"
    stems = sorted(p.stem for p in (source / "Imgs").iterdir())[:3]
    for kind in ("Imgs", "GT"):
        (train / kind).mkdir(parents=True)
        for f in (source / kind).iterdir():
            if f.stem in stems:
                shutil.copy(f, train / kind / f.name)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": {"train_path": [str(train)], "val_stems": stems[1:]}}, run / "checkpoint.pth")
    torch.manual_seed(0)
    model = Inf_Net(backbone="mobilenetv2").eval()  # an encoder read off a snapshot's keys, as test_curve loads
    with torch.no_grad():
        model.ra2_conv4.bn.weight.mul_(2000.0)  # maps spread over [0, 1], so that the flips change them
    save_release_weights(model, run / "Inf-Net-3.pth")
    held = curve.held_out_folder(run, tmp_path / "held")
    for kind in ("Imgs", "GT"):
        assert sorted(p.stem for p in (held / kind).iterdir()) == stems[1:]
    curve.main([str(run), "--held_out", "--tta", "none", "hflip", "--testsize", "64", "--epochs", "last"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| run") and " | 3 | " in line]
    assert [r.split(" | ")[0] for r in rows] == ["| run", "| run --tta hflip"]
    assert rows[0].split(" | ")[3:] != rows[1].split(" | ")[3:]  # the six figures: the flips were applied
    torch.save({"config": {"train_path": [str(train)], "val_stems": None}}, run / "checkpoint.pth")
    with pytest.raises(SystemExit, match="without --val_split"):
        curve.held_out_folder(run, tmp_path / "again")
    with pytest.raises(SystemExit, match="needs run folders"):
        curve.held_out_folder(tmp_path / "not-a-run", tmp_path / "again")


def test_multiclass_budget_finds_the_first_epoch_a_row_learns(tmp_path):
    import MyTrain_MulClsLungInf_UNet as mc_script
    from Code.model_lung_infection.engine import write_val_csv
    budget = _bench("multiclass_budget")
    a = budget.parse_args(["--epochs", "24", "--val_every", "8", "--snapshot_root", str(tmp_path)])
    for name, row in budget.ROWS.items():  # each command is one the training script takes, for that row
        cfg = mc_script.config_from_args(mc_script.parse_args(budget.command(row, 2020, a)[2:]))
        assert (cfg.arch, cfg.prior, cfg.trainsize, cfg.epoch, cfg.val_split, cfg.val_every, cfg.recipe) == \
            (row.model, row.prior, 192, 24, 5, 8, "release")
    fcn = budget.ROWS["FCN8s"]
    more = budget.parse_args(["--epochs", "48", "--extend", "--snapshot_root", str(tmp_path)])
    given = mc_script.parse_args(budget.command(fcn, 2020, more)[2:])  # continues the same run to 48
    assert (given.resume, given.epoch, given.train_save) == (True, 48, budget.run_name(fcn, 2020))
    run = tmp_path / "save_weights" / budget.run_name(fcn, 2020)
    run.mkdir(parents=True)

    def point(epoch, loss, ggo, cons):
        return {"epoch": epoch, "minutes": epoch / 2, "val_dice": (ggo + cons) / 2, "val_mae": 0.1,
                "val_ggo_dice": ggo, "val_cons_dice": cons, "train_loss": loss, "lr": 0.01}
    # background only at 8; GGO but no consolidation at 16; both at 24
    write_val_csv(run / "val.csv", [point(8, 0.40, 0, 0), point(16, 0.26, 0.2, 0), point(24, 0.25, 0.3, 0.1)])
    curve = budget.read_curve(run / "val.csv")
    assert budget.first_learned(curve) == 24
    assert budget.first_learned(curve[:2]) is None
    # maps that appear while the training loss has risen above its first figure do not count
    assert budget.first_learned([dict(p, loss=0.5 + p["epoch"]) for p in curve]) is None
    report = budget.make_report({"FCN8s": curve, "DeepLabV3+ (stride=8)": curve[:2]}, a)
    assert "| FCN8s | 24 | 16 | 24 |" in report and "| DeepLabV3+ (stride=8) | not within 16 | 16 | 16 |" in report
    assert budget.first_learned(curve, ("ggo",)) == 16


FRESH_PAGES = """
import os, resource, sys
sys.path.insert(0, sys.argv[2])
if sys.argv[1] == "glibc":
    os.environ["THP_MEM_ALLOC_ENABLE"] = "0"  # what torch does unless told
import Code.model_lung_infection.cli  # what every script imports before torch
import torch
from Code.model_lung_infection.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()

def page_faults_of_a_step():  # 224 MB of tensors written, then freed, as a training step's activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.ones(mb * 2 ** 18) for mb in (48, 64, 80, 32)]
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(sum([page_faults_of_a_step() for _ in range(12)][9:]))  # once the heap has settled (keep)
"""


def _huge_pages_mode():
    """The kernel's transparent huge pages setting: always | madvise | never (None: unknown)."""
    try:
        found = re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text())
    except OSError:
        return None
    return found and found.group(1)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_steps_fault_in_fewer_pages_with_the_scripts_allocator_settings():
    """glibc unmaps every freed block above 32 MB, and each step faults its pages in again (57344 per step of
    4 KB pages here). The scripts back large blocks with huge pages (512x fewer faults); --keep_freed_memory
    reuses the heap's memory, once it has settled, without any."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}  # the scripts' own default

    def faults(mode):
        run = subprocess.run([sys.executable, "-c", FRESH_PAGES, mode, ROOT], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])
    glibc = faults("glibc")
    if glibc < 3 * 4096:  # huge pages for every mapping (transparent_hugepage/enabled: always): little to save
        pytest.skip(f"the default faulted only {glibc} pages in 3 steps")
    assert faults("keep") < glibc / 20
    if _huge_pages_mode() in ("always", "madvise"):
        assert faults("scripts") < glibc / 10


HUGE_PAGES_AFTER_TRAINING = """
import sys
sys.path.insert(0, sys.argv[1])
import MyTrain_LungInf as script
script.main(sys.argv[2:])  # a short run; PyTorch has read its allocator setting by the time it ends
import torch

def huge_kb():
    return int(next(line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")).split()[1])

before = huge_kb()
blocks = [torch.ones(2 ** 24) for _ in range(4)]  # 256 MB in blocks of 64 MB
print(huge_kb() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or _huge_pages_mode() != "madvise",
                    reason="glibc; huge pages where PyTorch asks for them (transparent_hugepage: madvise)")
@pytest.mark.parametrize("keep", [False, True])
def test_the_training_script_turns_huge_pages_off_when_it_keeps_freed_memory(tmp_path, keep):
    """Huge pages align every large block to 2 MB, gaps that add up in a heap never trimmed (the fp32 hour
    with both held 20.5 GB after 7 minutes, 15.1-15.9 GB without huge pages): the script chooses before
    PyTorch allocates, which reads the setting once; its first line says which."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    run = ["--train_path", str(_slices(tmp_path / "data", n=4)), "--snapshot_root", str(tmp_path / "snap"),
           "--backbone", SMALL, "--epoch", "1", "--batchsize", "2", "--trainsize", "64", "--multi_scale", "False",
           "--progress", "False", "--device", "cpu"] + (["--keep_freed_memory"] if keep else [])
    done = subprocess.run([sys.executable, "-c", HUGE_PAGES_AFTER_TRAINING, ROOT, *run], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    huge_kb = int(done.stdout.split()[-1])
    start = next(line for line in done.stdout.splitlines() if "; device cpu;" in line)  # the run's first line
    assert (huge_kb == 0) if keep else (huge_kb >= 2048)
    assert (", huge pages" in start) is not keep and ("malloc keeps freed memory" in start) is keep


def test_engine_keeps_freed_memory_when_asked(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: calls.append("keep") or True)
    engine = engine_module.Engine(TrainConfig(device="cpu", snapshot_root=str(tmp_path)), torch.nn.Conv2d(3, 4, 3))
    assert not engine.keeps_freed_memory and calls == []  # opt-in: its fragments cost peak memory
    asked = TrainConfig(device="cpu", keep_freed_memory=True, snapshot_root=str(tmp_path))
    assert engine_module.Engine(asked, torch.nn.Conv2d(3, 4, 3)).keeps_freed_memory and calls == ["keep"]
    assert script.parse_args(["--keep_freed_memory"]).keep_freed_memory is True
    monkeypatch.setattr(engine_module, "keep_freed_memory", lambda: False)  # not glibc: said, and trained as usual
    with pytest.warns(UserWarning, match="not glibc"):
        assert not engine_module.Engine(asked, torch.nn.Conv2d(3, 4, 3)).keeps_freed_memory


@pytest.mark.parametrize("native", [True, False])
def test_cpu_training_defaults_to_channels_last_and_to_bf16_where_bf16_is_native(monkeypatch, native, tmp_path):
    from Code.model_lung_infection import runtime
    from Code.model_lung_infection.engine import Engine
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert runtime.training_precision(cpu) == (native, True)  # channels-last: faster in fp32 too
    assert runtime.training_precision(cpu, amp=False, channels_last=False) == (False, False)  # given: it wins
    assert runtime.training_precision(torch.device("cuda")) == (True, False)
    assert runtime.training_precision(cpu, smallest_input=32) == (False, True)  # 1x1 deepest maps: fp32
    assert TrainConfig(trainsize=64).smallest_input() == 64  # 0.75 x 64 rounds to 64
    assert TrainConfig(trainsize=352, progressive_size=96).smallest_input() == 64
    assert TrainConfig(trainsize=352, progressive_size=32).smallest_input() == 32  # its first epochs: fp32 run
    assert TrainConfig().amp is None and TrainConfig().channels_last is None  # unset unless given
    engine = Engine(TrainConfig(device="cpu", snapshot_root=str(tmp_path)), torch.nn.Conv2d(3, 4, 3))
    assert (engine.amp, engine.channels_last) == (native, True)
    assert engine.model.weight.is_contiguous(memory_format=torch.channels_last)
    assert engine.images(torch.zeros(1, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    nchw = TrainConfig(device="cpu", channels_last=False, snapshot_root=str(tmp_path))
    engine = Engine(nchw, torch.nn.Conv2d(3, 4, 3))  # given: it wins
    assert not engine.channels_last
    assert not engine.images(torch.zeros(1, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    # bf16 asked for where it is emulated (many times slower than fp32): said, and done as asked
    from Code.model_lung_infection import engine as engine_module
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = Engine(TrainConfig(device="cpu", amp=True, snapshot_root=str(tmp_path)), torch.nn.Conv2d(3, 4, 3))
    emulated = [w for w in caught if "without native bf16" in str(w.message)]
    assert engine.amp and len(emulated) == (0 if native else 1)
