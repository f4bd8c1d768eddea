"""Train the multi-class infection network (paper Sec. III-C): background / GGO / consolidation.

    python MyTrain_MulClsLungInf_UNet.py                    # infection-guided U-Net, release recipe
    python MyTrain_MulClsLungInf_UNet.py --arch fcn8s       # "Semi-Inf-Net & FCN8s"
    python MyTrain_MulClsLungInf_UNet.py --no-prior         # "Multi-class U-Net" baseline (slice only)
    python MyTrain_MulClsLungInf_UNet.py --recipe paper     # 512x512, Xavier, SGD lr 1e-10, momentum 0.99, wd 5e-4
    python MyTrain_MulClsLungInf_UNet.py --resume           # continue an interrupted run, with its options
    python MyTrain_MulClsLungInf_UNet.py --val_split 5 --val_every 4   # hold out 5 slices, score every 4 epochs

Data: <train_path>/{Imgs,GT,Prior}; GT are palette PNGs whose indices are the classes
(0 background, 1 GGO, 2 consolidation); Prior is the binary infection map.
Snapshots: Snapshots/save_weights/<train_save>/<prefix>-<epoch>.pth (release format) and checkpoint.pth
(resumable); train_save and prefix default to Semi-Inf-Net_UNet, Semi-Inf-Net_FCN8s, Multi-class_UNet
or FCN8s after --arch and --prior. The recipe lives in Code/model_lung_infection/multiclass.py.
"""
import argparse

from Code.model_lung_infection import cli
from Code.model_lung_infection.cli import add_bool, add_debug, add_run_args, given_options, run_main
from Code.model_lung_infection.configs import ARCHS, INITS, RECIPES, MultiClassConfig
from Code.model_lung_infection.registry import warn_random_weights


def build_parser():
    d = MultiClassConfig()
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_path", default=d.train_path, help="folder with Imgs/, GT/ and Prior/")
    p.add_argument("--train_save", type=cli.path_component, default=None,
                   help="run name: Snapshots/save_weights/<train_save>/ (default after --arch/--prior)")
    p.add_argument("--snapshot_prefix", type=cli.path_component, default=None,
                   help="snapshot file names: <prefix>-<epoch>.pth (default: run name)")
    p.add_argument("--snapshot_root", default=d.snapshot_root)
    p.add_argument("--arch", choices=sorted(ARCHS), default=d.arch)
    add_bool(p, "--prior", d.prior, "feed the infection map with the slice (6 channels); --no-prior: slice only")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=d.recipe,
                   help="release: 352, SGD lr 1e-2 momentum 0.7; "
                        "paper: 512, Xavier, SGD lr 1e-10 momentum 0.99 wd 5e-4")
    p.add_argument("--epoch", type=cli.positive_int, default=d.epoch)
    p.add_argument("--lr", type=cli.positive_float, default=None, help="default from --recipe")
    p.add_argument("--momentum", type=cli.nonnegative_float, default=None, help="default from --recipe")
    p.add_argument("--weight_decay", type=cli.nonnegative_float, default=None, help="default from --recipe")
    p.add_argument("--init", choices=INITS, default=None, help="weight initialisation (default from --recipe)")
    p.add_argument("--batchsize", type=cli.positive_int, default=d.batchsize,
                   help="global batch size (split over DDP processes)")
    p.add_argument("--trainsize", type=cli.positive_int, default=None,
                   help="default from --recipe (352 release, 512 paper)")
    p.add_argument("--clip", type=cli.nonnegative_float, default=d.clip,
                   help="gradient clipping by value (default: none, as released)")
    p.add_argument("--fc_width", type=cli.positive_int, default=d.fc_width, help="FCN8s fc6/fc7 channels")
    p.add_argument("--pretrained", default=None,
                   help="FCN8s: ImageNet VGG-16 weights (local file, e.g. vgg16-397923af.pth)")
    add_bool(p, "--binarize_prior", d.binarize_prior, "binarise priors at 128 (the released ones are already 0/255)")
    add_run_args(p, d)
    cli.add_validation_args(p, d, scores="per class (GGO, consolidation) Dice of the argmax labels and the "
                                         "fraction of slices on which the class is predicted at all",
                            example="e.g. 5 of the 50 slices")
    add_debug(p)
    return p


def parse_args(argv=None):
    """Parsed options; `.given` holds the names of those given explicitly (what --resume checks)."""
    p = build_parser()
    a = p.parse_args(argv)
    a.given = given_options(build_parser, argv)
    return a


def config_from_args(a):
    """MultiClassConfig of the options; with --resume, the run's saved config (engine.restore_config)."""
    if not a.resume:
        return cli.config_from_args(MultiClassConfig, a)
    given = set(getattr(a, "given", ())) & set(MultiClassConfig.__dataclass_fields__)
    from Code.model_lung_infection.engine import restore_config, resume_options
    run = MultiClassConfig(arch=a.arch, prior=a.prior, train_save=a.train_save, snapshot_root=a.snapshot_root,
                           resume=True, overwrite=a.overwrite)
    cfg = MultiClassConfig(**resume_options(MultiClassConfig, run.checkpoint_path, {k: getattr(a, k) for k in given}))
    return restore_config(MultiClassConfig, run.checkpoint_path, {k: getattr(cfg, k) for k in given})


def main(argv=None):
    a = parse_args(argv)
    cli.choose_cpu_allocator(a.keep_freed_memory)  # before PyTorch allocates (a resume reads the run)
    cfg = config_from_args(a)
    if not cfg.resume:
        warn_random_weights(ARCHS[cfg.arch], cfg.pretrained)
    from Code.model_lung_infection.multiclass.train import train  # PyTorch: after the arguments are parsed
    train(cfg)


if __name__ == "__main__":
    run_main(main)
