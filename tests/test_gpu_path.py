"""What users training on GPUs run, exercised on the CPU where the mechanism is not CUDA's own: fp16 autocast
with a GradScaler, resuming across precisions, DDP over gloo (per-rank RNG, remainders, the global batch),
no single-sample batches, the decode cache and DataLoader workers, every registry model under DDP's rule,
CPU tensors in snapshots, the pseudo labels' precision. What needs a GPU is in tests/test_cuda.py."""
import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from slices import copy_doctor_slices

import MyTrain_LungInf as script
from Code.model_lung_infection import runtime
from Code.model_lung_infection.checkpoint import to_cpu
from Code.model_lung_infection.configs import RunConfig
from Code.model_lung_infection.data import CachedSampleSet
from Code.model_lung_infection.engine import Engine, NoSingleSampleBatches, check_global_batch, use_sync_bn
from Code.model_lung_infection.errors import OptionError
from Code.model_lung_infection.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = "timm:resnet18"


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def _options(data, snap, name, *extra):
    return ["--train_path", str(data), "--trainsize", "64", "--batchsize", "2", "--backbone", SMALL,
            "--snapshot_root", str(snap), "--train_save", name, "--no-multi_scale", "--save_every", "1",
            "--device", "cpu", "--no-progress", "--seed", "5", *extra]


def _checkpoint(snap, name):
    return torch.load(snap / "save_weights" / name / "checkpoint.pth", weights_only=True)


# ---------------------------------------------------------------- precision

def test_resume_changes_precision_in_both_directions_with_fp16_and_a_gradscaler_on_cpu(data_root, tmp_path,
                                                                                       capsys):
    data, snap = tmp_path / "d", tmp_path / "snap"
    copy_doctor_slices(data_root, data, 2)
    dtypes = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, args, out: dtypes.append(out[3].dtype) if type(m).__name__ == "Inf_Net" else None)
    try:
        script.main(_options(data, snap, "p", "--epoch", "1", "--no-amp"))  # fp32: a disabled scaler saves {}
        first = _checkpoint(snap, "p")
        assert first["scaler"] == {} and first["precision"] == "fp32" and set(dtypes) == {torch.float32}
        dtypes.clear()
        resume = ["--resume", "--train_save", "p", "--snapshot_root", str(snap)]
        script.main(resume + ["--epoch", "2", "--amp_dtype", "float16"])  # CPU run -> fp16 + GradScaler
        out = capsys.readouterr().out
        assert "resumed" in out and "precision fp32 -> fp16 autocast + GradScaler" in out
        assert set(dtypes) == {torch.float16}
        second = _checkpoint(snap, "p")
        assert second["epoch"] == 2 and second["scaler"]["scale"] > 0 and second["config"]["amp_dtype"] == "float16"
        assert torch.isfinite(torch.stack([v.float().abs().sum() for v in second["model"].values()])).all()
        dtypes.clear()
        script.main(resume + ["--epoch", "3", "--amp", "False"])  # an enabled scaler's state into a disabled one
        assert "precision fp16 autocast + GradScaler -> fp32" in capsys.readouterr().out
        assert set(dtypes) == {torch.float32}
        third = _checkpoint(snap, "p")
        assert third["epoch"] == 3 and third["scaler"] == {} and third["config"]["amp_dtype"] is None
    finally:
        hook.remove()


def test_amp_dtype_defaults_to_bf16_where_native_and_fp16_with_a_scaler_elsewhere(monkeypatch, tmp_path):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert runtime.training_amp_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert runtime.training_amp_dtype(cuda) == torch.float16  # emulated bf16 is no bf16
    assert runtime.training_amp_dtype(torch.device("cpu")) == torch.bfloat16
    assert runtime.training_amp_dtype(cuda, "bfloat16") == torch.bfloat16
    assert script.parse_args(["--amp_dtype", "float16"]).amp_dtype == "float16"
    with pytest.raises(SystemExit):
        script.parse_args(["--amp_dtype", "float32"])
    model = torch.nn.Conv2d(3, 1, 1)
    cfg = RunConfig(snapshot_root=str(tmp_path), device="cpu", amp_dtype="float16")
    engine = Engine(cfg, model)
    assert engine.amp and engine.amp_dtype == torch.float16 and engine.scaler.is_enabled()
    with engine.autocast():
        assert model(torch.randn(1, 3, 4, 4)).dtype == torch.float16
    bf16 = Engine(RunConfig(snapshot_root=str(tmp_path), device="cpu", amp=True, amp_dtype="bfloat16"), model)
    assert not bf16.scaler.is_enabled()  # bf16 has fp32's range: no loss scaling
    with pytest.raises(OptionError, match="--amp_dtype float16 with --amp False"):
        Engine(RunConfig(snapshot_root=str(tmp_path), device="cpu", amp=False, amp_dtype="float16"), model)


