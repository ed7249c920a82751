"""Load: concurrent clients against a real Triton; every answer is complete, correct and goes to the right caller."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tests.conftest import BREASTMNIST

pytestmark = pytest.mark.slow

CLIENTS = 8
REQUESTS_PER_CLIENT = 200
TIME_LIMIT_S = 120


def test_concurrent_clients_all_answered(served) -> None:
    images = np.load(BREASTMNIST)["test_images"][:64]
    pool = (images[:, None].astype(np.float32) / np.float32(255.0)).copy()  # the model contract: [N,1,28,28]
    version = served.repository / "breast" / "1"
    input_name = json.loads((version / "metadata.json").read_text())["input"]["name"]
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {input_name: pool})[0]

    start_line = threading.Barrier(CLIENTS)

    def client_run(seed: int) -> dict[str, float]:
        rng = np.random.default_rng(seed)
        failures, worst, images_sent = 0, 0.0, 0
        latencies = []
        with httpclient.InferenceServerClient(served.server.http_url, connection_timeout=30,
                                              network_timeout=30) as client:  # closed: no keep-alive left open
            start_line.wait(timeout=60)
            for _ in range(REQUESTS_PER_CLIENT):
                idx = rng.choice(len(pool), size=int(rng.integers(1, 5)), replace=False)
                inp = httpclient.InferInput("image", [len(idx), 1, 28, 28], "FP32")
                inp.set_data_from_numpy(pool[idx])
                t0 = time.perf_counter()
                try:
                    result = client.infer("breast", [inp],
                                          outputs=[httpclient.InferRequestedOutput("probabilities")])
                    probs = result.as_numpy("probabilities")
                except Exception:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if probs is None or probs.shape != (len(idx), 2):
                    failures += 1
                    continue
                worst = max(worst, float(np.max(np.abs(probs - expected[idx]))))
                images_sent += len(idx)
        return {"failures": failures, "worst": worst, "images": images_sent, "p95": float(np.percentile(latencies, 95))
                if latencies else float("nan")}

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as executor:
        results = list(executor.map(client_run, range(CLIENTS)))
    elapsed = time.perf_counter() - t0

    requests = CLIENTS * REQUESTS_PER_CLIENT
    images_done = sum(r["images"] for r in results)
    print(f"\nload: {CLIENTS} clients x {REQUESTS_PER_CLIENT} requests = {requests} requests, {images_done} images "
          f"in {elapsed:.1f} s: {requests / elapsed:.0f} requests/s, {images_done / elapsed:.0f} images/s, "
          f"worst client p95 latency {max(r['p95'] for r in results) * 1000:.1f} ms")
    assert sum(r["failures"] for r in results) == 0, results
    assert max(r["worst"] for r in results) <= 1e-5  # every caller got its own images' probabilities
    assert images_done >= requests  # at least one image per request
    assert elapsed < TIME_LIMIT_S, f"{requests} requests took {elapsed:.0f} s"
    with httpclient.InferenceServerClient(served.server.http_url) as client:
        assert client.is_server_ready() and client.is_model_ready("breast")
