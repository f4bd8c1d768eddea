"""The testing stage of Inf-Net (release `MyTest_LungInf.py`): one probability map per slice.

Each map is the final prediction S_3 (`lateral_map_2`), resized back to its slice's original
size as logits (the release saved 352 x 352 maps and left resizing to the MATLAB tool), passed
through a sigmoid and written as an 8-bit PNG named like the slice. By default the map is the
probability itself, so a slice without infection gives a dark map; `normalize="minmax"` stretches
each map to [0, 1] as the release did (the evaluation tool min-max normalises every map itself,
so its figures do not depend on this choice beyond 8-bit rounding).

One prediction loop (`iter_batches`, with `probabilities`: logits resized, then the sigmoid) serves
the test script, the multi-class priors computed on the fly (`multiclass.infnet_priors`, the same
8-bit maps), the multi-class test stage and the pseudo labels. It predicts batches of slices (all are
resized to testsize), on a CPU two at a time (`side_by_side`), while worker processes decode the next ones
(`default_workers`).

The stage's options are one `configs.TestConfig` (`run_test(config)`); its output folder holds that run's
maps only, with a record of what made them (outputs.OutputFolder; the evaluation checks it).
"""
import collections
import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from .atomic import atomic_write
from .configs import SLICES, VOLUMES, TestConfig
from .data import SliceSet, check_slices, data_option
from .errors import OptionError
from .fast_inference import cpu_has_native_bf16, prepare_for_inference
from .maps import NORMALIZATIONS, _normalizer, minmax, to_uint8  # noqa: F401 -- how maps are written
from .models import load_model
from .outputs import OutputFolder, check_output_folder, file_identity
from .runtime import autocast, inference_amp_dtype, pick_device
from .tta import with_tta

DEFAULT_SAVE_ROOT = Path("Results") / "Lung infection segmentation"
NOT_IN_RECORD = ("pth_path", "data_path", "save_path", "progress", "overwrite")  # test_run.json records them apart
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


def default_workers(device, num_workers=None, slices=None, batchsize=1):
    """Decoding processes of the prediction loop: `num_workers` bounded by the CPU count (a larger number only
    exhausts memory; said when bounded). None: 4 on CUDA (decoding on the main thread starves the GPU); on CPU
    one when there is more than one batch of `slices` (it decodes the next batch while the network computes:
    5% less wall time on the 48 test slices here with one batch at a time, the same as decoding on the main
    thread with two side by side; bench/bench_test_stage.py), else none (a process to start for nothing)."""
    cpus = os.cpu_count() or 1
    if num_workers is None:
        if torch.device(device).type == "cuda":
            num_workers = 4
        else:
            num_workers = int(slices is not None and slices > batchsize)
    elif num_workers > cpus:
        print(f"[test] --num_workers {num_workers}: using {cpus}, the number of CPUs")
    return max(0, min(int(num_workers), cpus))


