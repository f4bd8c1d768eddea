"""Per-image metrics of the Inf-Net MATLAB EvaluationTool, re-derived in NumPy.

Conventions follow the released toolbox (main.m, Fmeasure_calu.m, Enhancedmeasure.m,
StructureMeasure.m / S_object.m / S_region.m), including its floating-point details where
they can change a figure:

* the prediction is im2double(first channel) then mapminmax(., 0, 1), computed as MATLAB does
  (multiply by a gain 1/range, leave a constant map unchanged);
* the 256 thresholds are the exact doubles MATLAB's colon operator builds for 1:-1/255:0
  (14 of them differ from k/255 by one ulp, which moves pixels of those grey levels);
* the sweep over thresholds is done on a histogram of per-pixel "ranks" (how many thresholds
  a pixel passes), so one image costs a few array passes, not 256.

Curves are indexed like the toolbox: position 0 is threshold 1.0, position 255 is threshold 0.
"""
import numpy as np

EPS = np.spacing(1.0)  # MATLAB's eps
N_THRESHOLDS = 256
CURVE_KEYS = ("Dic", "Sen", "Spe", "Prec", "Em")  # the toolbox's column_* names


def matlab_colon(start, step, stop):
    """`start:step:stop` with MATLAB's rounding: the first half of the vector is start + k*step,
    the second half stop - k*step, and an even count of intervals gets an exact midpoint."""
    n = int(round((stop - start) / step))
    k = n // 2
    v = np.empty(n + 1)
    v[: k + 1] = start + np.arange(k + 1) * step
    v[k + 1:] = stop - np.arange(n - k - 1, -1, -1) * step
    if n % 2 == 0:
        v[k] = (start + stop) / 2
    return v


THRESHOLDS = matlab_colon(1.0, -1.0 / 255, 0.0)   # descending, as in main.m
_ASCENDING = THRESHOLDS[::-1].copy()

# MATLAB's rgb2gray weights are the first row of the inverse NTSC (YIQ -> RGB) matrix.
_RGB2GRAY = np.linalg.inv([[1.0, 0.956, 0.621], [1.0, -0.272, -0.647], [1.0, -1.106, 1.703]])[0]


def im2double(img):
    """MATLAB im2double: integers are scaled by their type's maximum, logical -> 0/1."""
    if img.dtype == bool:
        return img.astype(np.float64)
    if img.dtype == np.uint8:
        return img / 255.0
    if img.dtype == np.uint16:
        return img / 65535.0
    if img.dtype in (np.float32, np.float64):
        return img.astype(np.float64)
    raise TypeError(f"unsupported image type {img.dtype} (expected uint8, uint16, bool or float)")


def _first_channel(img):
    return img[..., 0] if img.ndim == 3 else img


def _mapminmax(x, lo, hi):
    """MATLAB mapminmax(x, 0, 1) given the data's min and max: it scales by a precomputed gain
    (not a division) and leaves a constant map as it is (gain 1, offset 0), so an all-black
    map stays 0 and an all-white map stays 1."""
    gain = 1.0 / (hi - lo) if hi > lo else np.inf
    if np.isfinite(gain) and gain <= 1e14:
        return (x - lo) * gain
    return x


def normalize_prediction(pred):
    """Prediction map -> float64 in [0, 1]: first channel, im2double, then mapminmax(x, 0, 1)."""
    x = im2double(_first_channel(pred))
    x = _mapminmax(x, x.min(), x.max())
    if x.min() < 0 or x.max() > 1:
        # Only a constant float map outside [0, 1] gets here; the toolbox errors out as well.
        raise ValueError("prediction values must lie in [0, 1] after normalisation")
    return x


def binarize_gt(gt):
    """GT image -> bool mask as main.m reads it: logical images as they are, RGB through
    rgb2gray, otherwise the first channel, then > 128."""
    if gt.dtype == bool:
        return gt[..., 0] if gt.ndim == 3 else gt
    if gt.ndim == 3 and gt.shape[2] >= 3:
        # rgb2gray rounds back to the integer type before main.m compares with 128.
        gray = np.floor(gt[..., :3] @ _RGB2GRAY + 0.5)
    else:
        gray = gt[..., 0] if gt.ndim == 3 else gt
    return gray > 128


def _threshold_ranks(pred):
    """For every value, how many thresholds t satisfy t <= value (so value >= t)."""
    # floor(255 p) + 1 is the count for ideal thresholds k/255; MATLAB's are off by an ulp here
    # and there, so fix the (at most one) miscount against the real threshold values.
    rank = np.minimum((pred * 255).astype(np.intp) + 1, N_THRESHOLDS)
    rank += (rank < N_THRESHOLDS) & (_ASCENDING[np.minimum(rank, N_THRESHOLDS - 1)] <= pred)
    rank -= _ASCENDING[rank - 1] > pred
    return rank


