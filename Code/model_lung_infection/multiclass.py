"""Multi-class infection labelling (paper Sec. III-C): background, ground-glass opacity, consolidation.

The CT slice and an infection map (the "prior": Semi-Inf-Net's output at test time, the binarised
union of the two classes at training time, as released) are each ImageNet-normalised as 3
channels and concatenated into a 6-channel input of a multi-class network (the release's U-Net,
`--arch unet`, or FCN-8s, `--arch fcn8s`); with `prior=False` the slice alone (3 channels) gives
the "Multi-class U-Net" / "FCNs" baselines of Table III.

Training data: `<root>/{Imgs,GT,Prior}` paired by file stem (data.pair_by_stem). GT files are
palette PNGs whose *indices* are the classes (0 background, 1 GGO, 2 consolidation); they are read
as indices, never as gray values (the release converted to gray and remapped the gray values 38
and 75, which only works for that one palette), resized with nearest neighbour and one-hot encoded.

Recipes (`recipe=`):
- "release" (default): what `MyTrain_MulClsLungInf_UNet.py` ran -- input 352, PyTorch's default
  initialisation, sigmoid + BCE against the one-hot targets, SGD lr 1e-2, momentum 0.7, no weight
  decay, constant learning rate, batch 16, 200 epochs, a snapshot every 10 epochs.
- "paper": the paper's text -- input 512 x 512, Xavier initialisation, SGD lr 1e-10, momentum 0.99,
  weight decay 5e-4 (batch size and epochs as released: the paper gives none).
Any of trainsize / lr / momentum / weight_decay / init given explicitly overrides the recipe.

BCE is computed from the logits (`binary_cross_entropy_with_logits`), the numerically stable form
of the release's `BCELoss(sigmoid(x))`; the values are the same up to float rounding (the release's
BCELoss clamps log at -100, which only matters for saturated outputs).

Testing: see `run_test` and `class_maps`.
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .checkpoint import extract_state_dict, load_checkpoint
from .data import (
    CachedSampleSet,
    DataError,
    _natural_key,
    check_pairs,
    find_test_images,
    list_images,
    normalize_image,
    pair_by_stem,
    raise_problems,
    read_mask,
    read_rgb,
    resize,
)
from .engine import Engine, RunConfig, check_run_folder
from .errors import CheckpointError
from .fcn8s import load_vgg16_imagenet
from .infer import (
    default_model_name,
    save_png,
    slice_maps,
    to_uint8,
)
from .registry import create_model
from .runtime import autocast, pick_device
from .smp_models import load_encoder_weights

CLASSES = ("background", "GGO", "consolidation")
N_CLASSES = len(CLASSES)
CLASS_FOLDERS = {1: "Ground-glass opacities", 2: "Consolidation"}
OVERLAY_FOLDER = "Overlay"
OVERLAY_COLOURS = {1: (255, 0, 0), 2: (0, 255, 0)}  # red GGO, green consolidation
DEFAULT_SAVE_ROOT = Path("Results") / "Multi-class lung infection segmentation"
DEFAULT_PRIOR_PATH = Path("Results") / "Lung infection segmentation" / "Semi-Inf-Net"
PRIOR_THRESHOLD = 128  # 8-bit infection maps are binarised as `map >= 128` (0.5), to 0 / 255

# --arch -> MODELS registry name (DeepLabV3+: Table III's baselines, segmentation-models-pytorch)
ARCHS = {"unet": "unet_multiclass", "fcn8s": "fcn8s",
         "deeplabv3plus_os8": "deeplabv3plus_os8", "deeplabv3plus_os16": "deeplabv3plus_os16"}
RECIPES = {
    "release": dict(trainsize=352, lr=1e-2, momentum=0.7, weight_decay=0.0, init="default"),
    "paper": dict(trainsize=512, lr=1e-10, momentum=0.99, weight_decay=5e-4, init="xavier"),
}
INITS = ("default", "xavier")


def run_name(arch, prior):
    """Default run / model name: the Table III row the network stands for."""
    names = {("unet", True): "Semi-Inf-Net_UNet", ("fcn8s", True): "Semi-Inf-Net_FCN8s",
             ("unet", False): "Multi-class_UNet", ("fcn8s", False): "FCN8s"}
    return names.get((arch, bool(prior)), f"{'Semi-Inf-Net_' if prior else ''}{arch}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

_INDEX_MODES = ("P", "L", "I", "I;16", "I;16L", "I;16B", "I;16N")


def read_class_indices(path, n_classes=N_CLASSES):
    """A GT as uint8 class indices (H, W).

    Palette images (mode 'P') give their palette indices, whatever colours the palette holds;
    a single-channel integer image is accepted when it already holds indices. Anything else
    (RGB, binary, gray masks with values like 38/75) is an error naming the file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            a = np.array(im)
    except Exception as e:
        raise DataError(f"{path}: cannot read GT ({e})") from e
    if mode not in _INDEX_MODES or a.ndim != 2:
        raise DataError(f"{path}: GT must be a palette (mode 'P') or single-channel index image whose values are "
                        f"the classes 0..{n_classes - 1} ({', '.join(CLASSES)}); got mode '{mode}'")
    bad = np.unique(a[(a < 0) | (a >= n_classes)])
    if bad.size:
        raise DataError(f"{path}: GT indices {bad[:10].tolist()} outside 0..{n_classes - 1} ({', '.join(CLASSES)})"
                        + ("" if mode == "P" else f"; a gray mask (mode '{mode}') is not an index map"))
    return a.astype(np.uint8)


