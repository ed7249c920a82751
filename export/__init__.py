"""Checkpoint -> parity-checked ONNX (-> TensorRT) -> versioned Triton model folders with model cards.

``python -m export run=<run dir> name=<model>``; see :mod:`export.build`.
"""
