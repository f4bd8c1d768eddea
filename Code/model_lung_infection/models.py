"""One loader for every checkpoint we accept: `load_model(path_or_state, **overrides)`.

What to build is read, in this order, from
- our checkpoint.pth: its config records the architecture (`config["architecture"]`: the registry
  name and `create_model`'s arguments; older checkpoints: the training config's fields);
- a release-format file (a bare state dict) by its keys (RELEASE_FORMATS): the multi-class U-Net
  (`unet_model_200.pkl`: `inc.*`, channels and classes from its shapes), FCN8s (`features.*` +
  `fc6.*`), and Inf-Net (`resnet.*`; its encoder and component switches read off the keys).
`expect` ("binary": one infection map; "multiclass": the three classes) says what the caller can
use: a file of another kind, or one recognised as neither, is a CheckpointError naming it.
`overrides` (e.g. `backbone=`) replace recorded values; None values are ignored.
"""
import functools
import itertools
from typing import NamedTuple

import torch

from .checkpoint import extract_state_dict, load_checkpoint
from .configs import INF_NET_COMPONENTS, MULTICLASS_ARCHS, TrainConfig
from .errors import CheckpointError
from .registry import ENCODERS, create_model

KINDS = {"binary": "an infection-segmentation network (one map)",
         "multiclass": "a multi-class network (background, GGO, consolidation)"}
N_CLASSES = {"binary": 1, "multiclass": 3}


def inf_net_components(state):
    """Inf-Net's component switches read off its weights (release-format files carry no config)."""
    return {"partial_decoder": not any(k.startswith("backbone_head.") for k in state),
            "reverse_attention": any(k.startswith("ra4_conv1.") for k in state),
            "edge_attention": any(k.startswith("edge_conv1.") for k in state)}


def _release_unet(state):
    return {"name": "unet_multiclass", "in_channels": int(state["inc.double_conv.0.weight"].shape[1]),
            "num_classes": int(state["outc.conv.weight"].shape[0])}


def _release_fcn8s(state):
    return {"name": "fcn8s", "in_channels": int(state["features.0.weight"].shape[1]),
            "num_classes": int(state["score_fr.weight"].shape[0]), "fc_width": int(state["fc6.weight"].shape[0])}


@functools.lru_cache(maxsize=None)
def _encoder_shapes(backbone):
    """{key: shape} of an Inf-Net's encoder (`resnet.*`) with this backbone, built on the meta device (no weights)."""
    with torch.device("meta"):
        model = create_model("inf_net", backbone=backbone)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("resnet.")}


def inf_net_backbone(state):
    """The registered encoder whose keys and shapes are the file's `resnet.*` ones: a snapshot of a run with
    another --backbone tests without repeating it. The default first; None when none fits (the default is built
    and the key report names what does not fit)."""
    found = {k: tuple(v.shape) for k, v in state.items() if k.startswith("resnet.")}
    default = TrainConfig.backbone
    return next((name for name in (default, *(n for n in ENCODERS.names() if n != default))
                 if _encoder_shapes(name) == found), None)


def _release_inf_net(state):
    return {"name": "inf_net", "in_channels": 3, "num_classes": 1, "backbone": inf_net_backbone(state),
            **inf_net_components(state)}


# (kind, recognised by, architecture): release-format files, tried in order
RELEASE_FORMATS = (
    ("multiclass", lambda s: "inc.double_conv.0.weight" in s, _release_unet),
    ("multiclass", lambda s: "features.0.weight" in s and "fc6.weight" in s, _release_fcn8s),
    # a binary file with no config is an Inf-Net (the release's, or our snapshots); a file of another
    # network then fails to load with the keys that do not fit
    ("binary", lambda s: True, _release_inf_net),
)


def _legacy_architecture(config):
    """The architecture of a checkpoint.pth written before configs recorded it."""
    if config.get("arch") in MULTICLASS_ARCHS:
        arch = {"name": MULTICLASS_ARCHS[config["arch"]], "in_channels": 6 if config.get("prior", True) else 3,
                "num_classes": 3}
        return {**arch, "fc_width": config.get("fc_width", 4096)} if config["arch"] == "fcn8s" else arch
    if config.get("model"):
        arch = {"name": config["model"], "in_channels": 3, "num_classes": 1}
        if config["model"] == "inf_net":
            arch.update(backbone=config.get("backbone"), **{k: config.get(k, True) for k in INF_NET_COMPONENTS})
        return arch
    return None


def kind_of(architecture):
    return "binary" if architecture.get("num_classes", 1) == 1 else "multiclass"


def architecture_of(state, name, config, expect=None):
    """{"name": registry name, "in_channels", "num_classes", **options} of a checkpoint (module docstring)."""
    arch = config.get("architecture") or _legacy_architecture(config)
    if arch is None:
        arch = next((build(state) for kind, recognised, build in RELEASE_FORMATS
                     if (expect in (None, kind)) and recognised(state)), None)
        if arch is None:
            raise CheckpointError(f"{name}: neither a multi-class U-Net nor an FCN8s checkpoint (other architectures: "
                                  f"give their checkpoint.pth, which records the architecture)")
    if expect and kind_of(arch) != expect:
        raise CheckpointError(f"{name} holds a {arch['name']} with {arch.get('num_classes')} classes; expected "
                              f"{KINDS[expect]}")
    return {k: v for k, v in arch.items() if v is not None}


class Loaded(NamedTuple):
    model: object        # the network with its weights, in eval mode
    architecture: dict   # what was built (create_model's arguments)
    config: dict         # the training config of our checkpoint.pth ({} for release files)
    name: str            # the file the weights came from


def read_model(source, *, expect=None, device="cpu", **overrides):
    """`load_model`, with what was built and the checkpoint's config (see `Loaded`)."""
    state, name, config = extract_state_dict(source, mmap=True)  # the model takes the file's tensors as they are
    arch = {**architecture_of(state, name, config, expect), **{k: v for k, v in overrides.items() if v is not None}}
    return Loaded(_build_with(arch, state).to(device).eval(), arch, config, name)


def _build_with(arch, state):
    """The network of `arch` holding the weights `state`. It is built on the meta device (no random
    initialisation of weights that the file replaces: a third of a one-slice test's model set-up), then
    takes the file's tensors; a network with tensors the file does not hold is built as usual."""
    with torch.device("meta"):
        model = create_model(**arch)
    load_checkpoint(model, state, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = load_checkpoint(create_model(**arch), state)
    return model


def load_model(source, *, expect=None, device="cpu", **overrides):
    """The network of any checkpoint we accept (a path, or a state dict from extract_state_dict), with its
    weights, on `device`, in eval mode. See the module docstring for what is recognised."""
    return read_model(source, expect=expect, device=device, **overrides).model
