"""Read the result files the MATLAB toolbox saves (`main.m`: <ResDir>/<dataset>-<c>-mat/<model>.mat).

Papers on these slices, the release among them (its EvaluateResults/), publish those files rather than their
maps. Each holds the mean over images of every metric at each of the 256 thresholds (`column_Dic`, ...,
thresholds 1:-1/255:0 of the min-max normalised map), so the fixed-threshold figures that most later papers
report can be read off them: Dice, Sen and Spe at 128/255 (metrics.FIXED_THRESHOLD), the same cut as our
`fixed*` figures, which for a map whose gray levels run from 0 to 255 (the release stretches every map so)
are the same numbers.
"""
from pathlib import Path

import numpy as np

from .folder import EvaluationError, fixed_figures
from .metrics import FIXED_KEYS, FIXED_THRESHOLD, THRESHOLDS

# The index of the fixed threshold among the toolbox's 256: the last (smallest) one at or above it, 128/255.
FIXED_INDEX = int(np.flatnonzero(THRESHOLDS >= FIXED_THRESHOLD)[-1])
_CURVES = {"Dic": "column_Dic", "Sen": "column_Sen", "Spe": "column_Spe", "Em": "column_E"}
_OPTIONAL_CURVES = {"Prec": "column_Pr"}  # older revisions of main.m also saved precision
_SCALARS = {"meanDic": "meanDic", "meanSen": "meanSen", "meanSpe": "meanSpe", "Sm": "Sm", "meanEm": "meanEm",
            "MAE": "mae", "maxDic": "maxDic", "maxSen": "maxSen", "maxSpe": "maxSpe", "maxEm": "maxEm"}


def _load(path):
    from scipy.io import loadmat  # only this reader needs scipy.io
    from scipy.io.matlab import MatReadError

    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file; give a .mat that the MATLAB toolbox's main.m saved")
    with open(path, "rb") as f:
        header = f.read(19)
    if header == b"MATLAB 7.3 MAT-file":
        raise EvaluationError(f"{path}: a MATLAB 7.3 (HDF5) file, which scipy cannot read; re-save it in MATLAB "
                              f"with save(..., '-v7')")
    try:
        return loadmat(str(path))
    except (MatReadError, ValueError, OSError):
        raise EvaluationError(f"{path}: not a MATLAB .mat file that scipy can read; give a result file of the "
                              f"toolbox's main.m") from None


def read_toolbox_mat(path, dataset=None, model=None):
    """The summary of one toolbox result file, with the keys `evaluate_folder` gives (those it can hold: no
    precision, no per-image rows): the release line's six, the maxima, 'curves' and fixedDic/fixedSen/fixedSpe
    read at 128/255. dataset / model default to the file's folder (less its '-mat') and name."""
    path = Path(path)
    data = _load(path)
    missing = [name for name in (*_CURVES.values(), *_SCALARS.values()) if name not in data]
    if missing:
        raise EvaluationError(f"{path}: not a result file of the toolbox's main.m (no {', '.join(missing)})")
    names = {**_CURVES, **{k: name for k, name in _OPTIONAL_CURVES.items() if name in data}}
    curves = {k: np.asarray(data[name], dtype=np.float64).ravel() for k, name in names.items()}
    wrong = [f"{names[k]} ({v.size})" for k, v in curves.items() if v.size != len(THRESHOLDS)]
    if wrong:
        raise EvaluationError(f"{path}: curves of {len(THRESHOLDS)} thresholds expected, got {', '.join(wrong)}")
    folder = path.parent.name
    summary = {"dataset": dataset or (folder[:-len("-mat")] if folder.endswith("-mat") else folder),
               "model": model or path.stem, "source": str(path), "thresholds": THRESHOLDS, "curves": curves}
    summary.update({k: float(np.asarray(data[name]).ravel()[0]) for k, name in _SCALARS.items()})
    summary.update({"fixed" + k: float(curves[k][FIXED_INDEX]) for k in FIXED_KEYS})
    return summary


def curve_line(summary):
    """The fixed-threshold figures read off the curves, labelled as such."""
    return (f"    at threshold 128/255 of the min-max normalised map (read from the toolbox's curves; what most later "
            f"papers report): {fixed_figures(summary)}. meanDic above: the mean over 256 thresholds (what the paper "
            f"reports).")
