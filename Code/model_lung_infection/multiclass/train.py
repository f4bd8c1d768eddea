"""Multi-class training (paper Sec. III-C): the recipes and the trainer on engine.Engine.

Recipes (`recipe=`):
- "release" (default): what `MyTrain_MulClsLungInf_UNet.py` ran -- input 352, PyTorch's default
  initialisation, sigmoid + BCE against the one-hot targets, SGD lr 1e-2, momentum 0.7, no weight
  decay, constant learning rate, batch 16, 200 epochs, a snapshot every 10 epochs.
- "paper": the paper's text -- input 512 x 512, Xavier initialisation, SGD lr 1e-10, momentum 0.99,
  weight decay 5e-4 (batch size and epochs as released: the paper gives none).
Any of trainsize / lr / momentum / weight_decay / init given explicitly overrides the recipe.

BCE is computed from the logits (`binary_cross_entropy_with_logits`), the numerically stable form
of the release's `BCELoss(sigmoid(x))`; the values are the same up to float rounding (the release's
BCELoss clamps log at -100, which only matters for saturated outputs).
"""

import torch
import torch.nn.functional as F

from ..configs import ARCHS, INITS, RECIPES, MultiClassConfig, run_name  # noqa: F401 -- the recipes
from ..data import data_option
from ..engine import Engine, check_run_folder
from ..registry import create_model
from ..runtime import seed_everything
from ..validation import split_validation
from .data import MultiClassTrainSet
from .validation import MultiClassValidator


def build_model(cfg: MultiClassConfig):
    """The multi-class network of `cfg`: initialised by its recipe, then its ImageNet encoder file if given."""
    return create_model(**cfg.architecture(), init=cfg.init, pretrained=cfg.pretrained)


def bce_step(engine, batch):
    """One update: sigmoid + BCE of the logits against the one-hot targets (mean over all)."""
    x, target = engine.to_device(*batch)
    with engine.autocast():
        logits = engine.net(engine.images(x))
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    engine.optimize(loss)
    return {"bce": loss.detach()}


def train(cfg: MultiClassConfig, model=None):
    """Train the multi-class network; returns the bare model. Snapshots
    (`<snapshot_root>/save_weights/<train_save>/<prefix>-<epoch>.pth`, release format), the resumable
    checkpoint and TensorBoard logs are written by engine.Engine."""
    check_run_folder(cfg, clear=False)  # an existing run or a missing checkpoint: said before reading any data
    seed_everything(cfg.seed)  # same seed on every DDP rank: identical initial weights
    with data_option("--train_path", "Imgs/, GT/ and Prior/"):
        dataset = MultiClassTrainSet(cfg.train_path, cfg.trainsize, cfg.prior, cfg.binarize_prior)
    validate, held = None, ""
    if cfg.val_split:
        dataset, validate = split_validation(cfg, dataset, lambda samples: MultiClassValidator(
            samples, cfg.trainsize, cfg.prior, cfg.binarize_prior))
        held = f"; {len(validate)} held out for validation"
    if model is None:
        model = build_model(cfg)
    engine = Engine(cfg, model)
    optimizer = torch.optim.SGD(engine.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)  # constant, as released
    inputs = "slice + prior (6 ch)" if cfg.prior else "slice only (3 ch)"
    return engine.fit(dataset, optimizer, scheduler, bce_step, validate=validate,
                      describe=f" from {cfg.train_path}{held}; {cfg.arch}, {inputs}; recipe {cfg.recipe} "
                               f"(size {cfg.trainsize}, SGD lr {cfg.lr:g} momentum {cfg.momentum:g} "
                               f"wd {cfg.weight_decay:g}, init {cfg.init})")
