"""A queueing model of the served model, fitted to what Triton measured, for sizing.

The latency sweep says what one pinned serving core does; it cannot say whether any batcher setting could meet the
goal there, nor how many cores a load needs. This model answers both from the sweep's own figures:

- **service time per execution** ``S(b) = fixed + per_image * b``, a least-squares line through Triton's batch
  statistics (``batch_stats``: executions and compute time per batch size, input + infer + output) over the whole
  sweep, so it holds the machine's own cost at the batch sizes the load produced;
- **the rest of a request's latency** (client, gRPC, the network stack), constant: the measured low-load p50 minus
  the model's;
- **the dynamic batcher** as Triton runs it: a free instance takes the waiting requests, up to ``max_batch``, once
  the oldest has waited ``max_queue_delay`` or ``max_batch`` are waiting; ``instances`` model instances (one core
  each) serve one queue; Poisson arrivals. Preferred batch sizes are not modelled.

Written here rather than with a queueing library because the batch-service queue with a delay window has no closed
form (M/G/k tables do not batch), and a discrete-event run of a few ten thousand requests takes well under a second.
It is an estimate, not a bound: an ideal server (no VM stalls, no client jitter) with costs measured under load. The
bench prints its p99 beside the measured one at every load, so a reader sees how far to trust it.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SIZING_INSTANCES = (1, 2, 4, 8)
SIZING_MAX_BATCH = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ServiceModel:
    """Milliseconds: ``fixed + per_image * b`` per execution of a batch of ``b``; ``overhead`` per request."""

    fixed_ms: float
    per_image_ms: float
    overhead_ms: float = 0.0

    def execution_ms(self, batch: int) -> float:
        return self.fixed_ms + self.per_image_ms * batch

    def capacity_per_s(self, max_batch: int, instances: int = 1) -> float:
        """Requests/s when every execution is a full batch: the most this setting can serve."""
        return instances * 1e3 * max_batch / self.execution_ms(max_batch)


def batch_service_times(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
                        ) -> dict[int, tuple[float, float]]:
    """Per batch size: (executions, mean milliseconds per execution) between two ``served.batch_stats`` snapshots."""
    out = {}
    for size, (count, ns) in after.items():
        c0, ns0 = before.get(size, (0.0, 0.0))
        if count > c0:
            out[size] = (count - c0, (ns - ns0) / (count - c0) / 1e6)
    return out


def merge(*tables: dict[int, tuple[float, float]]) -> dict[int, tuple[float, float]]:
    """Several ``batch_service_times`` tables as one (counts added, means weighted by count)."""
    out: dict[int, tuple[float, float]] = {}
    for table in tables:
        for size, (count, ms) in table.items():
            c0, ms0 = out.get(size, (0.0, 0.0))
            out[size] = (c0 + count, (c0 * ms0 + count * ms) / (c0 + count))
    return out


def fit_service(times: dict[int, tuple[float, float]]) -> ServiceModel | None:
    """The line through the measured execution times (None with fewer than two sizes).

    Each batch size's squared residual is weighted by the square root of its executions (``np.polyfit`` squares
    ``w``), so the many one-image executions of low loads do not drown the few large batches that fix the slope.
    The intercept is kept at >= 0 (a negative fixed cost is noise): then the least-squares line through the
    origin."""
    sizes = sorted(times)
    if len(sizes) < 2:
        return None
    b = np.array(sizes, dtype=float)
    t = np.array([times[s][1] for s in sizes])
    w = np.array([times[s][0] for s in sizes]) ** 0.25
    slope, intercept = np.polyfit(b, t, 1, w=w)
    if intercept < 0:  # refit through the origin
        slope, intercept = float(np.sum(w**2 * b * t) / np.sum(w**2 * b * b)), 0.0
    if slope <= 0:
        return None
    return ServiceModel(fixed_ms=float(intercept), per_image_ms=float(slope))


def simulate(service: ServiceModel, rate_per_s: float, *, max_batch: int, delay_us: float, instances: int = 1,
             requests: int = 20000, seed: int = 0, arrive: np.ndarray | None = None) -> np.ndarray:
    """Latencies (ms) of ``requests`` Poisson arrivals at ``rate_per_s`` (or of the sorted arrival times ``arrive``,
    ms) through the dynamic batcher model."""
    if arrive is None:
        arrive = np.cumsum(np.random.default_rng(seed).exponential(1e3 / rate_per_s, requests))  # ms
    requests = len(arrive)
    delay = delay_us / 1e3
    free = [0.0] * instances
    latency = np.empty(requests)
    i = 0
    while i < requests:
        instance_free = heapq.heappop(free)
        full_at = arrive[i + max_batch - 1] if i + max_batch - 1 < requests else np.inf
        start = max(instance_free, min(arrive[i] + delay, full_at))
        end_index = min(requests, i + max_batch, int(np.searchsorted(arrive, start, side="right")))
        end_index = max(end_index, i + 1)
        done = start + service.execution_ms(end_index - i)
        latency[i:end_index] = done - arrive[i:end_index]
        heapq.heappush(free, done)
        i = end_index
    return latency + service.overhead_ms


def with_overhead(service: ServiceModel, low_rate: float, measured_low_p50_ms: float, *, max_batch: int,
                  delay_us: float) -> ServiceModel:
    """``service`` with the per-request overhead that makes its low-load p50 the measured one (>= 0)."""
    modelled = float(np.percentile(simulate(service, low_rate, max_batch=max_batch, delay_us=delay_us), 50))
    return ServiceModel(service.fixed_ms, service.per_image_ms, max(0.0, measured_low_p50_ms - modelled))


def low_load_p50(service: ServiceModel, rate: float, *, max_batch: int, delay_us: float) -> float:
    return float(np.percentile(simulate(service, rate, max_batch=max_batch, delay_us=delay_us), 50))


def p99_at(service: ServiceModel, rate: float, *, max_batch: int, delay_us: float, instances: int = 1
           ) -> float | None:
    """The model's p99 at ``rate``; None when the setting cannot serve that rate (the queue grows without bound)."""
    if rate >= service.capacity_per_s(max_batch, instances):
        return None
    return float(np.percentile(simulate(service, rate, max_batch=max_batch, delay_us=delay_us,
                                        instances=instances), 99))


