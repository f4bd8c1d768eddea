"""Segment CT slices with a trained Inf-Net (ours or a release checkpoint).

    python MyTest_LungInf.py --pth_path Snapshots/save_weights/Inf-Net/Inf-Net-100.pth \
        --data_path Dataset/TestingSet/LungInfection-Test
    # -> Results/Lung infection segmentation/Inf-Net/<slice>.png, 8-bit maps at each slice's size

Then score them: python -m EvaluationTool --gt_root Dataset/TestingSet/LungInfection-Test/GT \
    --pred_root "Results/Lung infection segmentation" --models Inf-Net
"""
import argparse

from Code.model_lung_infection.cli import add_bool, add_runtime_args
from Code.model_lung_infection.infer import run_test


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pth_path", default="Snapshots/save_weights/Inf-Net/Inf-Net-100.pth",
                   help="weights: a release snapshot (Inf-Net-100.pth), ours, or our checkpoint.pth")
    p.add_argument("--data_path", default="Dataset/TestingSet/LungInfection-Test",
                   help="a folder of slices, or a folder holding Imgs/ (GT is not needed)")
    p.add_argument("--save_path", default=None,
                   help="default: Results/Lung infection segmentation/<model>/ (model from the weights' folder)")
    p.add_argument("--testsize", type=int, default=352)
    p.add_argument("--batchsize", type=int, default=1)
    p.add_argument("--backbone", default=None, help="encoder of release-format weights (default res2net50_v1b_26w_4s)")
    add_bool(p, "--progress", True, "progress bar")
    add_bool(p, "--fuse_bn", True, "fold each BatchNorm into its convolution (same maps, faster)")
    add_bool(p, "--compile", False, "torch.compile the model (inductor; slow first slice, needs a C compiler on CPU)")
    add_runtime_args(p)
    # Testing defaults differ from training's: channels-last on; bf16 autocast on CPUs with native bf16.
    _set_default(p, "channels_last", True, "channels-last memory format: faster, same maps (default: True)")
    _set_help(p, "amp", "mixed precision: float16 on CUDA, bfloat16 on CPU; default on only for CPUs with "
                        "native bf16 (AVX512-BF16/AMX: 2.5x faster, test Dice within 0.002); --amp False: fp32 maps")
    return p.parse_args(argv)


def _set_help(parser, dest, text):
    for action in parser._actions:
        if action.dest == dest and action.help != argparse.SUPPRESS:
            action.help = text


def _set_default(parser, dest, value, text):
    parser.set_defaults(**{dest: value})
    _set_help(parser, dest, text)


if __name__ == "__main__":
    a = parse_args()
    run_test(a.pth_path, a.data_path, a.save_path, a.testsize, a.backbone, a.device, a.amp,
             a.channels_last, a.batchsize, a.progress, a.fuse_bn, a.compile)
