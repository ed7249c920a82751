"""``python -m serve load/unload/start`` for real: model control on the session server, a server of its own."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.http as httpclient

from serve.triton_server import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_serve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def model_ready(url: str, name: str = "breast") -> bool:
    with httpclient.InferenceServerClient(url) as client:
        return bool(client.is_model_ready(name))


def port_is_free(port: int) -> bool:
    """Nothing listens on ``port``: a new server could bind it (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_unload_then_load(served) -> None:
    url = served.server.http_url
    assert model_ready(url)
    try:
        proc = run_serve("unload", "breast", "--url", url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "unloaded" in proc.stdout
        assert not model_ready(url)

        proc = run_serve("load", "breast", "--url", f"http://{url}")  # a scheme is accepted too
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ready" in proc.stdout
        assert model_ready(url)
    finally:  # the session server must keep serving the model for the other tests
        if not model_ready(url):
            with httpclient.InferenceServerClient(url) as client:
                client.load_model("breast")
        assert model_ready(url)


@pytest.mark.parametrize("command", ["load", "unload"])
def test_unknown_model_is_refused(served, command: str) -> None:
    proc = run_serve(command, "no_such_model", "--url", served.server.http_url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no_such_model" in proc.stderr and "not in the model repository" in proc.stderr
    assert "breast" in proc.stderr  # the models that do exist are listed
    assert model_ready(served.server.http_url)


@pytest.mark.parametrize("command", ["load", "unload"])
def test_server_down_is_reported(command: str) -> None:
    url = f"127.0.0.1:{free_port()}"
    start = time.monotonic()
    proc = run_serve(command, "breast", "--url", url, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert time.monotonic() - start < 20
    assert f"Triton at {url} is not reachable" in proc.stderr
    assert "Traceback" not in proc.stderr


def _kill_leftover(pid: int | None) -> None:
    """Last resort after a failed test: the tritonserver runs in its own process group."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_start_serves_until_sigterm(served, tmp_path: Path) -> None:
    repository = tmp_path / "model_repository"
    shutil.copytree(served.repository, repository)
    http, grpc, metrics = free_port(), free_port(), free_port()
    log = tmp_path / "start.out"
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "start", "--model-repository", str(repository), "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--load", "breast"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    triton_pid = None
    try:
        url = f"127.0.0.1:{http}"
        deadline = time.monotonic() + 120
        ready = False
        with httpclient.InferenceServerClient(url, connection_timeout=2, network_timeout=2) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = client.is_server_ready() and client.is_model_ready("breast")
                except Exception:  # not listening yet
                    ready = False
                if ready:
                    break
                time.sleep(0.3)
        assert ready, f"not ready (exit code {proc.poll()}):\n{log.read_text()}"

        for _ in range(50):  # the banner is printed right after readiness
            text = log.read_text()
            if "press Ctrl-C" in text:
                break
            time.sleep(0.1)
        match = re.search(r"Triton is ready \(pid (\d+)", text)
        assert match, text
        triton_pid = int(match.group(1))
        assert f"http://127.0.0.1:{http}" in text
        assert f"127.0.0.1:{grpc}" in text
        assert f"http://127.0.0.1:{metrics}/metrics" in text
        assert re.search(r"breast v1: READY", text), text

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=40)
        took = time.monotonic() - t0
        text = log.read_text()
        assert code == 0, text
        assert took < 30, f"stopping took {took:.1f} s"
        assert "Triton stopped" in text
        with pytest.raises(ProcessLookupError):
            os.kill(triton_pid, 0)  # the server process is gone (reaped by the CLI)
        for port in (http, grpc, metrics):
            assert port_is_free(port), f"port {port} still in use"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_leftover(triton_pid)


def test_start_failure_exits_1_with_log_tail(tmp_path: Path) -> None:
    repository = tmp_path / "model_repository"
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "config.pbtxt").write_text("this is { not a valid config\n")
    proc = run_serve("start", "--model-repository", str(repository), "--http-port", str(free_port()),
                     "--grpc-port", str(free_port()), "--metrics-port", str(free_port()), "--load", "broken",
                     "--timeout", "60", timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Triton did not start" in proc.stderr
    assert "last server log lines" in proc.stderr
    assert "broken" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_batch_with_own_server_and_run_comparison(served, breastmnist_small: Path, tmp_path: Path) -> None:
    """The README job: ``batch <npz> --start-server --compare-run latest`` (here over gRPC, 64 test images)."""
    out_csv = tmp_path / "predictions.csv"
    proc = run_serve("batch", str(breastmnist_small), "--out", str(out_csv), "--model", "breast", "--backend", "grpc",
                     "--model-repository", str(served.repository), "--start-server", "--batch-size", "8",
                     "--compare-run", "latest", "--log-dir", str(served.run_dir.parent), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = out_csv.read_text().splitlines()
    assert len(rows) == 1 + 64, rows[:3]
    assert "images/s" in proc.stdout and "AUROC" in proc.stdout
    assert "training test" in proc.stdout  # the comparison table
    assert "Triton stopped (exit code 0)" in proc.stderr
    match = re.search(r"Triton ready: HTTP 127\.0\.0\.1:(\d+)", proc.stderr)
    assert match and port_is_free(int(match.group(1)))
