"""Triton locked down: the admin APIs behind ``MEDOPS_TRITON_ADMIN_KEY`` on a real server, inference left open.

The model is the torch-free tiny ONNX classifier of test_triton_server (Python backend), with two versions and the
``metadata.json`` a rollout reads, so promote and rollback run against the restricted server for real.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

import serve.triton_server as triton_server
from medops.integrity import seal
from medops.model_version import METADATA_SCHEMA
from serve import rollout
from serve.triton_server import (
    ADMIN_HEADER,
    ADMIN_KEY_ENV,
    RESTRICTED_APIS,
    AdminKeyError,
    TritonServer,
    admin_headers,
    admin_hint,
    admin_key_from_env,
    check_admin_key,
    free_port,
    generate_admin_key,
    restricted_args,
)
from tests.conftest import REPO
from tests.serve.test_triton_server import BATCH, LABELS, distinct_ports, write_model

KEY = "medops-test-" + "k3y" * 8  # what the server is started with; must never show up in any output
MODEL = "tiny"


# ---------------------------------------------------------------- no server needed


def test_admin_key_must_be_long_and_visible_ascii() -> None:
    assert check_admin_key(KEY) == KEY
    assert len(generate_admin_key()) >= 32 and generate_admin_key() != generate_admin_key()
    for bad in ("short", "x" * 15, "has a space in it!!", "tab\tinside-the-key", "nön-ascii-key-value"):
        with pytest.raises(AdminKeyError) as info:
            check_admin_key(bad)
        assert bad not in str(info.value) and ADMIN_KEY_ENV in str(info.value)
    with pytest.raises(AdminKeyError):
        TritonServer(REPO, admin_key="short")


def test_key_and_headers_come_from_the_environment() -> None:
    assert admin_key_from_env({}) is None and admin_key_from_env({ADMIN_KEY_ENV: ""}) is None
    assert admin_key_from_env({ADMIN_KEY_ENV: KEY}) == KEY
    with pytest.raises(AdminKeyError):
        admin_key_from_env({ADMIN_KEY_ENV: "too-short"})
    assert admin_headers(environ={}) is None
    assert admin_headers(environ={ADMIN_KEY_ENV: KEY}) == {ADMIN_HEADER: KEY}
    # Triton expects the restricted-protocol key with this prefix on gRPC
    assert admin_headers(KEY, protocol="grpc") == {f"triton-grpc-protocol-{ADMIN_HEADER}": KEY}


def test_restricted_args_follow_tritons_format() -> None:
    http, grpc = restricted_args(KEY)
    apis = ",".join(RESTRICTED_APIS)
    assert http == f"--http-restricted-api={apis}:{ADMIN_HEADER}={KEY}"
    assert grpc == f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={KEY}"
    # what clients need for inference stays open
    assert not {"health", "metadata", "model-config", "inference"} & set(RESTRICTED_APIS)


def test_admin_hint_names_the_variable_never_the_key() -> None:
    refused = InferenceServerException("This API is restricted, expecting header 'medops-admin-key'", "403")
    assert admin_hint(ValueError("connection refused")) == ""
    unset = admin_hint(refused, environ={})
    wrong = admin_hint(refused, environ={ADMIN_KEY_ENV: KEY})
    assert f"set {ADMIN_KEY_ENV}" in unset and "not the one" in wrong and KEY not in unset + wrong


def test_start_server_locks_its_private_server_with_a_random_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.__main__ import server_context

    made: list[dict] = []

    class Recorder:
        http_url, grpc_url, metrics_url, model_repository = "h:1", "g:2", "m", Path("repo")

        def __init__(self, *args, **kwargs) -> None:
            made.append(kwargs)

        def start(self, timeout: float) -> None:
            pass

        def stop(self) -> int:
            return 0

    monkeypatch.setattr(triton_server, "TritonServer", Recorder)
    args = argparse.Namespace(start_server=True, backend="grpc", model_repository="repo", tritonserver=None,
                              model="m", server_timeout=5.0)
    for _ in range(2):
        with server_context(args) as url:
            assert url == "g:2"
    keys = [kwargs["admin_key"] for kwargs in made]
    assert all(check_admin_key(k) for k in keys) and keys[0] != keys[1]


def run_serve(*args: str, key: str | None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV}
    env.update({"COLUMNS": "250", "PYTHONUNBUFFERED": "1", **({ADMIN_KEY_ENV: key} if key else {})})
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_start_without_a_key_warns_that_the_admin_apis_are_open(tmp_path: Path) -> None:
    # the warning comes before the server starts, so a missing repository is enough to see it
    proc = run_serve("start", "--model-repository", str(tmp_path / "missing"), key=None, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"warning: {ADMIN_KEY_ENV} is not set" in proc.stderr and "open" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_start_refuses_an_unusable_key_without_echoing_it(tmp_path: Path) -> None:
    bad = "weak key 42"
    proc = run_serve("start", "--model-repository", str(tmp_path), key=bad, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert ADMIN_KEY_ENV in proc.stderr and "at least 16" in proc.stderr
    assert bad not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- a restricted server


def write_version_metadata(folder: Path, version: int) -> None:
    meta = {"schema": METADATA_SCHEMA, "name": MODEL, "version": version, "class_names": LABELS,
            "input": {"name": "image", "channels": 1, "size": 4, "window": None},
            "parity": [{"engine": "python", "passed": True, "max_abs_diff": 1e-7}]}
    meta = seal(folder / str(version), meta)  # the file digests export records (serve start verifies them)
    (folder / str(version) / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny`` v1 and v2 (the same classifier), each with the metadata a rollout reads."""
    root = tmp_path_factory.mktemp("secure") / "repo"
    folder = write_model(root, MODEL)
    (folder / "2").mkdir()
    for item in (folder / "1").iterdir():
        (folder / "2" / item.name).write_bytes(item.read_bytes())
    for version in (1, 2):
        write_version_metadata(folder, version)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[TritonServer]:
    http, grpc, metrics = distinct_ports()
    srv = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, model_control="explicit",
                       load_models=[MODEL], admin_key=KEY)
    srv.start(timeout=120)
    try:
        yield srv
    finally:
        srv.stop()


