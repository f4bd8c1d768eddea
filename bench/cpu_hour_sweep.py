"""What does each opt-in option add on validation at a fixed wall-time budget? (issue 16)

Runs MyTrain_LungInf.py once per (option, seed), one after the other: the paper recipe, then each
option on top of it alone, every run with `--val_split 5 --val_every 1 --time_budget MINUTES`, and
prints (and writes, --out) a table of the final validation Dice per option and seed, its change
from the paper recipe, and Dice against minutes, read from each run's val.csv. Choices made from
this table are made on the held-out slices, never on the test set.

    python bench/cpu_hour_sweep.py --budget 60 --epoch 40 --seeds 1 2 --amp --channels_last
    python bench/cpu_hour_sweep.py --budget 0.2 --trainsize 64 --options paper augment --dry_run
    python bench/cpu_hour_sweep.py --table_only --snapshot_root Snapshots/cpu_hour_sweep   # re-read the runs
"""
import argparse
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# option name: the arguments it adds to the paper recipe (one at a time). Values are first guesses to
# compare, not choices: change them here or with --set NAME=ARGS.
OPTIONS = {
    "paper": [],
    "augment": ["--augment"],
    "cosine": ["--schedule", "cosine"],
    "warmup": ["--warmup_epochs", "2"],
    "ema": ["--ema", "0.99"],  # ~100 updates averaged: an hour on 45 slices gives a few hundred updates
    "progressive": ["--progressive_size", "224"],
}
MARKS = (0.25, 0.5, 0.75, 1.0)  # fractions of the budget at which Dice-against-minutes is read


def run_name(option, seed):
    return f"sweep-{option}-s{seed}"


def command(option, seed, a):
    """The MyTrain_LungInf.py command of one run of the sweep."""
    cmd = [sys.executable, str(ROOT / "MyTrain_LungInf.py"), "--train_save", run_name(option, seed),
           "--snapshot_root", a.snapshot_root, "--seed", str(seed), "--epoch", str(a.epoch),
           "--val_split", str(a.val_split), "--val_every", "1", "--time_budget", str(a.budget),
           "--trainsize", str(a.trainsize), "--batchsize", str(a.batchsize), "--no-progress", "--overwrite"]
    if a.train_path:
        cmd += ["--train_path", *a.train_path]
    return cmd + a.extra + OPTIONS[option]


def read_val_csv(path):
    """[(epoch, minutes, val_dice)] of a run's val.csv (engine.write_val_csv); [] if there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [(int(r["epoch"]), float(r["minutes"]), float(r["val_dice"])) for r in csv.DictReader(f)]


def dice_at(rows, minutes):
    """Validation Dice of the last validation done by `minutes` (None before the first)."""
    done = [dice for _, m, dice in rows if m <= minutes]
    return done[-1] if done else None


def _fmt(x):
    return "–" if x is None else f"{x:.4f}"


def make_table(runs, budget, baseline="paper"):
    """Markdown table from runs {option: {seed: val.csv path}}: per option, the final validation Dice of
    each seed, their mean, the change from `baseline`'s mean, and the mean Dice at MARKS of `budget` minutes."""
    seeds = sorted({s for per_seed in runs.values() for s in per_seed})
    finals, rows = {}, []
    for option, per_seed in runs.items():
        curves = {s: read_val_csv(p) for s, p in per_seed.items()}
        final = {s: (c[-1][2] if c else None) for s, c in curves.items()}
        done = [v for v in final.values() if v is not None]
        finals[option] = sum(done) / len(done) if done else None
        marks = []
        for frac in MARKS:
            at = [d for d in (dice_at(c, frac * budget) for c in curves.values()) if d is not None]
            marks.append(sum(at) / len(at) if at else None)
        epochs = max((c[-1][0] for c in curves.values() if c), default=None)
        rows.append((option, [final.get(s) for s in seeds], finals[option], marks, epochs))
    base = finals.get(baseline)
    head = (["option"] + [f"seed {s}" for s in seeds] + ["mean", f"vs {baseline}"] +
            [f"@{frac * budget:g} min" for frac in MARKS] + ["epochs"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for option, per_seed, mean, marks, epochs in rows:
        delta = None if mean is None or base is None else mean - base
        cells = ([option] + [_fmt(v) for v in per_seed] + [_fmt(mean), "–" if delta is None else f"{delta:+.4f}"] +
                 [_fmt(m) for m in marks] + [str(epochs) if epochs else "–"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, required=True, help="wall-time minutes per run (--time_budget)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS),
                   help="which runs (paper first: the others are compared with it)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=ARGS",
                   help="define or replace an option: e.g. --set 'ema=--ema 0.99'")
    p.add_argument("--epoch", type=int, default=100,
                   help="the run's --epoch (the budget usually stops it first; cosine and progressive count on it)")
    p.add_argument("--trainsize", type=int, default=352)
    p.add_argument("--batchsize", type=int, default=24)
    p.add_argument("--val_split", type=int, default=5)
    p.add_argument("--train_path", nargs="+", default=None)
    p.add_argument("--snapshot_root", default="Snapshots/cpu_hour_sweep")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--table_only", action="store_true", help="make the table from runs already done")
    p.add_argument("--amp", action="store_true", help="every run with --amp (bf16 on CPU)")
    p.add_argument("--channels_last", action="store_true", help="every run with --channels_last")
    p.add_argument("--args", default="", help="more MyTrain_LungInf.py options for every run, e.g. "
                   "'--epoch_samples 45 --num_workers 0'")
    a = p.parse_args(argv)
    for spec in a.set:
        name, _, args = spec.partition("=")
        OPTIONS[name] = args.split()
        if name not in a.options:
            a.options.append(name)
    a.snapshot_root = str(Path(a.snapshot_root).resolve())  # the runs start in the repository root
    a.extra = ["--amp"] * a.amp + ["--channels_last"] * a.channels_last + a.args.split()
    return a


def main(argv=None):
    a = parse_args(argv)
    runs = {}
    for option in a.options:
        for seed in a.seeds:
            cmd = command(option, seed, a)
            if a.dry_run:
                print(" ".join(cmd))
                continue
            if not a.table_only:
                print(f"[sweep] {option} seed {seed}: {' '.join(cmd)}", flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT)
            runs.setdefault(option, {})[seed] = Path(a.snapshot_root) / "save_weights" / run_name(option, seed) / \
                "val.csv"
    if a.dry_run:
        return
    table = make_table(runs, a.budget)
    print(table)
    if a.out:
        Path(a.out).write_text(f"Validation Dice ({a.val_split} held-out slices) at a {a.budget:g}-minute budget\n\n"
                               + table)


if __name__ == "__main__":
    main()
