"""Triton Python-backend model: an exported ONNX image classifier run with onnxruntime.

Copied verbatim into ``<repository>/<model>/<version>/model.py`` next to ``model.onnx``. It runs inside Triton's
Python-backend stub, so it may only import what the serving environment has: numpy and onnxruntime (no torch).

Execution providers are tried in the order TensorRT -> CUDA -> CPU, keeping those this onnxruntime build offers;
the providers the session really uses are written to the server log at start-up.
"""

import json
import os

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def choose_providers(available):
    """The preferred providers this onnxruntime offers, best first (never empty: CPU is the fallback)."""
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


class TritonPythonModel:
    """One model instance: one onnxruntime session, batched over all requests of an ``execute`` call."""

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.model_name = args.get("model_name", self.model_config.get("name", "model"))
        inputs = self.model_config["input"]
        outputs = self.model_config["output"]
        if len(inputs) != 1 or len(outputs) != 1:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: expected exactly one input and one output in config.pbtxt, "
                f"got {len(inputs)} and {len(outputs)}"
            )
        self.input_name = inputs[0]["name"]
        self.output_name = outputs[0]["name"]
        self.input_dims = tuple(int(d) for d in inputs[0]["dims"])

        onnx_path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        if not os.path.isfile(onnx_path):
            raise pb_utils.TritonModelException(f"{self.model_name}: ONNX file not found: {onnx_path}")

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = choose_providers(onnxruntime.get_available_providers())
        self.session = onnxruntime.InferenceSession(onnx_path, sess_options=options, providers=providers)
        self.onnx_input = self.session.get_inputs()[0].name
        self.onnx_output = self.session.get_outputs()[0].name
        pb_utils.Logger.log_info(
            f"{self.model_name} v{args['model_version']}: onnxruntime {onnxruntime.__version__} "
            f"providers in use: {', '.join(self.session.get_providers())} (requested: {', '.join(providers)})"
        )

    def _check(self, request):
        """The request's input array, or an error message saying what is wrong with it."""
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            return None, f"missing input {self.input_name!r}"
        array = tensor.as_numpy()
        expected = f"[N, {', '.join(str(d) for d in self.input_dims)}]"
        if array.dtype != np.float32:
            return None, f"input {self.input_name!r} must be FP32 (float32), got {array.dtype}"
        if array.ndim != 1 + len(self.input_dims):
            return None, (
                f"input {self.input_name!r} must have {1 + len(self.input_dims)} dims {expected}, "
                f"got shape {list(array.shape)}"
            )
        if tuple(array.shape[1:]) != self.input_dims:
            return None, f"input {self.input_name!r} has shape {list(array.shape)}, expected {expected}"
        return array, None

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []  # (index, array)
        for i, request in enumerate(requests):
            array, error = self._check(request)
            if error is not None:
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"{self.model_name}: {error}")
                )
            else:
                valid.append((i, array))

        if valid:
            batch = valid[0][1] if len(valid) == 1 else np.concatenate([a for _, a in valid], axis=0)
            try:
                result = self.session.run([self.onnx_output], {self.onnx_input: batch})[0]
                result = np.ascontiguousarray(result, dtype=np.float32)
            except Exception as exc:  # report to every client instead of killing the stub
                message = f"{self.model_name}: onnxruntime failed: {exc}"
                for i, _ in valid:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
                return responses
            start = 0
            for i, array in valid:
                stop = start + array.shape[0]
                out = pb_utils.Tensor(self.output_name, result[start:stop])
                responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                start = stop
        return responses

    def finalize(self):
        self.session = None
