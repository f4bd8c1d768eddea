"""OpenMP's wait policy for the scripts: the test stage and a short training run with OMP_WAIT_POLICY=PASSIVE
(what the scripts now set when the variable is unset) against libgomp's default (threads spin before they
sleep), on a quiet machine and beside a busy neighbour (another PyTorch process on every core, as a training
run beside the test stage is; it gets the same policy, as a second script would).

    python bench/bench_wait_policy.py [--runs 3] [--workloads test train] [--conditions quiet busy]

Each command runs in a fresh process, the two policies interleaved; median wall time of --runs, and the
training steps per second of the neighbour while each ran. Run it with nothing else busy.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICIES = {"PASSIVE": "PASSIVE", "libgomp default": None}

# A stand-in for a training run on every core: Inf-Net training steps on random data (small, so that many
# complete while a command runs); prints how many it did per second.
NEIGHBOUR = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[1])
from Code.model_lung_infection.inf_net import Inf_Net
model = Inf_Net()
optimizer = torch.optim.Adam(model.parameters(), 1e-4)
x, y = torch.randn(2, 3, 160, 160), (torch.rand(2, 1, 160, 160) > 0.5).float()
n, start = 0, time.perf_counter()
try:
    while True:
        loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(m, y) for m in model(x) if m is not None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n += 1
except KeyboardInterrupt:
    print(n / (time.perf_counter() - start), flush=True)
"""


# Runs a script (argv[1:]) after `import torch`: libgomp reads its settings when torch loads it, so the script's
# own default for OMP_WAIT_POLICY then changes nothing. Both policies run through it, alike.
SHIM = "import runpy, sys, torch; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def env_with(policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    return env


def workloads(tmp, data_root):
    test = Path(data_root) / "TestingSet" / "LungInfection-Test"
    train = Path(data_root) / "TrainingSet" / "LungInfection-Train" / "Doctor-label"
    weights = tmp / "weights.pth"
    subprocess.run([sys.executable, "-c", "import sys, torch; sys.path.insert(0, sys.argv[2]); "
                    "from Code.model_lung_infection.inf_net import Inf_Net; torch.manual_seed(0); "
                    "torch.save(Inf_Net().state_dict(), sys.argv[1])", str(weights), str(ROOT)], check=True)
    return {
        "test (48 slices)": lambda i: ["MyTest_LungInf.py", "--pth_path", str(weights), "--data_path", str(test),
                                       "--save_path", str(tmp / f"maps{i}"), "--progress", "False"],
        "train (8 samples x 3 scales)": lambda i: [
            "MyTrain_LungInf.py", "--train_path", str(train), "--epoch", "1", "--epoch_samples", "8",
            "--batchsize", "8", "--snapshot_root", str(tmp / f"snap{i}"), "--progress", "False"],
    }


def timed(args, env, busy):
    neighbour = None
    if busy:
        neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(ROOT)], env=env, stdout=subprocess.PIPE,
                                     text=True)
        time.sleep(4)  # past its import and first step
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SHIM, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rate = None
    if neighbour:
        neighbour.send_signal(2)
        rate = float(neighbour.communicate(timeout=60)[0])
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-1000:]}")
    return wall, rate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workloads", nargs="+", default=["test", "train"])
    p.add_argument("--conditions", nargs="+", choices=("quiet", "busy"), default=["quiet", "busy"])
    p.add_argument("--data_root", default=os.environ.get("INFNET_DATA", str(ROOT.parent / "shared" / "COVID-SemiSeg")))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chosen = {k: v for k, v in workloads(tmp, a.data_root).items() if k.split()[0] in a.workloads}
        print("| workload | machine | PASSIVE | libgomp default | ratio | neighbour's steps/s (PASSIVE / default) |")
        print("|---|---|---|---|---|---|")
        n = 0
        for name, command in chosen.items():
            for condition in a.conditions:
                walls, rates = {k: [] for k in POLICIES}, {k: [] for k in POLICIES}
                for _ in range(a.runs):
                    for label, policy in POLICIES.items():
                        n += 1
                        wall, rate = timed(command(n), env_with(policy), condition == "busy")
                        walls[label].append(wall)
                        if rate is not None:
                            rates[label].append(rate)
                ours, default = (statistics.median(walls[k]) for k in POLICIES)
                neighbour = (" / ".join(f"{statistics.median(rates[k]):.2f}" for k in POLICIES)
                             if condition == "busy" else "")
                print(f"| {name} | {condition} | {ours:.2f} s | {default:.2f} s | {ours / default:.2f}x "
                      f"| {neighbour} |", flush=True)


if __name__ == "__main__":
    main()
