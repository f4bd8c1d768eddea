"""Inf-Net package: models (registry), encoders, data, losses, and the train / test stages."""
from . import attention_unet, smp_models  # noqa: F401 -- register the Table II/III baselines
from .checkpoint import load_checkpoint, save_release_weights
from .fcn8s import FCN8s
from .inf_net import Inf_Net
from .registry import MODELS, create_model, list_models
from .unet import Inf_Net_UNet

__all__ = ["Inf_Net", "Inf_Net_UNet", "FCN8s", "load_checkpoint", "save_release_weights",
           "create_model", "list_models", "MODELS"]
