"""Reading CT slices and masks, pairing them by file stem, and the training / test datasets.

Rules (each violation is an error naming the file, never a silent skip):
- an image in `Imgs/` pairs with the mask of the same stem in `GT/` (and `Edge/`), any extension;
- a stem that appears twice in one folder, a partner that is missing, an unreadable file, a GT /
  Edge / prior whose size differs from its image's, or an empty folder stops the run; a training
  set is checked when it is built, and all its problems are reported together in one DataError;
- images of any size and mode load: gray, RGB(A), palette, 16-bit (16-bit and float images are
  min-max scaled to 8 bits, since CT exports rarely use the full 16-bit range).
"""
import contextlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .errors import DataError  # noqa: F401  (raised here; re-exported for callers)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingFolderError(DataError):
    """A data folder that is not there (the usual first run: no Dataset/ yet)."""


@contextlib.contextmanager
def data_option(option, holds):
    """Within it, a missing data folder is said with the option that gave it and what the folder must hold."""
    try:
        yield
    except MissingFolderError as e:
        raise MissingFolderError(f"{option}: {e}; give the folder holding {holds} (or put the COVID-SemiSeg data "
                                 f"in Dataset/, see Dataset/README.md)") from e


def list_images(folder):
    """{stem: path} of the image files in `folder`; errors on a missing/empty folder or a repeated stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFolderError(f"{folder}: folder not found")
    found = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
            continue
        if path.stem in found:
            raise DataError(f"{folder}: two files share the name '{path.stem}' ({found[path.stem].name}, {path.name})")
        found[path.stem] = path
    if not found:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
    return found


def pair_by_stem(folders, problems=None):
    """[(stem, path_a, path_b, ...)] for folders holding the same stems.

    A file without its partner is a problem: appended to `problems` (and the stem left out) when a
    list is given, else all of them are raised together in one DataError."""
    listings = [list_images(f) for f in folders]
    found = [] if problems is None else problems
    stems = set(listings[0])
    for folder, listing in zip(folders[1:], listings[1:]):
        found += [f"{listings[0][s]}: no partner named '{s}.*' in {folder}" for s in sorted(stems - set(listing))]
        found += [f"{listing[s]}: no partner named '{s}.*' in {folders[0]}" for s in sorted(set(listing) - stems)]
    if problems is None:
        raise_problems(found)
    paired = set.intersection(*(set(listing) for listing in listings))
    return [(stem, *(listing[stem] for listing in listings)) for stem in sorted(paired, key=_natural_key)]


# At most this many problems are spelled out in the one-line message (all are in DataError.problems).
MAX_PROBLEMS_SHOWN = 20


def raise_problems(problems, what="training data"):
    """One DataError listing every problem found (on one line, as cli.run_main prints it), if any."""
    if not problems:
        return
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = f"; ... and {len(problems) - MAX_PROBLEMS_SHOWN} more" if len(problems) > MAX_PROBLEMS_SHOWN else ""
    n = len(problems)
    error = DataError(f"{n} problem{'s' if n > 1 else ''} in the {what}: {shown}{more}; fix or remove these files")
    error.problems = list(problems)
    raise error


def image_size(path):
    """(width, height) of an image file that decodes to its end; DataError when it does not.

    Kept fast (1600 pseudo-label slices with their GT and Edge: 0.7 CPU-seconds here): PNG's verify()
    walks every chunk and its checksum without decompressing; a JPEG, whose verify() reads nothing, is
    decoded in draft mode at 1/8 scale (the whole entropy-coded stream, so a file cut short fails, but
    little of the inverse DCT); other formats are decoded."""
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
    except Exception as e:
        reason = str(e).replace(f"'{path}'", "").replace(str(path), "").strip(" :") or type(e).__name__
        raise DataError(f"{path} cannot be read as an image ({reason})") from e
    return size


def zero_one_masks(folder, paths):
    """[message] when every mask of `folder` (its files `paths`) holds only 0 and 1: masks exported as 0/1
    where 0/255 is meant. Masks are read as 0..255 (255 = infection), so such a set would train on targets
    of at most 1/255 and on no edges at all. Files are decoded until one holds a value above 1 (the first,
    in a usual folder); unreadable ones are left to check_pairs."""
    ones = 0
    for path in paths:
        try:
            top = int(read_mask(path).max())
        except DataError:
            continue
        if top > 1:
            return []
        ones += top == 1
    if not ones:
        return []
    return [f"{folder}: all {len(paths)} masks hold only the values 0 and 1, but masks are read as 0..255 "
            f"(255 = infection), so training would learn from targets of at most 0.004: save them as 0/255 "
            f"(multiply by 255)"]


def _short(path):
    """'Imgs/x.jpg': enough to name a partner whose root the message already shows."""
    return f"{path.parent.name}/{path.name}"


def _checked_size(path):
    try:
        return image_size(path)
    except DataError as e:
        return e


def _threads():
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cpus or 1))


def check_pairs(samples):
    """Problems of paired files [(stem, image, partner, ...)]: every file must decode as an image and each
    partner (GT, Edge, prior; None = absent) must have its image's size. Returns the messages.
    Files are decoded on a few threads (PIL decodes without the GIL)."""
    paths = [p for _, *files in samples for p in files if p is not None]
    with ThreadPoolExecutor(_threads()) as pool:
        checked = dict(zip(paths, pool.map(_checked_size, paths, chunksize=16)))
    problems = []
    for _, image, *partners in samples:
        sizes = {}
        for path in (image, *partners):
            if path is None:
                continue
            if isinstance(checked[path], DataError):
                problems.append(str(checked[path]))
            else:
                sizes[path] = checked[path]
        if image not in sizes:
            continue
        (w, h) = sizes[image]
        problems += [f"{p} is {sizes[p][0]}x{sizes[p][1]} but {_short(image)} is {w}x{h}"
                     for p in partners if p in sizes and sizes[p] != (w, h)]
    return problems


def masks_as_slices(paths):
    """A message when every image of `paths` holds at most two gray levels: masks (a GT/ folder given as the
    slices), not CT, which has hundreds; the network would turn them into maps without complaint. None
    otherwise. Files are decoded until one holds more (the first, in a usual folder); unreadable ones are
    left to check_pairs."""
    for path in paths:
        try:
            if np.count_nonzero(np.bincount(read_gray_or_rgb(path).ravel(), minlength=256)) > 2:
                return None
        except DataError:
            continue
    folders = {Path(p).parent for p in paths}
    where = f"{folders.pop()}: all {len(paths)} images" if len(folders) == 1 else f"all {len(paths)} slices"
    return (f"{where} hold at most two gray levels: masks (such as a GT/ folder), not CT slices; give the "
            f"folder of the slices (Imgs/, or the folder above it)")


def check_slices(items, what="test slices"):
    """DataError listing every slice of [(stem, path)] that does not decode to its end (image_size: fast), or
    saying that they are all masks (masks_as_slices), so that a test run stops before it writes anything."""
    raise_problems(check_pairs([(stem, path) for stem, path in items]), what)
    masks = masks_as_slices([path for _, path in items])
    if masks:
        raise DataError(masks)


def _natural_key(stem):
    """Sort '2' before '10'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", stem)]


