"""Training and testing stages: losses, data rules, training, resume, DDP, the test script."""
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from slices import copy_doctor_slices

from Code.model_lung_infection import Inf_Net, save_release_weights
from Code.model_lung_infection.data import DataError, InfectionTrainSet, edge_from_mask, read_mask, read_rgb, resize
from Code.model_lung_infection.infer import run_test
from Code.model_lung_infection.losses import (
    boundary_weight,
    box_mean,
    inf_net_loss,
    segmentation_loss,
    structure_loss,
)
from Code.model_lung_infection.train import TrainConfig, scaled_size, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "timm:resnet18"  # a light encoder with the same four taps, to keep the suite fast


# ---------------------------------------------------------------- losses

def test_structure_loss_on_empty_mask_by_hand():
    logits, mask = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    # w = 1 everywhere; BCE(0, 0) = log 2; IoU: inter 0, union = 64 * 0.5 = 32.
    expected = math.log(2) + 1 - 1 / 33
    assert structure_loss(logits, mask).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_is_per_pixel_and_release_flag_is_plain_mean():
    mask = torch.zeros(1, 1, 4, 4)
    mask[0, 0, 1, 2] = 1
    logits = torch.linspace(-2, 2, 16).view(1, 1, 4, 4)
    # By hand: avgpool31 with zero padding over a 4x4 map is sum/961 everywhere.
    m, z = mask.numpy()[0, 0], logits.numpy()[0, 0]
    w = 1 + 5 * np.abs(m.sum() / 961 - m)
    bce = np.maximum(z, 0) - z * m + np.log1p(np.exp(-np.abs(z)))
    p = 1 / (1 + np.exp(-z))
    inter, union = (p * m * w).sum(), ((p + m) * w).sum()
    iou = 1 - (inter + 1) / (union - inter + 1)
    torch.testing.assert_close(boundary_weight(mask)[0, 0], torch.from_numpy(w).float())
    assert structure_loss(logits, mask).item() == pytest.approx((w * bce).sum() / w.sum() + iou, rel=1e-5)
    assert structure_loss(logits, mask, release_bce=True).item() == pytest.approx(bce.mean() + iou, rel=1e-5)


