"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A crash or Ctrl-C mid-write leaves the old file (or none), never half a file.
"""
import hashlib
import os
import re
import secrets
from pathlib import Path

# Our temporaries: `.tmp-<16 hex digits><suffix>` (a name no other program is likely to use, so that a
# killed run's leftovers can be told apart and removed: remove_temporaries).
_TEMP_NAME = re.compile(r"\.tmp-[0-9a-f]{16}(\.[A-Za-z0-9.]*)?")


def is_temporary(name):
    """Whether a file name is one of our atomic writes' temporaries."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_temporaries(folder):
    """Delete the temporaries our atomic writes left in `folder` when a run was killed (not recursive; nothing
    else is touched); returns the removed paths with their sizes in bytes."""
    folder = Path(folder)
    stale = sorted(p for p in folder.iterdir() if p.is_file() and is_temporary(p.name)) if folder.is_dir() else []
    removed = []
    for p in stale:
        removed.append((p, p.stat().st_size))
        p.unlink(missing_ok=True)
    return removed


def _create_temp(folder, suffix):
    """A new empty file beside the target, created with mode 0o666 so that the kernel applies the
    user's umask (and any default ACL), as a plain open() would. (tempfile.mkstemp creates 0600
    files: colleagues on a shared server could not read our weights, maps or tables.)"""
    for _ in range(100):
        tmp = Path(folder) / f".tmp-{secrets.token_hex(8)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return str(tmp)
    raise FileExistsError(f"{folder}: could not create a temporary file (100 names taken)")


def atomic_write(path, write, suffix=None):
    """Call `write(tmp_path)` to produce the file, then move it to `path` in one rename.
    `suffix`: the temporary file's ending (default: the path's), for writers that infer a format from it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path.parent, path.suffix if suffix is None else suffix)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def file_sha256(path):
    """The file's sha256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