def _to_uint8(a, path):
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float64)
    lo, hi = np.nanmin(a), np.nanmax(a)
    if not np.isfinite([lo, hi]).all():
        raise DataError(f"{path}: image holds no finite values")
    return np.zeros(a.shape, np.uint8) if hi == lo else np.round((a - lo) / (hi - lo) * 255).astype(np.uint8)


def read_gray_or_rgb(path):
    """The file as a uint8 array, (H, W) or (H, W, 3), whatever its mode and bit depth."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "P":
                im = im.convert("RGB")
            elif im.mode in ("LA", "RGBA", "CMYK", "YCbCr"):
                im = im.convert("RGB")
            a = np.array(im)
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({e})") from e
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    return _to_uint8(a, path)


def read_rgb(path):
    """A CT slice as uint8 RGB (H, W, 3): gray is replicated, as the release's convert('RGB') did."""
    a = read_gray_or_rgb(path)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def read_mask(path):
    """A mask as uint8 (H, W): the gray value of the file (RGB masks: luminance)."""
    a = read_gray_or_rgb(path)
    return cv2.cvtColor(a, cv2.COLOR_RGB2GRAY) if a.ndim == 3 else a


def edge_from_mask(mask):
    """Edge map of a mask: binarise at 128, then Canny (used where no Edge/ folder is given)."""
    return cv2.Canny(np.where(mask >= 128, 255, 0).astype(np.uint8), 100, 200)


