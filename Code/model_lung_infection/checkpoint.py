"""Checkpoint IO: release-format weights, our resumable training checkpoints, atomic writes.

Release format: a bare `state_dict()` (what `Inf-Net-100.pth` holds). Our training
checkpoints are dicts with the weights under "model" plus optimizer, epoch and RNG states.
"""
import os

import torch

from .atomic import atomic_write


def atomic_save(obj, path):
    """torch.save, atomically: a crash never leaves half a checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def unwrap(model):
    """The bare model inside DistributedDataParallel / DataParallel / torch.compile."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def save_release_weights(model, path):
    """Save weights in the release format (a bare state dict), atomically."""
    atomic_save(unwrap(model).state_dict(), path)


def extract_state_dict(source, name="<state dict>"):
    """(weights, name, config) from a path, a release state dict, a DataParallel one or our checkpoint.

    `config` is the training config our checkpoints carry ({} for release files).
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"checkpoint not found: {name}")
        try:
            source = torch.load(name, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{name}: not a readable PyTorch checkpoint ({e})") from e
    if not isinstance(source, dict):
        raise ValueError(f"{name}: expected a state dict, got {type(source).__name__}")
    config = source.get("config", {}) if isinstance(source.get("config"), dict) else {}
    if "model" in source and isinstance(source["model"], dict):
        source = source["model"]  # our training checkpoint
    elif "state_dict" in source and isinstance(source["state_dict"], dict):
        source = source["state_dict"]
    if source and all(k.startswith("module.") for k in source):
        source = {k[len("module."):]: v for k, v in source.items()}
    return source, name, config


def load_checkpoint(model, source):
    """Strictly load weights into `model`; any missing, unexpected or mis-shaped key is an error naming it."""
    state, name, _ = extract_state_dict(source)
    model = unwrap(model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")
        lines = [f"{name} does not fit {type(model).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {few(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {few(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {few(shapes)}")
        raise ValueError("\n".join(lines))
    # nn.Module's own method: some libraries' modules override load_state_dict with other semantics
    torch.nn.Module.load_state_dict(model, state, strict=True)
    return model
