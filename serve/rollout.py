"""Safe model updates with Triton model versions: promotion gate, promote, rollback, canary and shadow trials.

State lives in the model repository next to the model, so it travels with it and every change is auditable:

* ``<repo>/<name>/rollout.json``: the production version, the previous ones (for rollback) and the running trial
  (a candidate version in ``canary`` or ``shadow`` mode, with the canary share);
* ``<repo>/<name>/history.jsonl``: one line per decision (promotion granted or refused with the gate's figures,
  rollback, trial start/end);
* ``<repo>/<name>/config.pbtxt``: rewritten from the production version's own config copy, with
  ``version_policy { specific { versions: [production(, candidate)] } }`` and the rollout as parameters
  (``rollout_production``, ``rollout_candidate``, ``rollout_mode``, ``rollout_canary_share``) so clients learn the
  routing from Triton itself. With ``--url`` the model is reloaded on the running Triton (explicit model control):
  Triton loads the new version set before it unloads the old one, so requests keep being answered. Model load and
  the repository index are Triton admin APIs: a server started with ``MEDOPS_TRITON_ADMIN_KEY`` wants that key
  (sent from the same variable), and access is checked before anything in the repository changes.

Clients (``serve predict``/``batch``) route through :class:`RolloutBackend` when the served config announces a
trial: canary sends a seeded share of requests to the candidate; shadow sends every request to both, answers with
production, and logs agreement. Requests without a version go to the highest loaded version, so during a trial
other clients should pin ``--version``. Torch-free.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import medops.model_version as mv
from medops.metrics import auroc_or_none
from medops.model_version import (
    CONFIG_FILE,
    ROLLOUT_FILE,
    ModelVersionError,
    RolloutState,
    list_versions,
    read_metadata,
    read_rollout_state,
    write_rollout_state,
)
from medops.triton_config import parse_model_config, render_model_config
from serve.contract import Backend, ModelInfo, ServeError, infer_outputs
from serve.local_backend import LocalBackend

MODES = ("canary", "shadow")


# -- repository state (the format is medops.model_version's) ----------------------------------------------------
def model_dir(repository: str | Path, name: str) -> Path:
    folder = Path(repository) / name
    if not (folder / CONFIG_FILE).is_file():
        raise ServeError(f"model {name!r} not found in {repository} (no {CONFIG_FILE})")
    return folder


def versions_of(repository: str | Path, name: str) -> list[int]:
    return list_versions(model_dir(repository, name))


def read_state(repository: str | Path, name: str) -> RolloutState:
    return read_rollout_state(model_dir(repository, name))


def read_history(repository: str | Path, name: str) -> list[dict[str, Any]]:
    return mv.read_history(model_dir(repository, name))


def append_history(repository: str | Path, name: str, entry: dict[str, Any]) -> dict[str, Any]:
    return mv.append_history(model_dir(repository, name), entry)


def write_state(repository: str | Path, name: str, state: RolloutState) -> None:
    """Persist ``state`` and rewrite the model's ``config.pbtxt`` to serve exactly its versions."""
    folder = model_dir(repository, name)
    if state.production is None:
        raise ServeError("a rollout needs a production version")
    base = folder / str(state.production) / "config.pbtxt"
    config = parse_model_config((base if base.is_file() else folder / "config.pbtxt").read_text())
    config.version_policy.Clear()
    config.version_policy.specific.versions.extend(state.served_versions)
    params = {"rollout_production": str(state.production), "rollout_candidate": str(state.candidate or ""),
              "rollout_mode": state.mode or "", "rollout_canary_share": f"{state.canary_share:g}"}
    for key, value in params.items():
        config.parameters[key].string_value = value
    write_rollout_state(folder, state)
    tmp = folder / f".{CONFIG_FILE}.tmp"
    tmp.write_text(render_model_config(config))
    os.replace(tmp, folder / CONFIG_FILE)


def reload_on_triton(url: str, name: str, state: RolloutState, timeout: float = 120,
                     headers: dict[str, str] | None = None) -> None:
    """Ask a running Triton (explicit model control) to reload ``name``; wait until exactly the state's versions
    are ready. Triton keeps the old versions serving until the new set has loaded. Model load and the repository
    index are admin APIs: ``headers`` default to the admin key header from ``MEDOPS_TRITON_ADMIN_KEY`` (none when
    it is unset)."""
    import tritonclient.http as httpclient

    from serve.triton_server import admin_headers, admin_hint

    headers = admin_headers() if headers is None else headers
    client = httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    try:
        client.load_model(name, headers=headers)
        deadline = time.monotonic() + timeout
        wanted = {str(v) for v in state.served_versions}
        while True:
            index = [m for m in client.get_model_repository_index(headers=headers) if m.get("name") == name]
            ready = {str(m.get("version")) for m in index if m.get("state") == "READY"}
            if ready == wanted:
                return
            if time.monotonic() > deadline:
                raise ServeError(f"Triton at {url} serves versions {sorted(ready)} of {name}, expected "
                                 f"{sorted(wanted)} after {timeout:.0f} s")
            time.sleep(0.1)
    except ServeError:
        raise
    except Exception as exc:
        raise ServeError(f"reloading {name} on Triton at {url} failed: {exc}{admin_hint(exc)}") from exc
    finally:
        client.close()


