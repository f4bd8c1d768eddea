"""The testing stage of Inf-Net (release `MyTest_LungInf.py`): one probability map per slice.

Each map is the final prediction S_3 (`lateral_map_2`), resized back to its slice's original
size as logits (the release saved 352 x 352 maps and left resizing to the MATLAB tool), passed
through a sigmoid and written as an 8-bit PNG named like the slice. By default the map is the
probability itself, so a slice without infection gives a dark map; `normalize="minmax"` stretches
each map to [0, 1] as the release did (the evaluation tool min-max normalises every map itself,
so its figures do not depend on this choice beyond 8-bit rounding).

One prediction loop (`iter_batches`, with `probabilities`: logits resized, then the sigmoid) serves
the test script, the multi-class priors computed on the fly (`multiclass.infnet_priors`, the same
8-bit maps), the multi-class test stage and the pseudo labels.
"""
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from .atomic import atomic_write
from .data import SliceSet
from .fast_inference import cpu_has_native_bf16, prepare_for_inference
from .maps import NORMALIZATIONS, _normalizer, minmax, to_uint8  # noqa: F401 -- how maps are written
from .models import load_model
from .runtime import autocast, pick_device

PREDICTION_INDEX = 3  # lateral_map_2, the output of the shallowest reverse-attention branch


def load_inf_net(pth_path, backbone=None, device="cpu"):
    """The infection network of a release snapshot or one of our checkpoints, with its weights, in eval mode
    (models.load_model: our checkpoint.pth records what to build, a release file is an Inf-Net whose
    components are read off its keys). `backbone` overrides the saved one."""
    return load_model(pth_path, expect="binary", device=device, backbone=backbone)


def final_logits(outputs):
    """The prediction among a model's outputs: Inf-Net's S_3, or a baseline's single map."""
    return outputs if isinstance(outputs, torch.Tensor) else outputs[PREDICTION_INDEX]


def probabilities(model, images, sizes, amp=False, device=None, select=final_logits):
    """Sigmoid probabilities (C, h, w) of a batch, each at its slice's (h, w): the prediction's logits
    (`select`: Inf-Net's S_3 by default) are resized bilinearly first, then passed through the sigmoid.
    The one place every stage turns network outputs into probabilities."""
    device = device or images.device
    with torch.inference_mode():
        with autocast(device, amp):
            logits = select(model(images)).float()
        return [torch.sigmoid(F.interpolate(logit[None], size=(int(h), int(w)), mode="bilinear",
                                            align_corners=False))[0] for logit, (h, w) in zip(logits, sizes)]


def probability_maps(model, images, sizes, amp=False, device=None, normalize="none"):
    """Probability maps of the prediction (Inf-Net's S_3) for a batch: float32 numpy (h, w) in [0, 1].

    normalize="none" (default) returns the probabilities; "minmax" the release's per-slice stretch.
    """
    stretch = _normalizer(normalize)
    return [stretch(p[0]).cpu().numpy() for p in probabilities(model, images, sizes, amp, device)]


def save_png(array, path):
    """Write an image atomically (temporary file, then rename)."""
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _collate(batch):
    images, stems, sizes = zip(*batch)
    return torch.stack(images), list(stems), list(sizes)


def iter_batches(model, dataset, batchsize=1, device=None, channels_last=False, progress=False, desc="test"):
    """The batched prediction loop every stage shares: (inputs on `device`, keys, sizes) per batch of
    `dataset` (items: (input tensor, key, (h, w))), with the progress bar; `model` is used as given."""
    device = device or next(model.parameters()).device
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = DataLoader(dataset, batch_size=max(1, batchsize), collate_fn=_collate)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=desc, leave=False)
    for inputs, keys, sizes in loader:
        inputs = inputs.to(device)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        yield inputs, keys, sizes


def iter_probability_maps(model, slices, batchsize=1, device=None, amp=False, channels_last=True, normalize="none",
                          progress=False):
    """(stem, float32 probability map at the slice's size) for each slice of `slices` (a `data.SliceSet`)."""
    device = device or next(model.parameters()).device
    _normalizer(normalize)  # a wrong name fails before the first slice
    for images, stems, sizes in iter_batches(model, slices, batchsize, device, channels_last, progress):
        yield from zip(stems, probability_maps(model, images, sizes, amp, device, normalize))


