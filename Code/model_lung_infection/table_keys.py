"""What a table row's figures depend on (its key), so that a row is reused only for the same inputs.

A key covers the row's configuration, the budget, the seed, the ImageNet file its encoder starts from,
the code version of the recipes (RECIPE_VERSION) and the contents of every data folder the row reads.
Its digest names the row's run, maps and result, so rows of other inputs get folders of their own and
never mix with (or replace) those of earlier inputs. The device and precision are not in it: a table
may be continued on another machine (each row records its device).
"""
import hashlib
import json
from pathlib import Path

from .atomic import file_sha256
from .errors import DataError

# Bump when a change of code changes what a row measures (its training, test or evaluation): every row
# is then trained and scored again, in new folders, and the old ones are left as they are.
RECIPE_VERSION = 1

# The DataPaths folders each recipe trains on, in the order its steps read them (Semi-Inf-Net: step (i)
# on the pseudo labels, step (ii) on the doctor labels), and the one its rows are tested on.
TRAINING_DATA = {"supervised": ("doctor",), "semi": ("pseudo", "doctor"), "multiclass": ("multiclass_train",)}
TEST_DATA = {"supervised": "test", "semi": "test", "multiclass": "multiclass_test"}


def folder_fingerprint(folder):
    """{"files": n, "sha256": ...} of every file under `folder` (names and contents; hidden files left
    out): a copy of the same data gives the same fingerprint, any changed, added or removed slice another.
    Reading COVID-SemiSeg's 5388 files (55 MB) takes about 0.3 s."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found; --data_root must be laid out like Dataset/ "
                        f"(TrainingSet/LungInfection-Train/..., TestingSet/...)")
    total, n = hashlib.sha256(), 0
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            total.update(f"{relative.as_posix()}\0{file_sha256(path)}\n".encode())
            n += 1
    return {"files": n, "sha256": total.hexdigest()}


def file_fingerprint(path):
    """{"name", "bytes", "sha256"} of one file (an ImageNet encoder file), or None for no file."""
    if path is None:
        return None
    path = Path(path)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def digest(key):
    """The short name of a key (10 hex digits), the suffix of the folders of the row or run it describes."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def key_changes(old, new):
    """What differs between two keys, in words: e.g. "data (test), seed"."""
    old, new = (json.loads(json.dumps(k)) for k in (old, new))  # as stored: tuples become lists
    changed = []
    for field in sorted(set(old) | set(new)):
        a, b = old.get(field), new.get(field)
        if a == b:
            continue
        if field == "data" and isinstance(a, dict) and isinstance(b, dict):
            folders = [f for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
            changed.append(f"data ({', '.join(folders)})")
        elif field == "recipe_version":
            changed.append(f"recipe version {a} -> {b}")
        else:
            changed.append(field)
    return ", ".join(changed)
