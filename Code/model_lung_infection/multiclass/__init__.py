"""Multi-class infection labelling (paper Sec. III-C): background, ground-glass opacity, consolidation.

The CT slice and an infection map (the "prior": Semi-Inf-Net's output at test time, the binarised
union of the two classes at training time, as released) are each ImageNet-normalised as 3
channels and concatenated into a 6-channel input of a multi-class network (the release's U-Net,
`--arch unet`, or FCN-8s, `--arch fcn8s`); with `prior=False` the slice alone (3 channels) gives
the "Multi-class U-Net" / "FCNs" baselines of Table III.

Split as the binary path is:
  data.py      palette GT read as class indices, priors, MultiClassTrainSet / MultiClassSliceSet
  train.py     MultiClassConfig, the recipes (release / paper), `train`
  predict.py   load_multiclass, class probabilities, class maps, overlays, `run_test`
  validation.py  MultiClassValidator: per-class scores of held-out slices (`--val_split`)
"""
from .data import (  # noqa: F401
    CLASSES,
    N_CLASSES,
    PRIOR_THRESHOLD,
    MultiClassSliceSet,
    MultiClassTrainSet,
    binarize,
    network_input,
    one_hot,
    prepare_prior,
    read_class_indices,
)
from .predict import (  # noqa: F401
    CLASS_FOLDERS,
    DEFAULT_PRIOR_PATH,
    DEFAULT_SAVE_ROOT,
    class_maps,
    folder_priors,
    infnet_priors,
    iter_probabilities,
    load_multiclass,
    overlay,
    predict_probabilities,
    run_test,
)
from .train import ARCHS, INITS, RECIPES, MultiClassConfig, bce_step, build_model, run_name, train  # noqa: F401
