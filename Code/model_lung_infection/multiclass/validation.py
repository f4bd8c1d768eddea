"""Validation of a multi-class network on held-out training slices (opt-in: `--val_split N`).

The slices are labelled as the test stage labels them (predict.iter_probabilities, then the argmax
over background / GGO / consolidation) and scored per class: Dice of the argmax region (0 where it
misses the class entirely, as the evaluation tool counts it), and `found`, the fraction of slices on
which the network predicts the class anywhere. A network that has learned only the class frequencies
predicts background everywhere: Dice 0 and found 0 for both classes.
"""
from pathlib import Path

import numpy as np

from ..validation import dice
from .data import MultiClassSliceSet, read_class_indices
from .predict import iter_probabilities

SHORT = {1: "ggo", 2: "cons"}  # class index -> the prefix of its scores


class MultiClassValidator:
    """Scores a model on held-out samples [(stem, image, gt[, prior])] (MultiClassTrainSet's) at `testsize`."""

    def __init__(self, samples, testsize, prior=True, binarize_prior=True, batchsize=4):
        priors = {stem: Path(rest[0]) for stem, _, _, *rest in samples} if prior else None
        slices = MultiClassSliceSet([(stem, image) for stem, image, *_ in samples], testsize, priors, binarize_prior)
        self.items = [slices[i] for i in range(len(slices))]  # a list is a dataset: decoded once
        self.gts = {stem: read_class_indices(gt) for stem, _, gt, *_ in samples}
        self.batchsize = batchsize

    def __len__(self):
        return len(self.items)

    def __call__(self, model, device, amp=False):
        """{"dice": mean of the two classes' Dice, "mae": of their probabilities, and per class
        (ggo_, cons_) "dice" and "found"}, averaged over the slices."""
        was_training = model.training
        model.eval()
        scores = {f"{name}_{k}": [] for name in SHORT.values() for k in ("dice", "found")}
        errors = []
        try:
            for stem, prob in iter_probabilities(model, self.items, self.batchsize, device, amp):
                labels, gt = prob.argmax(0), self.gts[stem]
                for c, name in SHORT.items():
                    scores[f"{name}_dice"].append(dice(labels == c, gt == c))
                    scores[f"{name}_found"].append(float((labels == c).any()))
                    errors.append(float(np.abs(prob[c] - (gt == c)).mean()))
        finally:
            model.train(was_training)
        means = {k: float(np.mean(v)) for k, v in scores.items()}
        return {"dice": float(np.mean([means[f"{name}_dice"] for name in SHORT.values()])),
                "mae": float(np.mean(errors)), **means}
