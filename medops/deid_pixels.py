"""Burned-in text in the pixel data: which DICOM files may carry it, and an OCR-free mask for text regions.

:func:`burned_in_reason` flags a file when

* BurnedInAnnotation (0028,0301) is ``YES``, or has any value other than ``YES``/``NO``;
* BurnedInAnnotation is absent and the file is of a kind that commonly carries burned-in text: one of the
  modalities in :data:`FLAGGED_MODALITIES` (ultrasound, secondary capture, other, external-camera and endoscopy
  photography, microscopy, panoramic and intra-oral X-ray), any Secondary Capture SOP class whatever its modality
  (screenshots exported as CT, MR, DX...), or no Modality at all.

``BurnedInAnnotation = NO`` is trusted. CT, MR, CR, DX, MG, XA, RF, NM, PT... without the attribute are not
flagged: their scanners keep annotations in overlays or presentation states (which the de-identification
removes); orientation markers burned into CR/DX are not identifiers.

:func:`mask_text` is the ``--pixels clean`` rule of ``datatools.ingest_dicom`` (:data:`MASK_RULE`), deliberately
conservative: it blacks out the top and bottom bands of the image, where scanners burn patient name, id, date and
institution, and, anywhere in the image, the box (plus a 2-pixel margin) around each small near-white connected
component (text glyphs: at most 1/16 of the image high and 1/4 wide). Text that is dark on a light background,
large, or outside the bands and not near-white is NOT found; there is no OCR. Reasons never quote header values
other than the fixed modality codes above.
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["FLAGGED_MODALITIES", "MASK_RULE", "burned_in_reason", "mask_text"]

FLAGGED_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "SM", "PX", "IO"})
BAND = 1 / 8  # fraction of the height masked at the top and at the bottom
BRIGHT = 250  # near-white (every channel of the 8-bit image)
MARGIN = 2
MASK_RULE = ("top and bottom 1/8 of the image, and the box (+2 px) around every near-white (>= 250) connected "
             "component at most 1/16 of the image high and 1/4 wide, set to 0")
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its .1 .. .4 multi-frame variants


def burned_in_reason(ds: Dataset) -> str | None:
    """Why ``ds`` may carry burned-in text (a fixed phrase), or None when it is not flagged."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if flag == "NO":
        return None
    if flag:
        return "BurnedInAnnotation is neither YES nor NO"
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if sop_class == _SECONDARY_CAPTURE or sop_class.startswith(_SECONDARY_CAPTURE + "."):
        return "BurnedInAnnotation absent; secondary capture (screenshots carry burned-in text)"
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if not modality:
        return "BurnedInAnnotation absent; no Modality"
    if modality in FLAGGED_MODALITIES:
        return f"BurnedInAnnotation absent; modality {modality} commonly carries burned-in text"
    return None


def mask_text(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(a copy of the H x W x C uint8 ``image`` with the text regions of :data:`MASK_RULE` set to 0, the fraction of
    pixels masked)."""
    from scipy import ndimage  # lazy: only the clean mode needs it

    img = np.array(image, copy=True)
    height, width = img.shape[:2]
    mask = np.zeros((height, width), dtype=bool)
    band = max(1, math.ceil(BAND * height))
    mask[:band] = True
    mask[height - band:] = True
    bright = np.all(img >= BRIGHT, axis=2) if img.ndim == 3 else img >= BRIGHT
    labels, _ = ndimage.label(bright, structure=np.ones((3, 3), dtype=bool))
    max_h, max_w = max(3, height // 16), max(3, width // 4)
    for rows, cols in ndimage.find_objects(labels):
        if rows.stop - rows.start <= max_h and cols.stop - cols.start <= max_w:
            mask[max(0, rows.start - MARGIN):rows.stop + MARGIN, max(0, cols.start - MARGIN):cols.stop + MARGIN] = True
    img[mask] = 0
    return img, float(mask.mean())
