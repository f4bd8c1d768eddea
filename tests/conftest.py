import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("INFNET_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"
DATA = SHARED / "COVID-SemiSeg"


# CI sets CI=true: there, missing data means the run would test little, so it is a failure, not a skip.
ON_CI = os.environ.get("CI") == "true"
MISSING_DATA = "test data not found"  # the start of every such skip reason (counted in the summary)


def _need(path):
    if not path.exists():
        message = f"{MISSING_DATA}: {path} (put the shared data at ../shared beside the repo or set INFNET_SHARED)"
        if ON_CI:
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return path


def pytest_terminal_summary(terminalreporter):
    """Say how many tests did not run for want of data (a skip is easy to miss under -q)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if MISSING_DATA in _skip_reason(r)]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests skipped because the test data is missing: {SHARED} "
                                    f"(set INFNET_SHARED; under CI=true they fail)", yellow=True, bold=True)


def _skip_reason(report):
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.fixture(scope="session")
def reference_dir():
    return _need(REFERENCE)


@pytest.fixture(scope="session")
def data_root():
    return _need(DATA)


@pytest.fixture(scope="session")
def reference_weights(reference_dir):
    sys.path.insert(0, str(reference_dir))
    import reference_weights as rw
    return rw


@pytest.fixture(scope="session")
def infnet_spec(reference_dir):
    return json.loads((reference_dir / "infnet_res2net50_state_dict.json").read_text())


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny runs are faster so on a small, busy CPU."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def test_slices(data_root, tmp_path):
    """copy(n) -> (folder holding Imgs/ with the first n LungInfection-Test slices, their names)."""
    import shutil

    def copy(n=2):
        src = data_root / "TestingSet/LungInfection-Test/Imgs"
        dst = tmp_path / "in"
        (dst / "Imgs").mkdir(parents=True, exist_ok=True)
        names = sorted(os.listdir(src))[:n]
        for name in names:
            shutil.copy(src / name, dst / "Imgs" / name)
        return dst, names
    return copy


@pytest.fixture
def mini_dataset(data_root, tmp_path):
    """make(n_train, n_test) -> a Dataset/-like root holding the first slices of every COVID-SemiSeg folder."""
    import shutil

    def take(folder, n):
        stems = sorted({Path(f).stem for f in os.listdir(data_root / folder / "Imgs")})[:n]
        for sub in sorted(os.listdir(data_root / folder)):
            src, dst = data_root / folder / sub, tmp_path / "data" / folder / sub
            if not src.is_dir():
                continue
            dst.mkdir(parents=True, exist_ok=True)
            for f in os.listdir(src):
                if Path(f).stem in stems:
                    shutil.copy(src / f, dst / f)

    def make(n_train=3, n_test=2):
        for folder in ("TrainingSet/LungInfection-Train/Doctor-label", "TrainingSet/LungInfection-Train/Pseudo-label",
                       "TrainingSet/MultiClassInfection-Train"):
            take(folder, n_train)
        for folder in ("TestingSet/LungInfection-Test", "TestingSet/MultiClassInfection-Test"):
            take(folder, n_test)
        return tmp_path / "data"
    return make
