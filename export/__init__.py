"""Checkpoint -> parity-checked ONNX (-> TensorRT) -> versioned Triton model folders (issue 3, not yet built)."""
