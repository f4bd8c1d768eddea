"""Multi-class prediction: load a network, predict class probabilities, class maps, overlays, `run_test`.

Priors: computed by an Inf-Net / Semi-Inf-Net checkpoint with the test stage's own loop
(`infnet_priors`), or read from a folder of maps named like the slices (`folder_priors`).
Probabilities come from the shared loop (infer.iter_batches / infer.probabilities): the logits are
resized to the slice's size, then passed through the sigmoid, as for the infection maps.
"""
from pathlib import Path

import numpy as np

from ..configs import DEFAULT_PRIOR_PATH, DEFAULT_SAVE_ROOT, one_path_component
from ..data import (
    DataError,
    _natural_key,
    check_pairs,
    check_slices,
    data_option,
    find_test_images,
    list_images,
    raise_problems,
    read_rgb,
    resize,
)
from ..errors import CheckpointError, OptionError
from ..infer import (
    default_model_name,
    default_workers,
    iter_batches,
    png_writer,
    probabilities,
    resolve_device,
    slice_maps,
    to_uint8,
)
from ..models import MULTICLASS_ARCHS as ARCHS
from ..models import read_model
from ..outputs import OutputFolder, check_output_folder, file_identity
from .data import N_CLASSES, MultiClassSliceSet, network_input, prepare_prior

CLASS_FOLDERS = {1: "Ground-glass opacities", 2: "Consolidation"}
OVERLAY_FOLDER = "Overlay"
OVERLAY_COLOURS = {1: (255, 0, 0), 2: (0, 255, 0)}  # red GGO, green consolidation


def load_multiclass(pth_path, device="cpu"):
    """(model in eval mode, info) from a release snapshot, one of ours or our checkpoint.pth (models.read_model:
    release U-Net / FCN8s files are recognised by their keys). info: arch (the --arch name), n_channels,
    and trainsize when the file is our checkpoint.pth (which carries its config)."""
    model, arch, config, name = read_model(pth_path, expect="multiclass", device=device)
    if arch["num_classes"] != N_CLASSES or arch["in_channels"] not in (3, 6):
        raise CheckpointError(f"{name}: expected {N_CLASSES} classes and 3 or 6 input channels, "
                              f"got {arch['num_classes']} classes, {arch['in_channels']} channels")
    arch_option = {v: k for k, v in ARCHS.items()}[arch["name"]]
    return model, {"arch": arch_option, "n_channels": arch["in_channels"], "trainsize": config.get("trainsize")}


def infnet_priors(infnet_pth, data_path, testsize=352, backbone=None, device="cpu", amp=False, progress=False,
                  normalize="none"):
    """{stem: uint8 infection map at the slice's size} computed by an Inf-Net / Semi-Inf-Net checkpoint.

    The maps come from the test stage's own loop (`infer.slice_maps`: the same model preparation,
    S_3 resized as logits, sigmoid, `normalize`, 8 bits), so with the same precision (`amp`, i.e.
    MyTest_LungInf.py's `--amp`) and `normalize` (its `--normalize`, default "none": probabilities)
    a prior computed here is pixel for pixel the map MyTest_LungInf.py writes; `prepare_prior` then
    binarises both at 128, i.e. at probability 0.5 for the default maps.
    """
    return slice_maps(infnet_pth, data_path, testsize, backbone, device, amp, progress=progress, normalize=normalize)


def folder_priors(prior_path, slices):
    """{stem: prior path} for every slice; a slice without a prior, or a prior of another size than its slice
    (training refuses those too), is an error naming it. Extra maps in the folder (e.g. all 50
    lung-infection test slices) are ignored."""
    prior_path = Path(prior_path)
    if not prior_path.is_dir():
        raise DataError(f"{prior_path}: prior folder not found (run MyTest_LungInf.py with a Semi-Inf-Net "
                        f"checkpoint first, or pass an Inf-Net checkpoint to compute the priors on the fly)")
    found = list_images(prior_path)
    for stem, path in slices:
        if stem not in found:
            raise DataError(f"{path}: no infection map (prior) named '{stem}.*' in {prior_path}")
    raise_problems(check_pairs([(stem, path, found[stem]) for stem, path in slices]), what="priors")
    return {stem: found[stem] for stem, _ in slices}


def _logits(outputs):
    return outputs  # a multi-class network returns its class logits (N, 3, h, w)


def iter_probabilities(model, slices, batchsize=1, device="cpu", amp=False, progress=False, num_workers=0):
    """(stem, sigmoid class probabilities (3, H, W) float32 numpy at the slice's own size) for each slice
    of `slices` (a MultiClassSliceSet); the logits are resized first, so the argmax is taken at the
    slice's resolution."""
    for x, stems, sizes in iter_batches(model, slices, batchsize, device, progress=progress, num_workers=num_workers):
        for stem, prob in zip(stems, probabilities(model, x, sizes, amp, device, select=_logits)):
            yield stem, prob.cpu().numpy()


def predict_probabilities(model, rgb, prior, testsize, binarize_prior=True, device="cpu", amp=False):
    """The class probabilities (3, H, W) of one slice (uint8 RGB) with its uint8 prior (any size; None for
    an image-only model), as `iter_probabilities` computes them (the volume stage's per-slice call)."""
    x = network_input(resize(rgb, (testsize, testsize)),
                      None if prior is None else prepare_prior(prior, (testsize, testsize), binarize_prior))
    return probabilities(model, x[None].to(device), [rgb.shape[:2]], amp, device, select=_logits)[0].cpu().numpy()


