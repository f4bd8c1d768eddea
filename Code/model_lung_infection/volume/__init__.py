"""CT volumes: reading NIfTI / DICOM in HU, the lung window, orientation and crop, the volume stage.

    from Code.model_lung_infection.volume import add_volume_args, is_volume_input, run_volumes

`run_volumes` (and with it PyTorch, nibabel and scipy) is imported on first use.
"""
from .io import find_cases, is_volume_input, read_dicom, read_nifti  # noqa: F401
from .options import add_volume_args  # noqa: F401


def __getattr__(name):
    if name == "run_volumes":
        from .predict import run_volumes
        return run_volumes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
