"""Start-up time: every script's --help against `python -c "import torch"`, and MyTest_LungInf.py on one
slice against the released MyTest_LungInf.py (made CPU-only) on the same slice and the same weights.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_startup.py [--runs 5] [--release PATH]

Each command runs in a fresh process, interleaved (A, B, C, A, B, C, ...) so a background load slows them
alike; the median wall time of --runs is printed. Targets (issue 14, 2-core machine): each --help at most
1.3 x `import torch`; our one-slice test no slower than the release's.

The released script comes from a checkout or a bare git mirror of github.com/DengPingFan/Inf-Net
(--release, default: the mirror at /work/.mirror/DengPingFan+Inf-Net/repo if it exists): its `Code/`
package and MyTest_LungInf.py are extracted to a temporary folder at run time (nothing of it is stored
here) and run unmodified under a small shim that makes it CPU-only: `.cuda()` is a no-op, and
`scipy.misc.imsave` (removed from SciPy since 1.2) is the PIL save of the same 8-bit bytescale. Its
constructor loads the ImageNet Res2Net file from ./Snapshots/pre_trained/, so that folder holds one (the
encoder part of the same weights), as the release's README has users put it. Without a release copy the bench
says so and runs a faithful re-implementation of its steps instead (load Inf_Net, torch.load weights,
PIL load + resize to 352, fp32 forward, sigmoid, min-max, PIL save).

Weights: a random-initialised Inf_Net state dict (the release's 946 keys), saved to a temporary file.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/DengPingFan+Inf-Net/repo")
SCRIPTS = ["MyTest_LungInf.py", "MyTrain_LungInf.py", "PseudoGenerator.py", "MyTrain_MulClsLungInf_UNet.py",
           "MyTest_MulClsLungInf_UNet.py", "reproduce.py"]

# Runs the release's MyTest_LungInf.py on the CPU (argv: release dir, then the script's arguments).
RELEASE_SHIM = r"""
import os, runpy, sys
import numpy as np, scipy, torch
from PIL import Image
torch.nn.Module.cuda = lambda self, *a, **k: self      # CPU-only: the release calls .cuda() on model and image
torch.Tensor.cuda = lambda self, *a, **k: self

def imsave(path, arr):                                 # scipy.misc.imsave: bytescale to 8 bits, then save
    lo, hi = float(arr.min()), float(arr.max())
    Image.fromarray((np.clip((arr - lo) * (255.0 / ((hi - lo) or 1.0)), 0, 255) + 0.5).astype(np.uint8)).save(path)

