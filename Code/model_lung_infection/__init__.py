"""Inf-Net package: models (registry), encoders, data, losses, and the train / test stages.

Importing the package imports nothing heavy: the names below are loaded on first use (PEP 562), and
each network's libraries (timm, segmentation-models-pytorch) only when it is built.
"""
import importlib

# name -> module that defines it
_EXPORTS = {"Inf_Net": ".inf_net", "Inf_Net_UNet": ".unet", "FCN8s": ".fcn8s",
            "load_checkpoint": ".checkpoint", "save_release_weights": ".checkpoint",
            "create_model": ".registry", "list_models": ".registry", "MODELS": ".registry",
            "load_model": ".models"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