def check_admin_access(url: str, timeout: float = 30, headers: dict[str, str] | None = None) -> None:
    """Fail before the repository changes if the Triton at ``url`` is unreachable or refuses its admin APIs
    (no or the wrong ``MEDOPS_TRITON_ADMIN_KEY``), so a rollout never leaves the files and the server apart."""
    import tritonclient.http as httpclient

    from serve.triton_server import admin_headers, admin_hint

    headers = admin_headers() if headers is None else headers
    client = httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
    try:
        client.get_model_repository_index(headers=headers)
    except Exception as exc:
        raise ServeError(f"Triton at {url} cannot reload models: {exc}{admin_hint(exc)}") from exc
    finally:
        client.close()


# -- promotion gate ------------------------------------------------------------------------------------------
def parity_check(repository: str | Path, name: str, version: int) -> tuple[bool, str]:
    """Did this version pass the export parity gate? (read from its ``metadata.json``)"""
    try:
        reports = read_metadata(model_dir(repository, name) / str(version)).parity
    except ModelVersionError as exc:
        return False, f"version {version}: {exc}"
    if not reports:
        return False, f"version {version}: no parity record"
    failed = [r.get("engine") for r in reports if not r.get("passed")]
    if failed:
        return False, f"version {version}: parity failed for {', '.join(map(str, failed))}"
    worst = max(float(r["max_abs_diff"]) for r in reports)
    return True, f"version {version}: parity passed ({len(reports)} engine(s), max |prob diff| {worst:.1e})"


def evaluate_version(repository: str | Path, name: str, version: int, data: str | Path, split: str = "test"
                     ) -> dict[str, Any]:
    """AUROC and accuracy of one version on a fixed labelled evaluation set (in-process onnxruntime)."""
    from serve.drift import read_images
    from serve.inputs import iter_inputs

    backend = LocalBackend(repository, name, version)
    try:
        items, _ = iter_inputs(data, split=split, class_names=backend.info.class_names)
        items = [item for item in items if item.label is not None]
        if not items:
            raise ServeError(f"evaluation set {data} has no labelled images")
        batch, _, failed = read_images(items, backend.info.size, backend.info.channels, backend.info.window)
        if failed:
            raise ServeError(f"evaluation set {data}: {len(failed)} unreadable image(s), e.g. {failed[0][0]}")
        probs = backend.infer(batch)
    finally:
        backend.close()
    labels = np.array([item.label for item in items])
    return {"version": version, "n": int(len(labels)), "auroc": auroc_or_none(labels, probs),
            "acc": float((probs.argmax(axis=1) == labels).mean())}


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    candidate: dict[str, Any] | None = None
    production: dict[str, Any] | None = None
    metric: str = "auroc"
    tolerance: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def promotion_gate(repository: str | Path, name: str, candidate: int, production: int | None, *,
                   data: str | Path | None, split: str = "test", metric: str = "auroc", tolerance: float = 0.01
                   ) -> GateDecision:
    """A candidate may become production only if it passed the export parity gate and, when there is a
    production version, scores at least production's ``metric`` minus ``tolerance`` on the evaluation set."""
    ok, why = parity_check(repository, name, candidate)
    decision = GateDecision(ok, [why], metric=metric, tolerance=tolerance)
    if production is None:
        decision.reasons.append("no production version yet: the parity gate decides")
        if data is not None:
            decision.candidate = evaluate_version(repository, name, candidate, data, split)
        return decision
    if data is None:
        decision.passed = False
        decision.reasons.append(f"replacing production v{production} needs an evaluation set (--eval-data)")
        return decision
    cand = evaluate_version(repository, name, candidate, data, split)
    prod = evaluate_version(repository, name, production, data, split)
    decision.candidate, decision.production = cand, prod
    if cand[metric] is None or prod[metric] is None:
        decision.passed = False
        decision.reasons.append(f"{metric} is undefined on {data} (one class only?)")
        return decision
    delta = cand[metric] - prod[metric]
    better = delta >= -tolerance
    decision.passed = decision.passed and better
    decision.reasons.append(
        f"{metric} v{candidate} {cand[metric]:.4f} vs production v{production} {prod[metric]:.4f} "
        f"(delta {delta:+.4f}, tolerance {tolerance}): {'ok' if better else 'worse'}"
    )
    return decision