def refused(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert "restricted" in str(info.value) and ADMIN_HEADER in str(info.value), info.value
    return info.value


def infer_http(url: str) -> np.ndarray:
    inp = httpclient.InferInput("image", list(BATCH.shape), "FP32")
    inp.set_data_from_numpy(BATCH, binary_data=True)
    with httpclient.InferenceServerClient(url) as client:
        return client.infer(MODEL, [inp]).as_numpy("probabilities")


@pytest.mark.slow
def test_http_admin_apis_need_the_key(server: TritonServer) -> None:
    assert server.restricted and server.admin_headers() == {ADMIN_HEADER: KEY}
    wrong = {ADMIN_HEADER: "not-the-key-" + "x" * 16}
    with httpclient.InferenceServerClient(server.http_url) as client:
        for headers in (None, wrong):
            error = refused(lambda h=headers: client.get_model_repository_index(headers=h))
            assert error.status() == "403"
            refused(lambda h=headers: client.load_model(MODEL, headers=h))
            refused(lambda h=headers: client.unload_model(MODEL, headers=h))
            refused(lambda h=headers: client.get_inference_statistics(MODEL, headers=h))
            refused(lambda h=headers: client.get_log_settings(headers=h))
            refused(lambda h=headers: client.update_log_settings({"log_verbose_level": 1}, headers=h))
            refused(lambda h=headers: client.get_trace_settings(headers=h))
            refused(lambda h=headers: client.get_system_shared_memory_status(headers=h))
        assert client.is_model_ready(MODEL)  # nothing was unloaded

        key = server.admin_headers()
        index = client.get_model_repository_index(headers=key)
        assert {(m["name"], m.get("state")) for m in index} >= {(MODEL, "READY")}
        stats = client.get_inference_statistics(MODEL, headers=key)
        assert stats["model_stats"][0]["name"] == MODEL
        assert "log_verbose_level" in client.get_log_settings(headers=key)
        client.get_trace_settings(headers=key)
        client.get_system_shared_memory_status(headers=key)
        client.load_model(MODEL, headers=key)  # a reload of what is loaded: accepted
        assert client.is_model_ready(MODEL)


@pytest.mark.slow
def test_inference_health_and_metadata_stay_open(server: TritonServer) -> None:
    probs = infer_http(server.http_url)
    assert probs.shape == (len(BATCH), len(LABELS)) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_server_metadata()["name"] == "triton"
        assert client.get_model_metadata(MODEL)["name"] == MODEL
        assert client.get_model_config(MODEL)["name"] == MODEL
    inp = grpcclient.InferInput("image", list(BATCH.shape), "FP32")
    inp.set_data_from_numpy(BATCH)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready()
        grpc_probs = client.infer(MODEL, [inp]).as_numpy("probabilities")
    np.testing.assert_allclose(grpc_probs, probs, atol=1e-6)


@pytest.mark.slow
def test_grpc_admin_protocols_need_the_prefixed_key_header(server: TritonServer) -> None:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for headers in (None, {ADMIN_HEADER: KEY}):  # the plain HTTP header name is not what gRPC checks
            refused(lambda h=headers: client.get_model_repository_index(headers=h))
            refused(lambda h=headers: client.get_inference_statistics(MODEL, headers=h))
            refused(lambda h=headers: client.unload_model(MODEL, headers=h))
        key = server.admin_headers("grpc")
        names = {m.name for m in client.get_model_repository_index(headers=key).models}
        assert MODEL in names
        assert client.get_inference_statistics(MODEL, headers=key).model_stats[0].name == MODEL


@pytest.mark.slow
def test_the_key_is_never_logged(server: TritonServer) -> None:
    assert KEY not in server.log_text()
    assert KEY not in " ".join(server.command) and KEY not in repr(server)
    assert any(arg.startswith("--http-restricted-api=") and arg.endswith("<redacted>") for arg in server.command)


@pytest.mark.slow
def test_load_and_unload_commands_send_the_key_from_the_environment(server: TritonServer) -> None:
    url = server.http_url
    proc = run_serve("unload", MODEL, "--url", url, key=None)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "restricted" in proc.stderr and f"set {ADMIN_KEY_ENV}" in proc.stderr
    proc = run_serve("unload", MODEL, "--url", url, key="a-wrong-key-of-enough-length")
    assert proc.returncode == 1 and "not the one the server was started with" in proc.stderr, proc.stderr
    assert infer_http(url).shape == (len(BATCH), len(LABELS))  # still served
    try:
        proc = run_serve("unload", MODEL, "--url", url, key=KEY)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        proc = run_serve("load", MODEL, "--url", url, key=KEY)
        assert proc.returncode == 0 and "ready" in proc.stdout, proc.stdout + proc.stderr
        assert KEY not in proc.stdout + proc.stderr
    finally:
        with httpclient.InferenceServerClient(url) as client:
            if not client.is_model_ready(MODEL):
                client.load_model(MODEL, headers=server.admin_headers())


def served_versions(server: TritonServer) -> set[str]:
    with httpclient.InferenceServerClient(server.http_url) as client:
        return {str(m["version"]) for m in client.get_model_repository_index(headers=server.admin_headers())
                if m["name"] == MODEL and m.get("state") == "READY"}


@pytest.mark.slow
def test_promote_and_rollback_reload_the_restricted_server_with_the_key(server: TritonServer, repo: Path) -> None:
    url, where = server.http_url, ("--model-repository", str(repo), "--url", server.http_url)
    before = (repo / MODEL / "config.pbtxt").read_text()
    proc = run_serve("promote", MODEL, "1", *where, key=None)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot reload models" in proc.stderr and f"set {ADMIN_KEY_ENV}" in proc.stderr
    # refused before anything changed: no decision recorded, the served config untouched
    assert rollout.read_state(repo, MODEL).production is None and rollout.read_history(repo, MODEL) == []
    assert (repo / MODEL / "config.pbtxt").read_text() == before

    proc = run_serve("promote", MODEL, "1", *where, key=KEY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served_versions(server) == {"1"}
    proc = run_serve("promote", MODEL, "2", "--force", *where, key=KEY)  # no evaluation set: forced past the gate
    assert proc.returncode == 0 and "forced" in proc.stdout, proc.stdout + proc.stderr
    assert served_versions(server) == {"2"}
    proc = run_serve("rollback", MODEL, *where, key=KEY)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert served_versions(server) == {"1"} and rollout.read_state(repo, MODEL).production == 1
    assert KEY not in proc.stdout + proc.stderr
    assert infer_http(url).shape == (len(BATCH), len(LABELS))


@pytest.mark.slow
def test_grpc_over_tls_with_the_kubernetes_components_flags(repo: Path, tmp_path: Path) -> None:
    """deploy/k8s/grpc-tls's flags, its mount path replaced by a folder with a self-signed certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(tmp_path / "tls.key"), "-out",
                    str(tmp_path / "tls.crt")], check=True, capture_output=True, timeout=60)
    patch = yaml.safe_load((REPO / "deploy" / "k8s" / "grpc-tls" / "deployment-patch.yaml").read_text())
    (c,) = patch["spec"]["template"]["spec"]["containers"]
    (mount,) = c["volumeMounts"]
    (extra,) = [e["value"] for e in c["env"] if e["name"] == "MEDOPS_TRITON_EXTRA_ARGS"]
    flags = extra.replace(mount["mountPath"], str(tmp_path)).split()
    http, grpc, metrics = distinct_ports()
    inp = grpcclient.InferInput("image", list(BATCH.shape), "FP32")
    inp.set_data_from_numpy(BATCH)
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, admin_key=KEY,
                      extra_args=flags) as srv:
        with grpcclient.InferenceServerClient(srv.grpc_url, ssl=True,
                                              root_certificates=str(tmp_path / "tls.crt")) as client:
            assert client.infer(MODEL, [inp]).as_numpy("probabilities").shape == (len(BATCH), len(LABELS))
            refused(client.get_model_repository_index)
            assert client.get_model_repository_index(headers=srv.admin_headers("grpc")).models
        with grpcclient.InferenceServerClient(srv.grpc_url) as client, pytest.raises(InferenceServerException):
            client.is_server_live(client_timeout=10)  # plaintext gRPC is refused


# ---------------------------------------------------------------- python -m serve start


def wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        content = path.read_text()
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not printed (exit code {proc.poll()}):\n{path.read_text()}")


@pytest.mark.slow
def test_serve_start_locks_the_admin_apis_with_the_environment_key(repo: Path, tmp_path: Path) -> None:
    http, grpc, metrics = free_port(), free_port(), free_port()
    out = tmp_path / "start.out"
    env = {**os.environ, ADMIN_KEY_ENV: KEY, "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    with open(out, "w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve", "start", "--model-repository", str(repo), "--http-port", str(http),
             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--load", MODEL],
            cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
    triton_pid = None
    try:
        text = wait_for(out, "press Ctrl-C", proc)
        triton_pid = int(re.search(r"Triton is ready \(pid (\d+)", text).group(1))
        assert f"need the header {ADMIN_HEADER}" in text and "warning" not in text
        assert re.search(rf"{MODEL} v\d: READY", text), text  # the banner's index request carried the key
        url = f"127.0.0.1:{http}"
        with httpclient.InferenceServerClient(url) as client:
            refused(client.get_model_repository_index)
            assert client.get_model_repository_index(headers={ADMIN_HEADER: KEY})
        assert infer_http(url).shape == (len(BATCH), len(LABELS))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert KEY not in out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if triton_pid is not None:
            try:
                os.killpg(triton_pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
