"""Command-line helpers shared by the entry-point scripts."""
import argparse
import math
import os
import sys
import warnings

from .configs import LR_SCHEDULES, MAX_SEED, TEST_SIZE, is_path_component
from .errors import UserError

# OpenMP threads that sleep when idle. With libgomp's default they first spin, and on a CPU shared with another
# run (the test stage beside a training run) the spinning threads take the cores from both: the 48 test slices
# took 7.1 s instead of 5.0 s here, with the same time on a quiet machine (bench/bench_wait_policy.py). libgomp
# reads it when torch loads it, so this comes before every script imports torch; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# PyTorch's CPU allocator backs each block of 2 MB or more with transparent huge pages when this is set (where the
# kernel allows them: /sys/kernel/mm/transparent_hugepage/enabled is madvise or always). glibc unmaps a freed block
# above 32 MB, most of a training step's activations, and the next step faults its pages in again; in 2 MB pages
# that is 512x fewer faults: a MobileNetV2 Inf-Net training step (batch 24, three scales, fp32, 2 cores) took
# 21.8-23.7 s instead of 26.6-28.1 s, with the same peak memory (docs/results.md, "Memory the steps keep").
# PyTorch reads it once, at its first CPU tensor; a value the user set is kept (0: off).
THP_SET_BY_USER = "THP_MEM_ALLOC_ENABLE" in os.environ
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def choose_cpu_allocator(keep_freed_memory):
    """Huge pages, or with --keep_freed_memory none: called by the training scripts after parsing and before
    PyTorch allocates its first tensor. Huge pages align every large block to 2 MB, and in a heap that is never
    trimmed the alignment gaps add up, for no faster step: the fp32 hour of --recipe cpu-hour-imagenet with both
    held 20.5 GB after 7 minutes, with kept memory alone 15.1-15.9 GB. A value the user set wins."""
    if keep_freed_memory and not THP_SET_BY_USER:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "0"

# What a user can fix: printed as one line, not a traceback (run_main).
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (`prog: error: ... (see --help)`), exit status 2,
    without the usage text that scripts with many options spread over a screen."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def add_debug(parser):
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


def run_main(main, argv=None, exit_when_done=False):
    """Run a script's `main(argv)`: a user error prints `error: ...` on one line and exits 2, a warning
    `warning: ...` on one line; Ctrl-C prints
    what was saved and how to continue (if the stage says) and exits 130. `--debug` (or INFNET_DEBUG=1)
    shows the traceback instead.

    exit_when_done: once `main` has returned, end the process at once (`exit_now`), for scripts whose
    outputs are all written and closed when main returns (the test stage)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("INFNET_DEBUG", "") not in ("", "0")
    try:
        with warnings.catch_warnings():
            if not debug:  # each warning one line, as errors are (not Python's file:line and source line)
                warnings.showwarning = _one_line_warning
            result = main(argv)
        if exit_when_done:
            exit_now()
        return result
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"interrupted{': ' + one_line(e) if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def exit_now(code=0):
    """End the process with `code` once stdout and stderr are flushed, skipping the interpreter's teardown:
    after `import torch` that teardown takes 0.3 s (freeing its thousands of modules), 8% of the test stage
    on the 48 test slices. Only for a finished script: atexit handlers and open files' buffers are skipped."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def one_line(error):
    """An exception's message on one line (OSError's 'strerror: filename' included)."""
    if isinstance(error, OSError) and error.filename and str(error.filename) not in str(error.args[0]):
        text = f"{error.strerror or error.args[0]}: {error.filename}"
    else:
        text = str(error.args[0]) if len(error.args) == 1 else str(error)
    return " ".join(text.split())


def path_component(value):
    """argparse type of --train_save / --snapshot_prefix: one name that stays under --snapshot_root."""
    if not is_path_component(value):
        raise argparse.ArgumentTypeError(f"expected one folder or file name (no '/', '\\', '..', empty or "
                                         f"absolute path: it names a folder under --snapshot_root), got {value!r}")
    return value


def positive_int(value):
    """argparse type: an integer >= 1 (batch sizes, epochs, sizes)."""
    return _bounded(value, int, 1, "an integer >= 1")


def nonnegative_int(value):
    return _bounded(value, int, 0, "an integer >= 0")


def positive_float(value):
    return _bounded(value, float, None, "a number > 0", strict=True)


def nonnegative_float(value):
    return _bounded(value, float, 0, "a number >= 0")


def _bounded(value, kind, low, what, strict=False):
    try:
        v = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got '{value}'") from None
    # nan passes no comparison and inf passes every lower bound: both would train NaN weights
    if not math.isfinite(v) or (strict and not v > 0) or (low is not None and v < low):
        raise argparse.ArgumentTypeError(f"expected {what}, got '{value}'")
    return v


