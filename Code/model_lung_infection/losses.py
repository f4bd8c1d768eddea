"""Inf-Net's training loss (paper Eq. 3-5).

L_seg = L_IoU^w + L_BCE^w, both weighted per pixel by w = 1 + 5 |avgpool31(G) - G|, which
emphasises pixels near the mask's boundary. Deep supervision:
    L = L_seg(S_g) + L_edge(S_e) + sum over the three reverse-attention outputs of L_seg(S_i).

The release computed its BCE with `reduce='none'`, an invalid argument that PyTorch read as
"reduce to the mean", so its BCE term was unweighted; `release_bce=True` reproduces that.
"""
import torch
import torch.nn.functional as F


def boundary_weight(mask):
    """1 + 5 |avgpool31(G) - G|, the 31x31 zero-padded mean (count_include_pad) by box sums."""
    return 1 + 5 * torch.abs(box_mean(mask, 31) - mask)


def box_mean(x, k):
    """Mean over the zero-padded k x k window around each pixel of x (N, C, H, W), k odd: avg_pool2d's
    value with stride 1 and padding k // 2, from differences of cumulative sums. The loss computes it at
    every step on full-size masks: at 352 px, batch 24, on 2 CPU cores avg_pool2d (even as two 1-D passes)
    took 86-159 ms, this 12-19 ms. A 0/1 mask's window sums are integers, exact in float32; other values
    round as float32 running sums do (a resized mask at 448 px: within 1e-6 of the mean)."""
    r = k // 2
    rows = F.pad(x.float(), (r + 1, r, r + 1, r)).cumsum(-1)
    rows = rows[..., k:] - rows[..., :-k]  # each pixel's sum over its k columns
    sums = rows.cumsum(-2)
    return ((sums[..., k:, :] - sums[..., :-k, :]) / (k * k)).to(x.dtype)


def structure_loss(logits, mask, release_bce=False, weight=None):
    """Weighted IoU + weighted BCE, averaged over the batch. logits and mask: (N, 1, H, W).

    weight: boundary_weight(mask), if already computed (the four deep-supervised terms share it).
    """
    w = boundary_weight(mask) if weight is None else weight
    if release_bce:
        bce = F.binary_cross_entropy_with_logits(logits, mask)  # plain mean: the release's effective loss
    else:
        bce = (w * F.binary_cross_entropy_with_logits(logits, mask, reduction="none")).sum((2, 3)) / w.sum((2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * mask * w).sum((2, 3))
    union = ((prob + mask) * w).sum((2, 3))
    iou = 1 - (inter + 1) / (union - inter + 1)
    return (bce + iou).mean()


def edge_loss(logits, edge):
    return F.binary_cross_entropy_with_logits(logits, edge)


def inf_net_loss(outputs, gt, edge, release_bce=False):
    """Total deep-supervised loss and its terms {'global', 'ra5', 'ra4', 'ra3', 'edge'}.

    outputs: the model's (S_g, S_5, S_4, S_3, S_e) logits; maps of switched-off components
    (None, see inf_net.py) have no term.
    """
    s_g, s_5, s_4, s_3, s_e = outputs
    w = boundary_weight(gt)
    terms = {name: structure_loss(s, gt, release_bce, w)
             for name, s in (("global", s_g), ("ra5", s_5), ("ra4", s_4), ("ra3", s_3)) if s is not None}
    if s_e is not None:
        terms["edge"] = edge_loss(s_e, edge)
    return sum(terms.values()), terms


def segmentation_loss(outputs, gt, edge, release_bce=False):
    """Inf-Net's loss for its tuple of maps; plain BCE for a single-map baseline (Table II's
    U-Net family: the pixel-wise cross-entropy of the original U-Net)."""
    if isinstance(outputs, torch.Tensor):
        bce = F.binary_cross_entropy_with_logits(outputs.float(), gt)
        return bce, {"bce": bce}
    return inf_net_loss([None if o is None else o.float() for o in outputs], gt, edge, release_bce)
