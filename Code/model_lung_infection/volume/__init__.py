"""CT volumes: reading NIfTI / DICOM in HU, the lung window, orientation and crop, the volume stage.

    from Code.model_lung_infection.volume import add_volume_args, is_volume_input, run_volumes
"""
from .io import find_cases, is_volume_input, read_dicom, read_nifti  # noqa: F401
from .predict import VolumeConfig, add_volume_args, run_volumes  # noqa: F401
