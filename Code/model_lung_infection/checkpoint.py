"""Checkpoint IO: release-format weights, our resumable training checkpoints, atomic writes.

Release format: a bare `state_dict()` (what `Inf-Net-100.pth` holds). Our training
checkpoints are dicts with the weights under "model" plus optimizer, epoch and RNG states.
Every error while reading or fitting weights is a CheckpointError naming the file, on one line.
"""
import os
import zipfile
from collections import OrderedDict

import torch

from .atomic import atomic_write
from .errors import CheckpointError


def atomic_save(obj, path):
    """torch.save, atomically: a crash never leaves half a checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def unwrap(model):
    """The bare model inside DistributedDataParallel / DataParallel / torch.compile."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def to_cpu(obj):
    """`obj` with every tensor copied to the CPU (dicts, lists and tuples rebuilt, a state dict's _metadata
    kept): what is saved from a GPU run, so that a plain torch.load reads it on a machine without that GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)((k, to_cpu(v)) for k, v in obj.items())
        if getattr(obj, "_metadata", None) is not None:
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_release_weights(model, path):
    """Save weights in the release format (a bare state dict of CPU tensors), atomically."""
    atomic_save(to_cpu(unwrap(model).state_dict()), path)


# A state dict passed in memory, when nothing says which file it came from.
UNNAMED = "<state dict>"


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No file at the given path (also a FileNotFoundError, for callers that test for one)."""


class NamedStateDict(OrderedDict):
    """A state dict that remembers the file it was read from, so a later error names that file."""

    source_name = UNNAMED

    def __reduce__(self):
        # saved as a plain OrderedDict, so the file loads with torch.load(weights_only=True)
        plain = OrderedDict(self)
        plain.__dict__.update({k: v for k, v in self.__dict__.items() if k != "source_name"})
        return plain.__reduce__()


def _named(state, name):
    named = NamedStateDict(state)
    metadata = getattr(state, "_metadata", None)  # module versions, used by load_state_dict
    if metadata is not None:
        named._metadata = metadata
    named.source_name = name
    return named


def _reason(error, limit=160):
    """The first sentence of an exception's message, shortened: torch's unpickling errors run to pages."""
    if isinstance(error, KeyError) and error.args and isinstance(error.args[0], int):
        # the unpickler looked up a number read off the file's first bytes: not a checkpoint at all
        return "its bytes are neither a zip archive nor a pickle"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = (lines[0] if lines else type(error).__name__).split(". ")[0]
    return text if len(text) <= limit else text[:limit] + "..."


def read_checkpoint(path, mmap=False):
    """torch.load of a weights or training-checkpoint file (on the CPU, weights only), with errors that
    name the file: CheckpointError (a missing file is also a FileNotFoundError)."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise MissingCheckpointError(f"no weights at {name}: the file does not exist (train a model first, "
                                     f"or give the path of a trained one)")
    if os.path.isdir(name):
        raise CheckpointError(f"no weights at {name}: it is a folder; give the path of a .pth / .pkl file in it")
    # mmap: tensors read from the page cache as they are used (files in the pre-1.6 format cannot be mapped)
    mmap = mmap and zipfile.is_zipfile(name)
    try:
        return torch.load(name, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{name} cannot be read as a PyTorch checkpoint (truncated or not a checkpoint): "
                              f"{_reason(e)}") from e


def extract_state_dict(source, name=None, mmap=False):
    """(weights, name, config) from a path, a release state dict, a DataParallel one or our checkpoint.

    `config` is the training config our checkpoints carry ({} for release files). `name` is the file
    the weights came from: the path itself, the `name` given, or the one a state dict returned by this
    function remembers; the weights returned remember it too, so `load_checkpoint(model, weights)`
    names the file in its errors.
    """
    if isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        source = read_checkpoint(name, mmap)
    name = name or getattr(source, "source_name", UNNAMED)
    if not isinstance(source, dict):
        raise CheckpointError(f"{name} holds a {type(source).__name__}, not a state dict; expected network "
                              f"weights (a state dict, or our checkpoint.pth)")
    config = source.get("config", {}) if isinstance(source.get("config"), dict) else {}
    if "model" in source and isinstance(source["model"], dict):
        source = source["model"]  # our training checkpoint
    elif "state_dict" in source and isinstance(source["state_dict"], dict):
        source = source["state_dict"]
    if source and all(k.startswith("module.") for k in source):
        source = OrderedDict((k[len("module."):], v) for k, v in source.items())
    return _named(source, name), name, config


def _few(items, n=8):
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def key_mismatches(own, state):
    """(missing, unexpected, mis-shaped) keys of the weights `state` against a model's own state dict."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shapes


def check_fit(name, kind, missing=(), unexpected=(), shapes=(), expected=None):
    """The one report of weights that do not fit a network: a CheckpointError naming the file (`name`), the
    network (`kind`) and the keys; nothing when all three lists are empty."""
    problems = [f"{len(items)} {what} ({_few(list(items))})" for what, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
    expected = expected or f"{kind} weights with the same options (encoder, components, channels) as the network built"
    if problems:
        raise CheckpointError(f"{name} does not fit {kind}: {'; '.join(problems)}; expected {expected}")


def load_checkpoint(model, source, name=None, assign=False):
    """Strictly load weights into `model`; any missing, unexpected or mis-shaped key is a CheckpointError
    naming the file (`source` if a path, else `name`, else the file a state dict from extract_state_dict
    remembers) and the keys. assign=True makes the file's tensors the model's (for a model built on the
    meta device, see models.read_model)."""
    state, name, _ = extract_state_dict(source, name)
    model = unwrap(model)
    check_fit(name, type(model).__name__, *key_mismatches(model.state_dict(), state))
    # nn.Module's own method: some libraries' modules override load_state_dict with other semantics
    torch.nn.Module.load_state_dict(model, state, strict=True, assign=assign)
    return model
