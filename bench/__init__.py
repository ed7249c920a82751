"""``python -m bench``: reproducible performance figures (inference engines and served efficiency, batch pipeline,
training, training cost, GPU, metrics, latency under load, INT8).

Every case prints a table, writes ``<case>.json`` and ``<case>.png`` into the output folder, reports medians over
several interleaved runs and compares engines as ratios measured in the same process. See ``bench/__main__.py``.
"""

CASES = ("engines", "pipeline", "training", "training-cost", "gpu", "metrics", "latency", "int8")
# the batch-pipeline case lives in bench/serve_batch.py, the training-cost case in bench/training_cost.py
MODULES = {"pipeline": "serve_batch", "metrics": "metrics", "training-cost": "training_cost"}

__all__ = ["CASES"]
