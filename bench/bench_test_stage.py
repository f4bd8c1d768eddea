"""The 2D test stage, whole process: MyTest_LungInf.py against the released MyTest_LungInf.py (CPU-only), side by
side in one run, on the 48 LungInfection-Test slices and on one slice, with the same random Inf-Net weights.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_test_stage.py [--runs 3] [--variants b1w0 b8w0 b8w1]

Each command runs in a fresh process, interleaved (release, ours..., release, ours...), median of --runs; wall
time and CPU time (process and children: on a shared machine it says what the command costs).
A variant bXwY is `--batchsize X --num_workers Y` (b1w0 is the stage before batching). Targets (issue 25):
48 slices at most 0.33x the release's wall time, one slice at most 1.0x. The release comes from a checkout or
bare mirror (see bench_startup.py: extracted at run time, run unmodified under a CPU shim); without one, its
steps re-implemented. Also prints how far each variant's maps are from b1w0's (gray levels).
"""
import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_startup import MIRROR, RELEASE_SHIM, RELEASE_STEPS, ROOT, extract_release, prepare  # noqa: E402


def timed(cmd, env, cwd):
    """(wall seconds, CPU seconds of the process and its children): on a machine shared with other work the CPU
    time says what the command costs, the wall time what it took."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def variant_args(name):
    batch, workers = name[1:].split("w")
    return ["--batchsize", batch, "--num_workers", workers]


def slices(data_root, dest, n):
    src = Path(data_root) / "TestingSet" / "LungInfection-Test" / "Imgs"
    (dest / "Imgs").mkdir(parents=True)
    for path in sorted(src.iterdir())[:n]:
        shutil.copy(path, dest / "Imgs" / path.name)
    return dest


def commands(tmp, data, release, have_release, variants, py):
    out = {}
    if have_release:
        (tmp / "release_out").mkdir(exist_ok=True)
        out["release (CPU shim)"] = ([py, "-c", RELEASE_SHIM, str(release), "--pth_path", str(tmp / "weights.pth"),
                                     "--data_path", str(data), "--save_path", str(tmp / "release_out") + "/"], release)
    else:
        out["release's steps, re-implemented"] = ([py, "-c", RELEASE_STEPS, str(ROOT), str(tmp / "weights.pth"),
                                                   str(data / "Imgs"), str(tmp / "release_out")], ROOT)
    for v in variants:
        out[f"ours {v}"] = ([py, "MyTest_LungInf.py", "--pth_path", str(tmp / "weights.pth"), "--data_path", str(data),
                             "--save_path", str(tmp / v), "--overwrite", "--progress", "False", *variant_args(v)], ROOT)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=["b1w0", "b8w0", "b8w1"])
    p.add_argument("--slices", type=int, nargs="+", default=[48, 1])
    p.add_argument("--release", default=str(MIRROR) if MIRROR.exists() else None)
    p.add_argument("--data_root", default=os.environ.get("INFNET_DATA", str(ROOT.parent / "shared" / "COVID-SemiSeg")))
    a = p.parse_args(argv)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    print(f"# {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, median of {a.runs} interleaved runs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        release = tmp / "release"
        release.mkdir()
        prepare(tmp, a.data_root, release)  # weights.pth (and the release's ImageNet file)
        have_release = extract_release(a.release, release)
        for n in a.slices:
            data = slices(a.data_root, tmp / f"data{n}", n)
            cmds = commands(tmp, data, release, have_release, a.variants, sys.executable)
            times = {label: [] for label in cmds}
            for _ in range(a.runs):
                for label, (cmd, cwd) in cmds.items():
                    times[label].append(timed(cmd, env, cwd))
            med = {label: [statistics.median(x) for x in zip(*t)] for label, t in times.items()}
            base = next(iter(med.values()))
            print(f"\n{n} slice(s), whole process (load {os.getloadavg()[0]:.2f}):")
            for label, (wall, cpu) in med.items():
                print(f"  {label:<36} wall {wall:7.2f} s {wall / base[0]:5.2f}x release   "
                      f"CPU {cpu:7.2f} s {cpu / base[1]:5.2f}x")
            ref = {q.name: np.array(Image.open(q)).astype(int) for q in sorted((tmp / a.variants[0]).glob("*.png"))}
            for v in a.variants[1:]:
                diff = max(np.abs(np.array(Image.open(tmp / v / k)).astype(int) - m).max() for k, m in ref.items())
                print(f"  maps of {v} vs {a.variants[0]}: at most {diff} gray level(s) apart")


if __name__ == "__main__":
    main()
