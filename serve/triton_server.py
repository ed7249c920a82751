"""Start and stop a real NVIDIA Triton Inference Server on loopback, for tests, demos and local serving.

Three ways to get a ``tritonserver`` binary, tried in order by :func:`find_tritonserver`: an explicit path, one on
``PATH`` (the NGC container), or the binary bundled in the ``nvidia-pytriton`` wheel. The bundled build has only
the Python backend, and it needs two things a plain install lacks, both handled here:

* its shared libraries live in ``site-packages/nvidia_pytriton.libs`` -> ``LD_LIBRARY_PATH`` (:func:`server_env`);
* the Python-backend stub for *this* Python version must sit in ``backends/python/`` -> a cached copy of the
  bundled tree with the stub put in place (:func:`prepare_bundled_backends`).

Python-backend models import packages from the environment whose ``bin/`` comes first on the server's ``PATH``
(``PYTHONPATH`` alone is not enough), so :func:`server_env` puts ``sys.executable``'s folder first.

Admin APIs behind a key (Triton's "Secure Deployment Considerations"): with ``admin_key`` the server restricts
:data:`RESTRICTED_APIS` (model repository incl. load/unload, shared memory, statistics, trace, logging) on HTTP and
gRPC to requests carrying the header :data:`ADMIN_HEADER` (gRPC: ``triton-grpc-protocol-`` + it) with the key;
health, metadata, model configuration and inference stay open. ``python -m serve`` takes the key from
:data:`ADMIN_KEY_ENV` (:func:`admin_key_from_env`, :func:`admin_headers`). Triton only accepts the key on its command
line, so it is in the server's argv (``ps`` on the same host shows it); :attr:`TritonServer.command` is redacted.

Torch-free: standard library only.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "ADMIN_HEADER",
    "ADMIN_KEY_ENV",
    "RESTRICTED_APIS",
    "AdminKeyError",
    "TritonNotFound",
    "TritonServer",
    "admin_headers",
    "admin_hint",
    "admin_key_from_env",
    "check_admin_key",
    "find_tritonserver",
    "free_port",
    "generate_admin_key",
    "is_restricted_error",
    "prepare_bundled_backends",
    "restricted_args",
    "server_env",
]

LOOPBACK = "127.0.0.1"
_COMPLETE_MARKER = ".medops-complete"
_LOG_TAIL_LINES = 60


ADMIN_KEY_ENV = "MEDOPS_TRITON_ADMIN_KEY"
ADMIN_HEADER = "medops-admin-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # Triton prefixes the restricted-protocol key on gRPC
# Triton's API groups behind the key; health, metadata, model-config and inference stay open (clients need them)
RESTRICTED_APIS = ("model-repository", "shared-memory", "statistics", "trace", "logging")
ADMIN_KEY_MIN_LENGTH = 16
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: a valid HTTP header value, one argv word
REDACTED = "<redacted>"


class TritonNotFound(RuntimeError):
    """No usable ``tritonserver`` binary."""


class AdminKeyError(ValueError):
    """An admin key Triton cannot use safely; the message never contains the key."""


def check_admin_key(key: str) -> str:
    """``key`` if it is at least 16 visible ASCII characters (no spaces), else :class:`AdminKeyError`."""
    if len(key) < ADMIN_KEY_MIN_LENGTH or not _KEY_CHARS.fullmatch(key):
        raise AdminKeyError(
            f"the Triton admin key ({ADMIN_KEY_ENV}) must be at least {ADMIN_KEY_MIN_LENGTH} visible ASCII "
            "characters without spaces, for example the output of `openssl rand -hex 32`"
        )
    return key


def generate_admin_key() -> str:
    """A random key (256 bits, URL-safe) for a server whose admin APIs nobody should use."""
    return secrets.token_urlsafe(32)


def admin_key_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The admin key from ``MEDOPS_TRITON_ADMIN_KEY``; None when unset or empty. Raises AdminKeyError if unusable."""
    value = (os.environ if environ is None else environ).get(ADMIN_KEY_ENV, "")
    return check_admin_key(value) if value else None