def seed(value):
    """argparse type: a seed, an integer from 0 to MAX_SEED (torch's generators take 64 bits)."""
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got '{value}'") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to {MAX_SEED}, got '{value}'")
    return v


def str2bool(value):
    """'True'/'False', 'yes'/'no', '1'/'0', 'on'/'off' -> bool (argparse's type=bool reads 'False' as True)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("true", "t", "yes", "y", "1", "on"):
        return True
    if v in ("false", "f", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got '{value}'")


def add_bool(parser, name, default, help):
    """`--name`, `--name True`, `--name False` and `--no-name` all work."""
    dest = name.lstrip("-").replace("-", "_")
    parser.add_argument(name, dest=dest, type=str2bool, nargs="?", const=True, default=default,
                        metavar="BOOL", help=f"{help} (default: {default})")
    parser.add_argument("--no-" + name.lstrip("-"), dest=dest, action="store_false", help=argparse.SUPPRESS)


RUNTIME_DEFAULTS = {"device": "auto", "amp": None, "channels_last": False, "num_workers": None, "seed": 2020}
RUNTIME_HELP = {
    "device": "auto (CUDA if present), cpu, cuda, cuda:1 ...",
    "amp": "mixed precision: float16 on CUDA, bfloat16 on CPU; default on for CUDA only",
    "channels_last": "channels-last memory format (faster on recent CPUs and GPUs)",
    "num_workers": "data-loading processes (default 4 on CUDA, 0 on CPU)",
    "seed": None,
}


def add_runtime_args(parser, defaults=None, help=None):
    """Device, precision and reproducibility options common to training and testing.

    `defaults` / `help`: {option name: value} replacing those of RUNTIME_DEFAULTS / RUNTIME_HELP, for a
    script whose defaults differ (e.g. the test stage's channels-last)."""
    d = {**RUNTIME_DEFAULTS, **(defaults or {})}
    h = {**RUNTIME_HELP, **(help or {})}
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", default=d["device"], help=h["device"])
    add_bool(g, "--amp", d["amp"], h["amp"])
    add_bool(g, "--channels_last", d["channels_last"], h["channels_last"])
    g.add_argument("--num_workers", type=nonnegative_int, default=d["num_workers"], help=h["num_workers"])
    g.add_argument("--seed", type=seed, default=d["seed"], help=h["seed"])
    return g


def add_run_args(parser, defaults):
    """Options of every training run (engine.RunConfig): snapshots, resume, progress, runtime."""
    parser.add_argument("--save_every", type=positive_int, default=defaults.save_every,
                        help="snapshot every N epochs (and the last)")
    add_bool(parser, "--resume", False, "continue the run from Snapshots/save_weights/<train_save>/checkpoint.pth")
    add_bool(parser, "--overwrite", False, "start again even if the run folder has a checkpoint")
    add_bool(parser, "--progress", True, "progress bar")
    parser.add_argument("--epoch_samples", type=positive_int, default=defaults.epoch_samples,
                        help="CPU budget: each epoch trains on this many slices (successive epochs continue "
                             "through a seeded shuffle of the set) instead of all of them")
    parser.add_argument("--max_steps", type=positive_int, default=None, help=argparse.SUPPRESS)
    g = add_runtime_args(parser, defaults={"channels_last": None}, help=TRAINING_PRECISION_HELP)
    add_training_runtime_args(g)
    add_bool(g, "--sync_bn", None, "SyncBatchNorm under DDP: BatchNorm statistics over the global batch, as on one "
                                   "GPU; unset: on for CUDA DDP (CPU DDP has no SyncBatchNorm)")


def add_training_runtime_args(group):
    """--amp_dtype and --deterministic (RunConfig), for every script that trains."""
    group.add_argument("--amp_dtype", choices=["bfloat16", "float16"], default=None,
                       help="autocast dtype of training (implies --amp); unset: bfloat16 where the device has it "
                            "natively, float16 with a GradScaler on older GPUs; float16 runs on CPUs too")
    add_bool(group, "--keep_freed_memory", False, "CPU training on glibc (Linux): malloc keeps the memory a step "
                                                  "frees for the next instead of giving it back to the kernel: "
                                                  "steps 16-20%% faster than with huge pages (which it turns off), "
                                                  "peak memory up to 1.6x (fragments); for this session only: a "
                                                  "resumed run does not inherit it")
    add_bool(group, "--deterministic", False, "deterministic CUDA kernels where PyTorch has them (cuDNN, cuBLAS); "
                                              "bilinear upsampling's backward has none, so CUDA runs stay approximate")


# Training's defaults (runtime.training_precision): None = chosen by the device
TRAINING_PRECISION_HELP = {
    "amp": "mixed precision (dtype: --amp_dtype); unset: on for CUDA and for CPUs with native bf16 "
           "(AVX512-BF16, AMX), off elsewhere",
    "channels_last": "channels-last memory format; unset: on for CPUs (faster in fp32 too), off for CUDA"}


def add_train_args(parser, defaults, from_preset=()):
    """The Inf-Net recipe's options (train.TrainConfig), declared once for MyTrain_LungInf.py and
    PseudoGenerator.py. `defaults`: a TrainConfig giving the defaults; `from_preset`: options whose
    default (None) comes from the script's preset (MyTrain_LungInf.py's --stage)."""
    def default(name):
        return None if name in from_preset else getattr(defaults, name)

    def preset_help(name, text=None):
        return "; ".join(t for t in (text, "default from --stage" if name in from_preset else None) if t) or None

    g = parser.add_argument_group("training recipe")
    g.add_argument("--snapshot_root", default=defaults.snapshot_root)
    g.add_argument("--train_save", type=path_component, default=default("train_save"),
                   help=preset_help("train_save", "run name: <snapshot_root>/save_weights/<train_save>/"))
    g.add_argument("--epoch", type=positive_int, default=default("epoch"), help=preset_help("epoch"))
    g.add_argument("--lr", type=positive_float, default=defaults.lr)
    g.add_argument("--batchsize", type=positive_int, default=default("batchsize"),
                   help=preset_help("batchsize", "global batch size (split over DDP processes)"))
    g.add_argument("--trainsize", type=positive_int, default=defaults.trainsize)
    g.add_argument("--clip", type=nonnegative_float, default=defaults.clip, help="gradient clipping by value (0: none)")
    g.add_argument("--decay_rate", type=positive_float, default=defaults.decay_rate)
    g.add_argument("--decay_epoch", type=positive_int, default=defaults.decay_epoch,
                   help="lr *= decay_rate every decay_epoch epochs")
    add_bool(g, "--multi_scale", True, "train each batch at scales 0.75, 1 and 1.25")
    add_bool(g, "--release_bce", False, "unweighted BCE, as the released code effectively computed")
    return g


def _as_options(preset):
    """A --recipe preset {field: value} as the command-line options it stands for."""
    out = []
    for name, value in preset.items():
        if isinstance(value, bool):
            out.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, list):
            out += [f"--{name}", *map(str, value)]
        else:
            out += [f"--{name}", f"{value:g}" if isinstance(value, float) else str(value)]
    return out


