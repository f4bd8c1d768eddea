"""Data augmentation for training from scratch (opt-in: `--augment`; the release and the paper have none).

Each sample of a batch gets a random horizontal and vertical flip (each with probability 1/2), a
rotation in [-10, 10] degrees and a scale in [0.9, 1.1] -- one geometric transform applied alike to
the image, its GT and its edge map -- then a brightness and a contrast factor in [0.9, 1.1] on the
image alone. Fifty slices are few for a network trained from random weights; these are the changes a
CT slice plausibly shows (patient position, field of view, window settings).

The draws come from a generator seeded by (seed, epoch, batch, rank), not from the global RNG, so
a resumed run augments exactly as an uninterrupted one, whatever else consumed random numbers.
"""
import math

import torch
import torch.nn.functional as F

from .data import IMAGENET_MEAN, IMAGENET_STD

MAX_ROTATION = 10.0        # degrees
SCALE_RANGE = (0.9, 1.1)
INTENSITY_RANGE = (0.9, 1.1)  # brightness and contrast factors


def batch_generator(seed, epoch, batch, rank=0):
    """The generator of one batch's draws: a function of (seed, epoch, batch index in the epoch, rank) only."""
    return torch.Generator().manual_seed(hash((int(seed), int(epoch), int(batch), int(rank))) % 2**63)


def _uniform(n, low, high, generator):
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def draw_transforms(n, generator):
    """Per-sample affine matrices (n, 2, 3) for affine_grid, and brightness / contrast factors (n,)."""
    flip_x = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    flip_y = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    angle = _uniform(n, -MAX_ROTATION, MAX_ROTATION, generator) * math.pi / 180
    scale = _uniform(n, *SCALE_RANGE, generator)
    brightness = _uniform(n, *INTENSITY_RANGE, generator)
    contrast = _uniform(n, *INTENSITY_RANGE, generator)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # output -> input coordinates
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos * flip_x, -sin * flip_x
    theta[:, 1, 0], theta[:, 1, 1] = sin * flip_y, cos * flip_y
    return theta, brightness, contrast


def augment_batch(images, gts, edges, generator):
    """Augmented copies of a batch: images ImageNet-normalised (N, 3, H, W), gts and edges (N, 1, H, W)."""
    n = images.shape[0]
    theta, brightness, contrast = (t.to(images.device, torch.float32) for t in draw_transforms(n, generator))
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    raw = images.float() * std + mean  # [0, 1]: what is outside the slice after rotation is black, as in CT
    stacked = torch.cat([raw, gts.float(), edges.float()], 1)
    grid = F.affine_grid(theta, list(stacked.shape), align_corners=False)
    warped = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    raw, gts, edges = warped[:, :3], warped[:, 3:4], warped[:, 4:5]
    level = raw.mean(dim=(1, 2, 3), keepdim=True)
    raw = ((raw - level) * contrast.view(-1, 1, 1, 1) + level) * brightness.view(-1, 1, 1, 1)
    return (raw.clamp(0, 1) - mean) / std, gts, edges
