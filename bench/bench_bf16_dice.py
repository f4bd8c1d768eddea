"""Does bf16 autocast change the test-set scores? (issue 3: bf16 may be a default only where it
changes the mean Dice by at most 0.002 on a trained checkpoint.)

Runs the test stage (`predict_folder`, as MyTest_LungInf.py does) on the 48 LungInfection-Test
slices three ways: plain fp32 (the release's path), fp32 with fused Conv-BN + channels-last (our
default) and bf16 autocast (fused + channels-last), scores each folder with EvaluationTool and
prints the six figures, their differences from plain fp32 and how far the 8-bit maps moved.

    python bench/bench_bf16_dice.py --pth_path Snapshots/save_weights/Inf-Net-cpu/Inf-Net-10.pth \
        --data_path /work/shared/COVID-SemiSeg/TestingSet/LungInfection-Test
"""
import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from Code.model_lung_infection.infer import load_inf_net, predict_folder  # noqa: E402
from EvaluationTool import evaluate_folder, release_line  # noqa: E402

TOLERANCE = 0.002
FIGURES = ("meanDic", "meanSen", "meanSpe", "Sm", "meanEm", "MAE", "maxDic")
VARIANTS = {  # name: predict_folder options
    "fp32 plain": dict(amp=False, fuse_bn=False, channels_last=False),
    "fp32 fused+cl": dict(amp=False, fuse_bn=True, channels_last=True),
    "bf16 fused+cl": dict(amp=True, fuse_bn=True, channels_last=True),
}


def newest_snapshot(run_dir="Snapshots/save_weights/Inf-Net-cpu"):
    """The highest-epoch Inf-Net-<epoch>.pth of a run, else its resumable checkpoint.pth."""
    run_dir = Path(run_dir)
    snaps = sorted(run_dir.glob("*-[0-9]*.pth"), key=lambda p: int(re.findall(r"(\d+)\.pth$", p.name)[0]))
    if snaps:
        return snaps[-1]
    if (run_dir / "checkpoint.pth").exists():
        return run_dir / "checkpoint.pth"
    sys.exit(f"no snapshot in {run_dir}: pass --pth_path")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pth_path", default=None, help="default: newest snapshot of --run_dir")
    p.add_argument("--run_dir", default="Snapshots/save_weights/Inf-Net-cpu")
    p.add_argument("--data_path", default="Dataset/TestingSet/LungInfection-Test", help="holds Imgs/ and GT/")
    p.add_argument("--save_root", default=None, help="keep the maps here (default: a temporary folder)")
    p.add_argument("--testsize", type=int, default=352)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    pth = Path(args.pth_path) if args.pth_path else newest_snapshot(args.run_dir)
    data, gt = Path(args.data_path), Path(args.data_path) / "GT"
    print(f"weights {pth}; data {data}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    model = load_inf_net(pth, device="cpu")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.save_root or tmp)
        scores, maps = {}, {}
        for name, opts in VARIANTS.items():
            out = root / name.replace(" ", "_").replace("+", "_")
            start = time.perf_counter()
            written = predict_folder(model, data, out, args.testsize, progress=False, **opts)
            seconds = (time.perf_counter() - start) / len(written)
            s = evaluate_folder(gt, out, dataset="LungInfection-Test", model=name)
            scores[name] = s
            maps[name] = {w.name: np.array(Image.open(w)).astype(int) for w in written}
            print(f"  {release_line(s)}  [{seconds:.3f} s/slice incl. I/O]", flush=True)

    ref = scores["fp32 plain"]
    print("\ndifferences from fp32 plain:")
    print(f"  {'variant':<16s} " + " ".join(f"{k:>9s}" for k in FIGURES) + "   map |diff| max / mean (gray levels)")
    for name in list(VARIANTS)[1:]:
        d = [scores[name][k] - ref[k] for k in FIGURES]
        diffs = [np.abs(maps[name][n] - maps["fp32 plain"][n]) for n in maps[name]]
        print(f"  {name:<16s} " + " ".join(f"{x:+9.5f}" for x in d) +
              f"   {max(x.max() for x in diffs)} / {np.mean([x.mean() for x in diffs]):.3f}")
    delta = scores["bf16 fused+cl"]["meanDic"] - ref["meanDic"]
    verdict = "within" if abs(delta) <= TOLERANCE else "OUTSIDE"
    print(f"\nbf16 changes mean Dice by {delta:+.5f}: {verdict} the {TOLERANCE} tolerance "
          f"(fp32 meanDic {ref['meanDic']:.4f}, bf16 {scores['bf16 fused+cl']['meanDic']:.4f}; weights {pth})")
    return delta


if __name__ == "__main__":
    main()
