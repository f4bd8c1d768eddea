"""Semi-Inf-Net: pseudo-label generation (Algorithm 1) and the two-step training stages."""
import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from Code.model_lung_infection import Inf_Net, infer, pseudo, save_release_weights
from Code.model_lung_infection.data import edge_from_mask
from Code.model_lung_infection.pseudo import (
    STATE_FILE,
    PseudoConfig,
    generate,
    load_state,
    round_training,
)
from Code.model_lung_infection.train import STAGES, stage_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "timm:resnet18"
POOL = 7
K = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one thread is faster on a busy CPU


def _shrink(src, dst, size):
    dst.parent.mkdir(parents=True, exist_ok=True)
    Image.open(src).resize(size).save(dst)


@pytest.fixture
def tiny(data_root, tmp_path):
    """7 unlabelled slices of assorted small sizes and formats, 4 doctor-labelled ones, random init weights.

    (4 + 3, 4 + 6 and 4 + 7 samples in batches of 4: no batch of one, which BatchNorm refuses at 32 px.)
    """
    train = data_root / "TrainingSet/LungInfection-Train"
    pool = tmp_path / "pool"
    names = sorted(os.listdir(train / "Pseudo-label/Imgs"))[:POOL]
    sizes = {}
    for i, n in enumerate(names):
        stem, ext = os.path.splitext(n)
        size = (40 + 4 * i, 48 - 2 * i)  # (w, h), all different
        _shrink(train / "Pseudo-label/Imgs" / n, pool / (stem + (ext if i % 2 else ".png")), size)
        sizes[stem] = size
    seed = tmp_path / "doctor"
    for n in sorted(os.listdir(train / "Doctor-label/Imgs"))[:4]:
        stem = os.path.splitext(n)[0]
        _shrink(train / "Doctor-label/Imgs" / n, seed / "Imgs" / n, (48, 48))
        _shrink(train / "Doctor-label/GT" / f"{stem}.png", seed / "GT" / f"{stem}.png", (48, 48))
    torch.manual_seed(0)
    init = tmp_path / "init.pth"
    save_release_weights(Inf_Net(backbone=SMALL).eval(), init)
    return dict(pool=pool, seed=seed, init=init, sizes=sizes, tmp=tmp_path)


def _cfg(t, name, **kw):
    train = dict(snapshot_root=str(t["tmp"] / name / "snap"), seed=5, epoch=1, batchsize=4, trainsize=32,
                 progress=False, device="cpu")
    own = dict(init=str(t["init"]), unlabeled_path=str(t["pool"]), labeled_path=str(t["seed"]),
               save_path=str(t["tmp"] / name / "out"), k=K, backbone=SMALL)
    for key, value in kw.items():  # each option where it is declared: the rounds' training or the run's own
        (own if key in PseudoConfig.__dataclass_fields__ else train)[key] = value
    return PseudoConfig(**own, train=dataclasses.replace(round_training(), **train))


def _masks(save_path):
    return {p.stem: np.array(Image.open(p)) for p in sorted((save_path / "GT").iterdir())}


class _Killed(Exception):
    pass


