"""``python -m bench``: reproducible performance figures (inference engines and served efficiency, batch pipeline,
time to accuracy, training loop, training cost, GPU, metrics, latency under load, INT8).

Every case prints a table, writes ``<case>.json`` and ``<case>.png`` into the output folder, reports medians over
several interleaved runs and compares engines as ratios measured in the same process. See ``bench/__main__.py``.
"""

CASES = ("engines", "pipeline", "training", "training-loop", "training-cost", "gpu", "metrics", "latency", "int8")
# the batch-pipeline case lives in bench/serve_batch.py, time to accuracy (training) in bench/time_to_accuracy.py
MODULES = {"pipeline": "serve_batch", "metrics": "metrics", "training": "time_to_accuracy",
           "training-loop": "training_loop", "training-cost": "training_cost"}

__all__ = ["CASES"]
