"""Command line: python -m EvaluationTool --gt_root ... --pred_root ... --models A B, or --from_mat FILE.mat ..."""
import argparse
import os
import sys
import warnings
from pathlib import Path

from .folder import (
    EvaluationError,
    evaluate_folder,
    extra_line,
    fixed_line,
    release_line,
    safe_name,
    write_per_image_csv,
)
from .report import MULTICLASS, average, write_binary_reports, write_multiclass_reports
from .toolbox_mat import curve_line, read_toolbox_mat


def _at_least_one(value):
    """argparse type of --workers: an integer >= 1 (0 or less reached the thread pool as a traceback)."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value!r}")
    return n


def default_dataset(gt_root, task):
    gt_root = Path(gt_root).resolve()
    if task == "binary" and gt_root.name == "GT":
        return gt_root.parent.name     # .../LungInfection-Test/GT -> LungInfection-Test
    return gt_root.name


def run(gt_root, pred_root, models, task="binary", dataset=None, save_dir="EvaluateResults",
        em_strict=False, workers=None, out=print):
    """Evaluate each model, print the release-format lines and write the reports.

    Returns {model: summary} for the binary task, {model: {class: summary, 'Average': ...}}
    for the multi-class one.
    """
    dataset = dataset or default_dataset(gt_root, task)
    save_dir = Path(save_dir)
    results = {}
    for model in models:
        if task == "binary":
            s = evaluate_folder(gt_root, Path(pred_root) / model, em_strict, workers, dataset, model)
            write_per_image_csv(s, save_dir / f"{safe_name(dataset)}_{safe_name(model)}_per_image.csv")
            out(release_line(s))
            out(extra_line(s))
            out(fixed_line(s))
            results[model] = s
            continue
        per_class = {}
        for c, (cls, gt_name) in enumerate(MULTICLASS, start=1):
            s = evaluate_folder(Path(gt_root) / gt_name, Path(pred_root) / cls / model,
                                em_strict, workers, f"{dataset}-{c}", model)
            write_per_image_csv(s, save_dir / f"{safe_name(dataset)}-{c}_{safe_name(model)}_per_image.csv")
            out(f"[{cls}] " + release_line(s))
            out(extra_line(s))
            out(fixed_line(s))
            per_class[cls] = s
        per_class["Average"] = avg = average([per_class[cls] for cls, _ in MULTICLASS])
        out("[Average] " + release_line(avg, dataset, model))
        results[model] = per_class

    if task == "binary":
        paths = write_binary_reports(results, dataset, save_dir)
    else:
        paths = write_multiclass_reports(results, dataset, [cls for cls, _ in MULTICLASS], save_dir)
    out("Reports: " + ", ".join(str(p) for p in paths))
    return results


def print_while_read(line):
    """print, and once the reader of stdout has gone (`... | head -1`), nothing more: the reports are still
    written, instead of the run ending half-done on a broken pipe."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the unflushed rest goes nowhere too


