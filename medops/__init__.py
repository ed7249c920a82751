"""medops: how an image file becomes model input, defined once (torch-free).

Contract: the model takes float32 NCHW tensors with values in [0, 1] = uint8 intensity / 255,
at a fixed square size and channel count; mean/std normalisation is inside the model graph.
Depends only on numpy, pillow and pydicom (imported by training and the serving containers).
"""

from medops.deid import deidentify, identifiers_of, pseudonym, scan_for_identifiers
from medops.dicom import apply_window, read_dicom
from medops.errors import ImageReadError
from medops.fingerprint import dataset_fingerprint, file_md5, sample_digest
from medops.io import SUPPORTED_SUFFIXES, load_for_model, preprocess, read_image, resize, to_channels
from medops.nifti import nifti_slices  # imports nibabel only when a file is read

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ImageReadError",
    "apply_window",
    "dataset_fingerprint",
    "deidentify",
    "file_md5",
    "identifiers_of",
    "load_for_model",
    "nifti_slices",
    "preprocess",
    "pseudonym",
    "read_dicom",
    "read_image",
    "resize",
    "sample_digest",
    "scan_for_identifiers",
    "to_channels",
]