import scipy.misc
scipy.misc.imsave = imsave
os.chdir(sys.argv[1])
sys.path.insert(0, sys.argv[1])
sys.argv = ["MyTest_LungInf.py"] + sys.argv[2:]
runpy.run_path("MyTest_LungInf.py", run_name="__main__")
"""

# The release's steps, re-implemented (used only when no copy of the release is available).
RELEASE_STEPS = r"""
import os, sys
import numpy as np, torch, torchvision.transforms as transforms
from PIL import Image
sys.path.insert(0, sys.argv[1])
from Code.model_lung_infection.inf_net import Inf_Net
pth, image_root, save_path = sys.argv[2:5]
model = Inf_Net()
model.load_state_dict(torch.load(pth, map_location="cpu"))
model.eval()
tf = transforms.Compose([transforms.Resize((352, 352)), transforms.ToTensor(),
                         transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
os.makedirs(save_path, exist_ok=True)
for name in sorted(os.listdir(image_root)):
    image = tf(Image.open(os.path.join(image_root, name)).convert("RGB")).unsqueeze(0)
    res = model(image)[3].sigmoid().data.cpu().numpy().squeeze()
    res = (res - res.min()) / (res.max() - res.min() + 1e-8)
    Image.fromarray((res * 255).astype(np.uint8)).save(os.path.join(save_path, os.path.splitext(name)[0] + ".png"))
"""


def timed(cmd, env, cwd=ROOT):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return took


def medians(commands, runs, env):
    """{label: median seconds}, the commands interleaved run by run."""
    times = {label: [] for label in commands}
    for _ in range(runs):
        for label, (cmd, cwd) in commands.items():
            times[label].append(timed(cmd, env, cwd))
    return {label: statistics.median(t) for label, t in times.items()}


def extract_release(source, dest):
    """The release's Code/ and MyTest_LungInf.py from a checkout or a bare git repository; False if none."""
    source = Path(source) if source else None
    if source is None or not source.exists():
        return False
    if (source / "MyTest_LungInf.py").is_file():
        shutil.copytree(source / "Code", dest / "Code")
        shutil.copy(source / "MyTest_LungInf.py", dest)
        return True
    archive = subprocess.run(["git", "--git-dir", str(source), "archive", "HEAD", "Code", "MyTest_LungInf.py"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return True


def prepare(tmp, data_root, release):
    """One test slice, random Inf-Net weights (and their encoder part as the release's ImageNet file)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from Code.model_lung_infection.inf_net import Inf_Net
    torch.manual_seed(0)
    state = Inf_Net().state_dict()
    torch.save(state, tmp / "weights.pth")
    hub = release / "Snapshots" / "pre_trained"
    hub.mkdir(parents=True)
    torch.save({k[len("resnet."):]: v for k, v in state.items() if k.startswith("resnet.")},
               hub / "res2net50_v1b_26w_4s-3cf99910.pth")
    src = Path(data_root) / "TestingSet" / "LungInfection-Test" / "Imgs"
    first = sorted(src.iterdir())[0]
    (tmp / "slice" / "Imgs").mkdir(parents=True)
    shutil.copy(first, tmp / "slice" / "Imgs" / first.name)
    return first.name


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--release", default=str(MIRROR) if MIRROR.exists() else None,
                   help="checkout or bare git repository of github.com/DengPingFan/Inf-Net")
    p.add_argument("--data_root", default=os.environ.get("INFNET_DATA", str(ROOT.parent / "shared" / "COVID-SemiSeg")))
    a = p.parse_args(argv)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    py = sys.executable
    print(f"# {os.cpu_count()} CPUs, torch threads default, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, "
          f"median of {a.runs} runs, interleaved")

    helps = {"python -c 'import torch'": ([py, "-c", "import torch"], ROOT)}
    helps.update({f"{s} --help": ([py, s, "--help"], ROOT) for s in SCRIPTS})
    m = medians(helps, a.runs, env)
    base = m["python -c 'import torch'"]
    print(f"\n{'command':<42} {'seconds':>8} {'x import torch':>15}")
    for label, t in m.items():
        flag = "" if label.startswith("python") else ("  ok" if t <= 1.3 * base else "  OVER 1.3x")
        print(f"{label:<42} {t:8.3f} {t / base:15.2f}{flag}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        release = tmp / "release"
        release.mkdir()
        name = prepare(tmp, a.data_root, release)
        have_release = extract_release(a.release, release)
        ours = [py, "MyTest_LungInf.py", "--pth_path", str(tmp / "weights.pth"), "--data_path", str(tmp / "slice"),
                "--save_path", str(tmp / "ours"), "--overwrite", "--progress", "False"]
        if have_release:
            label = "released MyTest_LungInf.py (CPU shim)"
            theirs = [py, "-c", RELEASE_SHIM, str(release), "--pth_path", str(tmp / "weights.pth"),
                      "--data_path", str(tmp / "slice"), "--save_path", str(tmp / "release_out") + "/"]
            (tmp / "release_out").mkdir()
        else:
            label = "release's steps, re-implemented (no release copy found)"
            theirs = [py, "-c", RELEASE_STEPS, str(ROOT), str(tmp / "weights.pth"), str(tmp / "slice" / "Imgs"),
                      str(tmp / "release_out")]
        m = medians({"MyTest_LungInf.py (ours)": (ours, ROOT), label: (theirs, release if have_release else ROOT)},
                    a.runs, env)
        print(f"\none slice ({name}), whole process:")
        for k, t in m.items():
            print(f"{k:<58} {t:8.3f} s")
        ratio = m["MyTest_LungInf.py (ours)"] / m[label]
        print(f"ours / release = {ratio:.2f} ({'ok' if ratio <= 1.0 else 'SLOWER'})")


if __name__ == "__main__":
    main()
