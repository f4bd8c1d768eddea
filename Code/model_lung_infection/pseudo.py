"""Semi-Inf-Net pseudo labels: Algorithm 1 of the paper (randomly selected propagation).

Start from an Inf-Net trained on the doctor labels (`init`). Each round draws K unlabelled slices
at random, predicts their infection probabilities (S_3 at each slice's own size, as `infer.probability_maps`
computes them, not stretched), writes (image, soft pseudo label, edge) into `<save_path>/{Imgs,GT,Edge}`
(see `PSEUDO_LABELS`: GT = the probability map in 8 bits, soft as the release saved it; the infection
mask, probability >= 0.5, gives the edge map) and fine-tunes the model on the labelled seed set plus every pseudo
label so far with the Inf-Net recipe (release `PseudoGenerator.py`: 10 epochs, Adam lr 3e-4,
batch 16, multi-scale). The round's weights start the next round; it ends when no slice is left.

Interruption: `<save_path>/pseudo_state.json` (written atomically) holds the draw order (from
`seed`), the names labelled in each finished round, the round in progress and the current weights.
Each sample is written image first, edge next, GT last, every file atomically, so a GT file marks a
finished sample. Re-running with the same arguments resumes after the last finished round; a round
that was interrupted is done again from its start (same draw, same weights, so the same labels).
"""
import dataclasses
import filecmp
import json
import math
import os
import random
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_write
from .configs import PseudoConfig, round_training  # noqa: F401 -- the run's options
from .data import (
    IMAGE_EXTENSIONS,
    DataError,
    InfectionTrainSet,
    SliceSet,
    _natural_key,
    edge_from_mask,
    list_images,
)
from .errors import UserError
from .infer import default_amp, iter_probability_maps, save_png, to_uint8
from .models import read_model
from .runtime import pick_device
from .train import train

STATE_FILE = "pseudo_state.json"
STATE_VERSION = 1
THRESHOLD = 0.5               # infection mask = probability >= 0.5 (it gives the edge map)
ROUND_PREFIX = "Semi-Inf-Net"  # round weights: <run>/round-NNNN/Semi-Inf-Net-<epoch>.pth (release naming)
DEFAULT_BACKBONE = "res2net50_v1b_26w_4s"


class PseudoRunError(UserError, ValueError):
    """A pseudo-labelling run that cannot start or continue as asked (the message says why and what to do)."""


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def _atomic_write_text(text, path):
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _atomic_copy(src, dst):
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def _same_file(a, b):
    a, b = Path(a), Path(b)
    if not b.exists():
        return False
    return os.path.samefile(a, b) or (a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False))


def _by_stem(folder):
    """{stem: [image files]} of a folder (empty if it does not exist); unlike list_images, no checks."""
    found = {}
    if Path(folder).is_dir():
        for p in sorted(Path(folder).iterdir()):
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
                found.setdefault(p.stem, []).append(p)
    return found


def _remove_others(folder, stem, keep):
    """Delete files of `stem` in `folder` other than `keep`, so every stem has one file (pairing stays unique)."""
    for p in _by_stem(folder).get(stem, []):
        if p.name != keep:
            p.unlink()


class _Layout:
    """Where a pseudo-labelled sample lives under save_path."""

    def __init__(self, save_path, pool):
        self.root = Path(save_path)
        self.pool = pool  # {stem: source image path}

    def image(self, stem):
        return self.root / "Imgs" / self.pool[stem].name

    def gt(self, stem):
        return self.root / "GT" / f"{stem}.png"

    def edge(self, stem):
        return self.root / "Edge" / f"{stem}.png"

    def sample(self, stem):
        return stem, self.image(stem), self.gt(stem), self.edge(stem)

    def write(self, stem, gt, edge):
        """Image first, edge next, GT last: a GT file marks a finished sample."""
        src, dst = self.pool[stem], self.image(stem)
        _remove_others(dst.parent, stem, dst.name)
        if not _same_file(src, dst):  # with the default paths, Imgs/ *is* the unlabelled folder
            _atomic_copy(src, dst)
        _remove_others(self.root / "Edge", stem, f"{stem}.png")
        save_png(edge, self.edge(stem))
        _remove_others(self.root / "GT", stem, f"{stem}.png")
        save_png(gt, self.gt(stem))


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------

def _identity(cfg, stems):
    """What must match for a re-run to continue a run: the pool, seed set, starting weights, K and seed."""
    return {"init": str(Path(cfg.init).resolve()), "labeled_path": str(Path(cfg.labeled_path).resolve()),
            "k": cfg.k, "seed": cfg.seed, "pool": sorted(stems, key=_natural_key),
            "release_pseudo": bool(cfg.release_pseudo)}  # one kind of label per run, never mixed