def resize(a, size, resample=Image.BILINEAR):
    """PIL resize of a uint8 array to (h, w), as the release's transforms.Resize did."""
    h, w = size
    return np.array(Image.fromarray(a).resize((w, h), resample))


def normalize_image(rgb):
    """uint8 RGB (H, W, 3) -> ImageNet-normalised float tensor (3, H, W)."""
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def mask_tensor(mask):
    """uint8 (H, W) -> float tensor (1, H, W) in [0, 1], not binarised (as released)."""
    return torch.from_numpy(np.ascontiguousarray(mask)).float().div_(255).unsqueeze(0)


class CachedSampleSet(Dataset):
    """A dataset whose decoded, resized samples (uint8 arrays) are kept after the first read,
    so later epochs skip decoding. Subclasses implement `read(i)` and `__getitem__`.

    The cache lives in the process that reads: DataLoader workers would each fill their own copy (workers x
    DDP ranks copies, never seen by the next loader), so a loader with workers is preceded by `fill_caches`,
    which fills it once in the main process; the workers fork after it and share it (fork: Linux's start method
    up to Python 3.13; where workers are spawned, each gets a copy of the filled cache)."""

    def __init__(self, cache=True):
        self._cache = {} if cache else None

    def read(self, i):
        raise NotImplementedError

    def load(self, i):
        if self._cache is None:
            return self.read(i)
        if i not in self._cache:
            self._cache[i] = self.read(i)
        return self._cache[i]

    def fill(self, num_workers=0):
        """Decode every sample not cached yet into this process's cache (by `num_workers` processes)."""
        if self._cache is None:
            return
        missing = [i for i in range(len(self)) if i not in self._cache]
        if missing:
            reads = torch.utils.data.DataLoader(_Reads(self, missing), batch_size=None, num_workers=num_workers,
                                                collate_fn=_as_read)
            self._cache.update(reads)


class _Reads(Dataset):
    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        return self.indices[j], self.dataset.read(self.indices[j])


def _as_read(item):
    return item  # the decoded arrays as they are (the default would turn them into tensors)


def fill_caches(dataset, num_workers=0):
    """`CachedSampleSet.fill` every cached set inside `dataset` (Subset, ConcatDataset included)."""
    if isinstance(dataset, CachedSampleSet):
        dataset.fill(num_workers)
    for inner in getattr(dataset, "datasets", None) or [getattr(dataset, "dataset", None)]:
        if inner is not None:
            fill_caches(inner, num_workers)


def gray_histogram(paths):
    """The pooled histogram (256 counts) of the slices' gray levels (RGB slices: every channel counted)."""
    counts = np.zeros(256, np.int64)
    for path in paths:
        counts += np.bincount(read_gray_or_rgb(path).ravel(), minlength=256)
    return counts