def decay(value):
    """argparse type: an EMA decay, strictly between 0 and 1."""
    v = positive_float(value)
    if not v < 1:
        raise argparse.ArgumentTypeError(f"expected a decay between 0 and 1 (e.g. 0.999), got '{value}'")
    return v


def add_validation_args(parser, defaults,
                        scores="Dice at 0.5, MAE and the toolbox's mean Dice over 256 thresholds (the paper's "
                               "figure), as the test stage predicts",
                        example="e.g. 5 of the 50 doctor-labelled, the paper's 45/5 split"):
    """--val_split / --val_seed / --val_every / --time_budget (RunConfig's opt-in fields, issue 16): every
    trainer that holds slices out for validation takes them."""
    g = parser.add_argument_group(
        "validation and budget (opt-in)",
        "Hold out training slices to choose options without looking at the test set, and stop on wall time.")
    g.add_argument("--val_split", type=nonnegative_int, default=defaults.val_split, metavar="N",
                   help=f"hold out N training slices (chosen by --val_seed, recorded in the checkpoint so a resumed "
                        f"run keeps them; {example}); they are not trained on and are scored every --val_every "
                        f"epochs: {scores}, printed, logged to TensorBoard and written to <run>/val.csv")
    g.add_argument("--val_seed", type=seed, default=defaults.val_seed,
                   help="chooses the held-out slices; independent of --seed so that seeds share one split")
    g.add_argument("--val_every", type=positive_int, default=defaults.val_every, metavar="K",
                   help="validate every K epochs (and after the last)")
    g.add_argument("--time_budget", type=positive_float, default=defaults.time_budget, metavar="MINUTES",
                   help="stop after the epoch that crosses this wall time (from the run's start, resumed time "
                        "included), saving snapshots as at the last epoch; set --epoch to the epochs expected to "
                        "fit, which schedules over the epochs count on")
    return g


