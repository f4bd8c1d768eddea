"""The classical lung mask on real CT (../shared/realct, see its README): COPDGene against CIP's lung labels,
TotalSegmentator's abdomen with lung bases (colon gas and the table are not lung), and a whole normal chest."""
import numpy as np
import pytest
from conftest import SHARED, _need

from Code.model_lung_infection.quantify.lungs import LEFT, RIGHT, find_lungs
from Code.model_lung_infection.volume import geometry
from Code.model_lung_infection.volume.io import read_dicom, read_nifti

REALCT = SHARED / "realct"
TS_LOBES = (10, 11, 12, 13, 14)     # TotalSegmentator "total": lung lobes
TS_COLON = 20
TS_VERTEBRAE = range(25, 51)        # sacrum .. C1


def _display(path, labels=None):
    """(HU, spacing, labels or None) in the lung mask's display view."""
    volume = read_nifti(path) if str(path).endswith(".nii.gz") else read_dicom(path)
    orient = geometry.orientation(volume.affine, volume.data.shape)
    ref = orient.display(read_nifti(labels).data).astype(np.int16) if labels else None
    return orient.display(volume.data), orient.spacing, ref


def _dice(a, b):
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def test_copdgene_lungs_match_cip_labels_per_side():
    folder = _need(REALCT / "copdgene-64")
    hu, spacing, cip = _display(folder / "ct-64.nii.gz", folder / "lm-64_right1_left2.nii.gz")
    labels = find_lungs(hu, spacing).labels
    assert _dice(labels == RIGHT, cip == 1) >= 0.95   # CIP: 1 right, 2 left
    assert _dice(labels == LEFT, cip == 2) >= 0.95


def test_totalsegmentator_lung_bases_found_colon_and_table_rejected():
    folder = _need(REALCT / "totalseg")
    hu, spacing, seg = _display(folder / "example_ct_sm.nii.gz", folder / "example_seg.nii.gz")
    ours = find_lungs(hu, spacing).labels > 0
    lobes = np.isin(seg, TS_LOBES)
    assert _dice(ours, lobes) >= 0.6
    assert (ours & ~lobes).sum() <= 0.25 * ours.sum()
    assert not (ours & (seg == TS_COLON)).any()
    # the table and its padding lie behind the back: no lung further posterior than the spine (columns: posterior)
    spine_back = np.flatnonzero(np.isin(seg, TS_VERTEBRAE).any(axis=(0, 2))).max()
    assert np.flatnonzero(ours.any(axis=(0, 2))).max() < spine_back


@pytest.fixture(scope="module")
def normal_chest():
    """The 141-slice 512 x 512 normal chest, read and masked once for the module (about 15 s)."""
    hu, spacing, _ = _display(_need(REALCT / "chest-normal-dicom"))
    return find_lungs(hu, spacing), float(np.prod(spacing)) / 1000.0


def test_normal_chest_volume_and_sides(normal_chest):
    lungs, voxel_ml = normal_chest
    right, left = (lungs.labels == RIGHT).sum() * voxel_ml, (lungs.labels == LEFT).sum() * voxel_ml
    assert 4000 <= right + left <= 7000
    assert right > left                       # the right lung is the larger (three lobes)
    assert lungs.dense.sum() * voxel_ml < 0.01 * (right + left)  # a normal chest has no dense lung to add
