"""End-to-end time of the volume stage on a synthetic 512 x 512 x 300 chest CT (issue 15's speed target:
<= 60 s on the 2-core CPU with the default fast inference path), or on a real scan (--scan), split into
read, lungs, network, write and report.

    python bench/bench_volume.py [--pth_path W] [--shape 512,512,300] [--threads 2] [--backbone ...]
    python bench/bench_volume.py --scan ../shared/realct/chest-normal-dicom --compare /work/main

--compare ROOT times the same scan with the code of another checkout (e.g. main) too, in a subprocess,
and prints both side by side.

Without --pth_path a random-init Inf-Net (Res2Net-50 encoder, the paper's network, same cost as a trained
one) is saved to a temporary checkpoint. The phantom is tests/volume_phantom.py's scaled to the shape:
lungs on about 2/3 of the slices, as in a chest CT whose field of view reaches the abdomen.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(os.environ.get("BENCH_CODE_ROOT", Path(__file__).resolve().parents[1]))  # --compare's checkout
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_scan(path, shape):
    """A chest phantom in HU on a (rows, cols, slices) grid of 0.7 x 0.7 x 1.0 mm, written as NIfTI."""
    import volume_phantom as vp
    vp.SHAPE = tuple(shape)
    vp.SPACING = (0.7, 0.7, 1.0)
    scale = np.array([shape[0] * 0.7 / 205.0, shape[1] * 0.7 / 157.0, shape[2] * 1.0 / 144.0 * 0.75])
    vp.BODY = (90.0 * scale[0] * 1.4, 70.0 * scale[1] * 1.4)
    vp.LUNGS = {k: (tuple(np.array(c) * scale), tuple(np.array(a) * scale)) for k, (c, a) in vp.LUNGS.items()}
    vp.VESSELS = [(x * scale[0], y * scale[1], r) for x, y, r in vp.VESSELS]
    vp.INFECTION = (tuple(np.array(vp.INFECTION[0]) * scale), vp.INFECTION[1] * scale.mean())
    return vp.write_phantom_nifti(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pth_path", default=None)
    p.add_argument("--backbone", default=None)
    p.add_argument("--shape", default="512,512,300")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batchsize", type=int, default=8)
    p.add_argument("--testsize", type=int, default=352)
    p.add_argument("--scan", default=None, help="a real scan (NIfTI file or DICOM folder) instead of the phantom")
    p.add_argument("--compare", default=None, help="another checkout's root: time its code on the same scan too")
    a = p.parse_args(argv)
    if a.compare:
        return compare(a, argv)
    torch.set_num_threads(a.threads)
    from Code.model_lung_infection import Inf_Net
    from Code.model_lung_infection.checkpoint import atomic_save
    from Code.model_lung_infection.infer import default_amp
    from Code.model_lung_infection.volume import run_volumes
    shape = tuple(int(v) for v in a.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if a.scan:
            scan = Path(a.scan)
        else:
            scan = make_scan(tmp / "chest.nii.gz", shape)
            print(f"phantom {shape} written in {time.perf_counter() - t0:.1f} s "
                  f"({os.path.getsize(scan) / 1e6:.1f} MB)")
        pth = a.pth_path
        if pth is None:
            pth = tmp / "checkpoint.pth"
            backbone = a.backbone or "res2net50_v1b_26w_4s"
            torch.manual_seed(0)  # the same random network for both checkouts under --compare
            atomic_save({"model": Inf_Net(backbone=backbone).eval().state_dict(),
                         "config": {"model": "inf_net", "backbone": backbone}}, pth)
        start = time.perf_counter()
        done = run_volumes(dict(data_path=str(scan), pth_path=str(pth), save_path=str(tmp / "out"),
                                testsize=a.testsize, batchsize=a.batchsize, device="cpu", progress=not a.scan))
        total = time.perf_counter() - start
        # --compare may run a checkout from before run_volumes returned a VolumeRun
        summaries, timings = (done.summaries, done.timings) if hasattr(done, "timings") else \
            (done, run_volumes.last_timings)
        case, summary = next(iter(summaries.items()))
        t = timings[case]
    print(f"code {ROOT}: torch threads {torch.get_num_threads()}, bf16 autocast {default_amp('cpu')}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min, after the run)")
    print(f"lungs {summary['lung_ml']:.0f} mL (right {summary['right_lung_ml']:.0f}, left "
          f"{summary['left_lung_ml']:.0f}) on {summary['shape']}")
    print("  ".join(f"{k} {v:.1f} s" for k, v in t.items()) + f"  | end to end {total:.1f} s "
          f"(incl. model load {total - sum(t.values()):.1f} s)")


def compare(a, argv):
    """This checkout's code, then --compare's, each in its own process on the same scan."""
    import subprocess
    rest = [v for i, v in enumerate(argv or sys.argv[1:])
            if v != "--compare" and (i == 0 or (argv or sys.argv[1:])[i - 1] != "--compare")
            and not v.startswith("--compare=")]
    for root in (Path(__file__).resolve().parents[1], Path(a.compare).resolve()):
        env = dict(os.environ, BENCH_CODE_ROOT=str(root))
        subprocess.run([sys.executable, __file__, *rest], env=env, check=True)


if __name__ == "__main__":
    main()