# ---------------------------------------------------------------- batches

@pytest.mark.parametrize("n,batch,sizes", [(5, 2, [2, 3]), (25, 8, [8, 8, 9]), (4, 2, [2, 2]), (3, 4, [3]),
                                           (1, 2, [1]), (7, 3, [3, 4]),
                                           (6, 4, [4, 2]), (3, 1, [1, 1, 1])])
def test_no_batch_of_one_sample_after_others(n, batch, sizes):
    batches = list(NoSingleSampleBatches(range(n), batch))
    assert [len(b) for b in batches] == sizes == [len(b) for b in NoSingleSampleBatches(range(n), batch)]
    assert len(NoSingleSampleBatches(range(n), batch)) == len(sizes) and sum(batches, []) == list(range(n))


def test_a_remainder_of_one_never_reaches_batchnorm(data_root, tmp_path):
    # DeepLabV3+'s ASPP pooling normalises a 1x1 map: a batch of one sample stops training with an error.
    copy_doctor_slices(data_root, tmp_path / "d", 3)
    seen = []
    cfg = TrainConfig(train_path=[str(tmp_path / "d")], snapshot_root=str(tmp_path / "snap"),
                      model="deeplabv3plus_os16", epoch=1, batchsize=2, trainsize=64, scales=(1.0,), device="cpu",
                      amp=False, progress=False)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.append(len(args[0])) if type(m).__name__ == "DeepLabV3Plus" else None)
    try:
        train(cfg)
    finally:
        hook.remove()
    assert seen == [3]


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, monkeypatch):
    check_global_batch(24, 8)
    check_global_batch(7, 1)
    with pytest.raises(OptionError, match=r"^--batchsize 16 .*over 3 processes: give a multiple of 3 \(15 or 18\), "
                                          r"or run 2 or 4 process"):
        check_global_batch(16, 3)
    with pytest.raises(OptionError, match=r"--batchsize 24 .* over 32 processes: give a multiple of 32 \(32\)"):
        check_global_batch(24, 32)
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(OptionError, match="--batchsize 16"):  # before any process group is made
        Engine(RunConfig(snapshot_root=str(tmp_path), batchsize=16, device="cpu"), torch.nn.Conv2d(3, 1, 1))


def test_sync_bn_is_on_for_cuda_ddp_and_refused_on_the_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_sync_bn(None, cuda, 2) and not use_sync_bn(False, cuda, 2) and not use_sync_bn(None, cuda, 1)
    assert not use_sync_bn(None, cpu, 2) and not use_sync_bn(True, cpu, 1)
    with pytest.raises(OptionError, match="GPUs only"):
        use_sync_bn(True, cpu, 2)
    assert script.parse_args(["--sync_bn"]).sync_bn is True and script.parse_args([]).sync_bn is None


# ---------------------------------------------------------------- DDP over gloo

def _torchrun(data, out, overrides, port):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(ROOT / "tests" / "ddp_worker.py"), str(data), str(out), json.dumps(overrides)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, [json.loads((out / f"rank{i}.json").read_text()) for i in range(2)]


