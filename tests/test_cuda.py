"""CUDA: what users run on GPUs. Skipped, with the reason, where no CUDA device is visible.

- two epochs of Inf-Net (the default Res2Net encoder, 64 px, four slices) with fp16 autocast,
  the GradScaler and gradient clipping, and with the default precision (bf16 where the GPU has it, no scaler);
- snapshots and checkpoint.pth read by a plain torch.load where no GPU is visible; a run started on the CPU
  (fp32) resumed on the GPU in fp16 with a GradScaler, and back on the CPU;
- DDP with two processes on one GPU (gloo): SyncBatchNorm by default, each rank its own CUDA RNG;
- a run killed (SIGKILL) in the middle of its second epoch and resumed ends where the same run
  left alone ends;
- the test stage, MyTest_LungInf.py, on CUDA with fp16 autocast, against fp32;
- with two or more GPUs: DDP over all of them (torchrun, nccl), `--device cuda:1`, and resuming
  with fewer GPUs visible than at save time.

Determinism: the child processes turn on torch.use_deterministic_algorithms (warn_only: the
bilinear up-sampling in Inf-Net's decoder has no deterministic CUDA backward, it adds with
atomics) with cuDNN's deterministic kernels and CUBLAS_WORKSPACE_CONFIG. When two uninterrupted
runs still differ, that difference is the noise floor, and the resumed run must be as close to
an uninterrupted one as the two uninterrupted runs are to each other (and far closer than one
epoch of training moves the weights); when they do not differ, the resumed run must be exact.

Set INFNET_CUDA_RECIPE=1 to also time one epoch of the paper's recipe (batch 24, 352 px,
multi-scale, the 50 doctor-labelled slices): `python -m pytest -s tests/test_cuda.py -k recipe`.
"""
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slices import copy_doctor_slices

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)")

ROOT = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs two or more CUDA devices ({GPUS} visible)")
DOCTOR = "TrainingSet/LungInfection-Train/Doctor-label"

# Runs a script as `python SCRIPT ARGS...` would, after turning on deterministic algorithms; kills
# itself with SIGKILL at the INFNET_TEST_KILL_AT-th forward pass of Inf-Net when that is set.
RUNNER = r"""
import os, runpy, signal, sys
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
torch.backends.cudnn.benchmark = False
torch.backends.cudnn.deterministic = True
kill_at, calls = int(os.environ.get("INFNET_TEST_KILL_AT", "0")), [0]

def count_forward(module, args):
    if type(module).__name__ == "Inf_Net":
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

torch.nn.modules.module.register_module_forward_pre_hook(count_forward)
script = os.path.abspath(sys.argv[1])
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


def _copy_slices(data_root, dst, n):
    copy_doctor_slices(data_root, dst, n, key=int)
    return dst


def _run(args, cwd, kill_at=0, **env):
    full_env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", INFNET_TEST_KILL_AT=str(kill_at), **env)
    return subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)


def _train_args(data, snap, name, epoch=2, **extra):
    args = ["--train_path", data, "--trainsize", 64, "--batchsize", 2, "--epoch", epoch, "--train_save", name,
            "--snapshot_root", snap, "--save_every", 1, "--device", "cuda", "--amp", "True", "--clip", 0.5,
            "--num_workers", 0, "--seed", 3, "--no-progress"]
    for k, v in extra.items():
        args += [f"--{k}"] if v is True else [f"--{k}", v]
    return [ROOT / "MyTrain_LungInf.py", *args]


def _max_diff(a, b, floats_only=False):
    """Largest difference between two state dicts; floats_only: weights and BN statistics, not counters."""
    assert list(a) == list(b)
    keys = [k for k in a if a[k].is_floating_point()] if floats_only else list(a)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def four_slices(data_root, tmp_path):
    return _copy_slices(data_root, tmp_path / "data", 4)


# ---------------------------------------------------------------- training with fp16 AMP

@pytest.mark.parametrize("amp_dtype", ["float16", None])
def test_two_epochs_with_fp16_autocast_gradscaler_and_clipping(four_slices, tmp_path, amp_dtype):
    from Code.model_lung_infection import Inf_Net
    from Code.model_lung_infection.train import TrainConfig, train

    clip = 0.5
    seen = {"output_dtypes": set(), "devices": set(), "max_grad": 0.0, "steps": 0}

    def forward_hook(module, args, outputs):
        if isinstance(module, Inf_Net):
            seen["devices"].add(args[0].device.type)
            seen["output_dtypes"].add(outputs[3].dtype)

    def before_step(opt, args, kwargs):  # GradScaler calls step() only with finite, unscaled gradients
        seen["steps"] += 1
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        seen["max_grad"] = max(seen["max_grad"], max(g.abs().max().item() for g in grads))
        assert all(torch.isfinite(g).all() for g in grads)

    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handles = [torch.nn.modules.module.register_module_forward_hook(forward_hook),
               register_optimizer_step_pre_hook(before_step)]
    cfg = TrainConfig(train_path=[str(four_slices)], snapshot_root=str(tmp_path / "snap"), train_save="amp",
                      device="cuda", amp=True, amp_dtype=amp_dtype, clip=clip, epoch=2, batchsize=2, trainsize=64,
                      save_every=1, num_workers=0, progress=False, seed=3)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        model = train(cfg)
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"[cuda] 2 epochs, 4 slices at 64 px, amp_dtype {amp_dtype}: {seconds:.1f} s; peak {peak:.0f} MiB")

    fp16 = amp_dtype == "float16" or not torch.cuda.is_bf16_supported(including_emulation=False)
    expected = torch.float16 if fp16 else torch.bfloat16
    assert seen["devices"] == {"cuda"} and seen["output_dtypes"] == {expected}
    assert seen["steps"] >= 1  # 12 updates at most: the scaler skips those whose fp16 gradients overflowed
    assert seen["max_grad"] <= clip
    run = tmp_path / "snap/save_weights/amp"
    ckpt = _load(run / "checkpoint.pth")
    assert ckpt["epoch"] == 2
    assert ckpt["scaler"]["scale"] > 0 if fp16 else ckpt["scaler"] == {}  # the GradScaler runs with fp16 only
    init = _load(run / "Inf-Net-1.pth")
    final = {k: v.cpu() for k, v in model.state_dict().items()}
    assert all(torch.isfinite(v.float()).all() for v in final.values())
    assert _max_diff(final, _load(run / "Inf-Net-2.pth")) == 0
    assert _max_diff(final, init, floats_only=True) > 0  # the second epoch trained


# ---------------------------------------------------------------- across devices

CPU_ONLY_LOAD = r"""
import sys, torch
assert not torch.cuda.is_available()
for path in sys.argv[1:]:
    state = torch.load(path)  # the plain call: no map_location
    tensors = state["model"] if "model" in state else state
    assert all(t.device.type == "cpu" for t in tensors.values()), path
