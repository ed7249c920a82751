"""``python -m bench``: reproducible performance figures (inference engines, batch pipeline, training, GPU, metrics).

Every case prints a table, writes ``<case>.json`` and ``<case>.png`` into the output folder, reports medians over
several interleaved runs and compares engines as ratios measured in the same process. See ``bench/__main__.py``.
"""

CASES = ("engines", "pipeline", "training", "gpu", "metrics")
MODULES = {"pipeline": "serve_batch", "metrics": "metrics"}  # the batch-pipeline case lives in bench/serve_batch.py

__all__ = ["CASES"]
