"""The Inf-Net training recipe (paper Sec. III-A/IV-A, release `MyTrain_LungInf.py`).

Adam; every batch is trained at three scales {0.75, 1, 1.25} (sides rounded to multiples of 32),
one optimizer update per scale; deep-supervised loss (losses.py); gradient clipping by value;
learning rate x decay_rate every decay_epoch epochs. The loop itself is engine.Engine.

Opt-in options for training from scratch on a CPU budget (TrainConfig; off by default, the paper's
recipe unchanged): `val_split` held-out slices scored during training (validation.py), `augment`
(augment.py), `schedule` cosine and `warmup_epochs` (lr_factor), `progressive_size` (epoch_trainsize),
`ema` and `time_budget` (engine.py).

Stages (STAGES, `stage_config`): the runs of the paper as presets. `doctor` is Inf-Net on the 50
doctor-labelled slices; Semi-Inf-Net is `pseudo` (step i: the pseudo-labelled slices) followed by
`semi` (step ii: step i's weights fine-tuned on the doctor labels).
"""

import math

import torch
import torch.nn.functional as F

from .augment import augment_batch, batch_generator
from .checkpoint import extract_state_dict, load_checkpoint
from .configs import (  # noqa: F401 -- the recipe's options, defined with every config
    DOCTOR_LABEL,
    PSEUDO_LABEL,
    SCALES,
    STAGES,
    TEST_SIZE,
    Stage,
    TrainConfig,
    scaled_size,
    stage_config,
)
from .data import DataError, InfectionTrainSet, data_option, gray_matching_lut
from .encoders import check_encoder, freeze_encoder_to
from .engine import Engine, PretrainSampler, check_run_folder
from .errors import OptionError
from .losses import segmentation_loss
from .models import inf_net_backbone
from .registry import create_model
from .runtime import Distributed, seed_everything
from .validation import Validator, split_validation


def build_model(cfg):
    """The network a TrainConfig describes, its encoder from cfg.pretrained (an ImageNet file) if given."""
    return create_model(**cfg.architecture(), pretrained=cfg.pretrained)


def rescale_batch(tensors, size):
    return [t if tuple(t.shape[-2:]) == (size, size) else
            F.interpolate(t, size=(size, size), mode="bilinear", align_corners=True) for t in tensors]


