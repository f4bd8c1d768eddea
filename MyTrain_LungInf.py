"""Train Inf-Net on lung-infection slices (paper Sec. III-A, IV-A).

    python MyTrain_LungInf.py                               # 50 doctor-labelled slices, paper recipe
    python MyTrain_LungInf.py --train_path /data/COVID-SemiSeg/TrainingSet/LungInfection-Train/Doctor-label
    python MyTrain_LungInf.py --resume                      # continue an interrupted run
    torchrun --nproc_per_node=2 MyTrain_LungInf.py          # DistributedDataParallel

Semi-Inf-Net (pseudo labels from PseudoGenerator.py, or the release's):
    python MyTrain_LungInf.py --stage pseudo                # step (i): 1600 pseudo-labelled slices, batch 24
    python MyTrain_LungInf.py --stage semi                  # step (ii): step (i)'s weights, doctor labels, batch 16

Stages (--stage; the release's --is_pseudo / --is_semi select the same): data, run name, snapshot
prefix, batch size, epochs and initial weights come from the preset; any of them given explicitly wins.
Snapshots: Snapshots/save_weights/<train_save>/<prefix>-<epoch>.pth (release format) and checkpoint.pth
(resumable). The recipe lives in Code/model_lung_infection/train.py.
"""
import argparse
import sys

from Code.model_lung_infection.cli import add_bool, add_run_args
from Code.model_lung_infection.encoders import ENCODERS
from Code.model_lung_infection.train import STAGES, TrainConfig, stage_config, train

# The release's boolean switches and the stage each selects.
STAGE_SWITCHES = {"is_pseudo": "pseudo", "is_semi": "semi"}


def parse_args(argv=None):
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=list(STAGES), default=None,
                   help="preset (default doctor): " + "; ".join(
                       f"{k}: {v.description} ({', '.join(v.train_path)}, run {v.train_save}, batch {v.batchsize}, "
                       f"{v.epoch} epochs{', from ' + v.init[0] if v.init else ''})" for k, v in STAGES.items()))
    add_bool(p, "--is_pseudo", False, "release switch: same as --stage pseudo")
    add_bool(p, "--is_semi", False, "release switch: same as --stage semi")
    p.add_argument("--train_path", nargs="+", default=None,
                   help="folder(s) with Imgs/, GT/ and optionally Edge/ (edges are derived from GT if absent); "
                        "default from --stage")
    p.add_argument("--train_save", default=None,
                   help="run name: Snapshots/save_weights/<train_save>/ (default from --stage)")
    p.add_argument("--snapshot_prefix", default=None,
                   help="snapshot file names: <prefix>-<epoch>.pth (default from --stage)")
    p.add_argument("--snapshot_root", default=d.snapshot_root)
    p.add_argument("--backbone", default=d.backbone,
                   help=f"encoder: {', '.join(ENCODERS.names())} or timm:<name>")
    p.add_argument("--pretrained", default=None, help="ImageNet weights of the encoder (local file, e.g. "
                   "res2net50_v1b_26w_4s-3cf99910.pth); without it the encoder starts from random weights")
    p.add_argument("--init", default=None,
                   help="start from these Inf-Net weights (fine-tuning); --stage semi defaults to step (i)'s")
    p.add_argument("--epoch", type=int, default=None, help="default from --stage")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batchsize", type=int, default=None,
                   help="global batch size (split over DDP processes); default from --stage")
    p.add_argument("--trainsize", type=int, default=d.trainsize)
    p.add_argument("--clip", type=float, default=d.clip, help="gradient clipping by value")
    p.add_argument("--decay_rate", type=float, default=d.decay_rate)
    p.add_argument("--decay_epoch", type=int, default=d.decay_epoch, help="lr *= decay_rate every decay_epoch epochs")
    add_bool(p, "--multi_scale", True, "train each batch at scales 0.75, 1 and 1.25")
    add_bool(p, "--release_bce", False, "unweighted BCE, as the released code effectively computed")
    g = p.add_argument_group("Inf-Net components (Table IV ablations; --no-<name> switches one off, "
                             "see Code/model_lung_infection/inf_net.py)")
    add_bool(g, "--edge_attention", True, "edge-attention branch and its edge loss")
    add_bool(g, "--partial_decoder", True, "RFBs + parallel partial decoder for the global map")
    add_bool(g, "--reverse_attention", True, "the three cascaded reverse-attention branches")
    add_run_args(p, d)
    a = p.parse_args(argv)
    switched = [STAGE_SWITCHES[k] for k in STAGE_SWITCHES if getattr(a, k)]
    if len(switched) > 1:
        p.error("--is_pseudo and --is_semi select different stages (pseudo, semi): give one, or --stage")
    if switched and a.stage not in (None, switched[0]):
        p.error(f"--stage {a.stage} contradicts --is_{switched[0]} (stage {switched[0]})")
    a.stage = a.stage or (switched[0] if switched else "doctor")
    return a


def config_from_args(a):
    """TrainConfig of the parsed options: the --stage preset, overridden by every option given."""
    fields = set(TrainConfig.__dataclass_fields__)
    cfg = stage_config(getattr(a, "stage", None) or "doctor",
                       **{k: v for k, v in vars(a).items() if k in fields})
    if not a.multi_scale:
        cfg.scales = (1.0,)
    return cfg


if __name__ == "__main__":
    try:
        config = config_from_args(parse_args())
    except FileNotFoundError as e:  # e.g. --stage semi before step (i)
        sys.exit(f"error: {e}")
    train(config)
