"""Reproduce one of the paper's tables: train (or reuse), test and evaluate every row, then write it.

    python reproduce.py --table II                     # Table II with the paper's recipe (GPU: days)
    python reproduce.py --table IV --budget cpu        # Table IV scaled down for a CPU
    python reproduce.py --table II --budget cpu --epochs 4 --rows "Inf-Net" "U-Net"
    python reproduce.py --table II --retrain           # ignore finished rows and trained runs
    torchrun --nproc_per_node=4 reproduce.py --table II   # every row trained on 4 GPUs (DDP)

Writes Results/tables/table_<X>.md and .csv (ours beside the paper's figures, Params / FLOPs at
352 x 352, the budget of each row). Finished rows and trained runs are reused, and an interrupted
run continues at the first unfinished row (training resumes from its checkpoint.pth). The stages
and folders are described in Code/model_lung_infection/tables.py. Rows are reused only for the same
inputs (data files, budget, seed, ImageNet files, recipe version): others get folders of their own.
Under torchrun every process trains each row in one process group; rank 0 alone tests, evaluates and
writes.
"""
import argparse
import dataclasses
import os
import warnings

from Code.model_lung_infection.cli import (
    TRAINING_PRECISION_HELP,
    ArgumentParser,
    add_bool,
    add_debug,
    add_runtime_args,
    positive_int,
    run_main,
)
from Code.model_lung_infection.table_plan import BUDGETS, TABLE_ROWS


def table_name(name):
    """The table option's type: Table V is named, with why it cannot be run, rather than only refused."""
    if name == "V":
        raise argparse.ArgumentTypeError(
            "Table V scores the models on 9 CT volumes (638 slices) that the COVID-SemiSeg data does not include, "
            "so it cannot be reproduced from it; choose II, III or IV (scans of your own: MyTest_LungInf.py "
            "--data_path, README 'CT volumes')")
    return name


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", required=True, type=table_name, choices=list(TABLE_ROWS),
                   help="the paper's table (Table V needs CT volumes that COVID-SemiSeg does not include)")
    p.add_argument("--budget", default="paper", choices=list(BUDGETS),
                   help="; ".join(f"{k}: {v.describe('semi')}, multi-class {v.multiclass_epochs} ep"
                                  + "".join(f" ({run}: {e})" for run, e in v.multiclass_row_epochs)
                                  for k, v in BUDGETS.items()))
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="override the budget's epochs (doctor-label training and Semi-Inf-Net step ii)")
    p.add_argument("--trainsize", type=positive_int, default=None, help="override the budget's train/test size")
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (names as in the table)")
    p.add_argument("--data_root", default="Dataset", help="folder laid out like Dataset/ (COVID-SemiSeg)")
    p.add_argument("--snapshot_root", default="Snapshots")
    p.add_argument("--results_root", default="Results/tables")
    p.add_argument("--imagenet_dir", default=None,
                   help="folder with the encoders' ImageNet files (res2net50_v1b_26w_4s-3cf99910.pth, "
                        "vgg16-397923af.pth, densenet161-8d451a50.pth, resnet50-0676ba61.pth), as the paper "
                        "initialised them; without it every encoder starts from random weights")
    add_bool(p, "--retrain", False, "train, test and evaluate every row again")
    add_bool(p, "--progress", True, "progress bars")
    add_runtime_args(p, defaults={"channels_last": None}, help={  # the rows train
        **TRAINING_PRECISION_HELP, "amp": TRAINING_PRECISION_HELP["amp"].replace(" (dtype: --amp_dtype)", "")})
    add_debug(p)
    a = p.parse_args(argv)
    names = [r.name for r in TABLE_ROWS[a.table]]
    unknown = [r for r in a.rows or () if r not in names]
    if unknown:  # said now, not after the rows before it have trained
        p.error(f"Table {a.table} has no row(s) {unknown}; rows: {', '.join(names)}")
    return a


def main(argv=None):
    a = parse_args(argv)
    budget = BUDGETS[a.budget]
    overrides = {k: v for k, v in (("epochs", a.epochs), ("trainsize", a.trainsize)) if v is not None}
    if overrides:
        budget = dataclasses.replace(budget, **overrides)  # the tag and the table state the change
    if not a.imagenet_dir and os.environ.get("RANK", "0") == "0":  # said once under torchrun
        warnings.warn("every encoder starts from RANDOM weights: no --imagenet_dir was given. Expect far lower "
                      "accuracy than the paper's (the tables say so).")
    from Code.model_lung_infection.tables import TableRunner  # PyTorch: after the arguments are parsed
    runner = TableRunner(budget, a.data_root, a.snapshot_root, a.results_root, a.retrain, a.device, a.amp,
                         a.channels_last, a.progress, imagenet_dir=a.imagenet_dir, num_workers=a.num_workers,
                         seed=a.seed)
    for path in runner.run_table(a.table, a.rows):  # missing data, bad weights: one line (cli.run_main)
        print(f"[reproduce] wrote {path}")


if __name__ == "__main__":
    run_main(main)