print("loaded", len(sys.argv) - 1)
"""


def test_snapshots_load_where_no_gpu_is_visible_and_runs_move_between_devices(four_slices, tmp_path):
    snap = tmp_path / "snap"
    args = _train_args(four_slices, snap, "moves", epoch=1)
    cpu = [a if a != "cuda" else "cpu" for a in args]
    cpu[cpu.index("--amp") + 1] = "False"
    r = _run(cpu, tmp_path)  # started on the CPU in fp32: its GradScaler state is empty
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(_train_args(four_slices, snap, "moves", epoch=2, resume=True, amp_dtype="float16", deterministic=True),
             tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "precision fp32 -> fp16 autocast + GradScaler" in r.stdout
    run = snap / "save_weights/moves"
    assert _load(run / "checkpoint.pth")["scaler"]["scale"] > 0
    r = subprocess.run([sys.executable, "-c", CPU_ONLY_LOAD, str(run / "Inf-Net-2.pth"), str(run / "checkpoint.pth")],
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "loaded 2" in r.stdout, r.stderr[-3000:]
    r = _run([ROOT / "MyTrain_LungInf.py", "--resume", "--train_save", "moves",
              "--snapshot_root", snap, "--epoch", 3, "--device", "cpu", "--amp", "False"], tmp_path)
    assert r.returncode == 0 and "precision fp16 autocast + GradScaler -> fp32" in r.stdout, r.stderr[-3000:]


def test_ddp_on_one_gpu_over_gloo_syncs_batchnorm_and_keeps_each_ranks_rng(data_root, tmp_path):
    import json
    data = _copy_slices(data_root, tmp_path / "data", 6)  # 3 per rank; batch 4: 2 + 1 merged into 3
    overrides = {"device": "cuda", "batchsize": 4, "trainsize": 64, "epoch": 1, "seed": 3, "num_workers": 0}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests/ddp_worker.py"), str(data), str(tmp_path), json.dumps(overrides)]
    r = subprocess.run(cmd, env=dict(os.environ, INFNET_DDP_BACKEND="gloo", CUDA_VISIBLE_DEVICES="0"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["sync_bn"] for x in ranks] == [True, True] and [x["batches"] for x in ranks] == [[3], [3]]
    a, b = (_load(tmp_path / f"rank{i}.pth") for i in range(2))
    assert _max_diff(a, b) == 0
    rng = _load(tmp_path / "save_weights/ddp/checkpoint.pth")["rng_ranks"]
    assert not torch.equal(rng[0]["cuda"][0], rng[1]["cuda"][0])  # dropout masks differ between ranks


# ---------------------------------------------------------------- kill and resume

def test_killed_run_resumes_to_the_uninterrupted_weights(four_slices, tmp_path):
    snap = tmp_path / "snap"
    runs = snap / "save_weights"
    for name in ("full_a", "full_b"):
        r = _run(_train_args(four_slices, snap, name), tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    # 4 slices, batch 2: 2 batches of 3 forward passes per epoch; the 10th is the second batch of epoch 2.
    r = _run(_train_args(four_slices, snap, "split"), tmp_path, kill_at=10)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert _load(runs / "split/checkpoint.pth")["epoch"] == 1 and not (runs / "split/Inf-Net-2.pth").exists()
    r = _run(_train_args(four_slices, snap, "split", resume=True), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]

    full, again, resumed = (_load(runs / n / "Inf-Net-2.pth") for n in ("full_a", "full_b", "split"))
    noise, diff = _max_diff(full, again), _max_diff(full, resumed)
    one_epoch = _max_diff(full, _load(runs / "split/Inf-Net-1.pth"), floats_only=True)
    print(f"[cuda] resume: |resumed - full| {diff:.3g}; two full runs differ by {noise:.3g}; "
          f"epoch 2 moved the weights by {one_epoch:.3g}")
    if noise == 0:
        assert diff == 0
    else:
        assert diff <= max(4 * noise, 1e-6) and diff <= 0.05 * one_epoch
    assert _load(runs / "split/checkpoint.pth")["scaler"] == _load(runs / "full_a/checkpoint.pth")["scaler"]


# ---------------------------------------------------------------- the test stage

def _test_stage(argv, monkeypatch):
    """Run MyTest_LungInf.py in this process; returns the S_3 logits of each prediction (not the probes)."""
    from Code.model_lung_infection import Inf_Net
    logits = []

    def hook(module, args, outputs):
        if isinstance(module, Inf_Net):
            logits.append((outputs[3].dtype, outputs[3].device.type, outputs[3].float().cpu()))

    monkeypatch.setattr(sys, "argv", ["MyTest_LungInf.py", *map(str, argv)])
    monkeypatch.setattr("Code.model_lung_infection.cli.exit_now", lambda code=0: None)  # not this process's end
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        runpy.run_path(str(ROOT / "MyTest_LungInf.py"), run_name="__main__")
    finally:
        handle.remove()
    return logits


def _calibrated_inf_net(folder):
    """A random Inf-Net whose BatchNorm statistics come from real slices: its maps vary like a trained
    one's (with the default statistics, S_3 is nearly flat and any precision looks poor relative to it)."""
    from Code.model_lung_infection import Inf_Net
    from Code.model_lung_infection.data import SliceSet

    torch.manual_seed(0)
    model = Inf_Net().train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a plain average over the calibration passes
    images = torch.stack([SliceSet(folder, 64)[i][0] for i in range(2)])
    with torch.no_grad():
        model(images)
    return model.eval()


