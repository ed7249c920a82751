"""Triton Python-backend twin of a served model, for ``python -m bench engines`` (``bench/serving_cost.py``).

Not a model: it pays only what every Python-backend model pays per request. ``execute`` reads each request's input
tensor, spends the model's in-process CPU time per image (``burn_ms_per_image.txt``, written by the bench) in a busy
loop on thread CPU time, so the twin's request rate and batches match the real model's, and answers zeros in the
requested outputs. The CPU of Triton's processes per request beyond the burn is then what any Python-backend model
pays: gRPC, the dynamic batcher, the round trip to this stub through shared memory, and the reading of inputs and
building of responses below.
"""

import json
import os
import time

import numpy as np
import triton_python_backend_utils as pb_utils

BURN_FILE = "burn_ms_per_image.txt"


class TritonPythonModel:
    """Same inputs, outputs and batcher as the served model (the bench copies its config.pbtxt)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.outputs = {o["name"]: ([int(d) for d in o["dims"]], pb_utils.triton_string_to_numpy(o["data_type"]))
                        for o in config["output"]}
        self.burn_path = os.path.join(args["model_repository"], args["model_version"], BURN_FILE)
        self.burn_s, self.burn_stamp = 0.0, None

    def _burn_seconds(self):
        """Seconds of CPU per image, re-read when the bench rewrites the file (0 without one)."""
        try:
            info = os.stat(self.burn_path)
            stamp = (info.st_ino, info.st_mtime_ns, info.st_size)  # the bench replaces the file: a new inode
            if stamp != self.burn_stamp:
                with open(self.burn_path) as f:
                    self.burn_s = float(f.read()) / 1e3
                self.burn_stamp = stamp
        except (OSError, ValueError):
            pass
        return self.burn_s

    def execute(self, requests):
        counts = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy().shape[0] for r in requests]
        end = time.thread_time() + self._burn_seconds() * sum(counts)
        while time.thread_time() < end:  # CPU time of this thread: preemption does not shorten the burn
            pass
        responses = []
        for request, n in zip(requests, counts, strict=True):
            names = request.requested_output_names() or list(self.outputs)
            tensors = [pb_utils.Tensor(name, np.zeros([n, *self.outputs[name][0]], self.outputs[name][1]))
                       for name in names]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
