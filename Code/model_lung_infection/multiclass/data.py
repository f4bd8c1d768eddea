"""Multi-class data (paper Sec. III-C): palette GT read as class indices, priors, the training set.

Training data: `<root>/{Imgs,GT,Prior}` paired by file stem (data.pair_by_stem). GT files are
palette PNGs whose *indices* are the classes (0 background, 1 GGO, 2 consolidation); they are read
as indices, never as gray values (the release converted to gray and remapped the gray values 38
and 75, which only works for that one palette), resized with nearest neighbour and one-hot encoded.
The slice and its infection map (the "prior") are each ImageNet-normalised as 3 channels and
concatenated (`network_input`); training and test priors go through the same steps (`prepare_prior`).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..configs import CLASSES, N_CLASSES  # noqa: F401
from ..data import (
    CachedSampleSet,
    DataError,
    SliceSet,
    check_pairs,
    normalize_image,
    pair_by_stem,
    raise_problems,
    read_mask,
    read_rgb,
    resize,
    zero_one_masks,
)

PRIOR_THRESHOLD = 128  # 8-bit infection maps are binarised as `map >= 128` (0.5), to 0 / 255

_INDEX_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B", "I;16N")


def read_class_indices(path, n_classes=N_CLASSES):
    """A GT as uint8 class indices (H, W).

    Palette images (mode 'P') give their palette indices, whatever colours the palette holds;
    a single-channel integer image is accepted when it already holds indices. Anything else
    (RGB, binary, gray masks with values like 38/75) is an error naming the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            a = np.array(im)
    except Exception as e:
        raise DataError(f"{path}: cannot read GT ({e})") from e
    if mode not in _INDEX_MODES or a.ndim != 2:
        raise DataError(f"{path}: GT must be a palette (mode 'P') or single-channel index image whose values are "
                        f"the classes 0..{n_classes - 1} ({', '.join(CLASSES)}); got mode '{mode}'")
    bad = np.unique(a[(a < 0) | (a >= n_classes)])
    if bad.size:
        raise DataError(f"{path}: GT indices {bad[:10].tolist()} outside 0..{n_classes - 1} ({', '.join(CLASSES)})"
                        + ("" if mode == "P" else f"; a gray mask (mode '{mode}') is not an index map"))
    return a.astype(np.uint8)


def one_hot(indices, n_classes=N_CLASSES):
    """uint8 indices (H, W) -> float one-hot (n_classes, H, W)."""
    return F.one_hot(torch.from_numpy(np.ascontiguousarray(indices)).long(), n_classes).permute(2, 0, 1).float()


def binarize(prior):
    """An 8-bit infection map -> 0 / 255 (`>= 128`), the form of the released training priors."""
    return np.where(prior >= PRIOR_THRESHOLD, 255, 0).astype(np.uint8)


def prepare_prior(prior, size, binarize_prior=True):
    """uint8 gray prior at any size -> uint8 (h, w) at `size`: binarised first (if asked), then
    resized bilinearly like the slice, so training and test priors go through the same steps."""
    prior = binarize(prior) if binarize_prior else prior
    return resize(prior, size)


def network_input(rgb, prior=None):
    """Resized uint8 slice (H, W, 3) [+ resized uint8 prior (H, W)] -> float (3 or 6, H, W).

    Each part is ImageNet-normalised as 3 channels (the prior replicated, as the release's
    cv2.imread of a gray PNG did) and the two are concatenated, slice first."""
    x = normalize_image(rgb)
    if prior is None:
        return x
    return torch.cat([x, normalize_image(np.repeat(prior[..., None], 3, axis=2))], 0)


class MultiClassTrainSet(CachedSampleSet):
    """`<root>/Imgs`, `<root>/GT` (palette indices) and, with `prior=True`, `<root>/Prior`:
    (input (6 or 3, s, s), one-hot target (3, s, s)) at s = trainsize.

    Every file is checked when the set is built (readable, GT and prior of the slice's size, GT an
    index image with indices in 0..2, priors not all 0/1); all problems stop the run together, before
    training starts.
    Decoded, resized samples are cached as uint8.
    """

    def __init__(self, root, trainsize=352, prior=True, binarize_prior=True, cache=True):
        super().__init__(cache)
        root = Path(root)
        self.root, self.trainsize, self.prior, self.binarize_prior = root, trainsize, prior, binarize_prior
        folders = [root / "Imgs", root / "GT"] + ([root / "Prior"] if prior else [])
        problems = []
        self.samples = pair_by_stem(folders, problems)  # [(stem, image, gt[, prior])]
        # Every file is checked before the first step (readable, sizes, GT indices); all problems at once.
        problems += check_pairs(self.samples)
        if prior:  # binary infection maps, read as 0..255 like the binary trainer's GT: 0/1 would be all 0
            problems += zero_one_masks(root / "Prior", [sample[3] for sample in self.samples])
        for _, _, gt_path, *_ in self.samples:
            try:
                read_class_indices(gt_path)
            except DataError as e:
                if not any(p.startswith(f"{gt_path} cannot be read") for p in problems):  # said once
                    problems.append(str(e))
        raise_problems(problems)

    def __len__(self):
        return len(self.samples)

    def read(self, i):
        """uint8 arrays (slice s x s x 3, prior s x s or None, class indices s x s)."""
        _, img_path, gt_path, *rest = self.samples[i]
        size = (self.trainsize, self.trainsize)
        image = resize(read_rgb(img_path), size)
        prior = prepare_prior(read_mask(rest[0]), size, self.binarize_prior) if self.prior else None
        gt = resize(read_class_indices(gt_path), size, Image.NEAREST)
        return image, prior, gt

    def __getitem__(self, i):
        image, prior, gt = self.load(i)
        return network_input(image, prior), one_hot(gt)


class MultiClassSliceSet(SliceSet):
    """Slices to label: (network input at testsize, stem, original (h, w)). `priors`: {stem: uint8 map or
    its path} for a 6-channel network (the prior is read, binarised if asked and resized like the slice),
    None for an image-only one."""

    def __init__(self, items, testsize, priors=None, binarize_prior=True):
        super().__init__(testsize=testsize, items=items)
        self.priors, self.binarize_prior = priors, binarize_prior

    def __getitem__(self, i):
        stem, path = self.items[i]
        rgb = read_rgb(path)
        size = (self.testsize, self.testsize)
        prior = None
        if self.priors is not None:
            prior = self.priors[stem]
            prior = prepare_prior(read_mask(prior) if isinstance(prior, Path) else prior, size, self.binarize_prior)
        return network_input(resize(rgb, size), prior), stem, rgb.shape[:2]