def one_hot(indices, n_classes=N_CLASSES):
    """uint8 indices (H, W) -> float one-hot (n_classes, H, W)."""
    return F.one_hot(torch.from_numpy(np.ascontiguousarray(indices)).long(), n_classes).permute(2, 0, 1).float()


def binarize(prior):
    """An 8-bit infection map -> 0 / 255 (`>= 128`), the form of the released training priors."""
    return np.where(prior >= PRIOR_THRESHOLD, 255, 0).astype(np.uint8)


def prepare_prior(prior, size, binarize_prior=True):
    """uint8 gray prior at any size -> uint8 (h, w) at `size`: binarised first (if asked), then
    resized bilinearly like the slice, so training and test priors go through the same steps."""
    prior = binarize(prior) if binarize_prior else prior
    return resize(prior, size)


def network_input(rgb, prior=None):
    """Resized uint8 slice (H, W, 3) [+ resized uint8 prior (H, W)] -> float (3 or 6, H, W).

    Each part is ImageNet-normalised as 3 channels (the prior replicated, as the release's
    cv2.imread of a gray PNG did) and the two are concatenated, slice first."""
    x = normalize_image(rgb)
    if prior is None:
        return x
    return torch.cat([x, normalize_image(np.repeat(prior[..., None], 3, axis=2))], 0)


class MultiClassTrainSet(CachedSampleSet):
    """`<root>/Imgs`, `<root>/GT` (palette indices) and, with `prior=True`, `<root>/Prior`:
    (input (6 or 3, s, s), one-hot target (3, s, s)) at s = trainsize.

    Every file is checked when the set is built (readable, GT and prior of the slice's size, GT an
    index image with indices in 0..2); all problems stop the run together, before training starts.
    Decoded, resized samples are cached as uint8.
    """

    def __init__(self, root, trainsize=352, prior=True, binarize_prior=True, cache=True):
        super().__init__(cache)
        root = Path(root)
        self.root, self.trainsize, self.prior, self.binarize_prior = root, trainsize, prior, binarize_prior
        folders = [root / "Imgs", root / "GT"] + ([root / "Prior"] if prior else [])
        problems = []
        self.samples = pair_by_stem(folders, problems)  # [(stem, image, gt[, prior])]
        # Every file is checked before the first step (readable, sizes, GT indices); all problems at once.
        problems += check_pairs(self.samples)
        for _, _, gt_path, *_ in self.samples:
            try:
                read_class_indices(gt_path)
            except DataError as e:
                if not any(p.startswith(f"{gt_path} cannot be read") for p in problems):  # said once
                    problems.append(str(e))
        raise_problems(problems)

    def __len__(self):
        return len(self.samples)

    def read(self, i):
        """uint8 arrays (slice s x s x 3, prior s x s or None, class indices s x s)."""
        _, img_path, gt_path, *rest = self.samples[i]
        size = (self.trainsize, self.trainsize)
        image = resize(read_rgb(img_path), size)
        prior = prepare_prior(read_mask(rest[0]), size, self.binarize_prior) if self.prior else None
        gt = resize(read_class_indices(gt_path), size, Image.NEAREST)
        return image, prior, gt

    def __getitem__(self, i):
        image, prior, gt = self.load(i)
        return network_input(image, prior), one_hot(gt)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@dataclass
