"""Inf-Net package: models (registry), encoders and checkpoint IO."""
from .checkpoint import load_checkpoint, save_release_weights
from .inf_net import Inf_Net
from .registry import MODELS, create_model, list_models

__all__ = ["Inf_Net", "load_checkpoint", "save_release_weights", "create_model", "list_models", "MODELS"]
