"""Train Inf-Net on lung-infection slices (paper Sec. III-A, IV-A).

    python MyTrain_LungInf.py                               # 50 doctor-labelled slices, paper recipe
    python MyTrain_LungInf.py --train_path /data/COVID-SemiSeg/TrainingSet/LungInfection-Train/Doctor-label
    python MyTrain_LungInf.py --resume                      # continue an interrupted run (of the stage)
    python MyTrain_LungInf.py --resume --train_save NAME    # ... the run NAME, with all its options
    torchrun --nproc_per_node=2 MyTrain_LungInf.py          # DistributedDataParallel

Semi-Inf-Net (pseudo labels from PseudoGenerator.py, or the release's):
    python MyTrain_LungInf.py --stage pseudo                # step (i): 1600 pseudo-labelled slices, batch 24
    python MyTrain_LungInf.py --stage semi                  # step (ii): step (i)'s weights, doctor labels, batch 16

Stages (--stage; the release's --is_pseudo / --is_semi select the same): data, run name, snapshot
prefix, batch size, epochs and initial weights come from the preset; any of them given explicitly wins.
--resume continues a run with the options it was started with (saved in its checkpoint.pth); an
option given that differs is an error, except --epoch (extend a finished run) and runtime options
(--device, --amp, --amp_dtype, --sync_bn, --deterministic, --num_workers, --progress); --keep_freed_memory
holds only for the session it is given in.
Training from random weights on a CPU budget (opt-in; see the option groups below):
    python MyTrain_LungInf.py --recipe cpu-hour --train_save cpu-hour   # an hour: pseudo labels, then doctor labels
    # (its --fit_budget shrinks the epochs where this machine cannot train them all in the hour)
    python MyTrain_LungInf.py --val_split 5 --time_budget 60 --augment --schedule cosine --warmup_epochs 2 \
        --ema 0.999 --progressive_size 224 --train_save cpu-try

Snapshots: Snapshots/save_weights/<train_save>/<prefix>-<epoch>.pth (release format) and checkpoint.pth
(resumable). The recipe lives in Code/model_lung_infection/train.py.
"""
import argparse

from Code.model_lung_infection import cli
from Code.model_lung_infection.cli import add_bool, add_debug, add_run_args, given_options, run_main
from Code.model_lung_infection.configs import STAGES, TRAIN_RECIPES, TrainConfig, recipe_options, stage_config
from Code.model_lung_infection.registry import ENCODERS, warn_random_weights

# The release's boolean switches and the stage each selects.
STAGE_SWITCHES = {"is_pseudo": "pseudo", "is_semi": "semi"}
# Options whose config field has another name (the rest share theirs).
OPTION_FIELDS = {"multi_scale": "scales", "is_pseudo": "stage", "is_semi": "stage"}