def class_maps(prob):
    """(labels, {1: GGO map, 2: consolidation map}) from probabilities (3, H, W).

    labels = argmax over the three channels. Each class map is that class's sigmoid probability
    where the class wins the argmax and 0 elsewhere, scaled to 0..255 (at least 1 where the class
    wins, so the non-zero support is exactly the argmax region). Why this and not a 0/255 mask:
    the evaluation tool min-max normalises each map and sweeps 256 thresholds, so a graded map
    gives it a real curve (the model's confidence inside its decision) while the two maps stay
    disjoint -- no pixel is counted as both GGO and consolidation, as with the release's argmax
    masks -- and at threshold 1/255 the binary map is exactly the argmax decision.
    """
    labels = prob.argmax(0)
    maps = {}
    for c in CLASS_FOLDERS:
        win = labels == c
        m = np.zeros(labels.shape, np.uint8)
        m[win] = np.maximum(to_uint8(prob[c][win]), 1)
        maps[c] = m
    return labels.astype(np.uint8), maps


def overlay(rgb, labels, alpha=0.5):
    """The slice with GGO tinted red and consolidation green (uint8 RGB, the slice's size)."""
    out = rgb.astype(np.float32)
    for c, colour in OVERLAY_COLOURS.items():
        win = labels == c
        out[win] = (1 - alpha) * out[win] + alpha * np.array(colour, np.float32)
    return np.round(out).astype(np.uint8)


def run_test(pth_path, data_path, prior_path=DEFAULT_PRIOR_PATH, infnet_pth=None, save_root=DEFAULT_SAVE_ROOT,
             testsize=None, model_name=None, device="auto", amp=None, binarize_prior=True,
             infnet_testsize=352, infnet_backbone=None, progress=True, batchsize=1, num_workers=None,
             overwrite=False):
    """Label every slice of `data_path` (or `data_path/Imgs`); returns {folder kind: [paths]}.

    Priors: computed from `infnet_pth` (an Inf-Net / Semi-Inf-Net checkpoint) when given,
    otherwise read from `prior_path` (maps named like the slices and of their size, e.g.
    MyTest_LungInf.py's output); image-only models need neither. Either way a prior is binarised at 128
    (unless binarize_prior=False), like the released training priors, then resized like the slice.
    `amp` None: priors at MyTest_LungInf.py's default precision (so they equal its maps), the multi-class
    network in fp32; True/False: both networks.
    Writes, at each slice's original size (each folder holds this run's maps only, with its test_run.json:
    a folder that holds files is refused unless `overwrite`, which deletes the old maps first):
      <save_root>/Ground-glass opacities/<model>/<stem>.png   8-bit graded map (class_maps)
      <save_root>/Consolidation/<model>/<stem>.png            8-bit graded map, disjoint from GGO
      <save_root>/Overlay/<model>/<stem>.png                  RGB: red GGO, green consolidation
    `model_name` (default: from the weights' path) must be one folder name.
    """
    model_name = one_path_component(model_name or default_model_name(pth_path), "--model_name")
    device = resolve_device(device)
    with data_option("--data_path", "the slices, or Imgs/ with them"):
        slices = sorted(find_test_images(data_path).items(), key=lambda kv: _natural_key(kv[0]))
    check_slices(slices)  # as MyTest_LungInf.py: every slice decodes, and they are not masks
    save_root = Path(save_root)
    dirs = {c: save_root / folder / model_name for c, folder in CLASS_FOLDERS.items()}
    dirs["overlay"] = save_root / OVERLAY_FOLDER / model_name
    for d in dirs.values():  # before any work
        check_output_folder(d, overwrite, [path for _, path in slices])
    model, info = load_multiclass(pth_path, device)
    testsize = testsize or info["trainsize"] or 352
    if info["arch"] != "unet" and testsize % 32:
        raise OptionError(f"--testsize {testsize}: {info['arch']} needs a multiple of 32 "
                          f"(e.g. {max(32, testsize // 32 * 32)})")

    priors = None
    if info["n_channels"] == 6:
        if infnet_pth:
            print(f"[test] computing infection priors with {infnet_pth}")
            priors = infnet_priors(infnet_pth, data_path, infnet_testsize, infnet_backbone, device, amp, progress)
        else:
            priors = folder_priors(prior_path, slices)

    record = {"weights": file_identity(pth_path), "data_path": str(Path(data_path).resolve()),
              "priors": (f"computed by {Path(infnet_pth).resolve()}" if infnet_pth else
                         str(Path(prior_path).resolve()) if priors is not None else None),
              "options": {"testsize": testsize, "binarize_prior": binarize_prior, "amp": amp,
                          "infnet_testsize": infnet_testsize, "infnet_backbone": infnet_backbone},
              "device": str(device), "slices": len(slices)}
    names = [f"{stem}.png" for stem, _ in slices]
    outputs = {c: OutputFolder(d, record, overwrite, names).start() for c, d in dirs.items()}
    paths = dict(slices)
    dataset = MultiClassSliceSet(slices, testsize, priors, binarize_prior)
    for stem, prob in iter_probabilities(model, dataset, batchsize, device, bool(amp), progress,
                                         default_workers(device, num_workers, len(slices), batchsize)):
        labels, maps = class_maps(prob)
        for c in CLASS_FOLDERS:
            outputs[c].write(f"{stem}.png", png_writer(maps[c]))
        outputs["overlay"].write(f"{stem}.png", png_writer(overlay(read_rgb(paths[stem]), labels)))
    written = {key: outputs[c].finish() for key, c in (("GGO", 1), ("Consolidation", 2), ("Overlay", "overlay"))}
    print(f"[test] {model_name}: wrote {len(slices)} slices to {', '.join(str(d) for d in dirs.values())}")
    return written
