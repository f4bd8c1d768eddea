"""Inf-Net architecture: release equivalence (golden outputs, keys), checkpoint loading, encoders."""
import warnings

import numpy as np
import pytest
import torch

from Code.model_lung_infection import Inf_Net, create_model, load_checkpoint, save_release_weights
from Code.model_lung_infection.complexity import count_complexity
from Code.model_lung_infection.encoders import ENCODERS
from Code.model_lung_infection.registry import warn_random_weights

OUTPUTS = ["lateral_map_5", "lateral_map_4", "lateral_map_3", "lateral_map_2", "lateral_edge"]


@pytest.fixture(scope="module")
def release_state(reference_weights, infnet_spec):
    return reference_weights.build_state_dict(infnet_spec)


@pytest.fixture(scope="module")
def golden_model(release_state):
    model = Inf_Net().eval()
    load_checkpoint(model, release_state)
    return model


def test_state_dict_keys_and_shapes_match_release(infnet_spec):
    sd = Inf_Net().state_dict()
    assert len(infnet_spec) == 946
    assert [k for k, _, _ in infnet_spec] == list(sd)
    for key, shape, dtype in infnet_spec:
        assert list(sd[key].shape) == shape, key
        assert str(sd[key].dtype) == f"torch.{dtype}", key


def test_golden_outputs(golden_model, reference_weights, reference_dir):
    golden = np.load(reference_dir / "infnet_res2net50_golden_352.npz")
    with torch.no_grad():
        outs = golden_model(reference_weights.reference_input(352, 352))
    assert len(outs) == 5
    for name, out in zip(OUTPUTS, outs):
        assert out.shape == (1, 1, 352, 352)
        err = np.abs(out.numpy() - golden[name]).max()
        assert err <= 1e-4, f"{name}: max abs error {err}"


def test_loads_dataparallel_and_training_checkpoint(release_state, golden_model, tmp_path):
    model = Inf_Net()
    load_checkpoint(model, {"module." + k: v for k, v in release_state.items()})
    torch.testing.assert_close(model.state_dict()["ra2_conv4.conv.weight"], release_state["ra2_conv4.conv.weight"])

    path = tmp_path / "Inf-Net-100.pth"
    save_release_weights(golden_model, path)
    load_checkpoint(Inf_Net(), path)                       # release format, from disk
    torch.save({"model": release_state, "epoch": 3}, tmp_path / "ckpt.pth")
    load_checkpoint(Inf_Net(), tmp_path / "ckpt.pth")      # our training checkpoint


def test_mismatched_checkpoint_names_keys(release_state):
    bad = dict(release_state)
    del bad["edge_conv4.conv.weight"]
    bad["extra.weight"] = torch.zeros(1)
    bad["ra4_conv1.conv.weight"] = torch.zeros(8, 2048, 1, 1)
    with pytest.raises(ValueError) as e:
        load_checkpoint(Inf_Net(), bad)
    msg = str(e.value)
    assert "edge_conv4.conv.weight" in msg and "extra.weight" in msg and "ra4_conv1.conv.weight" in msg


def test_missing_or_corrupt_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(Inf_Net(), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_checkpoint(Inf_Net(), junk)


def test_non_square_and_batched(golden_model):
    with torch.no_grad():
        outs = golden_model(torch.randn(3, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(3, 1, 64, 96)] * 5
    # Each sample is processed independently in eval mode.
    with torch.no_grad():
        single = golden_model(torch.randn(1, 3, 64, 96))
    assert single[3].shape == (1, 1, 64, 96)


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16", "vgg16_bn", "timm:convnext_atto"])
def test_alternative_encoders(backbone):
    model = Inf_Net(backbone=backbone).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(2, 1, 64, 64)] * 5
    assert all(torch.isfinite(o).all() for o in outs)


def test_encoder_registry_and_random_init_warning():
    assert {"res2net50_v1b_26w_4s", "resnet50", "vgg16"} <= set(ENCODERS.names())
    with pytest.raises(KeyError, match="choose one of"):
        Inf_Net(backbone="no_such_encoder")
    # constructors are silent; the entry point says it once (MyTrain_LungInf.py: warn_random_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_model("inf_net", backbone="resnet50")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        warn_random_weights("inf_net", pretrained=None)


def test_pretrained_file_is_loaded(tmp_path):
    import timm
    ref = timm.create_model("resnet50", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "imagenet.pth")
    model = Inf_Net(backbone="resnet50", pretrained=str(tmp_path / "imagenet.pth"))
    torch.testing.assert_close(model.resnet.conv1.weight, ref.conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="wrong.pth"):
        Inf_Net(backbone="resnet50", pretrained=str(tmp_path / "wrong.pth"))


def test_complexity_matches_paper_params():
    c = count_complexity(Inf_Net(), 352)
    assert round(c["params"] / 1e6, 3) == 33.122            # the paper's Params, thop-style
    assert c["params"] - c["params_no_classifier"] == 2048 * 1000 + 1000
    assert abs(c["macs"] / 1e9 - 13.922) < 0.2               # paper: 13.922 G (thop MACs)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_resizes_equal_interpolation_in_value_and_gradient(fmt, dtype):
    """resize_to_each (one autograd node for the shrinks by whole factors) against separate
    bilinear interpolations: even, odd and unequal factors, a size that is not a whole factor
    (falls back), the input's own size, and one output whose gradient never arrives."""
    from Code.model_lung_infection.layers import resize_to_each, upsample_to
    torch.manual_seed(0)
    base = torch.randn(2, 5, 24, 36).to(dtype).contiguous(memory_format=fmt)
    sizes = [(12, 18), (6, 9), (3, 4), (8, 12), (24, 36), (7, 10)]
    weights = [torch.randn(2, 5, *s).to(dtype) for s in sizes]
    results = []
    for resize in (resize_to_each, lambda x, refs: [upsample_to(x, r) for r in refs]):
        x = base.detach().requires_grad_()
        outs = resize(x, sizes)
        assert [tuple(o.shape[-2:]) for o in outs] == sizes
        assert all(o.dtype == dtype for o in outs)
        loss = sum((o.float() * w.float()).sum() for o, w in zip(outs[:-1], weights))  # (7, 10): no gradient
        loss.backward()
        results.append((outs, x.grad))
    (fused, g_fused), (plain, g_plain) = results
    assert [type(o.grad_fn).__name__ for o in fused[:4]] == ["_BilinearShrinksBackward"] * 4  # not the fallback
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(g_fused.float(), g_plain.float(), rtol=tol, atol=tol)
    assert g_fused.is_contiguous(memory_format=fmt)


def test_training_gradients_unchanged_by_the_fused_edge_resize(monkeypatch):
    """Inf-Net's parameter gradients with the edge features resized in one node equal those of
    three separate interpolations (the release's formulation), in float64 so that rounding
    cannot hide a wrong weight."""
    from Code.model_lung_infection import inf_net, layers
    grads = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(inf_net, "resize_to_each", lambda x, refs: [layers.upsample_to(x, r) for r in refs])
        torch.manual_seed(0)
        model = Inf_Net(backbone="mobilenetv2").train().double().to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        sum(o.square().mean() for o in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    # Biases of BNs followed by another BN have a gradient of zero up to rounding: compare
    # every gradient against the largest one, not against itself.
    scale = max(g.abs().max().item() for g in grads[1].values())
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max().item() <= 1e-12 * scale, name
