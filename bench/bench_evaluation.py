"""Wall time of EvaluationTool on the 48 LungInfection-Test slices (target: < 1 s on 2 cores).

Predictions are synthetic (GT blurred + noise, written as uint8 PNGs to a temporary folder), so
the timing covers what a user's run does: reading both PNGs, all metrics over 256 thresholds.

    python bench/bench_evaluation.py --data_root /work/shared/COVID-SemiSeg
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from EvaluationTool import evaluate_folder, release_line  # noqa: E402
from EvaluationTool.folder import read_image  # noqa: E402
from EvaluationTool.metrics import binarize_gt  # noqa: E402


def make_predictions(gt_dir, out_dir, seed=0):
    """A soft, noisy, imperfect 'model output' per GT slice."""
    rng = np.random.default_rng(seed)
    names = sorted(p.name for p in gt_dir.glob("*.png"))
    for name in names:
        gt = binarize_gt(read_image(gt_dir / name)).astype(np.float32)
        soft = cv2.GaussianBlur(gt, (0, 0), sigmaX=6)
        noisy = np.clip(soft + rng.normal(0, 0.15, soft.shape), 0, 1)
        cv2.imwrite(str(out_dir / name), (noisy * 255).round().astype(np.uint8))
    return names


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_root", default="Dataset", help="root with a COVID-SemiSeg layout")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)

    gt_dir = Path(args.data_root) / "TestingSet" / "LungInfection-Test" / "GT"
    if not gt_dir.is_dir():
        sys.exit(f"GT folder not found: {gt_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        names = make_predictions(gt_dir, Path(tmp))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            summary = evaluate_folder(gt_dir, tmp, workers=args.workers,
                                      dataset="LungInfection-Test", model="blurred-GT")
            times.append(time.perf_counter() - start)
    print(release_line(summary), f"meanPrec:{summary['meanPrec']:.3f}")
    print(f"{len(names)} slices, all metrics over 256 thresholds: first run {times[0]:.3f} s, "
          f"best of {len(times)} {min(times):.3f} s (target < 1 s)")


if __name__ == "__main__":
    main()
