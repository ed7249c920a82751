"""Clinical evaluation: metrics with bootstrap intervals, operating points, calibration, subgroups, reports."""

from train.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
    plot_reliability,
)
from train.evaluation.metrics import (
    bootstrap_ci,
    choose_threshold,
    evaluate_predictions,
    subgroup_metrics,
)

__all__ = [
    "apply_temperature",
    "bootstrap_ci",
    "choose_threshold",
    "evaluate_predictions",
    "expected_calibration_error",
    "fit_temperature",
    "nll",
    "plot_reliability",
    "subgroup_metrics",
]