def test_test_stage_on_cuda_with_fp16_matches_fp32(data_root, tmp_path, test_slices, monkeypatch):
    from Code.model_lung_infection import save_release_weights

    folder, names = test_slices(2)
    weights = tmp_path / "save_weights" / "Net" / "Inf-Net-1.pth"
    save_release_weights(_calibrated_inf_net(folder), weights)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 means fp32, not TF32 convolutions
    common = ["--pth_path", weights, "--data_path", folder, "--testsize", 64, "--device", "cuda", "--no-progress"]
    amp = _test_stage(common + ["--save_path", tmp_path / "amp", "--amp", "True"], monkeypatch)[-len(names):]
    fp32 = _test_stage(common + ["--save_path", tmp_path / "fp32", "--amp", "False"], monkeypatch)[-len(names):]
    assert [(d, dev) for d, dev, _ in amp] == [(torch.float16, "cuda")] * len(names)
    assert [(d, dev) for d, dev, _ in fp32] == [(torch.float32, "cuda")] * len(names)
    for (_, _, a), (_, _, b) in zip(amp, fp32):
        spread = (b.max() - b.min()).item()
        assert spread > 1  # maps that vary, as a trained model's do
        assert (a - b).abs().max().item() <= 0.02 * spread  # fp16 rounding (bf16 on a CPU: 0.05), not another map
        assert np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] > 0.999
    src = data_root / "TestingSet/LungInfection-Test/Imgs"
    for n in names:
        for out in ("amp", "fp32"):
            pred = Image.open(tmp_path / out / (Path(n).stem + ".png"))
            assert pred.mode == "L" and pred.size == Image.open(src / n).size