class _OneLineErrors(argparse.ArgumentParser):
    """Usage errors on one line (the package's cli.ArgumentParser; not imported: it would load torch)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def parse_args(argv=None):
    p = _OneLineErrors(
        prog="python -m EvaluationTool",
        description="Inf-Net evaluation (Dice, Sen, Spe, Prec, S-alpha, E-phi, MAE) with the "
                    "definitions of the released MATLAB toolbox.")
    p.add_argument("--gt_root",
                   help="GT folder (binary), or the MultiClassInfection-Test folder holding GT-1 "
                        "and GT-2 (multiclass)")
    p.add_argument("--pred_root",
                   help="folder with one sub-folder of PNG maps per model (multiclass: "
                        "'Ground-glass opacities/<model>' and 'Consolidation/<model>')")
    p.add_argument("--models", nargs="+", help="model sub-folder names")
    p.add_argument("--from_mat", nargs="+", metavar="MAT",
                   help="instead of maps: result files saved by the MATLAB toolbox's main.m (<dataset>-<c>-mat/"
                        "<model>.mat, as papers publish them); prints their release line and Dice, Sen, Spe at "
                        "128/255 read from their curves")
    p.add_argument("--dataset", type=_file_name,
                   help="name in the report and of its files (default: taken from --gt_root)")
    p.add_argument("--task", choices=("binary", "multiclass"), default="binary")
    p.add_argument("--save_dir", default="EvaluateResults", help="where reports are written")
    p.add_argument("--em_strict", action="store_true",
                   help="binarise with pred > t for E-phi (one main.m revision) instead of >=")
    p.add_argument("--workers", type=_at_least_one, default=None, help="threads (default: up to 4)")
    p.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    args = p.parse_args(argv)
    maps = [f"--{name}" for name in ("gt_root", "pred_root", "models") if getattr(args, name) is not None]
    if args.from_mat and maps:
        p.error(f"--from_mat reads saved results, not maps: leave out {', '.join(maps)}")
    if not args.from_mat and len(maps) < 3:
        p.error("give --gt_root, --pred_root and --models (or --from_mat with the toolbox's .mat files)")
    return args


def show_mat_files(paths, dataset=None, out=print):
    """Print the release line and the fixed-threshold line of each toolbox result file; returns the summaries."""
    summaries = [read_toolbox_mat(path, dataset) for path in paths]  # all read before any line is printed
    for s in summaries:
        out(release_line(s))
        out(curve_line(s))
    return summaries


def _file_name(value):
    """--dataset names the report files: one file name, refused otherwise (never rewritten silently)."""
    if value in ("", ".", "..") or any(c in value for c in "/\\\0") or Path(value).is_absolute():
        raise argparse.ArgumentTypeError(f"{value!r} must be one file name (no '/', '\\', '..' or absolute path): "
                                         f"it names the report files in --save_dir")
    return value


def check_roots(gt_root, pred_root, task):
    """The two roots exist: said before anything is evaluated, with the option that names each."""
    gt_what = "GT folder" if task == "binary" else "MultiClassInfection-Test folder (holding GT-1 and GT-2)"
    for option, path, what, hint in (
            ("--gt_root", gt_root, gt_what, "check the path"),
            ("--pred_root", pred_root, "prediction root", "write the maps first (MyTest_LungInf.py / "
                                                          "MyTest_MulClsLungInf_UNet.py) or check the path")):
        if not Path(path).is_dir():
            raise EvaluationError(f"{option}: {what} not found: {path}; {hint}")


def check_save_dir(save_dir):
    """Reports can be written to --save_dir: said before anything is evaluated."""
    save_dir = Path(save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise EvaluationError(f"--save_dir {save_dir} is a file; give a folder for the reports")
    folder = next((p for p in (save_dir, *save_dir.parents) if p.exists()), Path("."))
    if not os.access(folder, os.W_OK):
        raise EvaluationError(f"--save_dir {save_dir}: {folder} is not writable; give another folder")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


# What a user can fix: one line on stderr and exit status 2 (the same contract as
# Code/model_lung_infection/cli.run_main, kept here so the toolbox runs without PyTorch).
USER_ERRORS = (EvaluationError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv=None):
    """Run the command line; returns 0, or 2 after printing a user error on one line (130 on Ctrl-C).
    `--debug` (or INFNET_DEBUG=1) shows the traceback instead."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    debug = args.debug or os.environ.get("INFNET_DEBUG", "") not in ("", "0")
    try:
        if args.from_mat:
            show_mat_files(args.from_mat, args.dataset, out=print_while_read)
            return 0
        check_roots(args.gt_root, args.pred_root, args.task)
        check_save_dir(args.save_dir)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning  # each warning one line, as errors are
            run(args.gt_root, args.pred_root, args.models, args.task, args.dataset, args.save_dir,
                args.em_strict, args.workers, out=print_while_read)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # writing the reports: a read-only folder, a full disk
        if debug:
            raise
        print(f"error: cannot write the reports: {err.strerror or err}: {err.filename or args.save_dir}; give a "
              f"writable --save_dir with free space", file=sys.stderr)
        return 2
    return 0