class Batches:
    """The batches (inputs, keys, sizes) of `dataset` (items: (input tensor, key, (h, w))), decoded by
    `num_workers` processes (bounded by the CPU count; pinned on CUDA). `start()` forks the workers at once, so that
    they decode the first batches while the caller does something else (the test stage: load the model, mostly on
    one core). Read ahead: 4 batches with one worker (two computed side by side, `side_by_side`, and the next
    two), 2 per worker with more."""

    def __init__(self, dataset, batchsize=1, device="cpu", num_workers=0):
        self.dataset = dataset
        workers = min(max(0, num_workers or 0), os.cpu_count() or 1)
        self.loader = DataLoader(dataset, batch_size=max(1, batchsize), collate_fn=_collate, num_workers=workers,
                                 pin_memory=torch.device(device).type == "cuda",
                                 prefetch_factor=max(2, 4 // workers) if workers else None)
        self._started = None

    def start(self):
        self._started = iter(self.loader)
        return self

    def __iter__(self):
        started, self._started = self._started, None
        return started if started is not None else iter(self.loader)

    def __len__(self):
        return len(self.loader)


def iter_batches(model, dataset, batchsize=1, device=None, channels_last=False, progress=False, desc="test",
                 num_workers=0):
    """The batched prediction loop every stage shares: (inputs on `device`, keys, sizes) per batch of
    `dataset` (items: (input tensor, key, (h, w)); or its `Batches`, perhaps started), with the progress bar;
    `model` is used as given. num_workers: processes decoding the slices (see `Batches`)."""
    device = torch.device(device or next(model.parameters()).device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loader = dataset if isinstance(dataset, Batches) else Batches(dataset, batchsize, device, num_workers)
    if progress:
        from tqdm import tqdm
        loader = tqdm(loader, desc=desc, leave=False)
    for inputs, keys, sizes in loader:
        inputs = inputs.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        yield inputs, keys, sizes


def default_streams(device, batches):
    """How many batches the prediction loop computes side by side (`side_by_side`): two on a CPU with two or more
    threads when there are two or more batches, else one. On few cores, two batches each on half the threads
    beat one batch on all of them: 48 test slices 2-10% less network time on 2 cores (two measurements,
    docs/results.md), the same maps (in bf16 a few pixels in 10^5 one gray level apart: oneDNN's bf16 kernels
    depend on the thread count)."""
    return 2 if torch.device(device).type == "cpu" and torch.get_num_threads() >= 2 and batches >= 2 else 1


def side_by_side(fn, items, streams=1):
    """fn(item) for each of `items`, in order, `streams` of them at a time in threads; each shares the CPU's
    threads (torch.get_num_threads, restored after). PyTorch ops release the GIL, so the threads compute in
    parallel; at most 2 * streams items are taken ahead of the one yielded."""
    if streams <= 1:
        yield from map(fn, items)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // streams))  # read by each new thread at its first parallel op
    pool, pending = ThreadPoolExecutor(streams), collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * streams:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also on an error or when the caller stops early: drop what has not started
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def iter_probability_maps(model, slices, batchsize=1, device=None, amp=False, channels_last=True, normalize="none",
                          progress=False, num_workers=0, streams=None):
    """(stem, float32 probability map at the slice's size) for each slice of `slices` (a `data.SliceSet`, or its
    `Batches`). streams: batches computed side by side (None: `default_streams`)."""
    device = device or next(model.parameters()).device
    _normalizer(normalize)  # a wrong name fails before the first slice
    batches = slices if isinstance(slices, Batches) else Batches(slices, batchsize, device, num_workers)
    if streams is None:
        streams = default_streams(device, len(batches))

    def predict(batch):
        images, stems, sizes = batch
        return zip(stems, probability_maps(model, images, sizes, amp, device, normalize))

    for maps in side_by_side(predict, iter_batches(model, batches, device=device, channels_last=channels_last,
                                                   progress=progress), streams):
        yield from maps


def iter_maps(model, slices, batchsize=1, device=None, amp=False, channels_last=True, normalize="none",
              progress=False, num_workers=0):
    """The test stage's maps: (stem, 8-bit map at the slice's size) for each slice of `slices`."""
    for stem, prob in iter_probability_maps(model, slices, batchsize, device, amp, channels_last, normalize,
                                            progress, num_workers):
        yield stem, to_uint8(prob)


def png_writer(array):
    return lambda tmp: Image.fromarray(array).save(tmp, format="PNG")


def predict_folder(model, data_path, save_path, testsize=352, batchsize=1, device=None, amp=False,
                   channels_last=True, progress=True, fuse_bn=True, compile=False, prepare=True, normalize="none",
                   num_workers=0, overwrite=False, record=None, batches=None):
    """Segment every slice of `data_path` (or `data_path/Imgs`) into `save_path`/<stem>.png; returns the paths.

    `save_path` holds this run's maps only: a folder that already holds files is refused unless `overwrite`,
    which deletes its old maps first; `save_path`/test_run.json records the run (`record`: what made the maps)
    and every map's digest, so that the evaluation can refuse a folder that mixes runs (outputs.py).
    By default `model` is first passed through `prepare_for_inference` (a copy: `model` itself is
    left as it is) with Conv-BN fusion and channels-last on, torch.compile off; the maps match the
    plain fp32 model's to well under one gray level. `amp`: bf16 autocast on CPU (fp16 on CUDA).
    prepare=False uses `model` as given (`channels_last` then only converts the inputs and model).
    normalize: "none" (probabilities) or "minmax" (the release's per-slice stretch), see `probability_maps`.
    batches: the dataset's `Batches`, perhaps started before (the test stage decodes while the model loads).
    """
    dataset = data_path if isinstance(data_path, SliceSet) else SliceSet(data_path, testsize)
    check_output_folder(save_path, overwrite, [path for _, path in dataset.items])
    if prepare:
        model = prepare_for_inference(model, channels_last=channels_last, fuse_bn=fuse_bn, compile=compile,
                                      autocast_dtype=amp_dtype(device or next(model.parameters()).device, amp))
    record = {"slices": len(dataset), "testsize": dataset.testsize, "normalize": normalize, **(record or {})}
    out = OutputFolder(save_path, record, overwrite, [f"{stem}.png" for stem, _ in dataset.items]).start()
    source = dataset if batches is None else batches
    for stem, gray in iter_maps(model, source, batchsize, device, amp, channels_last, normalize, progress, num_workers):
        out.write(f"{stem}.png", png_writer(gray))
    return out.finish()


def amp_dtype(device, amp):
    """The dtype the test stage's autocast runs in (runtime.inference_amp_dtype), None without `amp`."""
    return inference_amp_dtype(device) if amp else None


def load_for_test(pth_path, backbone=None, device="cpu", channels_last=True, fuse_bn=True, compile=False, amp=False,
                  tta="none"):
    """`load_inf_net`, then prepared for inference in place (fused BN, channels-last; with `amp`, the convolutions
    held in the autocast dtype) and, with `tta`, averaging the maps of views of each slice (tta.with_tta): the test
    stage's model, to be run under `autocast(device, amp)`."""
    model = load_inf_net(pth_path, backbone, device)
    return with_tta(prepare_for_inference(model, channels_last=channels_last, fuse_bn=fuse_bn, compile=compile,
                                          inplace=True, autocast_dtype=amp_dtype(device, amp)),  # no copy
                    tta)


def slice_maps(pth_path, data_path, testsize=352, backbone=None, device="auto", amp=None, channels_last=True,
               batchsize=TestConfig.batchsize, progress=False, fuse_bn=True, compile=False, normalize="none",
               num_workers=None, tta="none"):
    """{stem: 8-bit map} of every slice of `data_path`: exactly what `run_test` (MyTest_LungInf.py)
    writes for the same checkpoint and options, without writing. amp=None: `default_amp(device)`. The batch
    size is the test stage's default too: oneDNN's kernels for other batch sizes round differently (one gray
    level on a few pixels)."""
    device = resolve_device(device) if isinstance(device, str) else device
    amp = default_amp(device) if amp is None else amp
    model = load_for_test(pth_path, backbone, device, channels_last, fuse_bn, compile, amp, tta)
    slices = SliceSet(data_path, testsize)
    return dict(iter_maps(model, slices, batchsize, device, amp, channels_last, normalize, progress,
                          default_workers(device, num_workers, len(slices), batchsize)))


def default_amp(device):
    """The test stage's precision when not given: bf16 autocast on CPUs with native bf16 (about
    2.5x faster; it changed the test-set mean Dice by < 0.002, see bench/bench_bf16_dice.py),
    fp32 elsewhere (CUDA included: fp16 there was not measured)."""
    device = torch.device(device)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_device(name):
    """`pick_device` (which names a device this machine lacks in one line), limited to what the test stage runs on."""
    device = pick_device(name)
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"--device {name}: the test stage runs on cpu or cuda")
    return device


def default_model_name(pth_path):
    """'Inf-Net' for Snapshots/save_weights/Inf-Net/Inf-Net-100.pth; the file stem otherwise."""
    p = Path(pth_path)
    return p.parent.name if p.parent.parent.name == "save_weights" else p.stem


def as_test_config(config=None, data_path=None, save_path=None, **options):
    """A TestConfig from a TestConfig (`options` replace its fields) or from the weights' path and options."""
    if isinstance(config, TestConfig):
        return dataclasses.replace(config, **options)
    return TestConfig.from_any({"pth_path": config, "data_path": data_path, "save_path": save_path}, **options)


def run_test(config=None, data_path=None, save_path=None, **options):
    """The slice test stage: load the weights and write one map per slice (see `predict_folder`).

    `config`: a configs.TestConfig (MyTest_LungInf.py's options), or the weights' path with `data_path`,
    `save_path` and TestConfig's fields as keywords. amp None: `default_amp(device)`; amp=False with the
    defaults (fused BN, channels-last) gives the fp32 maps, within the golden tolerance of the release's.
    normalize: "none" writes probabilities, "minmax" the release's stretched maps. Returns the paths written.
    """
    cfg = as_test_config(config, data_path, save_path, **options)
    cfg.refuse_options_of(VOLUMES, "a folder of 2D slices (no NIfTI or DICOM)")  # --mask, --window ... do nothing here
    device = resolve_device(cfg.device)
    amp = default_amp(device) if cfg.amp is None else cfg.amp
    save_path = Path(cfg.save_path or DEFAULT_SAVE_ROOT / default_model_name(cfg.pth_path))
    with data_option("--data_path", "the slices, or Imgs/ with them"):
        slices = SliceSet(cfg.data_path, cfg.testsize)
    check_slices(slices.items)  # before loading the model or writing anything
    check_output_folder(save_path, cfg.overwrite, [path for _, path in slices.items])
    # the workers fork now and decode the first batches while the model loads (most of it on one core)
    batches = Batches(slices, cfg.batchsize, device,
                      default_workers(device, cfg.num_workers, len(slices), cfg.batchsize)).start()
    model = load_for_test(cfg.pth_path, cfg.backbone, device, cfg.channels_last, cfg.fuse_bn, cfg.compile, amp,
                          cfg.tta)
    record = {"weights": file_identity(cfg.pth_path), "data_path": str(Path(cfg.data_path).resolve()),
              "options": cfg.options_read_by(SLICES, leave_out=NOT_IN_RECORD),
              "amp": bool(amp), "device": str(device)}
    written = predict_folder(model, slices, save_path, cfg.testsize, cfg.batchsize, device, amp, cfg.channels_last,
                             cfg.progress, prepare=False, normalize=cfg.normalize, overwrite=cfg.overwrite,
                             record=record, batches=batches)
    print(f"[test] wrote {len(written)} maps to {save_path}")
    return written
