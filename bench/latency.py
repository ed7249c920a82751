"""Latency under load: an open-loop sweep of offered load against Triton's dynamic batcher settings.

One-image requests arrive at fixed rates (Poisson arrivals, or constant spacing) from an asyncio gRPC client
(``tritonclient.grpc.aio``) that never waits for an answer before sending the next request, so the client does not
throttle the offered load; a request's latency runs from its scheduled arrival to its answer (a late sender counts
against the server, not in its favour). The server is pinned to its own core and the client to the others
(``bench/served.py``), as in deployments.

First the maximum throughput is measured (``burst`` requests kept in flight for a few seconds, with the batcher
settings export writes today); then every candidate batcher setting (``max_queue_delay`` and preferred batch
sizes, loaded with Triton's model-control API and a config override, nothing written to the repository) is run at
the same offered loads, ``fractions`` of that maximum. Per load: p50/p95/p99 latency and the achieved throughput.

The choice is the candidate with the lowest p99 at 80 % of the maximum throughput; the issue's goal is that p99 to
be at most 4x the p50 at the lowest load (of the best candidate there: a long queue delay must not pass the goal by
slowing the quiet hours). A queueing model fitted to Triton's batch statistics (of the maximum-throughput bursts
and the chosen candidate's sweep; ``bench/queueing.py``) then estimates whether any batcher setting could meet the
goal on this core, and how many serving cores would. ``--write-config FILE`` records the choice as the JSON that
export reads (``triton.batcher_file`` in ``conf/export.yaml``) and writes into every new version's ``config.pbtxt``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, queueing, served
from medops.model_version import INPUT_NAME, OUTPUT_NAME

GOAL_LOAD = 0.8
GOAL_RATIO = 4.0
REQUEST_TIMEOUT_S = 60.0  # a request unanswered this long counts as an error
WARM_UP_REQUESTS = 8  # sent one at a time on each load point's fresh connection before its timed schedule


@dataclass
class LatencyConfig:
    threads: int = 1
    export: str | None = None  # a version folder; default: the newest version of repository/model
    repository: str = "model_repository"
    model: str = "breastmnist"
    fractions: list[float] = field(default_factory=lambda: [0.05, 0.25, 0.5, 0.65, 0.8, 0.9, 1.0])
    candidates: list[dict[str, Any]] = field(default_factory=lambda: [
        {"max_queue_delay_us": 0, "preferred_batch_sizes": []},
        {"max_queue_delay_us": 500, "preferred_batch_sizes": []},
        {"max_queue_delay_us": 2000, "preferred_batch_sizes": []},
        {"max_queue_delay_us": 5000, "preferred_batch_sizes": []},
        {"max_queue_delay_us": 2000, "preferred_batch_sizes": [8, 16, 32]},
    ])
    seconds: float = 4.0  # per offered load
    burst: int = 64  # requests in flight while measuring the maximum throughput
    burst_seconds: float = 2.0  # per burst; the maximum is the median of ``bursts`` of them
    bursts: int = 3
    arrival: str = "poisson"  # or "constant"
    server_cpu_count: int = 1
    repeats: int = 2  # sweeps per candidate (figures: the median over them)
    python_shm_bytes: int = 64 * 2**20
    write_config: str | None = None

    @classmethod
    def quick(cls, threads: int) -> LatencyConfig:
        return cls(threads=threads, fractions=[0.1, 0.8], seconds=0.6, burst=8, burst_seconds=0.6, bursts=1, repeats=1,
                   candidates=[{"max_queue_delay_us": 0, "preferred_batch_sizes": []},
                               {"max_queue_delay_us": 2000, "preferred_batch_sizes": [4]}])


def find_export(cfg: LatencyConfig) -> Path | None:
    """The version folder to measure: ``cfg.export``, else the newest FP32 version of ``repository/model`` (None
    when there is none: the bench's ResNet-18 at 28 px is measured instead, and the result says so)."""
    if cfg.export:
        folder = Path(cfg.export)
        if not (folder / "metadata.json").is_file():
            raise FileNotFoundError(f"{folder}: not an exported version (no metadata.json)")
        return folder
    return served.newest_version(cfg.repository, cfg.model, "fp32")


def model_to_measure(cfg: LatencyConfig, folder: Path | None, repo: Path, threads: int) -> served.ServedModel:
    """The export copied into ``repo``, or without one the bench's ResNet-18, 1 channel, 28 px, random weights."""
    if folder is not None:
        return served.export_model_copy(folder, repo)
    from bench.engines import EnginesConfig, build_models

    (model,) = build_models(EnginesConfig(channels=[1], sizes=[28], threads=threads), repo.parent).values()
    return served.ServedModel(model.name, f"resnet18 1 ch 28 px, random weights (no export of {cfg.model!r} in "
                              f"{cfg.repository}: `python -m export run=latest name={cfg.model}`, or --export)",
                              1, 28, model.onnx_path)


# -- load generation -----------------------------------------------------------------------------------------------
def arrivals(rate: float, seconds: float, kind: str, seed: int = 0) -> np.ndarray:
    """Arrival offsets in seconds of an open-loop load of ``rate`` requests/s for ``seconds``."""
    n = max(2, int(round(rate * seconds)))
    if kind == "constant":
        return np.arange(n) / rate
    if kind != "poisson":
        raise ValueError(f"arrival must be 'poisson' or 'constant', got {kind!r}")
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))