def add_cpu_budget_args(parser, defaults, recipes=()):
    """Opt-in options for training from random weights on a small budget (issue 16), MyTrain_LungInf.py's.
    Every default is the paper's recipe; each option is recorded in the run's config."""
    budget = add_validation_args(parser, defaults)
    budget.add_argument("--val_size", type=positive_int, default=defaults.val_size, metavar="PX",
                        help=f"score the held-out slices resized to PX (default: {TEST_SIZE}, the size the test stage "
                             "resizes to unless MyTest_LungInf.py is told otherwise, so that runs trained at "
                             "different --trainsize compare as they will be tested; a run keeps its size on resume)")
    add_bool(budget, "--fit_budget", defaults.fit_budget,
             "with --time_budget: when the epochs so far show that --epoch will not fit the budget on this machine, "
             "shrink --epoch and, in proportion, --pretrain_epochs (and the step schedule's --decay_epoch), so that "
             "the lr schedule and both training steps end within it (re-estimated after every epoch from the "
             "second, so a slow start is made up for; never beyond --epoch). Without it the budget cuts the run off "
             "wherever it is")
    g = parser.add_argument_group(
        "training from random weights (opt-in; the paper's recipe has none of these)",
        "Options meant for CPU budgets without ImageNet weights; --recipe bundles them.")
    presets = "; ".join(f"{name}: " + (" ".join(_as_options(v)) or "none of them") for name, v in recipes.items())
    g.add_argument("--recipe", choices=list(recipes) or ["paper"], default=defaults.recipe,
                   help=f"a preset of options ({presets}); options given explicitly win")
    add_bool(g, "--augment", defaults.augment,
             "random horizontal/vertical flips, rotation within 10 degrees, scale 0.9-1.1 (the same on image, GT "
             "and edge) and brightness/contrast jitter of 10 percent, seeded by (seed, epoch, batch) so --resume "
             "stays exact: 50 slices are few for a network from random weights")
    g.add_argument("--schedule", choices=LR_SCHEDULES, default=defaults.schedule,
                   help="learning-rate schedule: step (the paper's: x decay_rate every decay_epoch epochs), cosine "
                        "(from lr towards 0 over --epoch, after the warm-up), which suits short runs, or "
                        "cosine-phases (one cosine over the --pretrain_epochs, another from lr over the rest, as "
                        "Semi-Inf-Net's fine-tuning restarted at the full lr)")
    g.add_argument("--warmup_epochs", type=nonnegative_int, default=defaults.warmup_epochs, metavar="N",
                   help="raise the lr linearly over the first N epochs (lr/N, 2lr/N, ..., lr): large first updates "
                        "of a randomly initialised network can diverge")
    g.add_argument("--ema", type=decay, default=defaults.ema, metavar="DECAY",
                   help="keep an exponential moving average of the weights, updated after every optimizer update "
                        "(it spans about 1/(1-DECAY) updates: e.g. 0.99, as an hour on 45 slices makes a few hundred):"
                        " smoother than the last weights of a short noisy run; used for validation "
                        "and saved as <prefix>-ema-<epoch>.pth beside each snapshot (the raw weights keep training)")
    g.add_argument("--progressive_size", type=positive_int, default=defaults.progressive_size, metavar="START",
                   help="train at START px first, growing linearly to --trainsize over the first half of the epochs "
                        "(multiples of 32): early epochs are cheaper and coarse shapes come first")
    g.add_argument("--pretrain_path", nargs="+", default=defaults.pretrain_path, metavar="DIR",
                   help="folder(s) of extra labelled slices (Imgs/, GT/, Edge/), e.g. the release's 1600 pseudo "
                        "labels (Dataset/TrainingSet/LungInfection-Train/Pseudo-label) that the first "
                        "--pretrain_epochs train on before --train_path: Semi-Inf-Net's pre-training and "
                        "fine-tuning in one run and one --time_budget")
    g.add_argument("--pretrain_epochs", type=nonnegative_int, default=defaults.pretrain_epochs, metavar="N",
                   help="epochs 1..N train on --pretrain_path, each on as many slices as a --train_path epoch "
                        "has (continuing through the set: every epoch costs the same); the rest on --train_path")
    add_bool(g, "--pretrain_match_gray", defaults.pretrain_match_gray,
             "map the --pretrain_path slices' gray levels onto the --train_path slices' (histogram matching of "
             "their pooled histograms; held-out slices left out): the release's pseudo-labelled slices were "
             "exported with another display window, darker than the doctor-labelled and test slices")
    return g


def given_options(build_parser, argv):
    """The dests of the options given explicitly in `argv` (a default, even an equal one, is not given).

    `build_parser()` makes a fresh parser whose every default is then set (argparse's public set_defaults)
    to a marker: what parses to something else was on the command line."""
    parser, unset = build_parser(), object()  # not a string: argparse converts string defaults with `type`
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), unset))
    return {k for k, v in vars(parser.parse_args(argv)).items() if v is not unset}


def config_from_args(config_class, args, **overrides):
    """A config dataclass filled from the parsed options that share its field names."""
    fields = set(config_class.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(overrides)
    return config_class(**values)
