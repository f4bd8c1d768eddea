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