def iter_maps(model, slices, batchsize=1, device=None, amp=False, channels_last=True, normalize="none",
              progress=False):
    """The test stage's maps: (stem, 8-bit map at the slice's size) for each slice of `slices`."""
    for stem, prob in iter_probability_maps(model, slices, batchsize, device, amp, channels_last, normalize,
                                            progress):
        yield stem, to_uint8(prob)


def predict_folder(model, data_path, save_path, testsize=352, batchsize=1, device=None, amp=False,
                   channels_last=True, progress=True, fuse_bn=True, compile=False, prepare=True, normalize="none"):
    """Segment every slice of `data_path` (or `data_path/Imgs`) into `save_path`/<stem>.png; returns the paths.

    By default `model` is first passed through `prepare_for_inference` (a copy: `model` itself is
    left as it is) with Conv-BN fusion and channels-last on, torch.compile off; the maps match the
    plain fp32 model's to well under one gray level. `amp`: bf16 autocast on CPU (fp16 on CUDA).
    prepare=False uses `model` as given (`channels_last` then only converts the inputs and model).
    normalize: "none" (probabilities) or "minmax" (the release's per-slice stretch), see `probability_maps`.
    """
    dataset = SliceSet(data_path, testsize)
    save_path = Path(save_path)
    existing = [s for s, _ in dataset.items if (save_path / f"{s}.png").exists()]
    if existing:
        print(f"[test] replacing {len(existing)} existing map(s) in {save_path}")
    if prepare:
        model = prepare_for_inference(model, channels_last=channels_last, fuse_bn=fuse_bn, compile=compile)
    written = []
    for stem, gray in iter_maps(model, dataset, batchsize, device, amp, channels_last, normalize, progress):
        written.append(save_png(gray, save_path / f"{stem}.png"))
    return written


def load_for_test(pth_path, backbone=None, device="cpu", channels_last=True, fuse_bn=True, compile=False):
    """`load_inf_net`, then prepared for inference in place (fused BN, channels-last): the test stage's model."""
    model = load_inf_net(pth_path, backbone, device)
    return prepare_for_inference(model, channels_last=channels_last, fuse_bn=fuse_bn, compile=compile,
                                 inplace=True)  # freshly loaded: no copy needed


def slice_maps(pth_path, data_path, testsize=352, backbone=None, device="auto", amp=None, channels_last=True,
              batchsize=1, progress=False, fuse_bn=True, compile=False, normalize="none"):
    """{stem: 8-bit map} of every slice of `data_path`: exactly what `run_test` (MyTest_LungInf.py)
    writes for the same checkpoint and options, without writing. amp=None: `default_amp(device)`."""
    device = pick_device(device) if isinstance(device, str) else device
    amp = default_amp(device) if amp is None else amp
    model = load_for_test(pth_path, backbone, device, channels_last, fuse_bn, compile)
    return dict(iter_maps(model, SliceSet(data_path, testsize), batchsize, device, amp, channels_last, normalize,
                          progress))


def default_amp(device):
    """The test stage's precision when not given: bf16 autocast on CPUs with native bf16 (about
    2.5x faster; it changed the test-set mean Dice by < 0.002, see bench/bench_bf16_dice.py),
    fp32 elsewhere (CUDA included: fp16 there was not measured)."""
    device = torch.device(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def default_model_name(pth_path):
    """'Inf-Net' for Snapshots/save_weights/Inf-Net/Inf-Net-100.pth; the file stem otherwise."""
    p = Path(pth_path)
    return p.parent.name if p.parent.parent.name == "save_weights" else p.stem


def run_test(pth_path, data_path, save_path=None, testsize=352, backbone=None, device="auto", amp=None,
             channels_last=True, batchsize=1, progress=True, fuse_bn=True, compile=False, normalize="none"):
    """Load `pth_path` and write one map per slice of `data_path` (see `predict_folder` for the options).

    amp=None: `default_amp(device)`; amp=False with the defaults (fused BN, channels-last) gives
    the fp32 maps, within the golden tolerance of the release's. normalize: "none" writes
    probabilities, "minmax" the release's stretched maps.
    """
    device = pick_device(device)
    amp = default_amp(device) if amp is None else amp
    model = load_for_test(pth_path, backbone, device, channels_last, fuse_bn, compile)
    save_path = save_path or Path("Results") / "Lung infection segmentation" / default_model_name(pth_path)
    written = predict_folder(model, data_path, save_path, testsize, batchsize, device, amp, channels_last, progress,
                             prepare=False, normalize=normalize)
    print(f"[test] wrote {len(written)} maps to {save_path}")
    return written