# -- actions ---------------------------------------------------------------------------------------------------
def _check_version(repository: str | Path, name: str, version: int) -> None:
    known = versions_of(repository, name)
    if version not in known:
        raise ServeError(f"{name} has no version {version} (versions: {known})")


def promote(repository: str | Path, name: str, version: int, *, data: str | Path | None = None,
            split: str = "test", metric: str = "auroc", tolerance: float = 0.01, force: bool = False,
            url: str | None = None, timeout: float = 120) -> dict[str, Any]:
    """Make ``version`` production if it passes the gate (or ``force``); record the decision either way."""
    _check_version(repository, name, version)
    if url:
        check_admin_access(url, timeout)
    state = read_state(repository, name)
    if state.production == version:
        raise ServeError(f"{name} v{version} is already production")
    gate = promotion_gate(repository, name, version, state.production, data=data, split=split, metric=metric,
                          tolerance=tolerance)
    promoted = gate.passed or force
    entry = append_history(repository, name, {
        "action": "promote", "from": state.production, "to": version, "decision": "promoted" if promoted else
        "refused", "forced": bool(force and not gate.passed), "gate": gate.as_dict(),
        "evaluation_set": None if data is None else str(data), "split": split})
    if promoted:
        if state.production is not None:
            state.previous.append(state.production)
        state.production = version
        if state.candidate == version:
            state.candidate, state.mode, state.canary_share = None, None, 0.0
        write_state(repository, name, state)
        if url:
            reload_on_triton(url, name, state, timeout)
    return entry


def rollback(repository: str | Path, name: str, *, url: str | None = None, timeout: float = 120) -> dict[str, Any]:
    """Return to the previous production version (ends any trial)."""
    state = read_state(repository, name)
    if not state.previous:
        raise ServeError(f"{name}: nothing to roll back to (no earlier production version in {ROLLOUT_FILE})")
    if url:
        check_admin_access(url, timeout)
    current, target = state.production, state.previous.pop()
    state.production, state.candidate, state.mode, state.canary_share = target, None, None, 0.0
    write_state(repository, name, state)
    entry = append_history(repository, name, {"action": "rollback", "from": current, "to": target})
    if url:
        reload_on_triton(url, name, state, timeout)
    return entry


def start_trial(repository: str | Path, name: str, version: int, mode: str, *, share: float = 0.1,
                url: str | None = None, timeout: float = 120) -> dict[str, Any]:
    """Serve ``version`` beside production as a canary (``share`` of requests) or in shadow (every request)."""
    if mode not in MODES:
        raise ServeError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "canary" and not 0 < share <= 1:
        raise ServeError(f"canary share must be in (0, 1], got {share}")
    _check_version(repository, name, version)
    state = read_state(repository, name)
    if state.production is None:
        raise ServeError(f"{name} has no production version yet: promote one first")
    if version == state.production:
        raise ServeError(f"v{version} is production; a trial needs another version")
    ok, why = parity_check(repository, name, version)
    if not ok:
        raise ServeError(f"refusing a {mode} of v{version}: {why}")
    if url:
        check_admin_access(url, timeout)
    state.candidate, state.mode, state.canary_share = version, mode, share if mode == "canary" else 0.0
    write_state(repository, name, state)
    entry = append_history(repository, name, {"action": f"start {mode}", "production": state.production,
                                               "candidate": version, "share": state.canary_share})
    if url:
        reload_on_triton(url, name, state, timeout)
    return entry


def end_trial(repository: str | Path, name: str, *, url: str | None = None, timeout: float = 120) -> dict[str, Any]:
    state = read_state(repository, name)
    if state.candidate is None:
        raise ServeError(f"{name} has no running trial")
    if url:
        check_admin_access(url, timeout)
    ended = (state.mode, state.candidate)
    state.candidate, state.mode, state.canary_share = None, None, 0.0
    write_state(repository, name, state)
    entry = append_history(repository, name, {"action": f"end {ended[0]}", "candidate": ended[1],
                                               "production": state.production})
    if url:
        reload_on_triton(url, name, state, timeout)
    return entry


# -- routing client ------------------------------------------------------------------------------------------
def trial_of(info: ModelInfo) -> tuple[str, int, int, float] | None:
    """(mode, production, candidate, share) announced by the served config, or None without a trial."""
    params = info.extra.get("parameters") or {}
    mode = params.get("rollout_mode") or ""
    if mode not in MODES or not params.get("rollout_candidate"):
        return None
    return (mode, int(params["rollout_production"]), int(params["rollout_candidate"]),
            float(params.get("rollout_canary_share") or 0))


@dataclass
class _VersionStats:
    requests: int = 0
    images: int = 0
    latencies: list[float] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)


