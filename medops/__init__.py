"""medops: the torch-free core every stage imports; it owns every format that two stages touch.

* images and the preprocessing contract (:mod:`medops.io`, :mod:`medops.dicom`, :mod:`medops.nifti`): the model
  takes float32 NCHW tensors with values in [0, 1] = uint8 intensity / 255, at a fixed square size and channel
  count; mean/std normalisation is inside the model graph;
* datasets, manifests and splits (:mod:`medops.datasets`), fingerprints (:mod:`medops.fingerprint`);
* the run record (:mod:`medops.run_record`), the model version and its repository layout
  (:mod:`medops.model_version`), the Triton model configuration (:mod:`medops.triton_config`);
* numpy metrics and the shared figures (:mod:`medops.metrics`, :mod:`medops.plots`), drift statistics
  (:mod:`medops.drift`) and DICOM de-identification (:mod:`medops.deid`).

Depends on numpy, pillow and pydicom (and protobuf/tritonclient for the Triton config), never on torch:
import-linter enforces it (``.importlinter``).
"""

from medops.deid import deidentify, identifiers_of, pseudonym, scan_for_identifiers
from medops.dicom import apply_window, read_dicom
from medops.errors import ImageReadError
from medops.fingerprint import dataset_fingerprint, file_md5, sample_digest
from medops.io import (
    SUPPORTED_SUFFIXES,
    fit_to_model,
    load_for_model,
    preprocess,
    read_image,
    refuse_blank,
    resize,
    to_channels,
    to_unit_range,
)
from medops.nifti import nifti_slices  # imports nibabel only when a file is read

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ImageReadError",
    "apply_window",
    "dataset_fingerprint",
    "deidentify",
    "file_md5",
    "fit_to_model",
    "identifiers_of",
    "load_for_model",
    "nifti_slices",
    "preprocess",
    "pseudonym",
    "read_dicom",
    "read_image",
    "refuse_blank",
    "resize",
    "sample_digest",
    "scan_for_identifiers",
    "to_channels",
    "to_unit_range",
]