def _new_state(cfg, stems, backbone):
    order = sorted(stems, key=_natural_key)
    random.Random(cfg.seed).shuffle(order)  # the whole draw: round r takes order[(r-1)K : rK]
    return {"version": STATE_VERSION, "identity": _identity(cfg, stems), "order": order, "rounds": [],
            "pending": None, "checkpoint": str(cfg.init), "backbone": backbone, "finished": False,
            "config": cfg.as_dict()}


def _differences(old, new):
    diffs = []
    for key in new:
        if old.get(key) != new[key]:
            if key == "pool":
                a, b = set(old.get(key) or []), set(new[key])
                diffs.append(f"unlabelled slices: {len(b - a)} new, {len(a - b)} gone")
            else:
                diffs.append(f"{key} {old.get(key)!r} -> {new[key]!r}")
    return diffs


def load_state(save_path):
    path = Path(save_path) / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise PseudoRunError(f"{path}: not a readable state file ({e}); delete it to start again") from e


def _start_or_resume(cfg, stems, backbone):
    path = Path(cfg.save_path) / STATE_FILE
    state = load_state(cfg.save_path)
    if state is None:
        return _new_state(cfg, stems, backbone), False
    identity = {"release_pseudo": False, **state.get("identity", {})}  # state files from before the option
    diffs = (["state version"] if state.get("version") != STATE_VERSION else
             _differences(identity, _identity(cfg, stems)))
    if diffs:
        if not cfg.overwrite:
            raise PseudoRunError(f"{path} belongs to a pseudo-labelling run with other arguments ({'; '.join(diffs)}): "
                             f"re-run with its arguments to resume it, pass --overwrite to start again, "
                             f"or choose another --save_path")
        warnings.warn(f"{path}: starting again (--overwrite; {'; '.join(diffs)})")
        return _new_state(cfg, stems, backbone), False
    if cfg.backbone and cfg.backbone != state["backbone"]:
        raise PseudoRunError(f"{path}: the run uses backbone {state['backbone']}, not {cfg.backbone}")
    changed = {k: (v, now[k]) for k, v in _fine_tuning(state.get("config", {})).items()
               if k in (now := _fine_tuning(cfg.as_dict())) and now[k] != v}
    if changed:
        warnings.warn("resuming with fine-tuning options that differ from the earlier rounds': " +
                      ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    state["config"] = cfg.as_dict()
    return state, True


def _fine_tuning(config):
    """The options of a saved config whose change between rounds is worth a warning (state files written
    before configs nested their training options hold them at the top level)."""
    train = config.get("train", config)
    return {k: train[k] for k in ("epoch", "lr", "batchsize", "trainsize", "scales", "clip", "release_bce")
            if k in train} | ({"testsize": config["testsize"]} if "testsize" in config else {})


def _save_state(state, save_path):
    _atomic_write_text(json.dumps(state, indent=1), Path(save_path) / STATE_FILE)


def labelled_names(state):
    """Names labelled in the finished rounds, in draw order."""
    return [name for r in state["rounds"] for name in r["names"]]


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def _check_not_foreign(cfg, state, layout):
    """Refuse to replace labels (or images) in save_path that this run did not write, unless overwrite."""
    owned = set(labelled_names(state)) | set((state.get("pending") or {}).get("names", []))
    todo = [s for s in state["order"] if s not in owned]
    gts = _by_stem(layout.root / "GT")
    imgs = _by_stem(layout.root / "Imgs")
    foreign_gt = [gts[s][0] for s in todo if s in gts]
    foreign_img = [p for s in todo for p in imgs.get(s, []) if not _same_file(layout.pool[s], p)]
    if cfg.overwrite:
        if foreign_gt:
            print(f"[pseudo] --overwrite: replacing {len(foreign_gt)} existing label(s) in {layout.root / 'GT'}")
        return
    if foreign_gt:
        raise FileExistsError(f"{layout.root / 'GT'} already holds labels for {len(foreign_gt)} of the {len(todo)} "
                              f"slices to label (e.g. {foreign_gt[0].name}): pass --overwrite to replace them, "
                              f"or choose another --save_path")
    if foreign_img:
        raise FileExistsError(f"{layout.root / 'Imgs'} holds other images named like {len(foreign_img)} of the "
                              f"slices to label (e.g. {foreign_img[0].name}): pass --overwrite to replace them, "
                              f"or choose another --save_path")


def _check_finished_samples(state, layout):
    for stem in labelled_names(state):
        for p in (layout.image(stem), layout.gt(stem), layout.edge(stem)):
            if not p.exists():
                raise DataError(f"{p}: missing, though {Path(layout.root) / STATE_FILE} records '{stem}' as "
                                f"labelled; restore it, or delete the state file to start again")


def _clean_temporaries(root):
    """Half-written files of a killed run (atomic writes leave only `.tmp-*` files)."""
    for sub in ("Imgs", "GT", "Edge"):
        for p in (root / sub).glob(".tmp-*") if (root / sub).is_dir() else []:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# The rounds
# ---------------------------------------------------------------------------------------------

def probability_label(prob):
    """Our pseudo label from a probability map (float, [0, 1]): GT = the probability in 8 bits, soft
    as the release saved its labels (training reads GT as soft targets, `data.mask_tensor`: a pixel's
    target is its probability); Edge = Canny of the infection mask, probability >= 0.5. An
    infection-free slice (all probabilities well below 0.5) gets a dark GT and no edge."""
    mask = np.where(prob >= THRESHOLD, 255, 0).astype(np.uint8)
    return to_uint8(prob), edge_from_mask(mask)


def _bytescale(x):
    """scipy.misc.imsave's conversion of a float image to 8 bits, which the release's labels went through:
    a second min-max stretch to 0..255, rounded half up (a constant map gives zeros)."""
    lo, hi = float(x.min()), float(x.max())
    scale = 255.0 / ((hi - lo) or 1.0)
    return (np.clip((x - lo) * scale, 0, 255) + 0.5).astype(np.uint8)


def release_label(stretched):
    """The release's pseudo label from the min-max stretched map: GT = that soft map (`misc.imsave`);
    Edge = `binary2edge` of the saved GT: threshold > 128, Canny 10/150. Every slice gets a full-range
    map, so even an infection-free slice gets a confident mask (the release's behaviour)."""
    gt = _bytescale(stretched)
    return gt, cv2.Canny(np.where(gt > 128, 255, 0).astype(np.uint8), 10, 150)


# release_pseudo -> (how the probability map is normalised, how it becomes (GT, Edge))
PSEUDO_LABELS = {False: ("none", probability_label), True: ("minmax", release_label)}


def predict_labels(model, items, testsize, device, amp=False, batchsize=16, release_pseudo=False,
                   channels_last=False):
    """{stem: (GT, Edge)} uint8 pseudo labels of `items` ([(stem, path)]), each at its slice's own size
    (see `PSEUDO_LABELS`), from the test stage's prediction loop."""
    normalize, label = PSEUDO_LABELS[bool(release_pseudo)]
    model.eval()
    maps = iter_probability_maps(model, SliceSet(items=items, testsize=testsize), batchsize, device, amp,
                                 channels_last, normalize)
    return {stem: label(prob) for stem, prob in maps}


def prediction_amp(amp, device):
    """The labels' precision: the test stage's (--amp given, else `infer.default_amp`: fp32 on CUDA, bf16
    on CPUs with native bf16), whatever the rounds' training uses."""
    return default_amp(device) if amp is None else bool(amp)


def _round_config(cfg, state, r):
    t = cfg.train
    return dataclasses.replace(
        t, train_path=[str(cfg.labeled_path), str(cfg.save_path)], train_save=f"{t.train_save}/round-{r:04d}",
        snapshot_prefix=ROUND_PREFIX, save_every=t.epoch, init=None, backbone=state["backbone"], seed=t.seed + r,
        overwrite=True, resume=False,
        resumable=False)  # an interrupted round is redone from its start: no per-epoch optimizer checkpoint


def _is_round_weights(path, cfg):
    run = (Path(cfg.train.snapshot_root) / "save_weights" / cfg.train.train_save).resolve()
    p = Path(path).resolve()
    return p.parent.parent == run and p.parent.name.startswith("round-")


def generate(cfg: PseudoConfig):
    """Run (or continue) Algorithm 1; returns the state dict (see the module docstring)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise PseudoRunError("pseudo-label generation runs in a single process: "
                             "run PseudoGenerator.py without torchrun")
    if cfg.k < 1:
        raise PseudoRunError(f"k must be at least 1, got {cfg.k}")
    if not Path(cfg.init).is_file():
        raise FileNotFoundError(f"--init: no weights at {cfg.init} (an Inf-Net trained on the doctor labels, "
                                f"e.g. Snapshots/save_weights/Inf-Net/Inf-Net-100.pth)")
    save = Path(cfg.save_path)
    pool = list_images(cfg.unlabeled_path)
    seed_set = InfectionTrainSet([cfg.labeled_path], cfg.train.trainsize)
    clash = sorted(set(pool) & {s[0] for s in seed_set.samples}, key=_natural_key)
    if clash:
        raise DataError(f"{cfg.unlabeled_path}: {len(clash)} slice name(s) also in the labelled set "
                        f"{cfg.labeled_path} (e.g. '{clash[0]}'); names must be unique across both")
    start = read_model(cfg.init, expect="binary", backbone=cfg.backbone)  # the network and weights of --init
    backbone = start.architecture.get("backbone", DEFAULT_BACKBONE)
    state, resumed = _start_or_resume(cfg, list(pool), backbone)
    layout = _Layout(save, pool)
    _check_finished_samples(state, layout)
    _check_not_foreign(cfg, state, layout)
    _clean_temporaries(save)

    order, total = state["order"], len(state["order"])
    n_rounds = math.ceil(total / cfg.k)
    done = len(labelled_names(state))
    if resumed:
        pending = state.get("pending")
        print(f"[pseudo] resuming {save / STATE_FILE}: {done} of {total} slices labelled in "
              f"{len(state['rounds'])} round(s)" + (f"; redoing round {pending['round']}" if pending else ""),
              flush=True)
    if done >= total:
        print(f"[pseudo] all {total} slices are labelled ({len(state['rounds'])} rounds); "
              f"final weights {state['checkpoint']}", flush=True)
        return state

    device = pick_device(cfg.train.device)
    amp = prediction_amp(cfg.train.amp, device)
    testsize = cfg.testsize or cfg.train.trainsize
    # grows by each round's samples; its decode cache lives in this process and is kept across rounds
    # (with DataLoader workers, the engine fills it here before they start: data.fill_caches)
    dataset = seed_set
    dataset.samples.extend(layout.sample(s) for s in labelled_names(state))
    model, ran = None, 0
    while done < total and (cfg.max_rounds is None or ran < cfg.max_rounds):
        r = len(state["rounds"]) + 1
        names = order[done:done + cfg.k]
        state["pending"] = {"round": r, "names": names}
        _save_state(state, save)  # from here on these names' files are this run's to (re)write

        if model is None:
            model = (start.model if state["checkpoint"] == str(cfg.init) else
                     read_model(state["checkpoint"], expect="binary", backbone=state["backbone"]).model).to(device)
        labels = predict_labels(model, [(s, pool[s]) for s in names], testsize, device, amp, cfg.train.batchsize,
                                cfg.release_pseudo, cfg.train.channels_last)
        for stem in names:
            layout.write(stem, *labels[stem])

        tcfg = _round_config(cfg, state, r)
        shutil.rmtree(tcfg.run_dir, ignore_errors=True)  # an interrupted attempt at this round
        shutil.rmtree(Path(tcfg.snapshot_root) / "tensorboard" / tcfg.train_save, ignore_errors=True)
        dataset.samples.extend(layout.sample(s) for s in names)
        model = train(tcfg, model=model, dataset=dataset)
        weights = tcfg.run_dir / f"{ROUND_PREFIX}-{tcfg.epoch}.pth"
        if not weights.is_file():
            raise RuntimeError(f"round {r}: the fine-tuning wrote no weights at {weights}")

        previous = state["checkpoint"]
        state["rounds"].append({"round": r, "names": names, "checkpoint": str(weights)})
        state["checkpoint"], state["pending"] = str(weights), None
        done += len(names)
        state["finished"] = done >= total
        _save_state(state, save)
        if not cfg.keep_rounds and _is_round_weights(previous, cfg):
            shutil.rmtree(Path(previous).parent, ignore_errors=True)
        ran += 1
        print(f"[pseudo] round {r}/{n_rounds}: labelled {len(names)} slice(s) ({', '.join(names[:3])}"
              f"{', ...' if len(names) > 3 else ''}); training set {len(dataset)}; "
              f"{total - done} of {total} unlabelled slices left; weights {weights}", flush=True)
    if done >= total:
        print(f"[pseudo] done: {total} pseudo labels in {save / 'GT'} after {len(state['rounds'])} rounds; "
              f"final weights {state['checkpoint']}", flush=True)
    else:
        print(f"[pseudo] stopped after {ran} round(s) (max_rounds); {total - done} slices left: "
              f"re-run with the same arguments to continue", flush=True)
    return state
