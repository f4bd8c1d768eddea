"""The multi-class networks: the release's U-Net (keys, golden output, checkpoint loading) and FCN8s."""
import json

import numpy as np
import pytest
import torch

from Code.model_lung_infection.checkpoint import load_checkpoint
from Code.model_lung_infection.fcn8s import FCN8s
from Code.model_lung_infection.registry import create_model
from Code.model_lung_infection.unet import Inf_Net_UNet


@pytest.fixture(scope="module")
def unet_spec(reference_dir):
    return json.loads((reference_dir / "unet_multiclass_state_dict.json").read_text())


@pytest.fixture(scope="module")
def unet_reference_state(unet_spec, reference_weights):
    return reference_weights.build_state_dict(unet_spec)


@pytest.fixture(scope="module")
def fcn8s_6ch():
    torch.manual_seed(0)
    return FCN8s(n_channels=6, n_classes=3).eval()


def test_unet_state_dict_matches_release_keys_shapes_and_order(unet_spec):
    rows = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in Inf_Net_UNet().state_dict().items()]
    assert rows == unet_spec


def test_unet_golden_output(reference_dir, reference_weights, unet_reference_state):
    model = Inf_Net_UNet(n_channels=6, n_classes=3).eval()
    model.load_state_dict(unet_reference_state, strict=True)
    with torch.no_grad():
        logits = model(reference_weights.reference_input(352, 352, channels=6))
    golden = np.load(reference_dir / "unet_multiclass_golden_352.npz")["logits"]
    assert logits.shape == golden.shape
    assert np.abs(logits.numpy() - golden).max() <= 1e-4


@pytest.mark.parametrize("channels", [6, 3])
def test_unet_non_square_batched_shapes(channels):
    model = create_model("unet_multiclass", in_channels=channels, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, channels, 64, 96)).shape == (2, 3, 64, 96)
        # Sides that are not multiples of 16 go through the skip padding.
        assert model(torch.randn(1, channels, 40, 56)).shape == (1, 3, 40, 56)


def test_fcn8s_non_square_batched_shapes(fcn8s_6ch):
    with torch.no_grad():
        assert fcn8s_6ch(torch.randn(2, 6, 64, 96)).shape == (2, 3, 64, 96)
        assert fcn8s_6ch(torch.randn(1, 6, 32, 32)).shape == (1, 3, 32, 32)


def test_fcn8s_image_only_and_registry():
    model = create_model("fcn8s", in_channels=3, num_classes=3, fc_width=64).eval()
    assert model.features[0].in_channels == 3
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 96)).shape == (2, 3, 64, 96)


def test_fcn8s_vgg16_layout(fcn8s_6ch):
    convs = [m for m in fcn8s_6ch.features if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13 and convs[0].in_channels == 6 and convs[-1].out_channels == 512
    assert fcn8s_6ch.fc6.weight.shape == (4096, 512, 7, 7)
    assert fcn8s_6ch.fc7.weight.shape == (4096, 4096, 1, 1)


def test_fcn8s_rejects_sides_not_multiple_of_32():
    model = FCN8s(n_channels=3, fc_width=16).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 64))


def test_fcn8s_loads_local_imagenet_vgg16_without_first_conv(tmp_path):
    torch.manual_seed(1)
    vgg = FCN8s(n_channels=3, fc_width=16)  # stands in for a VGG-16 file: same `features.*` keys
    path = tmp_path / "vgg16.pth"
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, path)
    with pytest.warns(UserWarning, match="conv1_1 keeps its random weights"):
        model = FCN8s(n_channels=6, fc_width=16, pretrained=str(path))
    assert torch.equal(model.features[28].weight, vgg.features[28].weight)
    assert torch.equal(model.features[2].weight, vgg.features[2].weight)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_unet_loads_release_format_checkpoint(tmp_path, prefix, unet_reference_state):
    path = tmp_path / "unet_model_200.pkl"
    torch.save({prefix + k: v for k, v in unet_reference_state.items()}, path)
    model = load_checkpoint(Inf_Net_UNet(n_channels=6, n_classes=3), path)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in unet_reference_state.items())


def test_unet_checkpoint_with_wrong_channels_is_rejected(unet_reference_state):
    with pytest.raises(ValueError, match="shape mismatches"):
        load_checkpoint(Inf_Net_UNet(n_channels=3, n_classes=3), unet_reference_state)
