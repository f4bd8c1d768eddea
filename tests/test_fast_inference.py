"""Fast inference (fused Conv-BN, channels-last): same outputs as the plain fp32 model."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from Code.model_lung_infection import Inf_Net, load_checkpoint, save_release_weights
from Code.model_lung_infection.fast_inference import (
    count_batchnorms,
    cpu_has_native_bf16,
    fuse_conv_bn,
    prepare_for_inference,
)
from Code.model_lung_infection.infer import default_amp, run_test
from Code.model_lung_infection.layers import ConvBN

ROOT = str(Path(__file__).resolve().parents[1])
OUTPUTS = ["lateral_map_5", "lateral_map_4", "lateral_map_3", "lateral_map_2", "lateral_edge"]


@pytest.fixture(scope="module")
def golden_model(reference_weights, infnet_spec):
    model = Inf_Net().eval()
    load_checkpoint(model, reference_weights.build_state_dict(infnet_spec))
    return model


@pytest.fixture(scope="module")
def golden(reference_dir):
    return np.load(reference_dir / "infnet_res2net50_golden_352.npz")


def test_fused_model_matches_golden_outputs(golden_model, golden, reference_weights):
    assert count_batchnorms(golden_model) == 157
    fast = prepare_for_inference(golden_model)  # defaults: fused BN, channels-last
    assert count_batchnorms(fast) == 0  # every BN folded: 50 in the heads, 107 in the Res2Net encoder
    assert not fast.training
    x = reference_weights.reference_input(352, 352).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        outs = fast(x)
    for name, out in zip(OUTPUTS, outs):
        assert out.shape == (1, 1, 352, 352)
        err = np.abs(out.numpy() - golden[name]).max()
        assert err <= 1e-4, f"{name}: max abs error {err}"


def test_original_model_is_untouched(golden_model):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = golden_model(x)
    golden_model.train()
    before = {k: v.clone() for k, v in golden_model.state_dict().items()}
    trainable = [p.requires_grad for p in golden_model.parameters()]
    prepare_for_inference(golden_model)
    assert golden_model.training  # still ready to train
    golden_model.eval()
    assert count_batchnorms(golden_model) == 157
    assert [p.requires_grad for p in golden_model.parameters()] == trainable
    after = golden_model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
        assert after[k].is_contiguous(), k  # not turned channels-last
    with torch.no_grad():
        for a, b in zip(golden_model(x), expected):
            assert torch.equal(a, b)


def test_inplace_option_modifies_the_model():
    model = nn.Sequential(ConvBN(3, 4, 3, padding=1), ConvBN(4, 2, 1)).eval()
    assert prepare_for_inference(model, inplace=True) is model
    assert count_batchnorms(model) == 0


def test_unsafe_pair_falls_back():
    class SharedOutput(nn.Module):  # the conv's output also feeds the sum: folding the BN would be wrong
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    torch.manual_seed(0)
    model = SharedOutput().eval()
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        with pytest.warns(UserWarning, match="only the ConvBN"):
            fused = fuse_conv_bn(model)
        torch.testing.assert_close(fused(x), expected)
    assert count_batchnorms(fused) == 1


def test_test_script_fused_maps_equal_unfused(golden_model, data_root, tmp_path, test_slices):
    _, names = test_slices(2)
    src = data_root / "TestingSet/LungInfection-Test/Imgs"
    weights = tmp_path / "save_weights" / "Golden" / "Inf-Net-100.pth"
    save_release_weights(golden_model, weights)
    size = 160  # the numerics at 352 are checked above; this checks the test stage's plumbing
    run_test(weights, tmp_path / "in", tmp_path / "plain", testsize=size, amp=False, fuse_bn=False,
             channels_last=False, progress=False)
    run_test(weights, tmp_path / "in", tmp_path / "fast", testsize=size, amp=False, progress=False)  # fused, NHWC
    for n in names:
        stem = os.path.splitext(n)[0]
        a = np.array(Image.open(tmp_path / "plain" / f"{stem}.png")).astype(int)
        b = np.array(Image.open(tmp_path / "fast" / f"{stem}.png")).astype(int)
        assert a.shape == b.shape == np.array(Image.open(src / n)).shape[:2]
        assert np.abs(a - b).max() <= 1, n


def test_convolutions_precast_to_the_autocast_dtype_give_the_same_outputs_bit_for_bit(golden_model, reference_weights):
    plain = prepare_for_inference(golden_model)
    precast = prepare_for_inference(golden_model, autocast_dtype=torch.bfloat16)
    convs = [m for m in precast.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 and (m.bias is None or m.bias.dtype == torch.bfloat16)
                         for m in convs)
    assert all(m.weight.dtype == torch.float32 for m in plain.modules() if isinstance(m, nn.Conv2d))
    x = reference_weights.reference_input(96, 96).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for a, b in zip(plain(x), precast(x)):
            assert torch.equal(a, b)  # autocast casts the weights to bf16 anyway: only when differs


def test_test_stage_precasts_under_amp_and_writes_the_same_maps(golden_model, tmp_path, test_slices, monkeypatch):
    import Code.model_lung_infection.infer as infer
    folder, _ = test_slices(2)
    weights = tmp_path / "w.pth"
    save_release_weights(golden_model, weights)
    asked = []
    real = infer.prepare_for_inference
    monkeypatch.setattr(infer, "prepare_for_inference", lambda *a, **k: asked.append(k["autocast_dtype"]) or
                        real(*a, **k))
    run_test(weights, folder, tmp_path / "amp", testsize=96, amp=True, progress=False, batchsize=2)
    run_test(weights, folder, tmp_path / "fp32", testsize=96, amp=False, progress=False, batchsize=2)
    assert asked == [torch.bfloat16, None]
    # the maps of a model run under autocast without precasting, the same batches
    plain = real(infer.load_inf_net(weights))
    expected = dict(infer.iter_maps(plain, infer.SliceSet(folder, 96), 2, torch.device("cpu"), amp=True))
    for stem, gray in expected.items():
        assert np.array_equal(np.array(Image.open(tmp_path / "amp" / f"{stem}.png")), gray), stem


def test_test_script_options():
    sys.path.insert(0, ROOT)
    from MyTest_LungInf import parse_args
    a = parse_args([])
    assert (a.fuse_bn, a.compile, a.channels_last, a.amp) == (True, False, True, None)  # amp None: default_amp
    a = parse_args(["--fuse_bn", "False", "--compile", "--channels_last", "False"])
    assert (a.fuse_bn, a.compile, a.channels_last) == (False, True, False)
    assert parse_args(["--no-fuse_bn"]).fuse_bn is False
    assert parse_args(["--amp", "False"]).amp is False


def _cpuinfo_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def test_bf16_probe_agrees_with_the_cpu_flags():
    flags = _cpuinfo_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    native = bool(flags & {"avx512_bf16", "amx_bf16"})  # the kernel's own report of the instructions
    assert cpu_has_native_bf16() is native
    assert default_amp("cpu") is native


@pytest.mark.parametrize("native_bf16", [True, False])
def test_default_precision_decision_table(monkeypatch, native_bf16):
    # bf16 autocast by default only on a CPU with native bf16; fp32 on CUDA (fp16 there was not measured).
    import Code.model_lung_infection.infer as infer
    monkeypatch.setattr(infer, "cpu_has_native_bf16", lambda: native_bf16)
    expected = {"cpu": native_bf16, torch.device("cpu"): native_bf16, "cuda": False, "cuda:1": False}
    assert {d: default_amp(d) for d in expected} == expected


def test_fusion_check_runs_with_tf32_off_and_restores_the_flags(monkeypatch):
    """TF32 (cuDNN's default for fp32 convolutions on recent GPUs) would make the fused/unfused comparison fail
    its fp32 tolerance: the check runs with it off, and the user's settings are restored after."""
    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return self.bn(self.conv(x))

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    fused = fuse_conv_bn(Probe().eval())
    assert count_batchnorms(fused) == 0
    assert seen and set(seen) == {(False, False)}  # every forward pass of the check
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)

    class Fails(Probe):
        def forward(self, x):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        fuse_conv_bn(Fails().eval())
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
