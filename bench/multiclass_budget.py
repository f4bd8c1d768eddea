"""The smallest budget at which each Table III row's own recipe learns, found on held-out slices (issue 16).

For each Table III row (table_plan.TABLE_ROWS), runs MyTrain_MulClsLungInf_UNet.py with the row's network
and input (the slice, or slice + prior) and the release recipe (SGD lr 1e-2, momentum 0.7, batch 16,
constant lr) at the budget's size, on 45 of the 50 multi-class training slices (`--val_split 5`),
validating every K epochs up to --epochs. Then it reads each run's val.csv and prints, per row, the loss
and validation figures against epochs and the first validated epoch at which the row has LEARNED:

    both classes predicted where they are on some held-out slice (GGO Dice > 0 and consolidation
    Dice > 0), with the training loss below that of the first validation (falling). The report also
    gives the first epoch at which GGO alone is (consolidation covers a few percent of the pixels),
    and the training loss at every validation.

A network that has learned only the class frequencies labels every pixel background: both Dice are 0.
The release's learning rate is constant, so the first k epochs of a run are the k-epoch run: one run
per row gives every smaller budget (at the resolution of --val_every). The test set is never read.

    python bench/multiclass_budget.py --epochs 64 --val_every 8 --out Results/multiclass_budget.md
    python bench/multiclass_budget.py --rows FCN8s "DeepLabV3+ (stride=16)" --epochs 64
    python bench/multiclass_budget.py --rows FCN8s --epochs 128 --extend   # the same runs, 64 epochs more
    python bench/multiclass_budget.py --table_only --snapshot_root Snapshots/multiclass_budget
"""
import argparse
import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from Code.model_lung_infection.table_plan import TABLE_ROWS  # noqa: E402  (after the path is set)

ROWS = {row.name: row for row in TABLE_ROWS["III"]}


def run_name(row, seed):
    return f"budget-{row.run}-s{seed}"


def command(row, seed, a):
    """The MyTrain_MulClsLungInf_UNet.py command of one row's run (--extend: continue it to --epochs)."""
    if a.extend:
        return [sys.executable, str(ROOT / "MyTrain_MulClsLungInf_UNet.py"), "--resume", "--train_save",
                run_name(row, seed), "--snapshot_root", a.snapshot_root, "--epoch", str(a.epochs), "--no-progress"]
    return [sys.executable, str(ROOT / "MyTrain_MulClsLungInf_UNet.py"), "--arch", row.model,
            "--prior" if row.prior else "--no-prior", "--train_path", a.train_path, "--trainsize", str(a.trainsize),
            "--epoch", str(a.epochs), "--val_split", str(a.val_split), "--val_every", str(a.val_every),
            "--seed", str(seed), "--snapshot_root", a.snapshot_root, "--train_save", run_name(row, seed),
            "--save_every", str(a.epochs), "--no-progress", "--overwrite"] + a.args.split()


def read_curve(path):
    """[{epoch, loss, ggo, cons}] of a multi-class run's val.csv; [] if there is none yet."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"epoch": int(r["epoch"]), "minutes": float(r["minutes"]), "loss": float(r["train_loss"]),
                 "ggo": float(r["val_ggo_dice"]), "cons": float(r["val_cons_dice"])} for r in csv.DictReader(f)]


def first_learned(curve, classes=("ggo", "cons")):
    """The first validated epoch at which the row has learned (see the module docstring): the Dice of each
    of `classes` > 0, the training loss at most that of the first validation; None if never."""
    for point in curve:
        if point["loss"] <= curve[0]["loss"] and all(point[c] > 0 for c in classes):
            return point["epoch"]
    return None


def make_report(curves, a):
    """Markdown: per row the epoch it learns at, then its loss / GGO Dice / consolidation Dice per validation."""
    lines = [f"Release recipe at {a.trainsize} px, {a.val_split} of the training slices held out (`--val_seed "
             f"2020`), validated every {a.val_every} epochs.",
             "", "| row | learns at epoch | GGO alone from epoch | epochs run | minutes | loss: first → last | "
             "last GGO / cons. Dice |", "|---|---|---|---|---|---|---|"]
    for name, curve in curves.items():
        if not curve:
            lines.append(f"| {name} | – | – | 0 | – | – | – |")
            continue
        last = curve[-1]
        learned, ggo = (first_learned(curve, classes) or f"not within {last['epoch']}"
                        for classes in (("ggo", "cons"), ("ggo",)))
        lines.append(f"| {name} | {learned} | {ggo} | "
                     f"{last['epoch']} | {last['minutes']:.1f} | {curve[0]['loss']:.4f} → {last['loss']:.4f} | "
                     f"{last['ggo']:.3f} / {last['cons']:.3f} |")
    lines += ["", "Training loss (BCE), GGO Dice and consolidation Dice on the held-out slices, per validated "
                  "epoch:", ""]
    for name, curve in curves.items():
        if curve:
            lines.append(f"- {name}: " + "; ".join(f"ep {p['epoch']}: {p['loss']:.4f}, {p['ggo']:.3f}, {p['cons']:.3f}"
                                                   for p in curve))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                   help=f"Table III rows (default all): {', '.join(ROWS)}")
    p.add_argument("--epochs", type=int, default=64, help="the longest budget tried")
    p.add_argument("--val_every", type=int, default=8, help="the resolution of the budget found")
    p.add_argument("--val_split", type=int, default=5)
    p.add_argument("--trainsize", type=int, default=192, help="the cpu budget's size")
    p.add_argument("--seed", type=int, default=2020, help="the tables' seed")
    p.add_argument("--train_path", default=str(ROOT / "Dataset/TrainingSet/MultiClassInfection-Train"))
    p.add_argument("--snapshot_root", default="Snapshots/multiclass_budget")
    p.add_argument("--out", default=None, help="also write the report to this Markdown file")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--table_only", action="store_true", help="report the runs already done")
    p.add_argument("--extend", action="store_true",
                   help="continue the rows' finished runs to --epochs (the lr is constant: the same as a longer run)")
    p.add_argument("--args", default="", help="more MyTrain_MulClsLungInf_UNet.py options for every run")
    a = p.parse_args(argv)
    a.snapshot_root = str(Path(a.snapshot_root).resolve())  # the runs start in the repository root
    a.train_path = str(Path(a.train_path).resolve())
    return a


def main(argv=None):
    a = parse_args(argv)
    curves = {}
    for name in a.rows:
        row = ROWS[name]
        cmd = command(row, a.seed, a)
        if a.dry_run:
            print(" ".join(cmd))
            continue
        if not a.table_only:
            print(f"[budget] {name}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True, cwd=ROOT)
        curves[name] = read_curve(Path(a.snapshot_root) / "save_weights" / run_name(row, a.seed) / "val.csv")
    if a.dry_run:
        return
    report = make_report(curves, a)
    print(report)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(report)


if __name__ == "__main__":
    main()
