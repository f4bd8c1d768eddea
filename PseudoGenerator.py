"""Generate Semi-Inf-Net's pseudo labels: Algorithm 1 of the paper (randomly selected propagation).

    python PseudoGenerator.py --init Snapshots/save_weights/Inf-Net/Inf-Net-100.pth --overwrite
    python PseudoGenerator.py --init ... --save_path my_pseudo --max_rounds 20     # 20 rounds, then stop
    python PseudoGenerator.py --init ... --save_path my_pseudo                     # same arguments: resume

Each round draws --k unlabelled slices at random (--seed), labels them with the current model (GT = the
infection probability map at the slice's size, 8-bit and soft as the release saved it; edge from the mask
probability >= 0.5; --release_pseudo: the release's per-slice stretched map), writes them into
<save_path>/{Imgs,GT,Edge} and fine-tunes the model on the doctor labels plus all pseudo labels so far
(--epoch 10, --lr 3e-4, --batchsize 16, multi-scale), until every slice is labelled. Round weights go to
Snapshots/save_weights/<train_save>/round-NNNN/Semi-Inf-Net-<epoch>.pth (only the newest is kept unless
--keep_rounds). State: <save_path>/pseudo_state.json; an interrupted round is redone from its start.

The default --save_path is the release's Pseudo-label folder, whose GT/ already holds the released pseudo
labels: they are only replaced with --overwrite. Then train Semi-Inf-Net on the result:
    python MyTrain_LungInf.py --stage pseudo --train_path <save_path>   &&   python MyTrain_LungInf.py --stage semi
The algorithm lives in Code/model_lung_infection/pseudo.py.
"""
import argparse

from Code.model_lung_infection import cli
from Code.model_lung_infection.cli import (
    add_bool,
    add_debug,
    add_runtime_args,
    nonnegative_int,
    positive_int,
    run_main,
)
from Code.model_lung_infection.configs import PseudoConfig, TrainConfig


def build_parser():
    d = PseudoConfig(init="")
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", required=True, help="Inf-Net weights trained on the doctor labels "
                   "(e.g. Snapshots/save_weights/Inf-Net/Inf-Net-100.pth)")
    p.add_argument("--unlabeled_path", default=d.unlabeled_path, help="folder of unlabelled CT slices")
    p.add_argument("--labeled_path", default=d.labeled_path, help="labelled seed set: Imgs/, GT/ (and Edge/)")
    p.add_argument("--save_path", default=d.save_path,
                   help="output Imgs/, GT/, Edge/ and pseudo_state.json (its GT/ is only replaced with --overwrite)")
    p.add_argument("--k", type=positive_int, default=d.k, help="slices labelled per round")
    p.add_argument("--max_rounds", type=nonnegative_int, default=None,
                   help="stop after this many rounds (re-run to continue)")
    add_bool(p, "--release_pseudo", False, "labels exactly as the release made them: GT = the per-slice min-max "
             "stretched map (so even an infection-free slice gets a full-range label), edges by its binary2edge; "
             "default: GT = the probability map itself")
    add_bool(p, "--overwrite", False, "replace labels already in <save_path>/GT, or a state file of other arguments")
    p.add_argument("--testsize", type=positive_int, default=None, help="inference input size (default: --trainsize)")
    p.add_argument("--backbone", default=None, help="encoder of --init (default: from its saved config, "
                   "else res2net50_v1b_26w_4s)")
    g = cli.add_train_args(p, d.train)  # each round's fine-tuning: the Inf-Net recipe's options
    add_bool(g, "--keep_rounds", False, "keep every round's weights (default: only the newest)")
    add_bool(p, "--progress", True, "progress bar")
    cli.add_training_runtime_args(add_runtime_args(p))  # the rounds' fine-tuning
    add_debug(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def config_from_args(a):
    """PseudoConfig of the options: its own, and the rounds' TrainConfig from the options it shares."""
    # --init, --overwrite and --backbone are PseudoConfig's (each round sets its own init and backbone)
    train = cli.config_from_args(TrainConfig, a, init=None, overwrite=False, backbone=TrainConfig.backbone,
                                 **({} if a.multi_scale else {"scales": (1.0,)}))
    own = {k: v for k, v in vars(a).items() if k in PseudoConfig.__dataclass_fields__ and k != "train"}
    return PseudoConfig(**own, train=train)


def main(argv=None):
    a = parse_args(argv)
    cli.choose_cpu_allocator(a.keep_freed_memory)  # before PyTorch allocates (a resume reads the run)
    cfg = config_from_args(a)
    from Code.model_lung_infection.pseudo import generate  # PyTorch: after the arguments are parsed
    return generate(cfg)


if __name__ == "__main__":
    run_main(main)
