"""Validation on held-out training slices (opt-in: `--val_split N`), to choose options without the test set.

`hold_out` picks N stems by seed; `Validator` scores a model on them as the test stage predicts
(infer.probabilities: logits resized to each slice's size, then the sigmoid; the same ImageNet
normalisation), thresholded at 0.5: Dice as the evaluation tool counts it (0 where nothing is hit)
and MAE of the probabilities, averaged over the slices. The slices are decoded once.
"""
import numpy as np
import torch

from .data import SliceSet, read_mask
from .infer import iter_batches, probabilities

THRESHOLD = 0.5


def hold_out(stems, n, seed):
    """`n` of `stems`, chosen by `seed` alone (the same set on every machine and every resume), sorted."""
    stems = sorted(stems)
    if not 0 < n < len(stems):
        raise ValueError(f"--val_split {n}: the training set has {len(stems)} slices; hold out between 1 and "
                         f"{len(stems) - 1}")
    order = torch.randperm(len(stems), generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(stems[i] for i in order[:n])


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
        """{"dice": mean Dice at 0.5, "mae": mean absolute error of the probabilities}."""
        was_training = model.training
        model.eval()
        scores = []
        try:
            for images, stems, sizes in iter_batches(model, self.items, self.batchsize, device):
                for stem, prob in zip(stems, probabilities(model, images, sizes, amp, device)):
                    p, gt = prob[0].cpu().numpy(), self.gts[stem]
                    scores.append((dice(p >= THRESHOLD, gt), float(np.abs(p - gt).mean())))
        finally:
            model.train(was_training)
        dices, maes = zip(*scores)
        return {"dice": float(np.mean(dices)), "mae": float(np.mean(maes))}
