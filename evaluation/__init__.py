"""Clinical evaluation: metrics with intervals, operating point, calibration, subgroups, explanations, reports."""