def gray_matching_lut(source_paths, target_paths, sample=200):
    """A uint8 lookup table (256,) that maps the gray levels of `source_paths` onto those of `target_paths`:
    histogram matching of the two pooled histograms (each source level goes to the target level at the same
    quantile), meant for two sources of slices exported with different display windows (it cannot tell a
    window from a different mix of anatomy). At most `sample` files of each side are read, evenly spaced.
    Monotone, so the order of gray levels is kept."""
    def spaced(paths):
        paths = list(paths)
        step = max(1, -(-len(paths) // sample))
        return paths[::step]
    cdf = [np.cumsum(h) / max(1, h.sum()) for h in (gray_histogram(spaced(source_paths)),
                                                     gray_histogram(spaced(target_paths)))]
    levels = np.arange(256, dtype=np.float64)
    return np.clip(np.rint(np.interp(cdf[0], cdf[1], levels)), 0, 255).astype(np.uint8)


class InfectionTrainSet(CachedSampleSet):
    """A folder with `Imgs/`, `GT/` and (optionally) `Edge/`: (image, gt, edge) tensors at `trainsize`.

    Several roots may be given (e.g. a labelled seed set plus pseudo labels); stems must be unique
    across them. Decoded, resized samples are cached as uint8 so later epochs skip the JPEG decode.
    gray_lut: a uint8 table (256,) the images' gray levels go through first (`gray_matching_lut`).
    """

    def __init__(self, roots, trainsize=352, cache=True, gray_lut=None):
        super().__init__(cache)
        self.gray_lut = gray_lut
        roots = [Path(r) for r in ([roots] if isinstance(roots, (str, os.PathLike)) else roots)]
        self.trainsize = trainsize
        self.samples = []  # (stem, image path, gt path, edge path or None)
        problems, seen = [], {}
        for root in roots:
            edge_dir = root / "Edge"
            folders = [root / "Imgs", root / "GT"] + ([edge_dir] if edge_dir.is_dir() else [])
            pairs = pair_by_stem(folders, problems)
            for stem, *paths in pairs:
                if stem in seen:
                    problems.append(f"{paths[0]}: name '{stem}' also in {seen[stem]}")
                    continue
                seen[stem] = root
                self.samples.append((stem, paths[0], paths[1], paths[2] if len(paths) > 2 else None))
            for column, folder in enumerate(folders[1:], start=2):  # GT and Edge: 0/255, not 0/1
                problems += zero_one_masks(folder, [pair[column] for pair in pairs])
        # Every file is checked before the first step, and all problems are reported at once.
        raise_problems(problems + check_pairs(self.samples))

    def __len__(self):
        return len(self.samples)

    def read(self, i):
        """uint8 arrays (image HxWx3, gt HxW, edge HxW) at trainsize."""
        stem, img_path, gt_path, edge_path = self.samples[i]
        size = (self.trainsize, self.trainsize)
        image, gt = read_rgb(img_path), read_mask(gt_path)
        if self.gray_lut is not None:
            image = self.gray_lut[image]
        edge = read_mask(edge_path) if edge_path else edge_from_mask(gt)
        return resize(image, size), resize(gt, size), resize(edge, size)

    def __getitem__(self, i):
        image, gt, edge = self.load(i)
        return normalize_image(image), mask_tensor(gt), mask_tensor(edge)


def find_test_images(data_path):
    """{stem: path} of the slices to segment: `data_path` itself or its `Imgs/` sub-folder."""
    data_path = Path(data_path)
    if (data_path / "Imgs").is_dir():
        data_path = data_path / "Imgs"
    return list_images(data_path)


class SliceSet(Dataset):
    """CT slices for inference: (normalised image at testsize, stem, original (h, w)).

    The slices of `data_path` (or `data_path/Imgs`) in natural order, or `items`: [(stem, path)]."""

    def __init__(self, data_path=None, testsize=352, items=None):
        if items is None:
            items = sorted(find_test_images(data_path).items(), key=lambda kv: _natural_key(kv[0]))
        self.items = list(items)
        self.testsize = testsize

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        stem, path = self.items[i]
        rgb = read_rgb(path)
        return normalize_image(resize(rgb, (self.testsize, self.testsize))), stem, rgb.shape[:2]
