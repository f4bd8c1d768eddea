r"""Label CT slices as background / GGO / consolidation with a trained multi-class network.

    # priors from Semi-Inf-Net maps written earlier by MyTest_LungInf.py:
    python MyTest_MulClsLungInf_UNet.py --pth_path Snapshots/save_weights/Semi-Inf-Net_UNet/Semi-Inf-Net_UNet-200.pth \
        --data_path Dataset/TestingSet/MultiClassInfection-Test
    # only CT slices: compute the priors on the fly with a (Semi-)Inf-Net checkpoint:
    python MyTest_MulClsLungInf_UNet.py --pth_path ... \
        --infnet_pth Snapshots/save_weights/Semi-Inf-Net/Semi-Inf-Net-100.pth

Writes, at each slice's size, under --save_path (default "Results/Multi-class lung infection segmentation"):
  Ground-glass opacities/<model>/<slice>.png, Consolidation/<model>/<slice>.png  (8-bit maps, disjoint)
  Overlay/<model>/<slice>.png  (the slice with GGO in red, consolidation in green)
Priors are binarised at 128 like the training priors. Then score them:
  python -m EvaluationTool --task multiclass --gt_root Dataset/TestingSet/MultiClassInfection-Test \
      --pred_root "Results/Multi-class lung infection segmentation" --models Semi-Inf-Net_UNet
"""
import argparse
import os

from Code.model_lung_infection.cli import ArgumentParser, add_bool, add_debug, add_runtime_args, positive_int, run_main
from Code.model_lung_infection.configs import (
    DEFAULT_PRIOR_PATH,
    DEFAULT_SAVE_ROOT,
    TEST_SIZE_RANGE,
    backbone_problems,
    one_path_component,
)
from Code.model_lung_infection.errors import CheckpointError, OptionError

# Where each weights option comes from, said when the file is not there.
WEIGHT_HINTS = {
    "--pth_path": "give --pth_path the weights of a trained multi-class network: MyTrain_MulClsLungInf_UNet.py "
                  "writes Snapshots/save_weights/<run>/<run>-<epoch>.pth (and checkpoint.pth); the release's "
                  "unet_model_200.pkl loads too",
    "--infnet_pth": "give --infnet_pth an Inf-Net / Semi-Inf-Net checkpoint (MyTrain_LungInf.py writes "
                    "Snapshots/save_weights/<run>/<run>-<epoch>.pth), or leave it out to read priors from --prior_path",
}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pth_path", default="Snapshots/save_weights/Semi-Inf-Net_UNet/Semi-Inf-Net_UNet-200.pth",
                   help="multi-class U-Net / FCN8s weights: release (unet_model_200.pkl), ours, or our checkpoint.pth")
    p.add_argument("--data_path", default="Dataset/TestingSet/MultiClassInfection-Test",
                   help="a folder of slices, or a folder holding Imgs/ (GT is not needed)")
    p.add_argument("--prior_path", default=str(DEFAULT_PRIOR_PATH),
                   help="infection maps named like the slices (ignored with --infnet_pth or an image-only model)")
    p.add_argument("--infnet_pth", default=None,
                   help="Inf-Net / Semi-Inf-Net checkpoint: compute the priors on the fly instead of --prior_path")
    p.add_argument("--infnet_testsize", type=positive_int, default=352,
                   help="input size of the Inf-Net computing the priors")
    p.add_argument("--infnet_backbone", default=None, help="encoder of release-format Inf-Net weights")
    p.add_argument("--save_path", default=str(DEFAULT_SAVE_ROOT), help="root of the output folders")
    p.add_argument("--testsize", type=positive_int, default=None,
                   help="network input size (default: the trainsize saved in checkpoint.pth, else 352)")
    p.add_argument("--model_name", default=None,
                   help="output sub-folder, one folder name (default: the weights' run folder or file stem)")
    add_bool(p, "--overwrite", False, "delete the maps of an earlier run in the model's folders first (without "
                                      "it, folders that hold files are refused)")
    add_bool(p, "--binarize_prior", True, "binarise priors at 128, as the training priors are")
    add_bool(p, "--progress", True, "progress bar")
    add_runtime_args(p)
    add_debug(p)
    return p.parse_args(argv)


def check_weights(option, path):
    """A missing weights file is named with the option that gave it and where such weights come from."""
    if path and not os.path.isfile(path):
        raise CheckpointError(f"no weights at {path}: {'not a file' if os.path.exists(path) else 'no such file'}; "
                              f"{WEIGHT_HINTS[option]}")


def main(argv=None):
    a = parse_args(argv)
    if a.model_name is not None:
        one_path_component(a.model_name, "--model_name")
    low, high = TEST_SIZE_RANGE
    for option, size in (("--testsize", a.testsize), ("--infnet_testsize", a.infnet_testsize)):
        if size is not None and not low <= size <= high:
            raise OptionError(f"{option} {size}: must lie between {low} and {high}")
    problems = backbone_problems(a.infnet_backbone, "--infnet_backbone")
    if problems:
        raise OptionError(problems[0])
    check_weights("--pth_path", a.pth_path)
    check_weights("--infnet_pth", a.infnet_pth)
    from Code.model_lung_infection.multiclass.predict import run_test  # PyTorch: after the arguments are parsed
    return run_test(a.pth_path, a.data_path, a.prior_path, a.infnet_pth, a.save_path, a.testsize, a.model_name,
                    a.device, a.amp, a.binarize_prior, a.infnet_testsize, a.infnet_backbone, a.progress,
                    num_workers=a.num_workers, overwrite=a.overwrite)


if __name__ == "__main__":
    run_main(main, exit_when_done=True)  # every map and record is written and closed when main returns
