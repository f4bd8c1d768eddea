"""The suite's own honesty: missing data is a failure under CI=true and a counted skip elsewhere."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

TINY_SUITE = '''
def test_needs_data(data_root):
    pass


def test_needs_nothing():
    pass
'''


def _run_tiny_suite(tmp_path, ci):
    """pytest -q on a two-test file (one needs ../shared) with our conftest and INFNET_SHARED missing."""
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(CONFTEST, suite / "conftest.py")
    (suite / "test_tiny.py").write_text(TINY_SUITE)
    (suite / "pytest.ini").write_text("[pytest]\n")  # isolate from any ini above tmp_path
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["INFNET_SHARED"] = str(tmp_path / "no-such-folder")
    if ci is not None:
        env["CI"] = ci
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)],
                       cwd=suite, env=env, capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_missing_data_fails_under_ci(tmp_path):
    code, out = _run_tiny_suite(tmp_path, ci="true")
    assert code != 0, out
    assert "1 passed" in out and "1 error" in out, out
    assert "CI=true: test data not found" in out and "no-such-folder" in out, out


@pytest.mark.parametrize("ci", [None, "false"])
def test_missing_data_skips_loudly_elsewhere(tmp_path, ci):
    code, out = _run_tiny_suite(tmp_path, ci=ci)
    assert code == 0, out
    assert "1 passed, 1 skipped" in out, out
    assert "1 tests skipped because the test data is missing" in out, out  # visible even under -q