async def _open_loop(url: str, model: str, image: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    latencies: list[float] = []
    lags: list[float] = []
    errors: list[str] = []

    async def send(scheduled: float) -> None:
        inp = grpcclient.InferInput(INPUT_NAME, list(image.shape), "FP32")
        inp.set_data_from_numpy(image)
        try:
            await client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                               client_timeout=REQUEST_TIMEOUT_S)
            latencies.append(time.perf_counter() - scheduled)
        except Exception as exc:  # counted and reported, the sweep goes on
            errors.append(str(exc)[:200])

    try:
        for _ in range(WARM_UP_REQUESTS):  # connect first: channel set-up is not the server's latency
            await send(time.perf_counter())
        latencies.clear()
        tasks = []
        start = time.perf_counter()
        for offset in offsets:
            scheduled = start + float(offset)
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(time.perf_counter() - scheduled)
            tasks.append(asyncio.create_task(send(scheduled)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    finally:
        await client.close()
    return {"latencies": latencies, "lags": lags, "errors": errors, "wall": wall}


async def _closed_burst(url: str, model: str, image: np.ndarray, in_flight: int, seconds: float) -> float:
    """Images/s with ``in_flight`` requests always outstanding for ``seconds`` (the maximum throughput)."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    done = [0]
    end = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            inp = grpcclient.InferInput(INPUT_NAME, list(image.shape), "FP32")
            inp.set_data_from_numpy(image)
            await client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(OUTPUT_NAME)],
                               client_timeout=REQUEST_TIMEOUT_S)
            done[0] += 1

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        return done[0] / (time.perf_counter() - start)
    finally:
        await client.close()


def load_point(url: str, model: str, image: np.ndarray, rate: float, cfg: LatencyConfig, seed: int) -> dict[str, Any]:
    """One offered load: latency percentiles (ms), achieved throughput, send lag and errors."""
    raw = asyncio.run(_open_loop(url, model, image, arrivals(rate, cfg.seconds, cfg.arrival, seed)))
    lat = raw["latencies"]
    point = {"offered_per_s": rate, "requests": len(raw["lags"]), "answered": len(lat), "errors": len(raw["errors"]),
             "achieved_per_s": len(lat) / raw["wall"] if raw["wall"] > 0 else 0.0,
             "send_lag_p99_ms": float(np.percentile(raw["lags"], 99) * 1e3)}
    point |= common.latency_percentiles(lat) if lat else {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    if raw["errors"]:
        point["first_error"] = raw["errors"][0]
    return point


# -- the case ------------------------------------------------------------------------------------------------------
def write_candidate_config(model_dir: Path, candidate: dict[str, Any] | None, threads: int) -> None:
    """Rewrite the model's root ``config.pbtxt`` (a copy in the benchmark's own repository) with ``candidate``'s
    batcher settings (None: keep the export's) and ``threads`` onnxruntime threads."""
    from medops.triton_config import parse_model_config, render_model_config

    path = model_dir / "config.pbtxt"
    config = parse_model_config(path.read_text())
    if candidate is not None:
        batching = config.dynamic_batching
        batching.max_queue_delay_microseconds = int(candidate["max_queue_delay_us"])
        del batching.preferred_batch_size[:]
        batching.preferred_batch_size.extend(int(s) for s in candidate["preferred_batch_sizes"])
    config.parameters["ort_intra_op_threads"].string_value = str(threads)
    path.unlink()  # the copy may be a hard link into the source repository
    path.write_text(render_model_config(config))


@contextlib.contextmanager
def serving(repo: Path, model: str, candidate: dict[str, Any] | None, threads: int, server_cpus: list[int] | None,
            cfg: LatencyConfig) -> Iterator[Any]:
    """A pinned Triton serving ``model`` with ``candidate``'s batcher settings, stopped afterwards.

    A fresh server per candidate rather than a reload with a config override: reloading the Python-backend model,
    which registers custom metrics (the online drift gauges), hung this Triton build (2.x in nvidia-pytriton 0.7)."""
    write_candidate_config(repo / model, candidate, threads)
    server = served.start_server(repo, [model], server_cpus, cfg.python_shm_bytes)
    try:
        yield server
    finally:
        server.stop()


def sweep(repo: Path, model: str, image: np.ndarray, cfg: LatencyConfig, threads: int,
          server_cpus: list[int] | None, log: Callable[[str], None]) -> tuple[float, list[dict[str, Any]], dict]:
    """The maximum throughput (the export's own batcher settings), then each candidate's latency at every load."""
    with serving(repo, model, None, threads, server_cpus, cfg) as server:
        placement = {"server_cpus": served.thread_cpus(served.process_tree(server.process.pid)),
                     "client_cpus": served.thread_cpus([os.getpid()]), "ort_threads": threads,
                     "max_batch_size": _max_batch_size(repo / model)}
        log(f"Triton on CPUs {placement['server_cpus']}, load generator on {placement['client_cpus']}")
        asyncio.run(_closed_burst(server.grpc_url, model, image, cfg.burst, 0.5))  # warm up
        before = served.batch_stats(server.http_url, model)
        rates = [asyncio.run(_closed_burst(server.grpc_url, model, image, cfg.burst, cfg.burst_seconds))
                 for _ in range(max(1, cfg.bursts))]
        burst_times = queueing.batch_service_times(before, served.batch_stats(server.http_url, model))
        max_rate = common.median(rates)
    log(f"maximum throughput: {max_rate:.0f} requests/s ({cfg.burst} in flight; median of "
        f"{', '.join(f'{r:.0f}' for r in rates)})")
    results = []
    for i, candidate in enumerate(cfg.candidates):
        with serving(repo, model, candidate, threads, server_cpus, cfg) as server:
            before = served.batch_stats(server.http_url, model)
            runs = [[load_point(server.grpc_url, model, image, f * max_rate, cfg, seed=100 * rep + k)
                     for k, f in enumerate(cfg.fractions)] for rep in range(cfg.repeats)]
            times = queueing.batch_service_times(before, served.batch_stats(server.http_url, model))
        points = [_median_point(f, [run[k] for run in runs]) for k, f in enumerate(cfg.fractions)]
        results.append({"candidate": candidate, "points": points, **_judge(points),
                        "service_times": queueing.merge(burst_times, times)})
        log(f"candidate {i + 1}/{len(cfg.candidates)} {candidate}: " + ", ".join(
            f"{p['fraction']:.0%} p50 {p['p50_ms'] or float('nan'):.1f} p99 {p['p99_ms'] or float('nan'):.1f} ms"
            for p in points))
    return max_rate, results, placement


def _max_batch_size(model_dir: Path) -> int:
    from medops.triton_config import parse_model_config

    return int(parse_model_config((model_dir / "config.pbtxt").read_text()).max_batch_size)


def _median_point(fraction: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"fraction": fraction, "runs": len(runs)}
    for key in runs[0]:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
        out[key] = common.median(values) if values else runs[0][key]
    return out


def _judge(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The goal's figures: p50 at the lowest load, p99 at the load nearest 80 % of the maximum, their ratio."""
    low = min(points, key=lambda p: p["fraction"])
    at = min(points, key=lambda p: abs(p["fraction"] - GOAL_LOAD))
    ratio = common.ratio(at["p99_ms"], low["p50_ms"]) if at["p99_ms"] and low["p50_ms"] else None
    return {"low_load_p50_ms": low["p50_ms"], "goal_load": at["fraction"], "p99_at_goal_load_ms": at["p99_ms"],
            "p99_over_low_p50": ratio, "errors": sum(p["errors"] for p in points),
            "highest_load_within_goal": highest_load_within(points, low["p50_ms"])}


def highest_load_within(points: list[dict[str, Any]], low_p50: float | None, ratio: float = GOAL_RATIO
                        ) -> float | None:
    """The sizing figure: the highest offered load (fraction of the maximum) up to which every measured load keeps
    p99 within ``ratio`` x the low-load p50 (None when even the lowest does not)."""
    best = None
    for point in sorted(points, key=lambda p: p["fraction"]):
        if not (low_p50 and point["p99_ms"] is not None and point["p99_ms"] <= ratio * low_p50):
            break
        best = point["fraction"]
    return best


def choose(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The candidate with the lowest p99 at the goal load (no errors); ties go to the shorter queue delay."""
    usable = [r for r in results if r["p99_at_goal_load_ms"] is not None and not r["errors"]] or results
    best = min(usable, key=lambda r: (r["p99_at_goal_load_ms"] or float("inf"),
                                      r["candidate"]["max_queue_delay_us"]))
    return best


def run(cfg: LatencyConfig, out_dir: Path, info: dict[str, Any], log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    folder = find_export(cfg)
    work = Path(tempfile.mkdtemp(prefix="medops-bench-latency-"))
    split = served.split_cpus(cfg.server_cpu_count)
    server_cpus, client_cpus = split if split else (None, None)
    threads = len(server_cpus) if server_cpus else cfg.threads
    own, all_cpus = [os.getpid()], sorted(os.sched_getaffinity(0))
    try:
        model = model_to_measure(cfg, folder, work / "model_repository", threads)
        image = np.random.default_rng(0).random((1, model.channels, model.size, model.size), dtype=np.float32)
        if client_cpus:
            served.pin_threads(own, client_cpus)
        log(f"measuring {model.label}")
        max_rate, results, placement = sweep(work / "model_repository", model.name, image, cfg, threads, server_cpus,
                                             log)
    finally:
        served.pin_threads(own, all_cpus)
        shutil.rmtree(work, ignore_errors=True)
    best = choose(results)
    model_of_queue = queueing.analyse(best.pop("service_times"), best["points"], max_rate,
                                      max_batch=placement["max_batch_size"],
                                      delay_us=best["candidate"]["max_queue_delay_us"], goal=GOAL_RATIO,
                                      delays_us=[c["max_queue_delay_us"] for c in cfg.candidates], load=GOAL_LOAD,
                                      preferred_batch_sizes=best["candidate"]["preferred_batch_sizes"])
    for cand in results:
        cand.pop("service_times", None)
    if model_of_queue:
        log(queueing_summary(model_of_queue))
    # the goal's denominator: the p50 the service gives when quiet, with its best setting (of those without
    # errors); the chosen setting's own low-load p50 would let a long queue delay pass the goal by making the quiet
    # hours slower
    idle = min((c["low_load_p50_ms"] for c in results if c["low_load_p50_ms"] and not c["errors"]), default=None)
    goal_ratio = common.ratio(best["p99_at_goal_load_ms"], idle) if best["p99_at_goal_load_ms"] and idle else None
    result = {**common.header("latency", info, asdict(cfg)), "model": model.label,
              "export": str(folder) if folder else None, "placement": placement, "max_throughput_per_s": max_rate,
              "candidates": results, "queueing_model": model_of_queue,
              "choice": {**best["candidate"], "p99_at_goal_load_ms": best["p99_at_goal_load_ms"],
                         "low_load_p50_ms": best["low_load_p50_ms"], "p99_over_idle_p50": goal_ratio,
                         "highest_load_within_goal": highest_load_within(best["points"], idle)},
              "idle_p50_ms": idle,
              "targets": [common.target(f"p99 at {best['goal_load']:.0%} of max throughput (chosen batcher) / p50 at "
                                        f"low load (best batcher), {model.label}", goal_ratio, GOAL_RATIO,
                                        higher_is_better=False, unit="x")]}
    result["targets"][0]["met"] = None if goal_ratio is None else goal_ratio <= GOAL_RATIO
    result["targets"][0]["comparison"] = "<="
    if cfg.write_config:
        result["wrote_config"] = str(write_choice(Path(cfg.write_config), result))
        log(f"wrote the dynamic batcher choice to {result['wrote_config']}")
    return result


def queueing_summary(q: dict[str, Any]) -> str:
    """What the queueing model estimates, in the words of the goal."""
    s, chosen, fewest = q["service"], q["chosen_setting"], q["fewest_instances_meeting_goal"]
    one = next((b for b in q["best_per_instances"] if b["instances"] == 1), None)
    text = (f"queueing model from Triton's batch statistics: {s['fixed_ms']:.2f} ms + {s['per_image_ms']:.2f} ms per "
            f"image per execution, {s['overhead_ms']:.2f} ms per request outside Triton's compute. Its estimate of "
            f"p99 at {GOAL_LOAD:.0%} / idle p50 on one core (goal {GOAL_RATIO:g}x): ")
    text += ("overloaded" if chosen["ratio"] is None else f"{chosen['ratio']:.1f}x") + " with the chosen setting"
    if q["preferred_batch_sizes_ignored"]:
        text += f" (its preferred sizes {q['preferred_batch_sizes_ignored']} not modelled)"
    if one is None:
        text += "; every setting of the grid is overloaded."
    else:
        text += (f"; {one['ratio']:.1f}x with the best setting of the grid (max batch {one['max_batch']}, delay "
                 f"{one['delay_us']:g} us)")
        text += (", so a batcher setting could meet it here." if one["ratio"] <= GOAL_RATIO
                 else ", so no batcher setting of the grid meets it on one core.")
        text += (f" Within the goal's p99 budget ({GOAL_RATIO:g} x {q['low_load_p50_ms']:.1f} ms) one core serves "
                 f"{one['rate_within_goal_per_s']:.0f} requests/s.")
    if fewest:
        text += (f" Fewest serving cores (one instance each) that meet it in the model: {fewest['instances']} "
                 f"({fewest['ratio']:.1f}x with max batch {fewest['max_batch']}, delay {fewest['delay_us']:g} us).")
    else:
        text += f" Up to {queueing.SIZING_INSTANCES[-1]} serving cores, no setting of the grid meets it in the model."
    return text


def write_choice(path: Path, result: dict[str, Any]) -> Path:
    """The batcher settings export writes into config.pbtxt (``triton.batcher_file``), with where they came from."""
    choice = result["choice"]
    document = {"max_queue_delay_us": int(choice["max_queue_delay_us"]),
                "preferred_batch_sizes": [int(s) for s in choice["preferred_batch_sizes"]],
                "chosen_by": result["command"], "created": result["created"], "model": result["model"],
                "machine": result["machine_line"], "max_throughput_per_s": round(result["max_throughput_per_s"], 1),
                "p99_at_goal_load_ms": choice["p99_at_goal_load_ms"], "low_load_p50_ms": choice["low_load_p50_ms"],
                "rule": "lowest p99 at 80 % of the maximum throughput (python -m bench latency)"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
