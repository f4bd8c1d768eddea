"""Validation on held-out training slices (opt-in: `--val_split N`), to choose options without the test set.

`hold_out` picks N stems by seed and `split_validation` takes them out of a training set; `Validator`
scores an infection model on them as the test stage predicts (infer.probabilities: logits resized to
each slice's size, then the sigmoid; the same ImageNet normalisation): Dice at 0.5 as the evaluation tool
counts it (0 where nothing is hit), MAE of the probabilities and the toolbox's mean Dice over 256
thresholds of the 8-bit map (the paper's figure), averaged over the slices. The slices are decoded once.
(The multi-class one: multiclass/validation.py.)
"""
import numpy as np
import torch

from EvaluationTool.metrics import evaluate_pair

from .data import DataError, SliceSet, read_mask
from .errors import OptionError
from .infer import iter_batches, probabilities
from .maps import to_uint8

THRESHOLD = 0.5


def hold_out(stems, n, seed):
    """`n` of `stems`, chosen by `seed` alone (the same set on every machine and every resume), sorted."""
    stems = sorted(stems)
    if not 0 < n < len(stems):
        raise OptionError(f"--val_split {n}: the training set has {len(stems)} slices; hold out between 1 and "
                         f"{len(stems) - 1}")
    order = torch.randperm(len(stems), generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(stems[i] for i in order[:n])


def split_validation(cfg, dataset, make_validator):
    """(training subset, validator) holding out cfg.val_split samples of `dataset` (its `.samples` are
    (stem, image, gt, ...) tuples); `make_validator(held-out samples)` builds the validator.

    The stems are chosen by cfg.val_seed when the run starts and recorded in cfg.val_stems (and so in
    checkpoint.pth): a resumed run validates on the same slices."""
    stems = [sample[0] for sample in dataset.samples]
    if cfg.val_stems is None:
        cfg.val_stems = hold_out(stems, cfg.val_split, cfg.val_seed)
    held = set(cfg.val_stems)
    missing = sorted(held - set(stems))
    if missing:
        paths = cfg.train_path if isinstance(cfg.train_path, (list, tuple)) else [cfg.train_path]
        raise DataError(f"held-out validation slices {', '.join(missing)} (recorded in the run's config) are not in "
                        f"{', '.join(map(str, paths))}: restore them, or start a new run")
    rest = [i for i, stem in enumerate(stems) if stem not in held]
    validator = make_validator([s for s in dataset.samples if s[0] in held])
    return torch.utils.data.Subset(dataset, rest), validator


def dice(pred, gt):
    """Dice of two bool masks; 0 when they share no pixel (the evaluation tool's rule, empty GT included)."""
    hit = np.logical_and(pred, gt).sum()
    return float(2 * hit / (pred.sum() + gt.sum())) if hit else 0.0


class Validator:
    """Scores a model on held-out slices [(stem, image path, gt path)] at input size `testsize`."""

    def __init__(self, samples, testsize, batchsize=4):
        slices = SliceSet(items=[(stem, image) for stem, image, _ in samples], testsize=testsize)
        self.items = [slices[i] for i in range(len(slices))]  # a list is a dataset: decoded once
        self.gts = {stem: read_mask(gt) > 128 for stem, _, gt in samples}  # binarised as the evaluation tool
        self.batchsize = batchsize

    def __len__(self):
        return len(self.items)

    def __call__(self, model, device, amp=False):
        """{"dice": mean Dice at 0.5, "mae": mean absolute error of the probabilities, "mean_dice": the
        toolbox's meanDic of the maps the test stage would write}."""
        was_training = model.training
        model.eval()
        scores = []
        try:
            for images, stems, sizes in iter_batches(model, self.items, self.batchsize, device):
                for stem, prob in zip(stems, probabilities(model, images, sizes, amp, device)):
                    p, gt = prob[0].cpu().numpy(), self.gts[stem]
                    scores.append((dice(p >= THRESHOLD, gt), float(np.abs(p - gt).mean()),
                                   float(evaluate_pair(to_uint8(p), gt)["curves"]["Dic"].mean())))
        finally:
            model.train(was_training)
        dices, maes, mean_dices = zip(*scores)
        return {"dice": float(np.mean(dices)), "mae": float(np.mean(maes)), "mean_dice": float(np.mean(mean_dices))}