def epoch_trainsize(cfg, epoch):
    """The training size of `epoch`: cfg.trainsize, or with --progressive_size, growing linearly from it
    to trainsize over the first half of the epochs (multiples of 32): small early epochs are cheap, and
    a network from random weights first learns coarse shapes."""
    half = max(1, cfg.epoch // 2)
    if not cfg.progressive_size or epoch > half:
        return cfg.trainsize
    size = cfg.progressive_size + (cfg.trainsize - cfg.progressive_size) * (epoch - 1) / half
    return max(32, int(round(size / 32)) * 32)


def multi_scale_step(cfg):
    """The release's step: for each scale, resize the batch, forward, loss, one update
    (with --augment, the batch is first augmented; with --progressive_size, scales apply to the epoch's size)."""
    def step(engine, batch):
        images, gts, edges = engine.to_device(*batch)
        if cfg.augment:
            generator = batch_generator(cfg.seed, engine.epoch, engine.batch_index, engine.ddp.rank)
            images, gts, edges = augment_batch(images, gts, edges, generator)
        base = epoch_trainsize(cfg, engine.epoch)
        logged = None
        for rate in cfg.scales:
            x, g, e = rescale_batch((images, gts, edges), scaled_size(base, rate))
            with engine.autocast():
                outputs = engine.net(engine.images(x))
            loss, terms = segmentation_loss(outputs, g, e, cfg.release_bce)
            engine.optimize(loss)
            if logged is None or rate == 1.0:  # log the losses at the base scale
                logged = {"total": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
        return logged
    return step


def lr_factor(cfg, k):
    """The lr multiplier of epoch k + 1 (k epochs done): linear warm-up to 1 over the first warmup_epochs
    (lr/W, 2lr/W, ..., lr: large first updates from random weights diverge), then the paper's step
    (decay_rate every decay_epoch epochs), a cosine from 1 towards 0 over the remaining epochs, or
    (cosine-phases) one cosine over the pretraining epochs and another over the rest: Semi-Inf-Net's two steps,
    each from the full lr as the release's fine-tuning on the doctor labels started."""
    def cosine(done, total):
        return 0.5 * (1 + math.cos(math.pi * done / max(1, total)))

    warm, pretrain = cfg.warmup_epochs, cfg.pretrain_epochs
    if k < warm:
        return (k + 1) / warm
    if cfg.schedule == "cosine-phases":
        return cosine(k - warm, pretrain - warm) if k < pretrain else cosine(k - pretrain, cfg.epoch - pretrain)
    if cfg.schedule == "cosine":
        return cosine(k - warm, cfg.epoch - warm)
    return cfg.decay_rate ** (k // cfg.decay_epoch)


def build_scheduler(cfg, optimizer):
    """The paper's StepLR, unchanged, unless --schedule cosine or --warmup_epochs ask otherwise."""
    if cfg.schedule == "step" and not cfg.warmup_epochs and not cfg.fit_budget:
        # A true step schedule (lr * rate^(epoch // decay_epoch)); the release compounded its decay.
        # (lr_factor instead reads the config at every epoch: --fit_budget may shrink decay_epoch.)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.decay_epoch, gamma=cfg.decay_rate)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(cfg, k))


def load_init(model, cfg):
    """--init: the Inf-Net weights to fine-tune. Weights of another encoder are said with the --backbone they
    need, instead of a report of hundreds of keys."""
    state, name, config = extract_state_dict(cfg.init, mmap=True)
    trained = ((config.get("architecture") or {}).get("backbone") or config.get("backbone")
               or inf_net_backbone(state))
    if cfg.model == "inf_net" and trained and trained != cfg.backbone:
        raise OptionError(f"--init {name} holds Inf-Net weights with the {trained} encoder, and this run builds "
                          f"{cfg.backbone}: add --backbone {trained}")
    load_checkpoint(model, state)


def train(cfg: TrainConfig, model=None, dataset=None):
    """Train Inf-Net; returns the bare model. Snapshots and the resumable checkpoint go to cfg.run_dir.

    `dataset` (default: InfectionTrainSet(cfg.train_path)) lets a caller train on a chosen subset.
    """
    check_run_folder(cfg, clear=False)  # before reading data or building the model
    if cfg.model == "inf_net":
        check_encoder(cfg.backbone)
    seed_everything(cfg.seed)  # same seed on every DDP rank: identical initial weights
    if dataset is None:
        with data_option("--train_path", "Imgs/ and GT/"):
            dataset = InfectionTrainSet(cfg.train_path, cfg.trainsize)
    validate = None
    if cfg.val_split:
        if cfg.val_size is None:
            # Recorded in the config (and so kept on resume). Runs started before the default became the test
            # stage's size saved None and validated at trainsize; resumed, they go on doing so.
            cfg.val_size = cfg.trainsize if cfg.resume else TEST_SIZE
        dataset, validate = split_validation(cfg, dataset,
                                             lambda held: Validator([s[:3] for s in held], cfg.val_size))
    given = f"{len(dataset)} from {', '.join(map(str, cfg.train_path))}"
    dataset, sampler, pretrain = with_pretraining(cfg, dataset)
    if model is None:
        model = build_model(cfg)
    if cfg.init and not cfg.resume:  # a resumed run takes its weights from checkpoint.pth
        load_init(model, cfg)
    if cfg.freeze_encoder:  # before Engine: DDP hooks only the parameters that train
        freeze_encoder_to(model.resnet, cfg.freeze_encoder)
    engine = Engine(cfg, model)
    optimizer = torch.optim.Adam(engine.model.parameters(), cfg.lr)
    scheduler = build_scheduler(cfg, optimizer)
    held = f", {len(validate)} more held out for validation at {cfg.val_size} px" if validate is not None else ""
    return engine.fit(dataset, optimizer, scheduler, multi_scale_step(cfg), validate=validate, sampler=sampler,
                      describe=f" ({given}{held}{pretrain}); scales {cfg.scales}{opt_in_summary(cfg)}")


def with_pretraining(cfg, dataset):
    """(dataset, sampler, description) for --pretrain_path/--pretrain_epochs: Semi-Inf-Net's two steps
    (pseudo labels, then the doctor labels) in one run, so that both fit one --time_budget.

    Epochs 1..pretrain_epochs each visit as many pretraining slices as a training epoch has (so every
    epoch costs the same, and the lr schedule spans the whole run); the rest train on `dataset`.
    Without pretraining: (dataset, None, "")."""
    if not cfg.pretrain_epochs:
        return dataset, None, ""
    try:
        extra = InfectionTrainSet(cfg.pretrain_path, cfg.trainsize)
    except DataError as e:
        raise DataError(f"--pretrain_path: {e} (pass --pretrain_path with the folder of the slices to pretrain on, "
                        f"e.g. the release's Pseudo-label/, or --pretrain_epochs 0)") from e
    leaked = sorted(set(cfg.val_stems or ()) & {sample[0] for sample in extra.samples})
    if leaked:
        raise DataError(f"the held-out validation slices {', '.join(leaked)} are also in --pretrain_path "
                        f"{', '.join(cfg.pretrain_path)}: validation would score slices the run trains on; "
                        f"remove them from one of the two")
    matched = match_gray(extra, dataset) if cfg.pretrain_match_gray else ""
    samples = cfg.epoch_samples or len(dataset)
    ddp = Distributed()  # torchrun's world: each rank draws its shard
    sampler = PretrainSampler(len(dataset), len(extra), cfg, samples, ddp.world_size, ddp.rank, cfg.seed)
    return (torch.utils.data.ConcatDataset([dataset, extra]), sampler,
            f"; {len(extra)} in {', '.join(cfg.pretrain_path)}{matched}: epochs 1..{cfg.pretrain_epochs} pretrain "
            f"on {samples} of them per epoch, the rest train on the {len(dataset)}")


def match_gray(extra, dataset):
    """Give the pretraining set `extra` the gray-level table that maps its slices onto those of `dataset` (the
    training slices; a Subset leaves the held-out ones out). Returns what it does, for the log."""
    train = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    kept = dataset.indices if isinstance(dataset, torch.utils.data.Subset) else range(len(train))
    extra.gray_lut = gray_matching_lut([sample[1] for sample in extra.samples], [train.samples[i][1] for i in kept])
    shown = (64, 128, 192)
    return (f" (gray levels matched to the training slices': {'/'.join(map(str, shown))} -> "
            f"{'/'.join(str(int(extra.gray_lut[g])) for g in shown)})")


def opt_in_summary(cfg):
    """'; augment, ema 0.999, ...': the opt-in options a run uses, for its first log line."""
    used = {"recipe": cfg.recipe if cfg.recipe != "paper" else None, "augment": cfg.augment or None,
            "schedule": cfg.schedule if cfg.schedule != "step" else None, "warmup_epochs": cfg.warmup_epochs or None,
            "progressive_size": cfg.progressive_size, "ema": cfg.ema, "time_budget": cfg.time_budget,
            "fit_budget": cfg.fit_budget or None,
            "pretrain_epochs": cfg.pretrain_epochs or None,
            "freeze_encoder": cfg.freeze_encoder}
    shown = [k if v is True else f"{k} {v}" for k, v in used.items() if v is not None]
    return f"; {', '.join(shown)}" if shown else ""