def sizing(service: ServiceModel, max_rate: float, *, delays_us: list[float], goal: float, max_batch_cap: int,
           load: float = 0.8, low: float = 0.05) -> dict[str, Any]:
    """The goal's ratio in the model for every (instances, max batch up to ``max_batch_cap``, queue delay) of the
    grid, one core per instance, each at ``load`` of ``instances`` x the measured one-core maximum; the best setting
    per instance count; and the fewest instances that meet the goal.

    The ratio's denominator is the lowest low-load p50 of any setting: the latency the service gives when idle. A
    setting's own low-load p50 would let a long queue delay pass the goal by making the quiet hours slower."""
    batches = sorted({b for b in SIZING_MAX_BATCH if b <= max_batch_cap} | {max_batch_cap})
    settings = [(b, d) for b in batches for d in sorted(set(delays_us))]
    idle_p50 = min(low_load_p50(service, low * max_rate, max_batch=b, delay_us=d) for b, d in settings)
    grid = []
    for instances in SIZING_INSTANCES:
        for max_batch, delay in settings:
            p99 = p99_at(service, load * instances * max_rate, max_batch=max_batch, delay_us=delay,
                         instances=instances)
            grid.append({"instances": instances, "max_batch": max_batch, "delay_us": delay, "p99_ms": p99,
                         "ratio": None if p99 is None else p99 / idle_p50})
    best = []
    for instances in SIZING_INSTANCES:
        usable = [g for g in grid if g["instances"] == instances and g["ratio"] is not None]
        if usable:
            best.append(min(usable, key=lambda g: g["ratio"]))
    for b in best:  # the sizing figure: what that setting serves within the goal's p99 budget
        b["rate_within_goal_per_s"] = rate_within(service, goal * idle_p50, max_batch=b["max_batch"],
                                                  delay_us=b["delay_us"], instances=b["instances"],
                                                  upper=b["instances"] * max_rate)
    fewest = next((b for b in best if b["ratio"] <= goal), None)
    return {"low_load_p50_ms": idle_p50, "grid": grid, "best_per_instances": best,
            "fewest_instances_meeting_goal": fewest}


def rate_within(service: ServiceModel, p99_budget_ms: float, *, max_batch: int, delay_us: float, instances: int,
                upper: float, steps: int = 12) -> float:
    """The highest Poisson rate (requests/s, up to ``upper``) whose p99 stays within ``p99_budget_ms`` in the model,
    by bisection (p99 grows with the rate); 0 when even a trickle misses the budget."""
    low, high = 0.0, min(upper, service.capacity_per_s(max_batch, instances))
    for _ in range(steps):
        mid = (low + high) / 2
        p99 = p99_at(service, mid, max_batch=max_batch, delay_us=delay_us, instances=instances)
        low, high = (mid, high) if p99 is not None and p99 <= p99_budget_ms else (low, mid)
    return low


def analyse(times: dict[int, tuple[float, float]], points: list[dict[str, Any]], max_rate: float, *,
            max_batch: int, delay_us: float, delays_us: list[float], goal: float, load: float = 0.8,
            preferred_batch_sizes: list[int] | None = None) -> dict[str, Any] | None:
    """The fitted model; its latencies beside the measured ones and its goal ratio, both for the chosen setting
    (``max_batch``, ``delay_us``; preferred batch sizes are not modelled, and the result says so); and the sizing
    grid over ``delays_us`` (the sweep's candidate delays). None without enough data to fit."""
    service = fit_service(times)
    low = min(points, key=lambda p: p["fraction"])
    if service is None or not low.get("p50_ms") or max_rate <= 0:
        return None
    service = with_overhead(service, low["fraction"] * max_rate, low["p50_ms"], max_batch=max_batch,
                            delay_us=delay_us)
    compared = []
    for point in points:
        row = {"fraction": point["fraction"], "p50_ms": point.get("p50_ms"), "p99_ms": point.get("p99_ms"),
               "model_p50_ms": None, "model_p99_ms": None}
        rate = point["fraction"] * max_rate
        if rate < service.capacity_per_s(max_batch):  # else overloaded: the model's queue grows without bound
            lat = simulate(service, rate, max_batch=max_batch, delay_us=delay_us)
            row |= {"model_p50_ms": float(np.percentile(lat, 50)), "model_p99_ms": float(np.percentile(lat, 99))}
        compared.append(row)
    sized = sizing(service, max_rate, delays_us=[*delays_us, delay_us], goal=goal, max_batch_cap=max_batch,
                   load=load, low=low["fraction"])
    chosen_p99 = p99_at(service, load * max_rate, max_batch=max_batch, delay_us=delay_us)
    return {"service": asdict(service), "batches": {str(k): list(v) for k, v in sorted(times.items())},
            "max_batch": max_batch, "delay_us": delay_us, "preferred_batch_sizes_ignored": preferred_batch_sizes or [],
            "compared": compared,
            "chosen_setting": {"p99_ms": chosen_p99,
                               "ratio": None if chosen_p99 is None else chosen_p99 / sized["low_load_p50_ms"]},
            **sized}