def test_box_mean_is_avg_pool_on_real_masks_at_training_sizes(data_root):
    """The loss's 31x31 window mean (by cumulative sums) equals avg_pool2d's zero-padded mean: exactly (to
    float32's rounding of the mean) on 0/1 masks, within 1e-6 on a mask resized for the 1.25 scale."""
    import torch.nn.functional as F
    gts = sorted((data_root / "TestingSet" / "LungInfection-Test" / "GT").glob("*.png"))[:3]
    masks = [(torch.from_numpy(read_mask(str(g))) >= 128).float()[None, None] for g in gts]
    mask = torch.cat([F.interpolate(m, size=(352, 352), mode="nearest") for m in masks])
    assert 0 < mask.mean() < 0.5 and set(mask.unique().tolist()) == {0.0, 1.0}

    def avg_pool(x, k):
        return F.avg_pool2d(x.double(), k, stride=1, padding=k // 2, count_include_pad=True)

    torch.testing.assert_close(box_mean(mask, 31).double(), avg_pool(mask, 31), rtol=0, atol=1e-7)
    large = F.interpolate(mask, size=(448, 448), mode="bilinear", align_corners=True)  # fractions at edges
    torch.testing.assert_close(box_mean(large, 31).double(), avg_pool(large, 31), rtol=0, atol=1e-6)
    # any values, not square, k larger than a side: float32's rounding of the running sums (of up to 60 here)
    odd = torch.rand(2, 3, 37, 20, generator=torch.Generator().manual_seed(0))
    for k in (1, 3, 31):
        torch.testing.assert_close(box_mean(odd, k).double(), avg_pool(odd, k), rtol=0, atol=1e-5)


def _paper_seg_loss(z, g):
    """Eq. 4 of the paper for one map, from its definition, in float64 numpy: per image, the BCE and
    IoU weighted by w = 1 + 5 |mean over the zero-padded 31x31 window of G - G|; the batch mean."""
    n, _, h, wd = g.shape
    padded = np.pad(g[:, 0], ((0, 0), (15, 15), (15, 15)))
    window_mean = np.zeros((n, h, wd))
    for dy in range(31):
        for dx in range(31):
            window_mean += padded[:, dy:dy + h, dx:dx + wd]
    window_mean /= 31 * 31
    total = 0.0
    for i in range(n):
        zi, gi = z[i, 0], g[i, 0]
        w = 1 + 5 * np.abs(window_mean[i] - gi)
        p = 1 / (1 + np.exp(-zi))
        bce = -(gi * np.log(p) + (1 - gi) * np.log(1 - p))
        inter, union = (p * gi * w).sum(), ((p + gi) * w).sum()
        total += (w * bce).sum() / w.sum() + 1 - (inter + 1) / (union - inter + 1)
    return total / n


def _paper_edge_loss(z, e):
    p = 1 / (1 + np.exp(-z))
    return float(np.mean(-(e * np.log(p) + (1 - e) * np.log(1 - p))))


def _paper_total(outs, gt, edge):
    """L = L_seg(S_g) + L_edge(S_e) + sum_i L_seg(S_i), i in {5, 4, 3} (Eq. 5)."""
    o = [t.double().numpy() for t in outs]
    g, e = gt.double().numpy(), edge.double().numpy()
    return sum(_paper_seg_loss(z, g) for z in o[:4]) + _paper_edge_loss(o[4], e)


def test_deep_supervision_matches_the_paper_and_every_output_counts():
    gen = torch.Generator().manual_seed(0)
    gt = torch.zeros(2, 1, 32, 32)
    gt[0, 0, 8:20, 10:26] = 1  # a blob: the boundary weight is far from 1 near its edge
    gt[1, 0, 20:30, 2:9] = 1
    gt[1, 0, 3, 3] = 0.5       # masks are not binarised (as released)
    edge = torch.from_numpy(edge_from_mask((gt[:, 0] * 255).byte().numpy()[0])).float().div(255)
    edge = torch.stack([edge, torch.zeros_like(edge)])[:, None]
    outs = [3 * torch.randn(2, 1, 32, 32, generator=gen) for _ in range(5)]

    total, _ = segmentation_loss(outs, gt, edge)  # what the trainer calls
    assert total.item() == pytest.approx(_paper_total(outs, gt, edge), rel=1e-5)

    # Changing one output changes the loss by exactly that output's term: all five maps are supervised.
    for k in range(5):
        changed = list(outs)
        changed[k] = outs[k] + torch.randn(2, 1, 32, 32, generator=gen)
        delta = segmentation_loss(changed, gt, edge)[0].item() - total.item()
        expected = _paper_total(changed, gt, edge) - _paper_total(outs, gt, edge)
        assert abs(expected) > 1e-3, k
        assert delta == pytest.approx(expected, rel=1e-4, abs=1e-6), k


def test_multi_scale_sizes_are_multiples_of_32():
    assert [scaled_size(352, r) for r in (0.75, 1, 1.25)] == [256, 352, 448]


# ---------------------------------------------------------------- data

def _copy_slices(data_root, dst, n=4, edge=True):
    return copy_doctor_slices(data_root, dst, n, edge)


def test_pairs_by_stem_not_position(data_root, tmp_path):
    # Three real slices renamed so that sorting the file names pairs them wrongly: with images .jpg and
    # masks .png, 'case7.jpg' < 'case7.m.jpg' but 'case7.m.png' < 'case7.png' ('j' < 'm' < 'p').
    src = data_root / "TrainingSet/LungInfection-Train/Doctor-label"
    originals = sorted(p.stem for p in (src / "Imgs").iterdir())[:3]
    renamed = dict(zip(originals, ["case7", "case7.m", "case10"]))
    for sub, ext in (("Imgs", ".jpg"), ("GT", ".png"), ("Edge", ".png")):
        (tmp_path / sub).mkdir()
        for old, new in renamed.items():
            f = next((src / sub).glob(old + ".*"))
            assert f.suffix == ext
            shutil.copy(f, tmp_path / sub / (new + ext))
    by_position = list(zip(sorted(os.listdir(tmp_path / "Imgs")), sorted(os.listdir(tmp_path / "GT"))))
    assert ("case7.jpg", "case7.m.png") in by_position  # the layout really defeats positional pairing

    ds = InfectionTrainSet(tmp_path, trainsize=64)
    assert [s[0] for s in ds.samples] == ["case7", "case7.m", "case10"]  # natural order: 7 before 10
    for i, (stem, img, gt, edge) in enumerate(ds.samples):
        assert (img.name, gt.name, edge.name) == (stem + ".jpg", stem + ".png", stem + ".png")
        original = next(old for old, new in renamed.items() if new == stem)
        image, mask, edge_map = ds.load(i)  # the contents are the original slice's, all three together
        assert np.array_equal(image, resize(read_rgb(next((src / "Imgs").glob(original + ".*"))), (64, 64)))
        assert np.array_equal(mask, resize(read_mask(src / "GT" / (original + ".png")), (64, 64)))
        assert np.array_equal(edge_map, resize(read_mask(src / "Edge" / (original + ".png")), (64, 64)))


@pytest.mark.parametrize("problem", ["missing_gt", "extra_gt", "unreadable", "empty", "duplicate"])
def test_bad_input_names_the_file(data_root, tmp_path, problem):
    stems = _copy_slices(data_root, tmp_path, 3)
    if problem == "missing_gt":
        (tmp_path / "GT" / f"{stems[0]}.png").unlink()
        match = f"{stems[0]}.jpg"
    elif problem == "extra_gt":
        Image.new("L", (8, 8)).save(tmp_path / "GT" / "orphan.png")
        match = "orphan.png"
    elif problem == "unreadable":
        (tmp_path / "GT" / f"{stems[1]}.png").write_bytes(b"garbage")
        match = f"{stems[1]}.png"
    elif problem == "empty":
        for f in (tmp_path / "Imgs").iterdir():
            f.unlink()
        match = "Imgs"
    else:
        Image.new("L", (8, 8)).save(tmp_path / "Imgs" / f"{stems[0]}.png")
        match = stems[0]
    with pytest.raises(DataError, match=match):
        ds = InfectionTrainSet(tmp_path, trainsize=64)
        [ds[i] for i in range(len(ds))]


def test_any_image_mode_loads(tmp_path):
    a16 = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 7)
    Image.fromarray(a16).save(tmp_path / "s16.png")
    Image.fromarray((a16 // 256).astype(np.uint8)).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray((a16 // 256).astype(np.uint8)).save(tmp_path / "gray.jpg")
    for name in ["s16.png", "rgb.png", "gray.jpg"]:
        rgb = read_rgb(tmp_path / name)
        assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    s16 = read_rgb(tmp_path / "s16.png")
    assert s16.min() == 0 and s16.max() == 255  # 16-bit is min-max scaled, not clipped or truncated
    assert abs(int(read_rgb(tmp_path / "rgb.png").max()) - int(a16.max()) // 256) <= 1


def test_edges_derived_when_edge_folder_missing(data_root, tmp_path):
    _copy_slices(data_root, tmp_path, 2, edge=False)
    ds = InfectionTrainSet(tmp_path, trainsize=64)
    _, gt, edge = ds.load(0)
    assert edge.shape == (64, 64) and edge.max() > 0
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 200
    e = edge_from_mask(mask)
    assert e[16, 16] == 0 and e[8:24, 8:24].max() == 255 and e[:4].max() == 0


# ---------------------------------------------------------------- training

def _cfg(root, tmp_path, **kw):
    base = dict(train_path=[str(root)], snapshot_root=str(tmp_path / "snap"), train_save="t", backbone=SMALL,
                epoch=2, batchsize=2, trainsize=64, save_every=1, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_training_lowers_the_loss_and_writes_snapshots(data_root, tmp_path, capsys):
    _copy_slices(data_root, tmp_path / "d", 4)
    cfg = _cfg(tmp_path / "d", tmp_path, epoch=6, lr=1e-3, backbone="res2net50_v1b_26w_4s")
    data = InfectionTrainSet(cfg.train_path, 64)
    batch = [torch.stack(t) for t in zip(*[data[i] for i in range(4)])]

    def loss_of(model):
        model.eval()
        with torch.no_grad():
            return inf_net_loss(model(batch[0]), batch[1], batch[2])[0].item()

    torch.manual_seed(cfg.seed)
    before = loss_of(Inf_Net())
    after = loss_of(train(cfg))
    assert after < before
    run = tmp_path / "snap/save_weights/t"
    assert (run / "Inf-Net-6.pth").exists() and (run / "checkpoint.pth").exists()
    last = capsys.readouterr().out.splitlines()[-1]  # the run's last line names the weights to test
    assert last.startswith("[train] finished at epoch 6 after ") and last.endswith(f"; weights {run / 'Inf-Net-6.pth'}")
    sd = torch.load(run / "Inf-Net-6.pth", weights_only=True)
    assert "resnet.conv1.0.weight" in sd  # release format: a bare state dict


def test_resume_equals_uninterrupted(data_root, tmp_path):
    _copy_slices(data_root, tmp_path / "d", 4)
    full = train(_cfg(tmp_path / "d", tmp_path, train_save="full", epoch=2))
    train(_cfg(tmp_path / "d", tmp_path, train_save="split", epoch=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train(_cfg(tmp_path / "d", tmp_path, train_save="split", epoch=2))  # never overwrite silently
    resumed = train(_cfg(tmp_path / "d", tmp_path, train_save="split", epoch=2, resume=True))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_ddp_two_cpu_processes_end_identical(data_root, tmp_path):
    # The release's encoder, whose unused classifier made DDP fail at the second update.
    _copy_slices(data_root, tmp_path / "d", 4)  # batch 2 over 2 ranks: 2 batches x 3 scales per rank
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           os.path.join(ROOT, "tests", "ddp_worker.py"), str(tmp_path / "d"), str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pth", weights_only=True)
    b = torch.load(tmp_path / "rank1.pth", weights_only=True)
    torch.manual_seed(2020)  # the worker's seed: the initial weights
    init = Inf_Net().state_dict()
    assert len(a) == len(init) == 946 and list(a) == list(init)  # the release's keys
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_boolean_options_parse_as_booleans():
    sys.path.insert(0, ROOT)
    from MyTrain_LungInf import config_from_args, parse_args
    assert parse_args(["--release_bce", "False"]).release_bce is False
    assert parse_args(["--release_bce"]).release_bce is True
    assert parse_args(["--no-multi_scale"]).multi_scale is False
    assert config_from_args(parse_args(["--multi_scale", "False"])).scales == (1.0,)
    with pytest.raises(SystemExit):
        parse_args(["--resume", "maybe"])


# ---------------------------------------------------------------- testing stage

def test_test_stage_names_and_sizes(data_root, tmp_path, test_slices):
    _, names = test_slices(2)
    src = data_root / "TestingSet/LungInfection-Test/Imgs"
    weights = tmp_path / "save_weights" / "MyNet" / "Inf-Net-1.pth"
    save_release_weights(Inf_Net().eval(), weights)
    out, stretched = tmp_path / "out", tmp_path / "minmax"
    run_test(weights, tmp_path / "in", out, testsize=64, progress=False)
    run_test(weights, tmp_path / "in", stretched, testsize=64, progress=False, normalize="minmax")
    for n in names:
        pred = Image.open(out / (os.path.splitext(n)[0] + ".png"))
        assert pred.mode == "L"
        assert pred.size == Image.open(src / n).size
        a = np.array(Image.open(stretched / (os.path.splitext(n)[0] + ".png")))
        assert a.min() == 0 and a.max() == 255  # --normalize minmax: stretched as released


# ---------------------------------------------------------------- CPU budgets and ablations

def test_epoch_samples_continue_through_shuffles_and_shard():
    from Code.model_lung_infection.engine import EpochSliceSampler
    s = EpochSliceSampler(7, 3, seed=5)
    seen = []
    for epoch in (1, 2, 3, 4, 5):
        s.set_epoch(epoch)
        seen += list(s)
        assert len(list(s)) == len(s) == 3
    assert sorted(seen[:7]) == list(range(7)) and sorted(seen[7:14]) == list(range(7))  # no repeat within a sweep
    again = EpochSliceSampler(7, 3, seed=5)
    again.set_epoch(4)
    assert list(again) == seen[9:12]  # depends only on (seed, epoch): a resumed run continues the order
    ranks = [EpochSliceSampler(7, 4, world_size=2, rank=r, seed=5) for r in (0, 1)]
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(seen[:4])


def test_budget_and_component_options_reach_the_config():
    sys.path.insert(0, ROOT)
    from MyTrain_LungInf import config_from_args, parse_args
    args = ["--epoch_samples", "200", "--no-edge_attention", "--reverse_attention", "False"]
    cfg = config_from_args(parse_args(args))
    assert cfg.epoch_samples == 200
    assert (cfg.edge_attention, cfg.partial_decoder, cfg.reverse_attention) == (False, True, False)


@pytest.mark.parametrize("off", ["edge_attention", "partial_decoder", "reverse_attention"])
def test_ablated_release_snapshot_loads_for_testing(tmp_path, off):
    from Code.model_lung_infection.infer import final_logits, load_inf_net
    torch.manual_seed(0)
    model = Inf_Net(backbone=SMALL, **{off: False}).eval()
    save_release_weights(model, tmp_path / "w.pth")  # a bare state dict: no config to say what it is
    loaded = load_inf_net(tmp_path / "w.pth", backbone=SMALL)
    assert getattr(loaded, off) is False
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(final_logits(loaded(x)), final_logits(model(x)))
