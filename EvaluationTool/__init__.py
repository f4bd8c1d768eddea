"""Python version of the Inf-Net MATLAB EvaluationTool (Dice, Sen, Spe, Prec, S-alpha, E-phi, MAE).

    from EvaluationTool import evaluate_pair, evaluate_folder
    r = evaluate_pair(pred_uint8, gt_uint8)        # per-threshold curves + S-alpha, MAE
    s = evaluate_folder("GT", "Results/Inf-Net")   # summary dict (meanDic, Sm, ...)
    m = read_toolbox_mat("Inf-Net.mat")            # a result file of the MATLAB toolbox (main.m)
"""
from .folder import EvaluationError, evaluate_folder, read_image, release_line
from .metrics import THRESHOLDS, binarize_gt, evaluate_pair, normalize_prediction, s_measure
from .toolbox_mat import read_toolbox_mat

__all__ = ["evaluate_pair", "evaluate_folder", "EvaluationError", "read_image", "release_line",
           "THRESHOLDS", "binarize_gt", "normalize_prediction", "s_measure", "read_toolbox_mat"]
