"""Atomic file writes: write to a temporary file beside the target, fsync, then rename.

A crash or Ctrl-C mid-write leaves the old file (or none), never half a file.
"""
import os
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Call `write(tmp_path)` to produce the file, then move it to `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
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
