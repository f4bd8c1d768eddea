r"""Segment CT slices or whole CT scans with a trained Inf-Net (ours or a release checkpoint).

    python MyTest_LungInf.py --pth_path Snapshots/save_weights/Inf-Net/Inf-Net-100.pth \
        --data_path Dataset/TestingSet/LungInfection-Test
    # -> Results/Lung infection segmentation/Inf-Net/<slice>.png, 8-bit maps at each slice's size, and
    #    test_run.json (what made them); a folder that holds files is refused unless --overwrite

CT volumes (a NIfTI, MetaImage or NRRD file, a DICOM series folder, or a folder of them; docs/volumes.md):
    python MyTest_LungInf.py --pth_path W --data_path scan.nii.gz --save_path OUT
    python MyTest_LungInf.py --data_path scan.nii.gz --mask infection.nii.gz --save_path OUT   # no network
    # -> OUT/<case>/{infection,lungs}.nii.gz, slices.csv, summary.json, overview.png; OUT/summary.csv

Each map is the infection probability (255 = 1): a slice without infection gives a dark map.
--normalize minmax stretches every map to the full 0..255 range, as the release did; the
evaluation tool min-max normalises each map itself, so its figures hardly change (8-bit rounding).

Then score them: python -m EvaluationTool --gt_root Dataset/TestingSet/LungInfection-Test/GT \
    --pred_root "Results/Lung infection segmentation" --models Inf-Net
"""
import argparse
from pathlib import Path

from Code.model_lung_infection.cli import (
    ArgumentParser,
    add_bool,
    add_debug,
    add_runtime_args,
    config_from_args,
    positive_int,
    run_main,
)
from Code.model_lung_infection.configs import TestConfig
from Code.model_lung_infection.maps import NORMALIZATIONS, TTA_VIEWS
from Code.model_lung_infection.volume import add_volume_args, is_volume_input

DEFAULTS = TestConfig()
DEFAULT_PTH = DEFAULTS.pth_path

# The test stage's runtime defaults differ from training's: channels-last on; bf16 autocast on CPUs with native bf16.
RUNTIME_DEFAULTS = {"channels_last": True}
RUNTIME_HELP = {
    "channels_last": "channels-last memory format: faster, same maps",
    "num_workers": "processes decoding the slices while the network computes (at most the CPU count; default "
                   "4 on CUDA, on CPU 1 when there is more than one batch)",
    "amp": "mixed precision: float16 on CUDA, bfloat16 on CPU; when not given, on only for CPUs with native bf16 "
           "(AVX512-BF16/AMX: 2.5x faster, test Dice within 0.002); --amp False: fp32 maps",
}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pth_path", default=DEFAULT_PTH,
                   help="weights: a release snapshot (Inf-Net-100.pth), ours, or our checkpoint.pth")
    p.add_argument("--data_path", default=DEFAULTS.data_path,
                   help="a folder of slices, or a folder holding Imgs/ (GT is not needed); or a CT volume: a "
                        ".nii/.nii.gz file, a DICOM series folder, or a folder of them")
    p.add_argument("--save_path", default=None,
                   help="default: Results/Lung infection segmentation/<model>/ (model from the weights' folder); "
                        "it holds this run's maps only, with test_run.json saying what made them")
    add_bool(p, "--overwrite", False, "delete the maps (volumes: the results) of an earlier run in --save_path "
                                      "first (without it, a folder that holds files is refused)")
    p.add_argument("--testsize", type=positive_int, default=DEFAULTS.testsize)
    p.add_argument("--batchsize", type=positive_int, default=DEFAULTS.batchsize,
                   help="slices per forward pass (every slice is resized to --testsize)")
    p.add_argument("--normalize", choices=sorted(NORMALIZATIONS), default="none",
                   help="none: write probabilities (default); minmax: stretch each map to 0..255 as the release did")
    p.add_argument("--backbone", default=None, help="encoder of release-format weights (default: read off the "
                                                    "file's keys, e.g. a run trained with --backbone mobilenetv2)")
    p.add_argument("--tta", choices=list(TTA_VIEWS), default=DEFAULTS.tta,
                   help="test-time augmentation: average each map with those of the slice flipped left-right "
                        "(hflip: 2x the network time), flipped left-right, up-down and both (flips: 4x), or at "
                        "0.82 and 1.18 times --testsize (scales: 3x); default none, as the paper")
    add_bool(p, "--progress", True, "progress bar")
    add_bool(p, "--fuse_bn", True, "fold each BatchNorm into its convolution (same maps, faster)")
    add_bool(p, "--compile", False, "torch.compile the model (inductor; slow first slice, needs a C compiler on CPU)")
    add_runtime_args(p, defaults=RUNTIME_DEFAULTS, help=RUNTIME_HELP)
    add_volume_args(p)
    add_debug(p)
    return p.parse_args(argv)


def check_weights(pth_path):
    """A missing checkpoint is the usual first-run mistake: say which file and where weights come from."""
    if Path(pth_path).is_dir():
        found = sorted(p.name for p in Path(pth_path).glob("*.pth"))
        listed = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "") if found else "it holds no .pth file"
        raise FileNotFoundError(f"--pth_path {pth_path} is a folder: give a weights file in it ({listed})")
    if not Path(pth_path).is_file():
        raise FileNotFoundError(
            f"no weights at {pth_path}: pass --pth_path PATH, with weights trained by MyTrain_LungInf.py "
            f"(Snapshots/save_weights/<train_save>/Inf-Net-100.pth) or the release's Inf-Net-100.pth")


def main(argv=None):
    a = parse_args(argv)
    config = config_from_args(TestConfig, a)  # every option, checked (--testsize, --threshold ...) in one line
    if not a.mask:  # --mask quantifies a given mask: no network
        check_weights(a.pth_path)
    if not Path(a.data_path).exists():
        raise FileNotFoundError(f"--data_path {a.data_path}: no such file or folder; give a folder of slices, "
                                f"a CT volume file (NIfTI, MetaImage, NRRD) or a DICOM series folder")
    # the stages (and PyTorch) are imported after the arguments are parsed: --help and errors are fast
    if not a.mask:
        from Code.model_lung_infection.infer import resolve_device
        resolve_device(a.device)  # --device banana / cuda:7: one line, for slices and volumes alike
    if is_volume_input(a.data_path):
        from Code.model_lung_infection.volume.predict import run_volumes
        return run_volumes(config)
    from Code.model_lung_infection.infer import run_test
    return run_test(config)


if __name__ == "__main__":
    run_main(main, exit_when_done=True)  # every map and record is written and closed when main returns
