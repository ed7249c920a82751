"""The value part of the model-input contract: finite float32 values in [0, 1] (uint8 intensity / 255).

Numpy only, with no other medops import: export copies this file next to the Triton Python-backend model
(``input_check.py``), so the served model, the local backend and the clients refuse the same inputs with the same
reason. Shape and dtype are checked by each of them against the model's own configuration.
"""

from __future__ import annotations

import numpy as np

LOW, HIGH = 0.0, 1.0
TOLERANCE = 1e-3  # float rounding of uint8 / 255 and of resampling stays far inside this


def value_problem(array: np.ndarray, low: float = LOW, high: float = HIGH, tolerance: float = TOLERANCE) -> str | None:
    """Why ``array`` is not a valid model input (NaN or infinite values, values outside [low, high] beyond
    ``tolerance``), or ``None`` when it is. The reason names counts and the range found, never pixel data."""
    values = np.asarray(array)
    finite = np.isfinite(values)
    if not finite.all():
        nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        return (f"input has {nan} NaN and {inf} infinite value(s) of {values.size}; a model input must be finite "
                f"values in [{low:g}, {high:g}] (uint8 intensity / 255)")
    if values.size == 0:
        return None
    found_low, found_high = float(values.min()), float(values.max())
    if found_low < low - tolerance or found_high > high + tolerance:
        return (f"input values range from {found_low:.6g} to {found_high:.6g}; a model input must be in "
                f"[{low:g}, {high:g}] (uint8 intensity / 255, see medops.preprocess)")
    return None
