"""End-to-end time of the volume stage on a synthetic 512 x 512 x 300 chest CT (issue 15's speed target:
<= 60 s on the 2-core CPU with the default fast inference path), split into read, lungs, network,
write and report.

    python bench/bench_volume.py [--pth_path W] [--shape 512,512,300] [--threads 2] [--backbone ...]

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


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
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from Code.model_lung_infection import Inf_Net
    from Code.model_lung_infection.checkpoint import atomic_save
    from Code.model_lung_infection.infer import default_amp
    from Code.model_lung_infection.volume import run_volumes
    shape = tuple(int(v) for v in a.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        scan = make_scan(tmp / "chest.nii.gz", shape)
        print(f"phantom {shape} written in {time.perf_counter() - t0:.1f} s ({os.path.getsize(scan) / 1e6:.1f} MB)")
        pth = a.pth_path
        if pth is None:
            pth = tmp / "checkpoint.pth"
            backbone = a.backbone or "res2net50_v1b_26w_4s"
            atomic_save({"model": Inf_Net(backbone=backbone).eval().state_dict(),
                         "config": {"model": "inf_net", "backbone": backbone}}, pth)
        start = time.perf_counter()
        summary = run_volumes(dict(data_path=str(scan), pth_path=str(pth), save_path=str(tmp / "out"),
                                   testsize=a.testsize, batchsize=a.batchsize, device="cpu", progress=True))["chest"]
        total = time.perf_counter() - start
        t = run_volumes.last_timings["chest"]
    print(f"torch threads {torch.get_num_threads()}, bf16 autocast {default_amp('cpu')}, "
          f"load average {os.getloadavg()[0]:.2f} (1 min, after the run)")
    print(f"lungs {summary['lung_ml']:.0f} mL on {shape}")
    print("  ".join(f"{k} {v:.1f} s" for k, v in t.items()) + f"  | end to end {total:.1f} s "
          f"(incl. model load {total - sum(t.values()):.1f} s)")


if __name__ == "__main__":
    main()