class MultiClassConfig(RunConfig):
    """The multi-class recipe. None fields are filled from `recipe` (RECIPES) or from arch/prior."""
    train_path: str = "Dataset/TrainingSet/MultiClassInfection-Train"
    arch: str = "unet"                    # unet | fcn8s
    prior: bool = True                    # 6-channel input (slice + infection map) or slice only
    recipe: str = "release"               # release | paper
    trainsize: Optional[int] = None
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    init: Optional[str] = None            # default (PyTorch's) | xavier
    binarize_prior: bool = True           # training priors as 0/255 (the released ones already are)
    fc_width: int = 4096                  # FCN8s fc6/fc7 width
    pretrained: Optional[str] = None      # FCN8s: ImageNet VGG-16 weights, from disk
    train_save: Optional[str] = None      # default: run_name(arch, prior)
    snapshot_prefix: Optional[str] = None  # default: run_name(arch, prior)
    epoch: int = 200
    batchsize: int = 16
    save_every: int = 10

    SCRIPT: ClassVar[str] = "MyTrain_MulClsLungInf_UNet.py"  # named in the command that resumes a run

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch '{self.arch}': choose one of {', '.join(ARCHS)}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe '{self.recipe}': choose one of {', '.join(RECIPES)}")
        for k, v in RECIPES[self.recipe].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.init not in INITS:
            raise ValueError(f"init '{self.init}': choose one of {', '.join(INITS)}")
        if self.arch != "unet" and self.trainsize % 32:
            raise ValueError(f"{self.arch} needs a trainsize that is a multiple of 32, got {self.trainsize}")
        if self.pretrained and self.arch not in IMAGENET_LOADERS:
            raise ValueError(f"pretrained (ImageNet encoder weights): arch {self.arch} has no ImageNet encoder")
        name = run_name(self.arch, self.prior)
        self.train_save = self.train_save or name
        self.snapshot_prefix = self.snapshot_prefix or name