def build_parser():
    d = TrainConfig()
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=list(STAGES), default=None,
                   help="preset (default doctor): " + "; ".join(
                       f"{k}: {v.description} ({', '.join(v.train_path)}, run {v.train_save}, batch {v.batchsize}, "
                       f"{v.epoch} epochs{', from ' + v.init[0] if v.init else ''})" for k, v in STAGES.items()))
    add_bool(p, "--is_pseudo", False, "release switch: same as --stage pseudo")
    add_bool(p, "--is_semi", False, "release switch: same as --stage semi")
    p.add_argument("--train_path", nargs="+", default=None,
                   help="folder(s) with Imgs/, GT/ and optionally Edge/ (edges are derived from GT if absent); "
                        "default from --stage")
    p.add_argument("--snapshot_prefix", type=cli.path_component, default=None,
                   help="snapshot file names: <prefix>-<epoch>.pth (default from --stage)")
    p.add_argument("--backbone", default=d.backbone,
                   help=f"encoder: {', '.join(ENCODERS.names())} or timm:<name>")
    p.add_argument("--pretrained", default=None, help="ImageNet weights of the encoder: a local file (e.g. "
                   "res2net50_v1b_26w_4s-3cf99910.pth) or 'imagenet' (timm's cache, else an installed weights "
                   "package: requirements-imagenet.txt); without it the encoder starts from random weights")
    p.add_argument("--init", default=None,
                   help="start from these Inf-Net weights (fine-tuning); --stage semi defaults to step (i)'s")
    p.add_argument("--freeze_encoder", type=int, choices=(2, 4, 8, 16, 32), default=None, metavar="STRIDE",
                   help="keep the encoder's weights as --pretrained or --init gave them, from its input up to its "
                        "feature at STRIDE (2, 4, 8, 16 or 32; 4: the layers before the edge branch's feature): "
                        "their backward is skipped, a faster step; their BatchNorm still follows each batch. "
                        "Default: the whole network trains, as in the paper")
    cli.add_train_args(p, d, from_preset=("train_save", "epoch", "batchsize"))
    g = p.add_argument_group("Inf-Net components (Table IV ablations; --no-<name> switches one off, "
                             "see Code/model_lung_infection/inf_net.py)")
    add_bool(g, "--edge_attention", True, "edge-attention branch and its edge loss")
    add_bool(g, "--partial_decoder", True, "RFBs + parallel partial decoder for the global map")
    add_bool(g, "--reverse_attention", True, "the three cascaded reverse-attention branches")
    add_run_args(p, d)
    cli.add_cpu_budget_args(p, d, TRAIN_RECIPES)
    add_debug(p)
    return p


def parse_args(argv=None):
    """Parsed options; `.given` holds the names of those given explicitly (what --resume checks)."""
    p = build_parser()
    a = p.parse_args(argv)
    switched = [STAGE_SWITCHES[k] for k in STAGE_SWITCHES if getattr(a, k)]
    if len(switched) > 1:
        p.error("--is_pseudo and --is_semi select different stages (pseudo, semi): give one, or --stage")
    if switched and a.stage not in (None, switched[0]):
        p.error(f"--stage {a.stage} contradicts --is_{switched[0]} (stage {switched[0]})")
    a.stage = a.stage or (switched[0] if switched else "doctor")
    a.given = given_options(build_parser, argv)
    return a


def config_from_args(a):
    """TrainConfig of the parsed options: the --stage preset and the --recipe preset, overridden by every
    option given; with --resume, the run's saved config, which options given may only extend (restore_config)."""
    fields = set(TrainConfig.__dataclass_fields__)
    given = {OPTION_FIELDS.get(k, k) for k in getattr(a, "given", ())} & fields
    options = {k: v for k, v in vars(a).items() if k in fields and k != "stage"}
    stage = getattr(a, "stage", None) or "doctor"
    if not a.resume:
        options.update(recipe_options(a.recipe, given))
    else:  # the run keeps the options it started with: the given ones go over those, not over the defaults
        from Code.model_lung_infection.engine import restore_config, resume_options
        run = stage_config(stage, resume=True, overwrite=a.overwrite, snapshot_root=a.snapshot_root,
                           train_save=a.train_save)
        options = resume_options(TrainConfig, run.checkpoint_path, {k: v for k, v in options.items() if k in given})
        options.pop("stage", None)
        if a.multi_scale and "scales" in given:
            options["scales"] = TrainConfig().scales
    cfg = stage_config(stage, **options)
    if not a.multi_scale:
        cfg.scales = (1.0,)
    if not a.resume:
        return cfg
    return restore_config(TrainConfig, run.checkpoint_path, {k: getattr(cfg, k) for k in given})


def main(argv=None):
    a = parse_args(argv)
    cli.choose_cpu_allocator(a.keep_freed_memory)  # before PyTorch allocates (a resume reads the run)
    cfg = config_from_args(a)
    if not (cfg.init or cfg.resume):  # fine-tuned and resumed runs start from trained weights
        warn_random_weights(cfg.model, cfg.pretrained)
    from Code.model_lung_infection.train import train  # PyTorch: after the arguments are parsed
    train(cfg)


if __name__ == "__main__":
    run_main(main)