def test_algorithm1_labels_every_slice_once_and_resumes_exactly(tiny, monkeypatch, capsys):
    stems = set(tiny["sizes"])
    # --- uninterrupted run; a label already in GT/ is kept unless overwrite is given
    a = _cfg(tiny, "a")
    foreign = tiny["tmp"] / "a/out/GT" / f"{sorted(stems)[0]}.bmp"
    foreign.parent.mkdir(parents=True)
    Image.new("L", (8, 8), 7).save(foreign)
    with pytest.raises(FileExistsError, match="GT"):
        generate(a)
    assert foreign.exists() and not (tiny["tmp"] / "a/out" / STATE_FILE).exists()
    a.overwrite = True
    state_a = generate(a)
    out = capsys.readouterr().out
    assert "4 of 7 unlabelled slices left" in out and "1 of 7" in out and "0 of 7" in out

    # rounds, coverage, sizes
    rounds = [r["names"] for r in state_a["rounds"]]
    assert len(rounds) == math.ceil(POOL / K) == 3 and [len(r) for r in rounds] == [3, 3, 1]
    flat = [n for r in rounds for n in r]
    assert sorted(flat) == sorted(stems) and state_a["finished"] and state_a["pending"] is None
    out_a = tiny["tmp"] / "a/out"
    assert not foreign.exists()  # replaced (overwrite) by this run's label of that slice
    masks_a = _masks(out_a)
    assert set(masks_a) == stems and all(p.suffix == ".png" for p in (out_a / "GT").iterdir())
    for stem, m in masks_a.items():
        w, h = tiny["sizes"][stem]
        # soft GT (the probability in 8 bits); its edge map is the mask probability >= 0.5's, i.e. GT >= 128
        assert m.shape == (h, w) and m.dtype == np.uint8
        edge = np.array(Image.open(out_a / "Edge" / f"{stem}.png"))
        np.testing.assert_array_equal(edge, edge_from_mask(np.where(m >= 128, 255, 0).astype(np.uint8)), err_msg=stem)
        assert Image.open(next((out_a / "Imgs").glob(stem + ".*"))).size == (w, h)
    # only the newest round's weights are kept
    runs = sorted(p.name for p in (tiny["tmp"] / "a/snap/save_weights/Semi-Inf-Net_pseudo").iterdir())
    assert runs == ["round-0003"] and state_a["checkpoint"].endswith("round-0003/Semi-Inf-Net-1.pth")
    assert generate(a)["rounds"] == state_a["rounds"]  # finished: a re-run does nothing

    # --- the same run stopped after round 1, then killed inside round 2, then re-run
    b = _cfg(tiny, "b", max_rounds=1)
    state = generate(b)
    assert len(state["rounds"]) == 1 and "4 of 7 unlabelled slices left" in capsys.readouterr().out
    with pytest.raises(ValueError, match="k 3 -> 2"):
        generate(_cfg(tiny, "b", k=2))  # other arguments: refused, not mixed

    def killed(*args, **kwargs):
        raise _Killed()
    with monkeypatch.context() as m:
        m.setattr(pseudo, "train", killed)
        with pytest.raises(_Killed):
            generate(_cfg(tiny, "b"))
    pending = load_state(tiny["tmp"] / "b/out")["pending"]
    assert pending["round"] == 2 and len(list((tiny["tmp"] / "b/out/GT").iterdir())) == 6  # its files exist
    state_b = generate(_cfg(tiny, "b"))  # its own files: no overwrite needed; round 2 is redone
    assert "redoing round 2" in capsys.readouterr().out

    assert [r["names"] for r in state_b["rounds"]] == rounds
    masks_b = _masks(tiny["tmp"] / "b/out")
    assert masks_b.keys() == masks_a.keys()
    for stem in masks_a:
        np.testing.assert_array_equal(masks_a[stem], masks_b[stem], err_msg=stem)
    wa = torch.load(state_a["checkpoint"], weights_only=True)
    wb = torch.load(state_b["checkpoint"], weights_only=True)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def test_pseudo_generator_cli_defaults():
    sys.path.insert(0, ROOT)
    from PseudoGenerator import config_from_args, parse_args
    cfg = config_from_args(parse_args(["--init", "w.pth"]))
    assert (cfg.k, cfg.train.epoch, cfg.train.lr, cfg.train.batchsize, cfg.train.trainsize) == (5, 10, 3e-4, 16, 352)
    assert cfg.save_path == "Dataset/TrainingSet/LungInfection-Train/Pseudo-label"
    assert cfg.unlabeled_path == "Dataset/TrainingSet/LungInfection-Train/Pseudo-label/Imgs"
    assert cfg.labeled_path == "Dataset/TrainingSet/LungInfection-Train/Doctor-label"
    assert cfg.overwrite is False and cfg.train.scales == (0.75, 1.0, 1.25)
    cfg = config_from_args(parse_args(["--init", "w.pth", "--overwrite", "False", "--no-multi_scale", "--k", "3"]))
    assert cfg.overwrite is False and cfg.train.scales == (1.0,) and cfg.k == 3


def test_stage_presets_and_explicit_overrides(tmp_path):
    sys.path.insert(0, ROOT)
    from MyTrain_LungInf import config_from_args, parse_args

    def cfg(*argv):
        return config_from_args(parse_args(["--snapshot_root", str(tmp_path)] + list(argv)))

    doctor = cfg()
    assert (doctor.train_path, doctor.train_save, doctor.snapshot_prefix, doctor.batchsize, doctor.epoch,
            doctor.init) == (["Dataset/TrainingSet/LungInfection-Train/Doctor-label"], "Inf-Net", "Inf-Net", 24, 100,
                             None)
    for argv in (["--stage", "pseudo"], ["--is_pseudo"], ["--is_pseudo", "True"]):
        c = cfg(*argv)
        assert (c.train_path, c.train_save, c.snapshot_prefix, c.batchsize, c.epoch) == (
            ["Dataset/TrainingSet/LungInfection-Train/Pseudo-label"], "Inf-Net_Pseudo", "Inf-Net_pseudo", 24, 100)
    assert cfg("--is_pseudo", "False").train_save == "Inf-Net"  # a real boolean
    # step (ii) needs step (i)'s weights: a clear error naming the file, unless --init is given
    with pytest.raises(FileNotFoundError, match="Inf-Net_Pseudo/Inf-Net_pseudo_100.pth"):
        cfg("--stage", "semi")
    weights = tmp_path / "save_weights/Inf-Net_Pseudo/Inf-Net_pseudo_100.pth"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    for argv in (["--stage", "semi"], ["--is_semi"]):
        c = cfg(*argv)
        assert (c.train_path, c.train_save, c.snapshot_prefix, c.batchsize, c.epoch, c.init) == (
            ["Dataset/TrainingSet/LungInfection-Train/Doctor-label"], "Semi-Inf-Net", "Semi-Inf-Net", 16, 100,
            str(weights))
    # explicit options win over the preset
    c = cfg("--stage", "semi", "--init", "mine.pth", "--batchsize", "4", "--epoch", "7", "--train_save", "x",
            "--snapshot_prefix", "y", "--train_path", "a", "b")
    assert (c.init, c.batchsize, c.epoch, c.train_save, c.snapshot_prefix, c.train_path) == (
        "mine.pth", 4, 7, "x", "y", ["a", "b"])
    assert stage_config("pseudo", batchsize=None, epoch=3).batchsize == STAGES["pseudo"].batchsize
    with pytest.raises(SystemExit):
        parse_args(["--is_pseudo", "--is_semi"])
    with pytest.raises(SystemExit):
        parse_args(["--stage", "doctor", "--is_semi"])
    with pytest.raises(SystemExit):
        parse_args(["--is_semi", "maybe"])