def _pass_counts(values, n_all=None, n_fg=None, strict=False):
    """Pixels passing each threshold (toolbox order: threshold 1 first), overall and inside the GT.

    values: prediction values -- every pixel (then n_all=None and n_fg is the GT mask), or the
    distinct grey levels with their pixel counts n_all and n_fg.
    strict: count `value > t` instead of `value >= t`.
    """
    rank = _threshold_ranks(values)
    if strict:
        # A value equal to a threshold passes `>=` but not `>`: drop its top threshold.
        rank = rank - (_ASCENDING[rank - 1] == values)

    def passing(weights):
        hist = np.bincount(rank, weights=weights, minlength=N_THRESHOLDS + 1)
        # A value of rank r passes the r lowest thresholds: count ranks above each index,
        # then flip to the toolbox's descending threshold order.
        return np.cumsum(hist[::-1])[::-1][1:][::-1]
    return passing(n_all), passing(n_fg)


def confusion_curves(pp, tp, n_fg, n):
    """Dice, sensitivity, specificity and precision per threshold from the predicted-positive
    and true-positive counts. Like Fmeasure_calu.m, all four are 0 where TP = 0."""
    pp = pp.astype(np.float64)
    tp = tp.astype(np.float64)
    fp = pp - tp
    fn = n_fg - tp
    tn = n - pp - fn
    hit = tp > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        # With TP > 0 only specificity can be 0/0 (a GT with no background); the toolbox
        # returns NaN there, and so do we.
        curves = {
            "Dic": 2 * tp / (n_fg + pp),
            "Sen": tp / n_fg,
            "Spe": tn / (tn + fp),
            "Prec": tp / pp,
        }
    return {k: np.where(hit, v, 0.0) for k, v in curves.items()}


def _enhanced(a_pred, a_gt):
    """Enhanced alignment value of one pixel from its demeaned prediction and GT values."""
    align = 2 * (a_gt * a_pred) / (a_gt * a_gt + a_pred * a_pred + EPS)
    return (align + 1) ** 2 / 4


def e_measure_curve(pp, tp, n_fg, n):
    """E-phi (IJCAI'18, Enhancedmeasure.m) of each binary map, from its counts.

    A binary map and a binary GT take only four (prediction, GT) value pairs, so the sum of
    the enhanced-alignment matrix is four counts times four values.
    """
    pp = pp.astype(np.float64)
    tp = tp.astype(np.float64)
    if n_fg == 0:        # all-black GT: score the predicted background only
        total = n - pp
    elif n_fg == n:      # all-white GT: score the predicted foreground only
        total = pp
    else:
        mu_p, mu_g = pp / n, n_fg / n
        fp, fn = pp - tp, n_fg - tp
        tn = n - pp - fn
        total = (tp * _enhanced(1 - mu_p, 1 - mu_g) + fp * _enhanced(1 - mu_p, -mu_g)
                 + fn * _enhanced(-mu_p, 1 - mu_g) + tn * _enhanced(-mu_p, -mu_g))
    return total / (n - 1 + EPS)   # the toolbox's denominator, w*h - 1 + eps


def _object_score(x):
    """S_object's per-region term; x holds the region's (possibly inverted) predictions."""
    if x.size == 0:
        return 0.0
    mean = x.mean()
    std = x.std(ddof=1) if x.size > 1 else 0.0   # MATLAB std is the N-1 version; std(scalar)=0
    return 2.0 * mean / (mean * mean + 1.0 + std + EPS)


def _ssim(pred, gt):
    """S_region's per-quadrant structural similarity."""
    n = pred.size
    if n == 0:
        # MATLAB's mean2 of an empty quadrant is NaN and it propagates through the 0 weight;
        # we keep the toolbox's answer (this needs a GT centred on the last row or column).
        return np.nan
    g = gt.astype(np.float64)
    x, y = pred.mean(), g.mean()
    dx, dy = pred - x, g - y
    sigma_x2 = np.sum(dx * dx) / (n - 1 + EPS)
    sigma_y2 = np.sum(dy * dy) / (n - 1 + EPS)
    sigma_xy = np.sum(dx * dy) / (n - 1 + EPS)
    alpha = 4 * x * y * sigma_xy
    beta = (x * x + y * y) * (sigma_x2 + sigma_y2)
    if alpha != 0:
        return alpha / (beta + EPS)
    return 1.0 if beta == 0 else 0.0


