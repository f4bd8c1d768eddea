"""The folder a run writes into: one run at a time, leftovers of killed runs removed, room checked first.

- `lock_folder(folder)`: a lock file (LOCK_NAME) naming the process that holds the folder (pid, host,
  command); a second run on the folder stops with a line naming the holder. The kernel's flock releases it
  when its process dies (kill -9 included), so a lock left by a dead run is taken over, with a note.
- `remove_stale_temporaries(folder)`: half-written files of our atomic writes (atomic.TEMP_NAME) that a
  killed run left; only called by the folder's lock holder, so never another live run's.
- `check_writable(folder)` and `check_free_space(folder, bytes)`: before any work is done, not when the
  first checkpoint is written after an epoch.
"""
import atexit
import json
import os
import re
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

from .atomic import remove_temporaries
from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: there a lock is stale when its process no longer runs (_alive)
    fcntl = None

LOCK_NAME = ".run.lock"


class FolderInUse(UserError):
    """Another live process holds the folder's lock (the message names it)."""


_held = {}  # resolved folder -> (file descriptor, lock path): this process's locks


def check_writable(folder, option):
    """Create `folder` (and parents) and a file in it, or raise one UserError naming `option`: read-only
    folders and file systems, a file where a folder should be, permissions."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".tmp-{secrets.token_hex(8)}"  # named as atomic writes name theirs: cleaned if killed
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror or e}): give a writable {option}") from e


def _holder():
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:])[:500]}


def _describe(holder):
    if not holder:
        return "another process (it has not written its name yet)"
    return (f"process {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')}: "
            f"{holder.get('command')})")


def _read(fd):
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 65536).decode() or "null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder):
    """Whether a lock's holder may still run (without flock: its pid on this host)."""
    if not holder or holder.get("host") != socket.gethostname():
        return bool(holder)  # another host's process cannot be asked: assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError, TypeError):
        return True
    return True


def lock_folder(folder, what="run", option="--train_save", log=print):
    """Hold `folder` until `release_folder(folder)` or the process ends (callers check_writable it first,
    for a clear error); FolderInUse when another live process holds it. Re-entrant within a process.
    `what`/`option` word the messages."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _held:
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        previous = _read(fd)
        try:
            if fcntl is None:
                raise OSError("no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            previous = _read(fd)
            locked = True
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by {_describe(previous)}: wait for that {what} to end, "
                              f"or choose another {option}") from None
        except OSError:  # no flock here (Windows, some network file systems): ask whether the holder runs
            locked = False
        if not locked and previous and previous.get("pid") != os.getpid() and _alive(previous):
            os.close(fd)
            raise FolderInUse(f"{folder} is in use by {_describe(previous)}: wait for that {what} to end, "
                              f"or choose another {option} (if it has ended, delete {path})")
        try:  # the file locked may have been unlinked by its holder's release meanwhile: lock the one at `path`
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    if previous and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
        log(f"[lock] {folder}: taking over the lock of {_describe(previous)}, which no longer runs", flush=True)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(_holder()).encode())
    _held[key] = (fd, path)


def release_folder(folder):
    """Give up this process's lock on `folder` (and delete the lock file); nothing if not held."""
    fd, path = _held.pop(Path(folder).resolve(), (None, None))
    if fd is None:
        return
    try:
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            os.unlink(path)  # while still locked: a waiting process then retries on a fresh file
    except OSError:
        pass
    os.close(fd)


@atexit.register
def _release_all():
    for folder in list(_held):
        release_folder(folder)


def remove_stale_temporaries(folder, log=print):
    """Delete the temporaries of atomic writes that a killed run left in `folder` (not recursive), saying
    each; the caller holds the folder's lock. Returns the names removed."""
    removed = remove_temporaries(folder)
    for p, size in removed:
        log(f"[cleanup] removed {p} ({size / 2 ** 20:.1f} MB), a half-written file of a run that was killed",
            flush=True)
    return [p.name for p, _ in removed]


def check_free_space(folder, needed, what):
    """UserError unless `folder`'s file system has `needed` bytes free (what: the files they are for)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f"{folder}: {free / 2 ** 20:.0f} MB free, but {what} need about {needed / 2 ** 20:.0f} MB: "
                        f"free some space or give another --snapshot_root")


def run_files(folder, prefixes):
    """The files a training run writes into `folder`: checkpoint.pth, val.csv and its snapshots
    `<prefix>-<epoch>.pth` / `<prefix>-ema-<epoch>.pth` for each of `prefixes`."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    snapshot = re.compile(rf"({'|'.join(map(re.escape, prefixes))})-(ema-)?\d+\.pth")
    return sorted(p for p in folder.iterdir() if p.is_file() and (
        p.name in ("checkpoint.pth", "val.csv") or snapshot.fullmatch(p.name)))
