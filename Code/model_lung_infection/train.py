"""The Inf-Net training recipe (paper Sec. III-A/IV-A, release `MyTrain_LungInf.py`).

Adam; every batch is trained at three scales {0.75, 1, 1.25} (sides rounded to multiples of 32),
one optimizer update per scale; deep-supervised loss (losses.py); gradient clipping by value;
learning rate x decay_rate every decay_epoch epochs. The loop itself is engine.Engine.

Stages (STAGES, `stage_config`): the runs of the paper as presets. `doctor` is Inf-Net on the 50
doctor-labelled slices; Semi-Inf-Net is `pseudo` (step i: the pseudo-labelled slices) followed by
`semi` (step ii: step i's weights fine-tuned on the doctor labels).
"""

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .configs import (  # noqa: F401 -- the recipe's options, defined with every config
    DOCTOR_LABEL,
    PSEUDO_LABEL,
    SCALES,
    STAGES,
    Stage,
    TrainConfig,
    stage_config,
)
from .data import InfectionTrainSet
from .engine import Engine, check_run_folder
from .losses import segmentation_loss
from .registry import create_model
from .runtime import seed_everything


def build_model(cfg):
    """The network a TrainConfig describes, its encoder from cfg.pretrained (an ImageNet file) if given."""
    return create_model(**cfg.architecture(), pretrained=cfg.pretrained)


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
    seed_everything(cfg.seed)  # same seed on every DDP rank: identical initial weights
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