def xavier_init(model):
    """Xavier-uniform weights and zero biases for every Conv2d (the paper's initialisation).

    Transposed convs (FCN8s' bilinear up-samplers) and BatchNorm keep their initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def build_model(cfg: MultiClassConfig):
    """The multi-class network of `cfg` (arch, prior -> channels, init, ImageNet encoder weights)."""
    kw = {"fc_width": cfg.fc_width} if cfg.arch == "fcn8s" else {}
    with warnings.catch_warnings():
        if cfg.pretrained:  # loaded below, after the initialisation
            warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        model = create_model(ARCHS[cfg.arch], n_channels=6 if cfg.prior else 3, n_classes=N_CLASSES, **kw)
    if cfg.init == "xavier":
        xavier_init(model)
    if cfg.pretrained:
        IMAGENET_LOADERS[cfg.arch](model, cfg.pretrained)
    return model


def _load_smp_encoder(model, path):
    load_encoder_weights(model.encoder, path)


# --arch -> how a local ImageNet file goes into the network (after its initialisation)
IMAGENET_LOADERS = {"fcn8s": load_vgg16_imagenet, "deeplabv3plus_os8": _load_smp_encoder,
                    "deeplabv3plus_os16": _load_smp_encoder}


def bce_step(engine, batch):
    """One update: sigmoid + BCE of the logits against the one-hot targets (mean over all)."""
    x, target = engine.to_device(*batch)
    with engine.autocast():
        logits = engine.net(engine.images(x))
    loss = F.binary_cross_entropy_with_logits(logits.float(), target)
    engine.optimize(loss)
    return {"bce": loss.detach()}


def train(cfg: MultiClassConfig, model=None):
    """Train the multi-class network; returns the bare model. Snapshots
    (`<snapshot_root>/save_weights/<train_save>/<prefix>-<epoch>.pth`, release format), the resumable
    checkpoint and TensorBoard logs are written by engine.Engine."""
    check_run_folder(cfg)  # an existing run or a missing checkpoint: said before reading any data
    torch.manual_seed(cfg.seed)  # same seed on every DDP rank: identical initial weights
    dataset = MultiClassTrainSet(cfg.train_path, cfg.trainsize, cfg.prior, cfg.binarize_prior)
    if model is None:
        model = build_model(cfg)
    engine = Engine(cfg, model)
    optimizer = torch.optim.SGD(engine.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)  # constant, as released
    inputs = "slice + prior (6 ch)" if cfg.prior else "slice only (3 ch)"
    return engine.fit(dataset, optimizer, scheduler, bce_step,
                      describe=f" from {cfg.train_path}; {cfg.arch}, {inputs}; recipe {cfg.recipe} "
                               f"(size {cfg.trainsize}, SGD lr {cfg.lr:g} momentum {cfg.momentum:g} "
                               f"wd {cfg.weight_decay:g}, init {cfg.init})")


# ---------------------------------------------------------------------------------------------
# Testing
# ---------------------------------------------------------------------------------------------

def load_multiclass(pth_path, device="cpu"):
    """(model in eval mode, info) from a release snapshot, one of ours or our checkpoint.pth.

    The architecture and input channels are read from the weights themselves (U-Net: `inc.*`,
    FCN8s: `features.*`), so release-format files need no extra options. info: arch, n_channels,
    and trainsize when the file is our checkpoint.pth (which carries its config).
    """
    state, name, config = extract_state_dict(pth_path)
    if config.get("arch") in ARCHS:  # our checkpoint.pth says what it is
        arch, n_channels = config["arch"], 6 if config.get("prior", True) else 3
        kw = {"fc_width": config.get("fc_width", 4096)} if arch == "fcn8s" else {}
        n_classes = N_CLASSES
    elif "inc.double_conv.0.weight" in state:
        arch, n_channels, kw = "unet", state["inc.double_conv.0.weight"].shape[1], {}
        n_classes = state["outc.conv.weight"].shape[0]
    elif "features.0.weight" in state and "fc6.weight" in state:
        arch, n_channels = "fcn8s", state["features.0.weight"].shape[1]
        kw = {"fc_width": state["fc6.weight"].shape[0]}
        n_classes = state["score_fr.weight"].shape[0]
    else:
        raise CheckpointError(f"{name}: neither a multi-class U-Net nor an FCN8s checkpoint (other architectures: "
                              f"give their checkpoint.pth, which records the architecture)")
    if n_classes != N_CLASSES or n_channels not in (3, 6):
        raise CheckpointError(f"{name}: expected {N_CLASSES} classes and 3 or 6 input channels, "
                              f"got {n_classes} classes, {n_channels} channels")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")  # weights come from the file
        model = create_model(ARCHS[arch], n_channels=int(n_channels), n_classes=N_CLASSES, **kw)
    load_checkpoint(model, state)
    info = {"arch": arch, "n_channels": int(n_channels), "trainsize": config.get("trainsize")}
    return model.to(device).eval(), info


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
    """{stem: prior path} for every slice; a slice without a prior is an error naming it.
    Extra maps in the folder (e.g. all 50 lung-infection test slices) are ignored."""
    prior_path = Path(prior_path)
    if not prior_path.is_dir():
        raise DataError(f"{prior_path}: prior folder not found (run MyTest_LungInf.py with a Semi-Inf-Net "
                        f"checkpoint first, or pass an Inf-Net checkpoint to compute the priors on the fly)")
    found = list_images(prior_path)
    for stem, path in slices:
        if stem not in found:
            raise DataError(f"{path}: no infection map (prior) named '{stem}.*' in {prior_path}")
    return {stem: found[stem] for stem, _ in slices}


def predict_probabilities(model, rgb, prior, testsize, binarize_prior=True, device="cpu", amp=False):
    """Sigmoid class probabilities (3, H, W) at the slice's own size (float32 numpy).

    rgb: the slice (H, W, 3) uint8; prior: uint8 gray infection map (any size) or None for an
    image-only model. Probabilities are resized bilinearly from testsize to (H, W), so the
    class decision (argmax) is taken at the original resolution."""
    size = (testsize, testsize)
    x = network_input(resize(rgb, size), None if prior is None else prepare_prior(prior, size, binarize_prior))
    with torch.inference_mode(), autocast(device, amp):
        logits = model(x[None].to(device)).float()
    prob = torch.sigmoid(logits)
    prob = F.interpolate(prob, size=rgb.shape[:2], mode="bilinear", align_corners=False)[0]
    return prob.cpu().numpy()


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
             infnet_testsize=352, infnet_backbone=None, progress=True):
    """Label every slice of `data_path` (or `data_path/Imgs`); returns {folder kind: [paths]}.

    Priors: computed from `infnet_pth` (an Inf-Net / Semi-Inf-Net checkpoint) when given,
    otherwise read from `prior_path` (maps named like the slices, e.g. MyTest_LungInf.py's
    output); image-only models need neither. Either way a prior is binarised at 128 (unless
    binarize_prior=False), like the released training priors, then resized like the slice.
    `amp` None: priors at MyTest_LungInf.py's default precision (so they equal its maps), the multi-class
    network in fp32; True/False: both networks.
    Writes, at each slice's original size:
      <save_root>/Ground-glass opacities/<model>/<stem>.png   8-bit graded map (class_maps)
      <save_root>/Consolidation/<model>/<stem>.png            8-bit graded map, disjoint from GGO
      <save_root>/Overlay/<model>/<stem>.png                  RGB: red GGO, green consolidation
    """
    device = pick_device(device)
    slices = sorted(find_test_images(data_path).items(), key=lambda kv: _natural_key(kv[0]))
    model, info = load_multiclass(pth_path, device)
    testsize = testsize or info["trainsize"] or 352
    if info["arch"] != "unet" and testsize % 32:
        raise ValueError(f"{info['arch']} needs a testsize that is a multiple of 32, got {testsize}")
    model_name = model_name or default_model_name(pth_path)

    priors = {}
    if info["n_channels"] == 6:
        if infnet_pth:
            print(f"[test] computing infection priors with {infnet_pth}")
            priors = infnet_priors(infnet_pth, data_path, infnet_testsize, infnet_backbone, device, amp, progress)
        else:
            priors = folder_priors(prior_path, slices)

    save_root = Path(save_root)
    dirs = {c: save_root / folder / model_name for c, folder in CLASS_FOLDERS.items()}
    dirs["overlay"] = save_root / OVERLAY_FOLDER / model_name
    existing = sum((d / f"{s}.png").exists() for d in dirs.values() for s, _ in slices)
    if existing:
        print(f"[test] replacing {existing} existing file(s) under {save_root}")
    items = slices
    if progress:
        from tqdm import tqdm
        items = tqdm(slices, desc="test", leave=False)
    written = {"GGO": [], "Consolidation": [], "Overlay": []}
    for stem, path in items:
        rgb = read_rgb(path)
        prior = priors.get(stem)
        if isinstance(prior, Path):
            prior = read_mask(prior)
        prob = predict_probabilities(model, rgb, prior, testsize, binarize_prior, device, bool(amp))
        labels, maps = class_maps(prob)
        for c, key in ((1, "GGO"), (2, "Consolidation")):
            save_png(maps[c], dirs[c] / f"{stem}.png")
            written[key].append(dirs[c] / f"{stem}.png")
        save_png(overlay(rgb, labels), dirs["overlay"] / f"{stem}.png")
        written["Overlay"].append(dirs["overlay"] / f"{stem}.png")
    print(f"[test] {model_name}: wrote {len(slices)} slices to {', '.join(str(d) for d in dirs.values())}")
    return written
