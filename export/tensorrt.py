"""ONNX -> TensorRT FP16 engine with a batch profile, when a CUDA GPU and the ``tensorrt`` package exist."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medops.model_version import OUTPUT_NAME

log = logging.getLogger(__name__)


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot be used here, or ``None`` when it can."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install tensorrt, or use NVIDIA's container)"
    return None


def build_engine(onnx_path: Path, plan_path: Path, input_shape: tuple[int, int, int], max_batch_size: int,
                 fp16: bool = True, workspace_gb: float = 2.0) -> Path:
    """Build a serialized engine with one optimisation profile covering batch 1..max_batch_size."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    opt = max(1, max_batch_size // 2)
    profile.set_shape(name, (1, *input_shape), (opt, *input_shape), (max_batch_size, *input_shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(engine))
    return plan_path


def tensorrt_runner(plan_path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Run a serialized engine on float32 NCHW batches (CUDA buffers through PyTorch); returns ``probabilities``.

    Every output of the engine gets a buffer (TensorRT needs an address for each), e.g. ``ood_score`` and
    ``ood_flag`` of a scored graph."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    wanted = OUTPUT_NAME if OUTPUT_NAME in outs else outs[0]
    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.BOOL: torch.bool,
              trt.DataType.INT32: torch.int32}

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).cuda()
        context.set_input_shape(inp, tuple(x.shape))
        context.set_tensor_address(inp, x.data_ptr())
        buffers = {}
        for name in outs:
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)),
                                        dtype=dtypes.get(engine.get_tensor_dtype(name), torch.float32), device="cuda")
            context.set_tensor_address(name, buffers[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return buffers[wanted].float().cpu().numpy()

    return run
