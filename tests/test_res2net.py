"""res2net.py's Res2Net-50 is timm's res2net50d, module for module, without importing timm."""
import subprocess
import sys

import torch

from Code.model_lung_infection.res2net import Res2Net


def _timm_res2net():
    import timm
    return timm.create_model("res2net50d", pretrained=False)


def test_same_keys_random_weights_and_generator_state_as_timm_for_a_seed():
    torch.manual_seed(3)
    theirs, after_theirs = _timm_res2net().state_dict(), torch.rand(4)
    torch.manual_seed(3)
    model = Res2Net()
    ours, after_ours = model.state_dict(), torch.rand(4)
    assert list(ours) == list(theirs) and len(ours) == 524  # the release checkpoints' resnet.* keys
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # same init: seeded runs train as before
    assert torch.equal(after_ours, after_theirs)  # and what is built after the encoder draws the same numbers
    assert model.layer1[0].bn3.weight.abs().sum() == 0  # each block starts as the identity, as timm's


def test_same_features_and_logits_as_timm_with_the_same_weights():
    theirs = _timm_res2net().eval()
    ours = Res2Net().eval()
    ours.load_state_dict(theirs.state_dict())
    assert ours.feature_info == [dict(f) for f in theirs.feature_info]
    x = torch.randn(2, 3, 80, 112, generator=torch.Generator().manual_seed(0))  # odd sizes: ceil-mode pooling
    with torch.no_grad():
        for indices in ([1, 2, 3, 4], [0, 2]):
            got = ours.forward_intermediates(x, indices)
            want = theirs.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)
            assert len(got) == len(want) == len(indices)
            for g, w in zip(got, want):
                assert g.shape == w.shape and torch.equal(g, w)
        assert torch.equal(ours(x), theirs(x))
    assert ours.pretrained_cfg["hf_hub_id"] == theirs.pretrained_cfg["hf_hub_id"]  # where --pretrained imagenet looks


def test_the_paper_network_loads_without_importing_timm(tmp_path):
    """The test stage's start-up: timm and torchvision cost about a second, and the default encoder needs neither."""
    from Code.model_lung_infection.inf_net import Inf_Net
    torch.save(Inf_Net().state_dict(), tmp_path / "w.pth")
    code = ("import sys; from Code.model_lung_infection.infer import load_for_test; "
            f"load_for_test({str(tmp_path / 'w.pth')!r}); "
            "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
