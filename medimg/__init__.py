"""medimg: how an image file becomes model input, defined once (torch-free).

Contract: the model takes float32 NCHW tensors with values in [0, 1] = uint8 intensity / 255,
at a fixed square size and channel count; mean/std normalisation is inside the model graph.
Depends only on numpy, pillow and pydicom (imported by training and the serving containers).
"""

from medimg.dicom import apply_window, read_dicom
from medimg.errors import ImageReadError
from medimg.fingerprint import dataset_fingerprint, file_md5, sample_digest
from medimg.io import SUPPORTED_SUFFIXES, load_for_model, preprocess, read_image, resize, to_channels

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ImageReadError",
    "apply_window",
    "dataset_fingerprint",
    "file_md5",
    "load_for_model",
    "preprocess",
    "read_dicom",
    "read_image",
    "resize",
    "sample_digest",
    "to_channels",
]
