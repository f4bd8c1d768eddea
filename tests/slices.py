"""Copies of real COVID-SemiSeg slices for tests that train (imported by test modules; not a test)."""
import shutil

DOCTOR = "TrainingSet/LungInfection-Train/Doctor-label"


def copy_doctor_slices(data_root, dst, n=4, edge=True, key=None):
    """Copy the first `n` doctor-labelled slices (sorted by stem, or by `key`) with their GT (and Edge)
    into dst/{Imgs,GT,Edge}; returns their stems."""
    src = data_root / DOCTOR
    stems = sorted((p.stem for p in (src / "Imgs").iterdir()), key=key)[:n]
    for sub in ["Imgs", "GT"] + (["Edge"] if edge else []):
        (dst / sub).mkdir(parents=True, exist_ok=True)
        for s in stems:
            f = next((src / sub).glob(s + ".*"))
            shutil.copy(f, dst / sub / f.name)
    return stems


def write_synthetic_slices(root, n=4, size=96, prefix=""):
    """n CT-like slices (Imgs/<prefix><i>.jpg) with blob masks (GT/*.png), for tests that need no real data;
    edges are derived from the masks."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    (root / "Imgs").mkdir(parents=True)
    (root / "GT").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(30, 66), rng.integers(30, 66), rng.integers(10, 25)
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.uint8) * 255
        image = np.clip(rng.normal(90, 30, (size, size)) + mask * 0.4, 0, 255).astype(np.uint8)
        Image.fromarray(image).convert("RGB").save(root / "Imgs" / f"{prefix}{i}.jpg")
        Image.fromarray(mask).save(root / "GT" / f"{prefix}{i}.png")
    return root
