"""Run analysis: side-by-side comparison of training runs and cross-validation summaries (torch-free)."""
