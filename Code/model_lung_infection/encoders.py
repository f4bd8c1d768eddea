"""Encoders for Inf-Net: any timm CNN that yields features at strides 4, 8, 16 and 32.

Inf-Net taps four levels: the low-level feature f2 (stride 4, edge branch) and the
high-level f3, f4, f5 (strides 8, 16, 32; RFB, decoder and reverse attention).
An encoder is a plain timm model (kept whole, so its state-dict keys stay those of
the released checkpoints, e.g. `resnet.layer1.0.conv1.weight`) plus the indices of
its feature taps. Nothing is downloaded: ImageNet weights come from a local file.
"""
import sys

from .checkpoint import check_fit, extract_state_dict, key_mismatches
from .errors import OptionError
from .registry import ENCODERS

STRIDES = (4, 8, 16, 32)


def _import_timm():
    """timm, imported when the first encoder is built (the package itself imports fast).

    timm imports huggingface_hub, and with it an HTTP stack (a quarter of a second here), only to
    download weights, which this project never does; so unless something imported huggingface_hub
    already, timm is imported with it unavailable (timm then simply has no hub downloads), and it is
    importable again right after."""
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


@ENCODERS.register("res2net50_v1b_26w_4s")
def res2net50_v1b_26w_4s(**kw):
    # timm's res2net50d is the release's Res2Net-50 v1b 26w*4s: same keys, shapes and outputs.
    # The release kept the unused ImageNet classifier (`resnet.fc.*`), so we do too (same 946 keys),
    # frozen: it never gets a gradient, and DistributedDataParallel fails on trainable parameters
    # that get none.
    model = _timm("res2net50d", keep_classifier=True, **kw)
    model.fc.requires_grad_(False)
    return model


@ENCODERS.register("resnet50")
def resnet50(**kw):
    return _timm("resnet50", **kw)


@ENCODERS.register("vgg16")
def vgg16(**kw):
    # Stride 32 is pool5 of the stride-16 conv5_3 feature.
    return _timm("vgg16", **kw)


@ENCODERS.register("vgg16_bn")
def vgg16_bn(**kw):
    return _timm("vgg16_bn", **kw)


def check_encoder(name):
    """OptionError for a `timm:<name>` timm does not know (registered names are checked with the options)."""
    if name.startswith("timm:") and not _import_timm().is_model(name[len("timm:"):]):
        raise OptionError(f"backbone '{name}': timm has no model '{name[len('timm:'):]}' (timm.list_models() "
                          f"lists them), or choose one of {', '.join(ENCODERS.names())}")


def create_encoder(name, pretrained=None, **kw):
    """A registered encoder, or any timm model given as `timm:<name>`."""
    model = _timm(name[len("timm:"):], **kw) if name.startswith("timm:") else ENCODERS.get(name)(**kw)
    if pretrained:
        load_pretrained(model, pretrained)
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


def load_pretrained(model, path):
    """Load ImageNet weights (e.g. the official `res2net50_v1b_26w_4s-3cf99910.pth`) from disk."""
    state, name, _ = extract_state_dict(path)  # reads the file, naming it in any error
    own = model.state_dict()
    # The classifier is irrelevant to segmentation; keep ours where the file's differs or is absent.
    state = {k: v for k, v in state.items() if not (k.startswith("fc.") and (k not in own or own[k].shape != v.shape))}
    missing, unexpected, shapes = key_mismatches(own, state)
    check_fit(name, f"the {type(model).__name__} encoder", [k for k in missing if not k.startswith("fc.")],
              unexpected, shapes, expected="ImageNet weights of this encoder")
    model.load_state_dict(state, strict=False)
