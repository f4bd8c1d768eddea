"""The Inf-Net training recipe (paper Sec. III-A/IV-A, release `MyTrain_LungInf.py`).

Adam; every batch is trained at three scales {0.75, 1, 1.25} (sides rounded to multiples of 32),
one optimizer update per scale; deep-supervised loss (losses.py); gradient clipping by value;
learning rate x decay_rate every decay_epoch epochs. The loop itself is engine.Engine.

Stages (STAGES, `stage_config`): the runs of the paper as presets. `doctor` is Inf-Net on the 50
doctor-labelled slices; Semi-Inf-Net is `pseudo` (step i: the pseudo-labelled slices) followed by
`semi` (step ii: step i's weights fine-tuned on the doctor labels).
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .data import InfectionTrainSet
from .engine import Engine, RunConfig, check_run_folder
from .losses import segmentation_loss
from .registry import create_model

SCALES = (0.75, 1.0, 1.25)


@dataclass
class TrainConfig(RunConfig):
    train_path: List[str] = field(default_factory=lambda: ["Dataset/TrainingSet/LungInfection-Train/Doctor-label"])
    model: str = "inf_net"
    backbone: str = "res2net50_v1b_26w_4s"
    pretrained: Optional[str] = None      # ImageNet weights of the encoder, from disk
    init: Optional[str] = None            # start from these Inf-Net weights (fine-tuning)
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


DOCTOR_LABEL = "Dataset/TrainingSet/LungInfection-Train/Doctor-label"
PSEUDO_LABEL = "Dataset/TrainingSet/LungInfection-Train/Pseudo-label"


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


INF_NET_COMPONENTS = ("edge_attention", "partial_decoder", "reverse_attention")


def build_model(cfg):
    """The network a TrainConfig (or a checkpoint's saved config, a dict) describes.

    Inf-Net takes its encoder and component switches; the single-map baselines of Table II
    (unet, unetplusplus, attention_unet, ...) only their optional ImageNet file."""
    c = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    name = c.get("model", "inf_net")
    if name == "inf_net":
        return create_model(name, backbone=c.get("backbone", TrainConfig.backbone), pretrained=c.get("pretrained"),
                            **{k: c.get(k, True) for k in INF_NET_COMPONENTS})
    return create_model(name, pretrained=c.get("pretrained"))


def scaled_size(trainsize, rate):
    """Multi-scale side length, rounded to a multiple of 32 (as released)."""
    return int(round(trainsize * rate / 32) * 32)


def rescale_batch(tensors, size):
    return [t if tuple(t.shape[-2:]) == (size, size) else
            F.interpolate(t, size=(size, size), mode="bilinear", align_corners=True) for t in tensors]


def multi_scale_step(cfg):
    """The release's step: for each scale, resize the batch, forward, loss, one update."""
    def step(engine, batch):
        images, gts, edges = engine.to_device(*batch)
        logged = None
        for rate in cfg.scales:
            x, g, e = rescale_batch((images, gts, edges), scaled_size(cfg.trainsize, rate))
            with engine.autocast():
                outputs = engine.net(engine.images(x))
            loss, terms = segmentation_loss(outputs, g, e, cfg.release_bce)
            engine.optimize(loss)
            if logged is None or rate == 1.0:  # log the losses at the base scale
                logged = {"total": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        return logged
    return step


def train(cfg: TrainConfig, model=None, dataset=None):
    """Train Inf-Net; returns the bare model. Snapshots and the resumable checkpoint go to cfg.run_dir.

    `dataset` (default: InfectionTrainSet(cfg.train_path)) lets a caller train on a chosen subset.
    """
    check_run_folder(cfg)  # before reading data or building the model
    torch.manual_seed(cfg.seed)  # same seed on every DDP rank: identical initial weights
    if dataset is None:
        dataset = InfectionTrainSet(cfg.train_path, cfg.trainsize)
    if model is None:
        model = build_model(cfg)
    if cfg.init and not cfg.resume:  # a resumed run takes its weights from checkpoint.pth
        load_checkpoint(model, cfg.init)
    engine = Engine(cfg, model)
    optimizer = torch.optim.Adam(engine.model.parameters(), cfg.lr)
    # A true step schedule (lr * rate^(epoch // decay_epoch)); the release compounded its decay.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.decay_epoch, gamma=cfg.decay_rate)
    return engine.fit(dataset, optimizer, scheduler, multi_scale_step(cfg),
                      describe=f" from {', '.join(map(str, cfg.train_path))}; scales {cfg.scales}")
