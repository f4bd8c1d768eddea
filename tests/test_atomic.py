"""Files we write get the permissions the user's umask gives, like any other program's files."""
import os
import stat

import pytest
import torch

from Code.model_lung_infection.atomic import atomic_write
from Code.model_lung_infection.checkpoint import atomic_save


@pytest.fixture
def umask():
    """set(mask): change the process umask for this test only."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)], ids=["022", "027", "077"])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    table = atomic_write(tmp_path / "table.md", lambda tmp: open(tmp, "w").write("| a |\n"))
    weights = atomic_save({"w": torch.zeros(2)}, tmp_path / "sub" / "Inf-Net-1.pth")
    for path in (table, weights):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, oct(os.stat(path).st_mode)
    # what a plain open() would have given, for comparison
    (tmp_path / "plain").write_text("x")
    assert stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) == mode


def test_overwrite_is_atomic_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "map.png"
    atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def fail(tmp):
        open(tmp, "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.png"]
