"""A test run's output folder holds exactly that run's maps, with a record of what made them.

    check_output_folder(folder, overwrite)      # before any work: refuse a file, an input folder, old maps
    run = OutputFolder(folder, record, overwrite).start()   # clears old maps (overwrite), writes the record
    run.write(path, writer) ...; run.finish()    # the record lists every map with its digest

The record (`test_run.json`, EvaluationTool.record) lets the evaluation refuse a folder that mixes runs.
Stale temporaries of a killed run (our `.tmp-*` naming) are removed by the next run in the folder.
No PyTorch here.
"""
import contextlib
import json
import os
import time
from pathlib import Path

from EvaluationTool.record import RECORD_NAME, RecordError, digest, read_record

from .atomic import atomic_write, is_temporary, remove_temporaries
from .errors import OptionError, UserError

MAP_SUFFIX = ".png"


class OutputError(UserError, OSError):
    """An output that cannot be written (read-only folder, full disk): names the file and what to do."""


def _entries(folder):
    return [p for p in Path(folder).iterdir() if not is_temporary(p.name)]


def _record(folder):
    try:
        return read_record(folder) or {}
    except RecordError:
        return {}


def _source(folder):
    record = _record(folder)
    if not record:
        return ""
    weights = record.get("weights", {}).get("path", "?")
    if not record.get("complete"):  # stopped by an error or Ctrl-C: --overwrite is the way on, say so
        expected = record.get("expected", [])
        written = sum((Path(folder) / name).is_file() for name in expected)
        return f" (an unfinished run of {weights}: {written} of {len(expected)} maps)"
    return f" (maps of {weights})"


def _recorded(folder):
    """The files a test run recorded in `folder` (written or being written), and the record itself: the only
    files --overwrite deletes."""
    record = _record(folder)
    return set(record.get("maps", {})) | set(record.get("expected", [])) | {RECORD_NAME}


def _foreign_maps(folder):
    """PNG files in `folder` that no test run recorded (a GT folder given by mistake, maps of another tool)."""
    ours = _recorded(folder)
    return sorted(p.name for p in _entries(folder) if p.suffix.lower() == MAP_SUFFIX and p.name not in ours)


def check_output_folder(folder, overwrite=False, inputs=(), option="--save_path"):
    """Refuse, before any work, a folder the run must not write into: a file, the folder of the input slices,
    or a folder that already holds files (unless `overwrite`, which deletes the maps a test run recorded there
    when the run starts; PNG files no run recorded are never deleted: they are refused)."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OptionError(f"{option} {existing} is a file, not a folder; give a folder for the maps")
    resolved = folder.resolve()
    for path in inputs:
        if Path(path).resolve().parent == resolved:
            raise OptionError(f"{option} {folder} is the folder of the input slices ({Path(path).name}); "
                              f"write the maps to another folder")
    if folder.is_dir() and not overwrite:
        entries = _entries(folder)
        if entries:
            raise OptionError(f"{option} {folder} already holds {len(entries)} file(s){_source(folder)}; a folder "
                              f"holds the maps of one run only: choose a new or empty folder, or pass --overwrite "
                              f"to delete its maps first")
    if folder.is_dir() and overwrite:
        foreign = _foreign_maps(folder)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" (and {len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise OptionError(f"{option} {folder}: --overwrite deletes only the maps a test run recorded in its "
                              f"{RECORD_NAME}, and {len(foreign)} PNG file(s) there are not: {shown}; move them "
                              f"or choose another folder")


@contextlib.contextmanager
def writing(path, option="--save_path"):
    """An OSError while writing `path` (read-only folder or file system, full disk) becomes one line naming it."""
    try:
        yield
    except UserError:
        raise
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror or error}; choose a writable {option} with free "
                          f"space") from error


class OutputFolder:
    """One run's folder of maps: `start` clears old maps (with overwrite) and stale temporaries and records the
    run; `write` writes one map atomically; `finish` records every map written with its digest."""

    def __init__(self, folder, record, overwrite=False, names=(), option="--save_path"):
        """names: the maps the run will write (recorded at the start, so that an interrupted run's maps are
        known to be ours)."""
        self.folder, self.overwrite, self.option = Path(folder), overwrite, option
        self.record = {"complete": False, **record, "expected": sorted(names), "maps": {}}
        self.written = []

    def _save_record(self):
        text = json.dumps(self.record, indent=1)
        path = self.folder / RECORD_NAME
        with writing(path, self.option):
            atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def start(self):
        check_output_folder(self.folder, self.overwrite, option=self.option)
        with writing(self.folder, self.option):
            self.folder.mkdir(parents=True, exist_ok=True)
            stale = remove_temporaries(self.folder)
            if stale:
                print(f"[test] removed {len(stale)} temporary file(s) a killed run left in {self.folder}")
            ours = _recorded(self.folder)
            old = [p for p in _entries(self.folder) if p.is_file() and p.name in ours]
            for p in old:
                p.unlink()
            if old:
                print(f"[test] --overwrite: deleted {len(old)} old file(s) in {self.folder}")
        self.record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._save_record()
        return self

    def write(self, name, writer):
        """Write the map `name` with `writer(tmp_path)` (atomically); returns its path."""
        path = self.folder / name
        with writing(path, self.option):
            atomic_write(path, writer)
        self.written.append(path)
        return path

    def finish(self):
        self.record["maps"] = {p.name: digest(p) for p in self.written}
        self.record["count"] = len(self.written)
        self.record["complete"] = True
        self.record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._save_record()
        return self.written


def file_identity(path):
    """What identifies a weights or data file cheaply: its absolute path, size and modification time."""
    path = Path(path)
    st = os.stat(path)
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
