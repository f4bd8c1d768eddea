"""CPU speed of Inf-Net (Res2Net-50): inference seconds per slice and training seconds per image.

The training figures take another encoder with --backbone (e.g. mobilenetv2, cpu-hour-imagenet's).

(a) inference at 352 x 352, batch 1, per slice: fp32 eager (the release's path), + channels-last,
    + fused Conv-BN (`prepare_for_inference`), + torch.compile (with --compile), and the same with
    bf16 autocast.
(b) training at 352, batch 4, per image: one forward + backward + Adam step at 352 only, and one
    full multi-scale step (0.75, 1, 1.25 -> 256, 352, 448; three optimizer steps, as in training)
    divided by the batch size; fp32 vs channels-last vs bf16 autocast (+ channels-last).

Variants run in the same process, interleaved (A, B, C, A, B, C, ...), and the minimum over
--repeats is reported, so a background load slows them alike. Targets (issue 3, 2-core machine):
inference <= 0.065 s/slice, training <= 0.25 s/image; the released code took 0.13 and 0.36.

    python bench/bench_infnet.py --threads 2 --repeats 5 [--compile] [--skip_train]

On a machine shared with other busy processes, run it with OMP_WAIT_POLICY=PASSIVE: OpenMP's
default busy-waiting makes every parallel region wait for a descheduled thread, which slowed a
64 x 64 forward pass 45-fold (3.7 s instead of 0.08 s) next to a training run on 2 cores.
"""
import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from Code.model_lung_infection import Inf_Net  # noqa: E402
from Code.model_lung_infection.fast_inference import prepare_for_inference  # noqa: E402
from Code.model_lung_infection.losses import inf_net_loss  # noqa: E402
from Code.model_lung_infection.runtime import autocast  # noqa: E402
from Code.model_lung_infection.train import SCALES, rescale_batch, scaled_size  # noqa: E402

CPU = torch.device("cpu")


def load_report(label):
    load1, load5, _ = os.getloadavg()
    cores = os.cpu_count()
    state = "LOADED (timings pessimistic, other processes share the cores)" if load1 > 0.5 * cores else "idle"
    print(f"[{label}] load average {load1:.2f} (1 min) {load5:.2f} (5 min) on {cores} cores: {state}", flush=True)


def interleaved(variants, repeats, warmup=1):
    """{name: (min wall seconds, min CPU seconds)} of calling each fn, interleaved across variants.

    CPU seconds (this process, all threads) are barely affected by other processes taking the
    cores: with --threads 1 they estimate the wall time of an idle core.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {name: [] for name in variants}, {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {name: (min(wall[name]), min(cpu[name])) for name in variants}


def make_model(seed=0, backbone="res2net50_v1b_26w_4s"):
    torch.manual_seed(seed)
    return Inf_Net(backbone=backbone)


def bench_inference(args):
    model = make_model().eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    fused = prepare_for_inference(model, channels_last=True, fuse_bn=True)
    fused_nchw = prepare_for_inference(model, channels_last=False, fuse_bn=True)

    def call(m, inp, amp):
        def fn():
            with torch.inference_mode(), autocast(CPU, amp):
                m(inp)
        return fn

    variants = {
        "fp32 eager (release path)": call(model, x, False),
        "fp32 + channels_last": call(cl, x_cl, False),
        "fp32 + fused BN": call(fused_nchw, x, False),
        "fp32 + channels_last + fused BN": call(fused, x_cl, False),
        "bf16 autocast": call(model, x, True),
        "bf16 + channels_last": call(cl, x_cl, True),
        "bf16 + channels_last + fused BN": call(fused, x_cl, True),
    }
    if args.compile:
        for amp in (False, True):
            compiled = prepare_for_inference(model, channels_last=True, fuse_bn=True, compile=True)
            start = time.perf_counter()
            call(compiled, x_cl, amp)()
            name = f"{'bf16' if amp else 'fp32'} + channels_last + fused BN + compile"
            print(f"  compile time ({name}): {time.perf_counter() - start:.1f} s", flush=True)
            variants[name] = call(compiled, x_cl, amp)

    with torch.inference_mode():
        base = model(x)[3]
        err = (fused(x_cl)[3] - base).abs().max().item()
    print(f"  fused + channels_last vs eager fp32: max abs diff of S_3 {err:.2e} (random weights)")
    best = interleaved(variants, args.repeats)
    ref_wall, ref_cpu = best["fp32 eager (release path)"]
    print(f"(a) inference, {args.size} x {args.size}, batch 1, seconds per slice (min of {args.repeats}); "
          "speed-up vs the release path; that ratio applied to the release's 0.13 s on an idle 2-core machine:")
    print(f"  {'':<50s} {'wall':>8s} {'speedup':>8s} {'CPU':>8s} {'speedup':>8s} {'0.13/x':>8s}")
    for name, (wall, cpu) in best.items():
        est = 0.13 * cpu / ref_cpu
        print(f"  {name:<50s} {wall:8.4f} {ref_wall / wall:7.2f}x {cpu:8.4f} {ref_cpu / cpu:7.2f}x {est:8.3f}"
              f"  {'<= 0.065 target' if est <= 0.065 else ''}")


def train_step(model, optimizer, images, gts, edges, scales, amp, channels_last, clip=0.5):
    """One batch of `train.train`'s loop: one optimizer step per scale."""
    for rate in scales:
        x, g, e = rescale_batch((images, gts, edges), scaled_size(images.shape[-1], rate))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with autocast(CPU, amp):
            outputs = model(x)
        loss, _ = inf_net_loss([o.float() for o in outputs], g, e)
        loss.backward()
        torch.nn.utils.clip_grad_value_(model.parameters(), clip)
        optimizer.step()
    return loss