def test_bn_fusion_check_passes_with_tf32_on(test_slices):
    """With TF32 on (cuDNN's default on Ampere and newer), the fusion check compares in full fp32 and folds every
    BatchNorm without a warning; in full fp32 the fused outputs stay within the README's tolerance."""
    import copy
    import warnings

    from Code.model_lung_infection.fast_inference import count_batchnorms, fuse_conv_bn

    folder, _ = test_slices(2)
    model = _calibrated_inf_net(folder).cuda()
    x = torch.randn(2, 3, 352, 352, generator=torch.Generator().manual_seed(0)).cuda()
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "folding only the ConvBN modules" would fail here
            fused = fuse_conv_bn(copy.deepcopy(model))
        assert torch.backends.cudnn.allow_tf32 is True  # restored
        assert count_batchnorms(fused) == 0
        torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            a, b = model(x)[3], fused(x)[3]
        err, scale = (a - b).abs().max().item(), a.abs().max().item()
        print(f"[cuda] fused vs unfused S_3, fp32 without TF32: {err:.2e} (outputs up to {scale:.2f})")
        assert err <= 1e-5 * max(1.0, scale)  # CPU: 4.5e-6 on the golden model (README)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------- several GPUs

DDP_WORKER = r"""
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[3])
from Code.model_lung_infection.train import TrainConfig, train
data, out, world = sys.argv[1], Path(sys.argv[2]), int(os.environ["WORLD_SIZE"])
cfg = TrainConfig(train_path=[data], snapshot_root=str(out), train_save="ddp", device="cuda", amp=True, clip=0.5,
                  epoch=1, batchsize=2 * world, trainsize=64, num_workers=0, progress=False, seed=3)
model = train(cfg)  # the default encoder (res2net50_v1b_26w_4s), multi-scale
torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / f"rank{os.environ['RANK']}.pth")
"""


@needs_two_gpus
def test_ddp_over_all_gpus_ends_identical(data_root, tmp_path):
    from Code.model_lung_infection import Inf_Net

    data = _copy_slices(data_root, tmp_path / "data", min(4 * GPUS, 50))  # two batches of 2 per rank
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={GPUS}",
           str(worker), str(data), str(tmp_path), str(ROOT)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [_load(tmp_path / f"rank{i}.pth") for i in range(GPUS)]
    torch.manual_seed(3)
    init = Inf_Net().state_dict()
    assert _max_diff(ranks[0], init, floats_only=True) > 0  # it trained
    for i, other in enumerate(ranks[1:], 1):
        assert _max_diff(ranks[0], other) == 0, f"rank {i} differs from rank 0"


@needs_two_gpus
def test_device_option_selects_that_gpu(four_slices, tmp_path):
    from Code.model_lung_infection.train import TrainConfig, train

    cfg = TrainConfig(train_path=[str(four_slices)], snapshot_root=str(tmp_path / "snap"), train_save="gpu1",
                      device="cuda:1", epoch=1, batchsize=2, trainsize=64, max_steps=1, num_workers=0,
                      progress=False)
    model = train(cfg)
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 1)}


@needs_two_gpus
def test_resume_with_fewer_gpus_visible(four_slices, tmp_path):
    snap = tmp_path / "snap"
    r = _run(_train_args(four_slices, snap, "fewer", epoch=1), tmp_path)  # all GPUs visible: saves their RNGs
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(_train_args(four_slices, snap, "fewer", epoch=2, resume=True), tmp_path, CUDA_VISIBLE_DEVICES="0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _load(snap / "save_weights/fewer/checkpoint.pth")["epoch"] == 2


# ---------------------------------------------------------------- the paper's recipe, timed (opt-in)

@pytest.mark.skipif(os.environ.get("INFNET_CUDA_RECIPE") != "1", reason="set INFNET_CUDA_RECIPE=1 to time it")
def test_one_epoch_of_the_paper_recipe(data_root, tmp_path):
    from Code.model_lung_infection.train import TrainConfig, train

    cfg = TrainConfig(train_path=[str(data_root / DOCTOR)], snapshot_root=str(tmp_path / "snap"), train_save="paper",
                      device="cuda", epoch=1, batchsize=24, trainsize=352, progress=False)  # amp: on for CUDA
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train(cfg)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"[cuda] paper recipe, 1 epoch (50 slices, batch 24, 352 px, scales 0.75/1/1.25, default precision): "
          f"{seconds:.1f} s, peak {peak:.2f} GiB on {torch.cuda.get_device_name()}")