class RolloutBackend:
    """Routes requests between production and candidate versions (canary or shadow); same interface as a backend.

    ``open_version(v)`` makes a backend for one version; one is made per thread and version (tritonclient's HTTP
    client is not thread-safe). Canary routing is seeded, so a run is reproducible.
    """

    def __init__(self, open_version: Callable[[int], Backend], mode: str, production: int, candidate: int,
                 share: float = 0.0, seed: int = 0, shadow_log: str | Path | None = None) -> None:
        if mode not in MODES:
            raise ServeError(f"mode must be one of {MODES}, got {mode!r}")
        self.open_version, self.mode = open_version, mode
        self.production, self.candidate, self.share = production, candidate, share
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.local = threading.local()
        self.opened: list[Backend] = []
        self.stats = {production: _VersionStats(), candidate: _VersionStats()}
        self.compared = self.agreed = self.sequence = 0
        self.shadow_log = Path(shadow_log) if shadow_log else None
        if self.shadow_log:
            self.shadow_log.parent.mkdir(parents=True, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shadow") if mode == "shadow" else None
        self.info = self._backend(production).info

    def _backend(self, version: int) -> Backend:
        backends = getattr(self.local, "backends", None)
        if backends is None:
            backends = self.local.backends = {}
        if version not in backends:
            backends[version] = self.open_version(version)
            with self.lock:
                self.opened.append(backends[version])
        return backends[version]

    def _timed(self, version: int, batch: np.ndarray) -> dict[str, np.ndarray]:
        started = time.perf_counter()
        outputs = infer_outputs(self._backend(version), batch)
        elapsed = time.perf_counter() - started
        with self.lock:
            s = self.stats[version]
            s.requests += 1
            s.images += len(batch)
            s.latencies.append(elapsed)
            s.classes.extend(int(c) for c in outputs[mv.OUTPUT_NAME].argmax(axis=1))
        return outputs

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.infer_outputs(batch)[mv.OUTPUT_NAME]

    def infer_outputs(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The answering version's outputs (production, or the candidate for a canary's share); in shadow mode the
        candidate's answer is only compared and logged."""
        with self.lock:
            self.sequence += 1
            seq = self.sequence
            to_candidate = self.mode == "canary" and self.rng.random() < self.share
        if self.mode == "canary":
            return self._timed(self.candidate if to_candidate else self.production, batch)
        assert self.pool is not None
        shadow = self.pool.submit(self._timed, self.candidate, batch)
        outputs = self._timed(self.production, batch)
        try:
            cand = shadow.result()[mv.OUTPUT_NAME]
        except Exception as exc:  # the candidate's failure never reaches the caller
            self._log({"request": seq, "error": f"candidate v{self.candidate}: {exc}"})
            return outputs
        probs = outputs[mv.OUTPUT_NAME]
        agree = probs.argmax(axis=1) == cand.argmax(axis=1)
        with self.lock:
            self.compared += len(agree)
            self.agreed += int(agree.sum())
        for row in np.flatnonzero(~agree):
            self._log({"request": seq, "row": int(row), "production": int(probs[row].argmax()),
                       "candidate": int(cand[row].argmax()), "production_probs": probs[row].round(6).tolist(),
                       "candidate_probs": cand[row].round(6).tolist()})
        return outputs

    def _log(self, record: dict[str, Any]) -> None:
        if self.shadow_log is None:
            return
        with self.lock, self.shadow_log.open("a") as fh:
            fh.write(json.dumps({"time": mv.now(), **record}) + "\n")

    def report(self) -> dict[str, Any]:
        """Per-version requests, images, latency percentiles (ms) and class shares; shadow agreement."""
        names = self.info.class_names
        versions = {}
        for version, s in self.stats.items():
            lat = np.asarray(s.latencies) * 1000
            counts = np.bincount(np.asarray(s.classes, dtype=np.int64), minlength=len(names))
            versions[str(version)] = {
                "role": "production" if version == self.production else "candidate", "requests": s.requests,
                "images": s.images,
                "latency_ms": {q: (float(np.percentile(lat, p)) if len(lat) else None)
                               for q, p in (("p50", 50), ("p95", 95), ("p99", 99))},
                "class_shares": {n: (float(c / counts.sum()) if counts.sum() else None)
                                 for n, c in zip(names, counts, strict=True)},
            }
        out: dict[str, Any] = {"mode": self.mode, "production": self.production, "candidate": self.candidate,
                               "versions": versions}
        if self.mode == "canary":
            out["share"] = self.share
        else:
            out["shadow"] = {"compared": self.compared, "agreement": (self.agreed / self.compared
                                                                     if self.compared else None),
                             "disagreements": self.compared - self.agreed,
                             "log": str(self.shadow_log) if self.shadow_log else None}
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        for backend in self.opened:
            try:
                backend.close()
            except Exception:  # best effort
                pass