def _negative_init(path):
    """Weights of an Inf-Net whose final logits are all about -9 (see tests/test_maps.py): no infection anywhere."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_maps import negative_infnet
    save_release_weights(negative_infnet(SMALL), path)
    return path


def test_infection_free_slices_get_empty_pseudo_labels_unless_release_pseudo(tiny):
    sys.path.insert(0, ROOT)
    import PseudoGenerator
    init = _negative_init(tiny["tmp"] / "negative.pth")

    def run(name, *extra):
        save = tiny["tmp"] / name / "out"
        PseudoGenerator.main(["--init", str(init), "--unlabeled_path", str(tiny["pool"]), "--labeled_path",
                              str(tiny["seed"]), "--save_path", str(save), "--snapshot_root", str(tiny["tmp"] / name),
                              "--k", str(K), "--seed", "5", "--epoch", "1", "--batchsize", "4", "--trainsize", "32",
                              "--backbone", SMALL, "--no-progress", "--device", "cpu", "--max_rounds", "1", *extra])
        return save, _masks(save)

    # default: the labels are the (unstretched) probabilities, ~1e-4 -> 0: an empty label and no edge
    save, gts = run("ours")
    assert len(gts) == K
    for stem, gt in gts.items():
        assert gt.max() == 0, stem
        assert np.array(Image.open(save / "Edge" / f"{stem}.png")).max() == 0, stem
    # the release's labels: each slice's map stretched to the full range, whatever the model's confidence
    save, gts = run("release", "--release_pseudo")
    assert len(gts) == K
    for stem, gt in gts.items():
        assert (gt.min(), gt.max()) == (0, 255), stem
        edge = np.array(Image.open(save / "Edge" / f"{stem}.png"))
        assert edge.max() == 255, stem  # a confident false mask, with its edge (binary2edge: > 128, Canny 10/150)


def test_release_label_is_the_release_conversion():
    # misc.imsave's bytescale of the stretched map: a second stretch to 0..255, rounded half up
    stretched = np.array([[0.0, 0.25, 0.5], [0.75, 0.999999, 0.5 / 255]], np.float32)
    gt, edge = pseudo.release_label(stretched)
    assert gt.dtype == np.uint8 and gt.tolist() == [[0, 64, 128], [191, 255, 1]]
    assert edge.shape == gt.shape
    gt, edge = pseudo.probability_label(np.full((4, 4), 0.4, np.float32))
    assert gt.max() == 102 and edge.max() == 0  # soft, and below 0.5: no mask, no edge


def test_each_round_predicts_with_the_previous_rounds_weights(tiny, monkeypatch):
    seen = []  # the weights of the model each prediction call used
    real = infer.probability_maps

    def spy(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(infer, "probability_maps", spy)
    state = generate(_cfg(tiny, "spy", keep_rounds=True))
    assert len(state["rounds"]) == 3 and len(seen) == 3  # one prediction batch per round (K <= batchsize)
    used_by = [str(tiny["init"])] + [r["checkpoint"] for r in state["rounds"][:-1]]  # round 1: --init
    for r, (weights, path) in enumerate(zip(seen, used_by), start=1):
        saved = torch.load(path, weights_only=True)
        assert saved.keys() == weights.keys()
        for k in saved:
            torch.testing.assert_close(weights[k], saved[k], rtol=0, atol=0, msg=f"round {r}: {k} is not {path}'s")
    # and the rounds' weights do differ, so a round using stale weights would be caught
    assert any(not torch.equal(seen[0][k], seen[1][k]) for k in seen[0] if seen[0][k].is_floating_point())
