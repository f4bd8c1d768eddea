"""The record a test run leaves beside its maps, and the check the evaluation makes with it.

A test run (MyTest_LungInf.py, MyTest_MulClsLungInf_UNet.py) writes `test_run.json` into each folder of
maps: which weights and data made them, the options, and every map's name and content digest. It is
written when the run starts (`complete: false`) and again when the last map is written. The evaluation
refuses a folder whose maps are not exactly the recorded ones (maps of two runs mixed, a map changed or
missing since, a run that never finished); folders without a record (the release's, other tools') are
evaluated as they are. No PyTorch here: the evaluation tool runs without it.
"""
import json
from pathlib import Path

from Code.model_lung_infection.atomic import file_sha256  # plain Python: no PyTorch here

RECORD_NAME = "test_run.json"


class RecordError(Exception):
    """A folder whose maps do not match its test run's record (or an unreadable record)."""


def digest(path):
    """A short content digest of a file (sha256, 16 hex digits): maps are small, this is cheap."""
    return file_sha256(path)[:16]


def read_record(folder):
    """The folder's record (a dict), or None when it has none."""
    path = Path(folder) / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        record["maps"] = dict(record["maps"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RecordError(f"{path}: unreadable test-run record ({err}); rerun the test into this folder with "
                          f"--overwrite, or delete the record to evaluate the maps as they are") from None
    return record


def _names(names, limit=5):
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def check_maps(folder, names):
    """Raise RecordError unless the PNG files `names` of `folder` are exactly the maps its record lists,
    each with its recorded content. A folder without a record passes. Returns the record (or None)."""
    folder = Path(folder)
    record = read_record(folder)
    if record is None:
        return None
    where = folder / RECORD_NAME
    fix = "rerun the test into an empty folder (or with --overwrite, which clears the old maps first)"
    if not record.get("complete"):
        raise RecordError(f"{folder}: the test run recorded in {where} did not finish (interrupted?); {fix}")
    recorded = record["maps"]
    extra = set(names) - set(recorded)
    if extra:
        raise RecordError(f"{folder}: {len(extra)} map(s) not written by the run recorded in {where} "
                          f"(weights {record.get('weights', {}).get('path', '?')}): {_names(extra)}; maps of "
                          f"different runs must not be scored together: {fix}")
    missing = set(recorded) - set(names)
    if missing:
        raise RecordError(f"{folder}: {len(missing)} map(s) of the run recorded in {where} are missing: "
                          f"{_names(missing)}; {fix}")
    changed = [n for n in names if digest(folder / n) != recorded[n]]
    if changed:
        raise RecordError(f"{folder}: {len(changed)} map(s) changed since the run recorded in {where} wrote "
                          f"them: {_names(changed)}; {fix}")
    return record