def bench_training(args):
    gen = torch.Generator().manual_seed(0)
    b, s = args.batchsize, args.size
    images = torch.randn(b, 3, s, s, generator=gen)
    gts = (torch.rand(b, 1, s, s, generator=gen) > 0.7).float()
    edges = (torch.rand(b, 1, s, s, generator=gen) > 0.95).float()
    setups = {"fp32": (False, False), "fp32 + channels_last": (False, True),
              "bf16 autocast": (True, False), "bf16 + channels_last": (True, True)}
    if args.train_variants:
        setups = {k: v for k, v in setups.items() if k in args.train_variants}
    variants = {}
    for name, (amp, cl) in setups.items():
        model = make_model(backbone=args.backbone).train()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), 1e-4)
        for scales, label in (((1.0,), f"{s} only"), (SCALES, "multi-scale")):
            variants[(name, label)] = (lambda m=model, o=opt, sc=scales, a=amp, c=cl:
                                       train_step(m, o, images, gts, edges, sc, a, c))
    best = interleaved(variants, args.train_repeats)
    _, ref_cpu = best[("fp32", "multi-scale")] if ("fp32", "multi-scale") in best else next(iter(best.values()))
    print(f"(b) training, batch {b}, seconds per image (min of {args.train_repeats}; one step / batch size); "
          "the CPU-time ratio to fp32 multi-scale applied to the release's 0.36 s on an idle 2-core machine:")
    print(f"  {'':<38s} {'wall':>8s} {'CPU':>8s} {'speedup':>8s} {'0.36/x':>8s}")
    for (name, label), (wall, cpu) in best.items():
        est = 0.36 * cpu / ref_cpu
        mark = "<= 0.25 target" if label == "multi-scale" and est <= 0.25 else ""
        print(f"  {name:<24s} {label:<13s} {wall / b:8.4f} {cpu / b:8.4f} {ref_cpu / cpu:7.2f}x {est:8.3f}  {mark}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    p.add_argument("--repeats", type=int, default=5, help="inference repeats per variant")
    p.add_argument("--train_repeats", type=int, default=3, help="training repeats per variant")
    p.add_argument("--size", type=int, default=352)
    p.add_argument("--batchsize", type=int, default=4)
    p.add_argument("--backbone", default="res2net50_v1b_26w_4s",
                   help="Inf-Net's encoder for the training figures (e.g. mobilenetv2, cpu-hour-imagenet's)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (compiles twice: fp32, bf16)")
    p.add_argument("--skip_infer", action="store_true")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--train_variants", nargs="*", default=None,
                   help="subset of: 'fp32' 'fp32 + channels_last' 'bf16 autocast' 'bf16 + channels_last'")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}; {os.cpu_count()} cores; {torch.get_num_threads()} threads; "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    load_report("start")
    policy = os.environ.get("OMP_WAIT_POLICY")
    print(f"OMP_WAIT_POLICY={policy or '(unset: active)'}" +
          ("" if policy or os.getloadavg()[0] <= 0.5 * os.cpu_count() else
           "  -- machine loaded: consider OMP_WAIT_POLICY=PASSIVE (see the docstring)"))
    if not args.skip_infer:
        bench_inference(args)
        load_report("after inference")
    if not args.skip_train:
        bench_training(args)
        load_report("after training")


if __name__ == "__main__":
    main()