def _centroid(gt):
    """1-based (X, Y) centroid of a non-empty GT, rounded like MATLAB (half away from zero;
    NumPy's round-half-to-even would move the split on exact .5 centroids)."""
    rows, cols = gt.shape
    total = np.count_nonzero(gt)
    x = np.dot(gt.sum(axis=0), np.arange(1, cols + 1)) / total
    y = np.dot(gt.sum(axis=1), np.arange(1, rows + 1)) / total
    return int(np.floor(x + 0.5)), int(np.floor(y + 0.5))


def _s_region(pred, gt):
    rows, cols = gt.shape
    X, Y = _centroid(gt)
    area = rows * cols
    w1 = X * Y / area
    w2 = (cols - X) * Y / area
    w3 = X * (rows - Y) / area
    w4 = 1.0 - w1 - w2 - w3
    return (w1 * _ssim(pred[:Y, :X], gt[:Y, :X]) + w2 * _ssim(pred[:Y, X:], gt[:Y, X:])
            + w3 * _ssim(pred[Y:, :X], gt[Y:, :X]) + w4 * _ssim(pred[Y:, X:], gt[Y:, X:]))


def _s_object(pred, gt):
    u = np.count_nonzero(gt) / gt.size
    return u * _object_score(pred[gt]) + (1 - u) * _object_score(1.0 - pred[~gt])


def s_measure(pred, gt, alpha=0.5):
    """S-alpha (ICCV'17, StructureMeasure.m) of a normalised prediction against a bool GT."""
    y = np.count_nonzero(gt) / gt.size
    if y == 0:           # all-black GT
        return float(1.0 - pred.mean())
    if y == 1:           # all-white GT
        return float(pred.mean())
    q = alpha * _s_object(pred, gt) + (1 - alpha) * _s_region(pred, gt)
    return float(0.0 if q < 0 else q)   # NaN stays NaN, as in MATLAB


def mae(pred, gt):
    return float(np.mean(np.abs(gt - pred)))


def evaluate_pair(pred, gt, em_strict=False):
    """All metrics of one prediction against one GT.

    pred: the prediction image as read (uint8/uint16/bool/float, 2-D or H x W x C; only the
      first channel is used) -- it is normalised here exactly as the toolbox does.
    gt: the GT image as read (bool is used as is, otherwise > 128, RGB via rgb2gray).
    em_strict: binarise with `pred > t` for E-phi (one revision of main.m does this) instead
      of `pred >= t` (the other revision, and the rule Fmeasure_calu.m uses).

    Returns {'thresholds', 'curves': {Dic, Sen, Spe, Prec, Em: 256 values each, threshold 1
    first}, 'Sm', 'MAE'}.
    """
    gt = binarize_gt(np.asarray(gt))
    first = _first_channel(np.asarray(pred))
    if first.shape != gt.shape:
        raise ValueError(f"prediction shape {first.shape} differs from GT shape {gt.shape}")
    n, n_fg = gt.size, int(np.count_nonzero(gt))

    if first.dtype == np.uint8:
        # A uint8 map has at most 256 grey levels: normalise and rank the levels (same float
        # operations as per pixel, so the same values), then weight them by pixel counts.
        levels = _mapminmax(np.arange(256) / 255.0, first.min() / 255.0, first.max() / 255.0)
        levels = np.clip(levels, 0.0, 1.0)   # only levels absent from the map fall outside
        pred = levels[first]
        sweep = (levels, np.bincount(first.ravel(), minlength=256),
                 np.bincount(first[gt], minlength=256))
    else:
        pred = normalize_prediction(first)
        sweep = (pred.ravel(), None, gt.ravel())

    pp, tp = _pass_counts(*sweep)
    curves = confusion_curves(pp, tp, n_fg, n)
    if em_strict:
        pp, tp = _pass_counts(*sweep, strict=True)
    curves["Em"] = e_measure_curve(pp, tp, n_fg, n)
    return {"thresholds": THRESHOLDS, "curves": curves,
            "Sm": s_measure(pred, gt), "MAE": mae(pred, gt), "fixed": fixed_threshold(first, gt)}


FIXED_THRESHOLD = 0.5
FIXED_KEYS = ("Dic", "Sen", "Spe")


def fixed_threshold(first, gt, threshold=FIXED_THRESHOLD):
    """Dice, Sen, Spe of the map *as stored* (im2double, no min-max) binarised at `threshold`: for 8-bit maps
    `map >= 128`, i.e. probability >= 0.5 for maps that store probabilities. What most later papers report,
    beside the toolbox's mean over 256 thresholds of the min-max normalised map. Same conventions as the
    curves (all three 0 where TP = 0)."""
    binary = im2double(first) >= threshold
    pp, tp = np.count_nonzero(binary), np.count_nonzero(binary & gt)
    curves = confusion_curves(np.array([pp]), np.array([tp]), int(np.count_nonzero(gt)), gt.size)
    return {k: float(curves[k][0]) for k in FIXED_KEYS}
