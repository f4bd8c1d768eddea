"""Peak memory and time of one Inf-Net training step on the CPU, per precision and allocator setting.

One step is the paper recipe's batch: multi-scale (0.75, 1, 1.25 of --size), one forward, loss,
backward and Adam update per scale (bench_infnet.train_step, as train.py does it). Each variant runs in
a fresh process, so that its peak resident memory (ru_maxrss) is its own: it builds Inf-Net, makes
one step to warm up, then --steps timed steps, and reports the peak over all of them and the fastest
step. A --limit_gb caps each process's address space, so that a variant that needs more memory than
the machine has fails with a message instead of waking the kernel's OOM killer. The allocator: glibc's
malloc as torch leaves it, "huge pages" as the scripts set it (cli.py), "kept memory" as
--keep_freed_memory sets it (runtime.keep_freed_memory: later steps reuse what earlier ones freed, so
time them over a few --steps). --freeze_encoder 0 4 runs each variant with the whole network training and
with the encoder fixed up to stride 4 (train.py's --freeze_encoder), side by side. --edge_resize fused separate
compares the edge features' three resizes in one autograd node (layers.resize_to_each, what the model does)
with three separate interpolations (as released).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_train_memory.py --size 448 --batchsize 24
    python bench/bench_train_memory.py --size 128 --batchsize 2 --variants fp32 "bf16 + channels_last"
    OMP_WAIT_POLICY=PASSIVE python bench/bench_train_memory.py --size 352 --batchsize 24 --backbone mobilenetv2 \
        --steps 4 --variants "fp32 + channels_last" "fp32 + channels_last + huge pages" \
        "fp32 + channels_last + kept memory"
    OMP_WAIT_POLICY=PASSIVE python bench/bench_train_memory.py --size 352 --batchsize 24 --backbone mobilenetv2 \
        --steps 2 --variants "fp32 + channels_last + huge pages" --freeze_encoder 0 4
    OMP_WAIT_POLICY=PASSIVE python bench/bench_train_memory.py --size 352 --batchsize 24 --backbone mobilenetv2 \
        --steps 2 --variants "fp32 + channels_last + huge pages" --edge_resize separate fused
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# name: (bf16 autocast, channels-last, allocator): "glibc" as torch leaves it, "huge pages" as the scripts set
# it (cli.py: THP_MEM_ALLOC_ENABLE), "kept memory" as --keep_freed_memory sets it
VARIANTS = {"fp32": (False, False, "glibc"), "fp32 + channels_last": (False, True, "glibc"),
            "bf16 autocast": (True, False, "glibc"), "bf16 + channels_last": (True, True, "glibc"),
            "fp32 + channels_last + huge pages": (False, True, "huge pages"),
            "fp32 + channels_last + kept memory": (False, True, "kept memory"),
            "bf16 + channels_last + huge pages": (True, True, "huge pages"),
            "bf16 + channels_last + kept memory": (True, True, "kept memory")}


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def child(a):
    """Runs in the variant's own process; prints one JSON line."""
    if a.limit_gb:
        limit = int(a.limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    amp, channels_last, allocator = VARIANTS[a.child]
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if allocator == "huge pages" else "0"  # read by torch's allocator
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench_infnet import make_model, train_step

    from Code.model_lung_infection import inf_net, layers
    from Code.model_lung_infection.encoders import freeze_encoder_to
    from Code.model_lung_infection.runtime import keep_freed_memory
    from Code.model_lung_infection.train import SCALES
    if a.threads:
        torch.set_num_threads(a.threads)
    edge_resize = a.edge_resize[0]
    if edge_resize == "separate":
        inf_net.resize_to_each = lambda x, refs: [layers.upsample_to(x, r) for r in refs]
    if allocator == "kept memory" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory: not applied here (glibc's malloc only)")
    gen = torch.Generator().manual_seed(0)
    b, s = a.batchsize, a.size
    images = torch.randn(b, 3, s, s, generator=gen)
    gts = (torch.rand(b, 1, s, s, generator=gen) > 0.7).float()
    edges = (torch.rand(b, 1, s, s, generator=gen) > 0.95).float()
    model = make_model(backbone=a.backbone).train()
    if a.freeze:
        freeze_encoder_to(model.resnet, a.freeze)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    before = peak_gb()
    times = []
    for i in range(1 + a.steps):
        start = time.perf_counter()
        train_step(model, optimizer, images, gts, edges, SCALES, amp, channels_last)
        if i:
            times.append(time.perf_counter() - start)
    print(json.dumps({"variant": a.child, "freeze": a.freeze, "edge_resize": edge_resize, "model_gb": before,
                      "peak_gb": peak_gb(), "step_s": min(times), "median_s": sorted(times)[len(times) // 2]}))


def run_variant(name, freeze, edge_resize, a):
    cmd = [sys.executable, __file__, "--child", name, "--size", str(a.size), "--batchsize", str(a.batchsize),
           "--steps", str(a.steps), "--limit_gb", str(a.limit_gb), "--backbone", a.backbone, "--freeze", str(freeze),
           "--edge_resize", edge_resize]
    cmd += ["--threads", str(a.threads)] if a.threads else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": name, "freeze": freeze, "edge_resize": edge_resize,
                "error": f"exit {done.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batchsize", type=int, default=24)
    p.add_argument("--steps", type=int, default=1, help="timed steps after the warm-up step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backbone", default="res2net50_v1b_26w_4s", help="Inf-Net's encoder (e.g. mobilenetv2)")
    p.add_argument("--limit_gb", type=float, default=22.0,
                   help="address-space cap per variant (0: none); keep it below the machine's memory")
    p.add_argument("--variants", nargs="+", default=["fp32", "bf16 + channels_last"], choices=list(VARIANTS))
    p.add_argument("--freeze_encoder", nargs="+", type=int, default=[0], metavar="STRIDE",
                   help="run each variant with the encoder fixed up to each STRIDE (0: the whole network trains)")
    p.add_argument("--edge_resize", nargs="+", default=["fused"], choices=["fused", "separate"],
                   help="the edge features' resizes in one autograd node (the model's) or separately (as released)")
    p.add_argument("--freeze", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    print(f"one multi-scale training step of Inf-Net ({a.backbone}), batch {a.batchsize}, {a.size} px "
          f"(scales 0.75, 1, 1.25); {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}; "
          f"cap {a.limit_gb:g} GB per variant")
    print(f"  {'variant':<36s} {'frozen to':>9s} {'edges':>8s} {'peak GB':>8s} {'model GB':>9s} {'step s':>8s} "
          f"{'median s':>9s}")
    results = [run_variant(name, freeze, edges, a)
               for name in a.variants for freeze in a.freeze_encoder for edges in a.edge_resize]
    for r in results:
        frozen = f"stride {r['freeze']}" if r["freeze"] else "-"
        if "error" in r:
            print(f"  {r['variant']:<36s} {frozen:>9s} {r['edge_resize']:>8s} failed ({r['error']})")
        else:
            print(f"  {r['variant']:<36s} {frozen:>9s} {r['edge_resize']:>8s} {r['peak_gb']:8.2f} {r['model_gb']:9.2f} "
                  f"{r['step_s']:8.2f} {r['median_s']:9.2f}")


if __name__ == "__main__":
    main()