def admin_headers(key: str | None = None, *, protocol: str = "http",
                  environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """Request headers for Triton's restricted APIs: ``{ADMIN_HEADER: key}`` (gRPC: the header Triton expects,
    ``triton-grpc-protocol-medops-admin-key``). ``key`` defaults to ``MEDOPS_TRITON_ADMIN_KEY``; None without a key,
    which is what tritonclient's ``headers=`` takes for "no extra headers"."""
    if protocol not in ("http", "grpc"):
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    if key is None:
        key = (os.environ if environ is None else environ).get(ADMIN_KEY_ENV) or None
    if key is None:
        return None
    return {(GRPC_HEADER_PREFIX if protocol == "grpc" else "") + ADMIN_HEADER: key}


def restricted_args(key: str) -> list[str]:
    """``tritonserver`` arguments that put :data:`RESTRICTED_APIS` behind the header ``ADMIN_HEADER: key``."""
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{ADMIN_HEADER}={key}",
            f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={key}"]


def is_restricted_error(exc: BaseException) -> bool:
    """Did Triton refuse a request because it lacked the admin key header (HTTP 403, gRPC UNAVAILABLE)?"""
    return "is restricted, expecting header" in str(exc)


def admin_hint(exc: BaseException, environ: Mapping[str, str] | None = None) -> str:
    """Text to append to an error when Triton refused a request for want of the admin key ("" otherwise)."""
    if not is_restricted_error(exc):
        return ""
    if (os.environ if environ is None else environ).get(ADMIN_KEY_ENV):
        fix = f"the key in {ADMIN_KEY_ENV} is not the one the server was started with"
    else:
        fix = f"set {ADMIN_KEY_ENV} to the key the server was started with"
    return f" (this Triton restricts its admin APIs to requests with the {ADMIN_HEADER} header: {fix})"


def _pytriton_root() -> Path | None:
    """``site-packages/pytriton`` without importing pytriton (its import is slow and pulls in much)."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _bundled_dir() -> Path | None:
    root = _pytriton_root()
    return root / "tritonserver" if root is not None else None


def _bundled_libs() -> Path | None:
    root = _pytriton_root()
    if root is None:
        return None
    libs = root.parent / "nvidia_pytriton.libs"
    return libs if libs.is_dir() else None


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _is_bundled(binary: Path) -> bool:
    bundled = _bundled_dir()
    if bundled is None:
        return False
    try:
        binary.resolve().relative_to(bundled.resolve())
    except ValueError:
        return False
    return True


def find_tritonserver(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The ``tritonserver`` binary to run: ``explicit``, else one on ``PATH``, else the pytriton-bundled one.

    Raises:
        TritonNotFound: ``explicit`` is not an executable file, or no binary was found anywhere.
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not _is_executable(path):
            reason = "is not executable" if path.is_file() else "does not exist"
            raise TritonNotFound(f"tritonserver binary {path} {reason}")
        return path
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path)
    bundled = _bundled_dir()
    if bundled is not None and _is_executable(bundled / "bin" / "tritonserver"):
        return bundled / "bin" / "tritonserver"
    raise TritonNotFound(
        "no tritonserver binary: not on PATH and no nvidia-pytriton wheel with a bundled server "
        "(pip install nvidia-pytriton, use the NGC tritonserver container, or pass the binary path explicitly)"
    )


def _default_cache_dir() -> Path:
    try:
        version = importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # The stub is specific to the Python minor version, so two interpreters must not share one copy.
    return base / "medops" / f"tritonserver-{version}-py{sys.version_info.major}.{sys.version_info.minor}"


def _find_stub(bundled: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = sorted(bundled.glob(f"**/python_backend_stubs/{version}/triton_python_backend_stub"))
    if not candidates:
        candidates = sorted(p for p in bundled.rglob("triton_python_backend_stub") if version in p.parts)
    if not candidates:
        raise TritonNotFound(f"the bundled Triton in {bundled} has no Python-backend stub for Python {version}")
    return candidates[0]


def prepare_bundled_backends(cache_dir: Path | None = None) -> Path:
    """Copy the pytriton-bundled Triton tree into ``cache_dir`` once, with this Python's stub in place.

    Returns the ``backends`` folder to pass as ``--backend-directory``. Idempotent; safe when processes race:
    each builds in its own temporary folder and renames it into place atomically, the loser discards its copy.
    """
    bundled = _bundled_dir()
    if bundled is None or not bundled.is_dir():
        raise TritonNotFound("nvidia-pytriton is not installed: no bundled Triton backends to prepare")
    target = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    backends = target / "backends"
    if (target / _COMPLETE_MARKER).is_file():
        return backends

    stub = _find_stub(bundled)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build = tmp / "tree"
        shutil.copytree(bundled, build, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
        (build / "backends" / "python").mkdir(parents=True, exist_ok=True)
        dst = build / "backends" / "python" / "triton_python_backend_stub"
        shutil.copy2(stub, dst)
        dst.chmod(0o755)
        (build / _COMPLETE_MARKER).write_text(f"{stub}\n")
        if target.exists() and not (target / _COMPLETE_MARKER).is_file():
            # A half-built copy from an older, non-atomic run: move it aside (atomic) and delete it.
            stale = tmp / "stale"
            try:
                os.rename(target, stale)
            except OSError:
                pass
        try:
            os.rename(build, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():
                raise
            # Another process won the race; its copy is complete and equivalent.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return backends


def server_env(binary: Path) -> dict[str, str]:
    """Environment for ``tritonserver``: bundled libraries on ``LD_LIBRARY_PATH``, this Python's ``bin`` first."""
    env = dict(os.environ)
    libs = _bundled_libs()
    if libs is not None:
        # The bundled libraries carry hashed names (libcurl-75a2bf80.so...), so appending cannot shadow others.
        current = env.get("LD_LIBRARY_PATH", "")
        parts = [p for p in current.split(os.pathsep) if p]
        if str(libs) not in parts:
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*parts, str(libs)])
    bin_dir = str(Path(sys.executable).parent)  # not resolved: a venv's bin/python is a symlink
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *rest])
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class TritonServer:
    """A ``tritonserver`` process bound to 127.0.0.1, as a context manager.

    >>> with TritonServer("model_repository", http_port=free_port(), grpc_port=free_port(),
    ...                   metrics_port=free_port()) as server:   # doctest: +SKIP
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)
    """

    def __init__(
        self,
        model_repository: str | os.PathLike[str],
        *,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        tritonserver: str | os.PathLike[str] | None = None,
        model_control: str = "none",
        load_models: Sequence[str] = (),
        log_verbose: int = 0,
        log_file: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        admin_key: str | None = None,
    ) -> None:
        if model_control not in ("none", "explicit"):
            raise ValueError(f"model_control must be 'none' or 'explicit', got {model_control!r}")
        if load_models and model_control != "explicit":
            raise ValueError("load_models needs model_control='explicit' (mode 'none' loads every model)")
        ports = (http_port, grpc_port, metrics_port)
        if len(set(ports)) != 3:
            raise ValueError(f"http, grpc and metrics ports must differ, got {ports}")
        self.model_repository = Path(model_repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = ports
        self.tritonserver = tritonserver
        self.model_control = model_control
        self.load_models = tuple(load_models)
        self.log_verbose = int(log_verbose)
        self.extra_args = tuple(extra_args)
        self._admin_key = check_admin_key(admin_key) if admin_key is not None else None
        self._argv: list[str] = []
        self._log_path = Path(log_file) if log_file is not None else None
        self._log_handle = None
        self._tmp_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.command: list[str] = []  # what was run, the admin key replaced by REDACTED: safe to log

    # -- addresses -----------------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    # -- admin APIs ----------------------------------------------------------------------------------------
    @property
    def restricted(self) -> bool:
        """True when the admin APIs (:data:`RESTRICTED_APIS`) need the key header."""
        return self._admin_key is not None

    def admin_headers(self, protocol: str = "http") -> dict[str, str] | None:
        """Headers for this server's restricted APIs (None when they are open)."""
        return admin_headers(self._admin_key, protocol=protocol) if self._admin_key is not None else None

    # -- lifecycle -----------------------------------------------------------------------------------------
    def _build_command(self, binary: Path) -> list[str]:
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.metrics_port}",
            f"--model-control-mode={self.model_control}",
            f"--log-verbose={self.log_verbose}",
        ]
        cmd += [f"--load-model={name}" for name in self.load_models]
        if _is_bundled(binary):
            backends = prepare_bundled_backends()
            cmd += [f"--backend-directory={backends}", f"--cache-directory={backends.parent / 'caches'}"]
        cmd += list(self.extra_args)
        if self._admin_key is not None:
            cmd += restricted_args(self._admin_key)
        return cmd

    def _redacted(self, argv: Sequence[str]) -> list[str]:
        key = self._admin_key
        return [arg.replace(key, REDACTED) if key else arg for arg in argv]

    def start(self, timeout: float = 120) -> TritonServer:
        """Launch the server and wait until ``/v2/health/ready`` answers 200.

        Raises:
            TritonNotFound: no binary.
            RuntimeError: the server exited during start-up or was not ready within ``timeout`` seconds; the
                message ends with the last lines of the server log. The process is stopped first.
        """
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"Triton is already running (pid {self.process.pid})")
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} is not a directory")
        binary = find_tritonserver(self.tritonserver)
        self._argv = self._build_command(binary)
        self.command = self._redacted(self._argv)
        if self._log_path is None:
            self._tmp_dir = Path(tempfile.mkdtemp(prefix="medops-triton-"))
            self._log_path = self._tmp_dir / "tritonserver.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self._log_path, "wb")  # closed in stop()
        self.process = subprocess.Popen(
            self._argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            env=server_env(binary),
            start_new_session=True,  # own process group: stop() reaches the Python-backend stubs too
        )
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self.stop()
                raise RuntimeError(
                    f"tritonserver exited with code {code} during start-up "
                    f"(repository {self.model_repository}); last server log lines:\n{self._log_tail()}"
                )
            if self.is_ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"tritonserver was not ready within {timeout:.0f} s (repository {self.model_repository}); "
                    f"last server log lines:\n{self._log_tail()}"
                )
            time.sleep(0.2)

    def stop(self, grace: float = 15) -> int:
        """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds; returns the exit code.

        A clean stop takes ~3 s (the Python-backend stubs shut down). Triton then waits, up to its
        ``--exit-timeout-secs`` (30 s by default), for open HTTP keep-alive connections to close: close your
        ``tritonclient.http`` clients first (or use them as context managers), or this ends in SIGKILL (-9).
        """
        proc = self.process
        if proc is None:
            return 0
        if proc.poll() is None:
            self._signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # Leftover Python-backend stubs (if the server died abruptly) share the group: make sure they go too.
        self._signal_group(proc.pid, signal.SIGKILL)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._tmp_dir is not None:  # a log folder we created: keep the text, remove the folder
            self._kept_log = self.log_text()
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None
            self._log_path = None
        return proc.returncode

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def is_ready(self) -> bool:
        """True when the server answers ``GET /v2/health/ready`` with 200 (every model loaded)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        try:
            with opener.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    # -- logs ----------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        if self._log_handle is not None:
            self._log_handle.flush()
        if self._log_path is None or not self._log_path.is_file():
            return getattr(self, "_kept_log", "")
        return self._log_path.read_text(errors="replace")

    def _log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "\n".join(tail) if tail else "(the server log is empty)"

    def __enter__(self) -> TritonServer:
        if self.process is None or self.process.poll() is not None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "not started" if self.process is None else f"pid {self.process.pid}, returncode {self.returncode}"
        return f"TritonServer({self.model_repository}, http={self.http_url}, grpc={self.grpc_url}, {state})"
