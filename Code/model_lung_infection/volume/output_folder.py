"""The volume stage's --save_path holds one run's results, with a record of what made them.

`volume_run.json` in --save_path records the run's inputs (data, weights or mask, options) and each case
finished with a fingerprint of its source files. Before any work (`OutputRoot.prepare`):
- an empty or new folder: a fresh run;
- the record of a run with the same inputs: a rerun resumes, keeping the cases finished earlier whose
  source files are unchanged (an interrupted run loses nothing; a finished one costs nothing to rerun);
- anything else (another run's cases, other files) is refused unless --overwrite, which deletes only
  the files the volume stage writes (case outputs, summary.csv, the record), never a user's own files.
As for the slice test stage (outputs.py), whose folder record is test_run.json.
"""
import json
import os
import time
from pathlib import Path

from ..atomic import atomic_write, is_temporary, remove_temporaries
from ..configs import VOLUMES
from ..errors import OptionError
from ..outputs import file_identity, writing

RECORD_NAME = "volume_run.json"
TABLE_NAME = "summary.csv"
# The files a case folder gets (and only these are removed when a case is run again or overwritten).
OUTPUTS = ("infection.nii.gz", "lungs.nii.gz", "classes.nii.gz", "probability.nii.gz", "slices.csv", "overview.png",
           "summary.json")
# Options that change no voxel of the outputs: a rerun differing only in these resumes.
NOT_IN_KEY = ("save_path", "data_path", "pth_path", "mask", "multiclass_pth", "progress", "batchsize", "device",
              "overwrite")


def run_key(cfg):
    """What makes a run's outputs: the data, the weights (or mask) and the options, as JSON values."""
    files = {name: file_identity(path) if path else None
             for name, path in (("weights", cfg.pth_path if not cfg.mask else None), ("mask", cfg.mask),
                                ("multiclass", cfg.multiclass_pth))}
    options = cfg.options_read_by(VOLUMES, leave_out=NOT_IN_KEY)
    key = {"data_path": str(Path(cfg.data_path).resolve()), **files, "options": options}
    return json.loads(json.dumps(key))


def fingerprint(case):
    """A cheap identity of a case's source files: count, total size, newest modification time."""
    files = case.files or (case.path,)
    stats = [os.stat(p) for p in files if Path(p).exists()]
    return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def _is_case_folder(path):
    return path.is_dir() and (any((path / n).is_file() for n in OUTPUTS)
                              or any(is_temporary(q.name) for q in path.iterdir()))  # a case killed while writing


def _case_folders(folder):
    """Subfolders holding a file the volume stage writes (a run's case folders, recorded or not)."""
    return sorted(p for p in folder.iterdir() if _is_case_folder(p))


def _describe(record):
    if not record:
        return ""
    key = record.get("key", {})
    made = f"mask {key['mask']['path']}" if key.get("mask") else f"weights {(key.get('weights') or {}).get('path')}"
    return f" (from {key.get('data_path')} with {made})"


class OutputRoot:
    """One run's --save_path: `prepare` (before any work) says which cases are done already, `done` records
    a finished case."""

    def __init__(self, folder, key, overwrite=False):
        self.folder, self.key, self.overwrite = Path(folder), key, overwrite
        self.record = {"stage": "volume", "key": key, "complete": False, "cases": {}}

    def _read_record(self):
        try:
            record = json.loads((self.folder / RECORD_NAME).read_text())
            return record if isinstance(record, dict) and isinstance(record.get("cases"), dict) else None
        except (OSError, ValueError):
            return None

    def prepare(self, cases):
        """Check the folder and return {case name: its summary.json path} of the cases to keep (a resumed run)."""
        folder = self.folder
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise OptionError(f"--save_path {existing} is a file, not a folder; give a folder for the outputs")
        entries = [p for p in folder.iterdir() if not is_temporary(p.name)] if folder.is_dir() else []
        if entries and all(p.name in (RECORD_NAME, TABLE_NAME) for p in entries):
            entries = []  # a run that made no case folder (its one scan unreadable, say): nothing to keep
        record = self._read_record() if entries else None
        if record and record.get("key") == self.key and not self.overwrite:
            keep = {}
            for case in cases:
                done = record["cases"].get(case.name)
                summary = folder / case.name / "summary.json"
                if done and done.get("fingerprint") == fingerprint(case) and summary.is_file():
                    keep[case.name] = summary
                    self.record["cases"][case.name] = done
            print(f"[volume] {folder}: a rerun of the same inputs: keeping {len(keep)} case(s) finished earlier, "
                  f"running {len(cases) - len(keep)}")
            return keep
        if entries:
            ours = _case_folders(folder)
            foreign = sorted(p.name for p in entries if p not in ours and p.name not in (RECORD_NAME, TABLE_NAME))
            if foreign:  # never ours to delete, so --overwrite cannot help
                shown = ", ".join(foreign[:3]) + (f" (and {len(foreign) - 3} more)" if len(foreign) > 3 else "")
                raise OptionError(f"--save_path {folder} holds {len(foreign)} file(s) or folder(s) that this stage did "
                                  f"not write ({shown}); an output folder holds one run's results: choose a new or "
                                  f"empty folder")
            if not self.overwrite:
                raise OptionError(f"--save_path {folder} already holds {len(ours)} case folder(s) of another run"
                                  f"{_describe(record)}; an output folder holds one run's results: choose a new or "
                                  f"empty folder, or pass --overwrite to delete its results first")
        if folder.is_dir():
            self._clear(quiet=not entries)
        return {}

    def _clear(self, quiet=False):
        """--overwrite: delete what the volume stage wrote here (case outputs, the table, the record) only."""
        removed = 0
        with writing(self.folder):
            for case in _case_folders(self.folder):
                for p in [case / n for n in OUTPUTS] + sorted(case.glob(".tmp-*")):
                    if p.is_file():
                        p.unlink()
                        removed += 1
                if not any(case.iterdir()):
                    case.rmdir()
            for p in [self.folder / TABLE_NAME, self.folder / RECORD_NAME]:
                if p.is_file():
                    p.unlink()
                    removed += 1
        if not quiet:
            print(f"[volume] --overwrite: deleted {removed} file(s) of an earlier run in {self.folder}")

    def _save(self):
        path = self.folder / RECORD_NAME
        text = json.dumps(self.record, indent=1)
        with writing(path):
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def start(self):
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_temporaries(self.folder)
        self.record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._save()
        return self

    def done(self, case):
        self.record["cases"][case.name] = {"source": str(case.path), "fingerprint": fingerprint(case)}
        self._save()

    def finish(self):
        self.record["complete"] = True
        self.record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._save()