def test_ddp_unetplusplus_per_rank_remainders_and_rng_resume(data_root, tmp_path):
    # 6 slices over 2 ranks: 3 each; a batch of 4 is 2 per rank: 2 + 1, merged into one batch of 3.
    copy_doctor_slices(data_root, tmp_path / "d", 6)
    # --fit_budget (an hour: nothing shrinks): from a session's second epoch rank 0's clock decides for both ranks
    run = dict(model="unetplusplus", batchsize=4, trainsize=64, seed=11, device="cpu", amp=False, time_budget=60.0,
               fit_budget=True)
    r, ranks = _torchrun(tmp_path / "d", tmp_path, {**run, "epoch": 1}, 29541)
    assert [x["batches"] for x in ranks] == [[3], [3]]  # three updates each (multi-scale): DDP needs every gradient
    assert "normalises BatchNorm over its own 2 sample(s) of the batch of 4" in r.stderr  # no SyncBatchNorm on CPU
    saved = torch.load(tmp_path / "save_weights/ddp/checkpoint.pth", weights_only=True)
    own = [s["torch"] for s in saved["rng_ranks"]]
    assert len(own) == 2 and not torch.equal(own[0], own[1])  # each rank's own, seeded apart
    assert torch.equal(saved["rng"]["torch"], own[0])

    _, resumed = _torchrun(tmp_path / "d", tmp_path, {**run, "epoch": 3, "resume": True}, 29542)
    assert [x["restored_rng"] for x in resumed] == [s.tolist() for s in own]  # every rank got its own back
    a, b = (torch.load(tmp_path / f"rank{i}.pth", weights_only=True) for i in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- models under DDP's rule

def _first_conv(model):
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_every_registry_model_gives_every_trainable_parameter_a_gradient():
    # DDP fails at its second update on a trainable parameter without a gradient (U-Net++'s unused center).
    from Code.model_lung_infection.registry import create_model, list_models
    for name in list_models():
        torch.manual_seed(0)
        model = create_model(name)
        out = model(torch.randn(2, _first_conv(model).in_channels, 64, 64))
        sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]) if o is not None).backward()
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == [], name


# ---------------------------------------------------------------- data loading

class _CountedSet(CachedSampleSet):
    def __init__(self, n, log):
        super().__init__()
        self.n, self.log = n, log

    def __len__(self):
        return self.n

    def read(self, i):
        with open(self.log, "a") as f:
            f.write(f"{i}\n")
        return np.full((4, 4), i, np.uint8)

    def __getitem__(self, i):
        return (torch.from_numpy(self.load(i)).float().unsqueeze(0).expand(3, 4, 4).clone(),)


def test_the_decode_cache_is_filled_once_before_the_workers_start(tmp_path):
    log = tmp_path / "reads.txt"
    dataset = _CountedSet(6, log)
    model = torch.nn.Conv2d(3, 1, 1)
    cfg = RunConfig(snapshot_root=str(tmp_path / "snap"), batchsize=2, epoch=3, num_workers=2, device="cpu",
                    amp=False, progress=False, resumable=False, save_every=100)
    engine = Engine(cfg, model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(engine, batch):
        loss = engine.net(batch[0]).mean()
        engine.optimize(loss)
        return {"loss": loss.detach()}
    engine.fit(torch.utils.data.Subset(dataset, range(6)), optimizer,
               torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0), step)
    assert sorted(map(int, log.read_text().split())) == list(range(6))  # each decoded once in 3 epochs, 2 workers
    assert sorted(dataset._cache) == list(range(6))  # in this process: what the next loader (round) reuses


# ---------------------------------------------------------------- snapshots, determinism, pseudo labels

def test_saved_state_is_rebuilt_on_the_cpu_with_its_metadata():
    state = torch.nn.BatchNorm2d(2).state_dict()
    moved = to_cpu({"model": state, "rng": [torch.ones(2)], "epoch": 3, "t": (torch.zeros(1), "x")})
    assert isinstance(moved["model"], OrderedDict) and moved["model"]._metadata == state._metadata
    assert moved["epoch"] == 3 and moved["t"][1] == "x" and moved["rng"][0].device.type == "cpu"


def test_deterministic_turns_on_deterministic_kernels(tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    assert script.parse_args(["--deterministic"]).deterministic is True
    try:
        Engine(RunConfig(snapshot_root=str(tmp_path), device="cpu", deterministic=True), torch.nn.Conv2d(3, 1, 1))
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)


def test_pseudo_labels_are_predicted_in_the_test_stage_precision(monkeypatch):
    from Code.model_lung_infection import infer, pseudo
    assert pseudo.prediction_amp(None, torch.device("cuda")) is False  # the test stage's fp32, not fp16
    assert pseudo.prediction_amp(True, torch.device("cuda")) is True  # --amp given: as the test stage's --amp
    for native in (True, False):
        monkeypatch.setattr(infer, "cpu_has_native_bf16", lambda: native)
        assert pseudo.prediction_amp(None, torch.device("cpu")) is native


def test_device_check_script_is_valid_bash_with_a_cpu_smoke_mode():
    script_path = ROOT / "bench" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script_path)], capture_output=True).returncode == 0
    assert "--cpu-smoke" in script_path.read_text()
