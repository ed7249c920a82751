"""``bench/queueing.py``: the batch-service queue model against queueing theory and its own definitions (the fit to
a real Triton's batch statistics is checked by tests/bench/test_bench.py on the shared quick run)."""

from __future__ import annotations

import numpy as np
import pytest

from bench import queueing
from bench.queueing import ServiceModel


def test_service_times_between_snapshots_and_merged() -> None:
    before = {1: (10.0, 20e6), 4: (2.0, 16e6)}
    after = {1: (30.0, 60e6), 4: (2.0, 16e6), 8: (5.0, 75e6)}
    times = queueing.batch_service_times(before, after)
    assert times == {1: (20.0, pytest.approx(2.0)), 8: (5.0, pytest.approx(15.0))}  # batch 4: no new executions
    merged = queueing.merge(times, {1: (20.0, 4.0), 2: (1.0, 3.0)})
    assert merged[1] == (40.0, pytest.approx(3.0)) and merged[8] == times[8] and merged[2] == (1.0, 3.0)


def test_fit_recovers_the_line_and_keeps_the_fixed_cost_non_negative() -> None:
    line = {b: (100.0 / b, 0.7 + 1.6 * b) for b in (1, 2, 4, 16, 64)}  # exact: any weighting recovers it
    fitted = queueing.fit_service(line)
    assert fitted.fixed_ms == pytest.approx(0.7) and fitted.per_image_ms == pytest.approx(1.6)
    steep = queueing.fit_service({1: (10.0, 1.0), 8: (10.0, 16.0)})  # the line would cross zero below batch 1
    assert steep.fixed_ms == 0.0 and steep.per_image_ms == pytest.approx((1 + 128) / 65)
    assert queueing.fit_service({1: (50.0, 2.0)}) is None  # one batch size fixes no slope


def test_a_quiet_server_answers_in_delay_plus_one_execution_plus_overhead() -> None:
    service = ServiceModel(fixed_ms=1.0, per_image_ms=2.0, overhead_ms=1.5)
    for delay in (0, 2000):
        lat = queueing.simulate(service, 1.0, max_batch=8, delay_us=delay, requests=500)
        assert np.median(lat) == pytest.approx(delay / 1e3 + 3.0 + 1.5)


def test_batches_form_as_tritons_dynamic_batcher_forms_them() -> None:
    """Hand-worked: 0.5 ms + 1 ms per image, max batch 2, queue delay 5 ms, arrivals at 1, 2, 3, 4 and 10 ms.
    [1, 2] go when the batch is full (2 ms) and end at 4.5; [3, 4] wait for the busy instance and end at 7; the
    lone request at 10 waits the full delay (15) and ends at 16.5."""
    service = ServiceModel(fixed_ms=0.5, per_image_ms=1.0)
    lat = queueing.simulate(service, 0.0, max_batch=2, delay_us=5000, arrive=np.array([1.0, 2.0, 3.0, 4.0, 10.0]))
    assert lat.tolist() == pytest.approx([3.5, 2.5, 4.0, 3.0, 6.5])
    # two instances, one image per batch: the third request waits for the first instance to free up
    two = queueing.simulate(ServiceModel(1.0, 0.0), 0.0, max_batch=1, delay_us=0, instances=2,
                            arrive=np.array([0.0, 0.1, 0.2]))
    assert two.tolist() == pytest.approx([1.0, 1.0, 1.8])


@pytest.mark.parametrize("load", [0.5, 0.8])
def test_one_image_batches_are_the_m_d_1_queue(load: float) -> None:
    """max_batch 1, no fixed cost: Poisson arrivals, deterministic service; Pollaczek-Khinchine's mean wait."""
    service_ms = 2.0
    rate = load * 1e3 / service_ms
    lat = queueing.simulate(ServiceModel(0.0, service_ms), rate, max_batch=1, delay_us=0, requests=200_000, seed=3)
    expected = service_ms + load * service_ms / (2 * (1 - load))
    assert lat.mean() == pytest.approx(expected, rel=0.05)


def test_batches_are_capped_and_more_instances_shorten_the_tail() -> None:
    service = ServiceModel(fixed_ms=1.0, per_image_ms=1.6)
    assert service.capacity_per_s(4) == pytest.approx(4e3 / 7.4)
    assert queueing.p99_at(service, 600.0, max_batch=4, delay_us=0) is None  # above the setting's capacity
    one = queueing.p99_at(service, 400.0, max_batch=8, delay_us=0)
    four = queueing.p99_at(service, 4 * 400.0, max_batch=8, delay_us=0, instances=4)
    assert one is not None and four is not None and four < one


def test_sizing_judges_every_setting_against_the_idle_p50() -> None:
    service = ServiceModel(fixed_ms=0.7, per_image_ms=1.7, overhead_ms=2.0)
    result = queueing.sizing(service, 520.0, delays_us=[0, 5000], goal=4.0, max_batch_cap=48)
    idle = result["low_load_p50_ms"]
    assert idle == pytest.approx(0.7 + 1.7 + 2.0)  # the delay-0 setting: no queue delay when quiet
    batches = sorted({g["max_batch"] for g in result["grid"]})
    assert batches == [1, 2, 4, 8, 16, 32, 48]  # the grid stops at the model's own max batch
    assert len(result["grid"]) == len(queueing.SIZING_INSTANCES) * len(batches) * 2
    for g in result["grid"]:
        assert (g["ratio"] is None) == (g["p99_ms"] is None)
        if g["ratio"] is not None:
            assert g["ratio"] == pytest.approx(g["p99_ms"] / idle)
    for best in result["best_per_instances"]:
        same = [g["ratio"] for g in result["grid"] if g["instances"] == best["instances"] and g["ratio"] is not None]
        assert best["ratio"] == min(same)
    budget = 4.0 * idle
    for best in result["best_per_instances"]:  # the sizing figure: the rate whose p99 just fits the budget
        rate = best["rate_within_goal_per_s"]
        setting = {"max_batch": best["max_batch"], "delay_us": best["delay_us"], "instances": best["instances"]}
        assert 0 < rate <= best["instances"] * 520.0
        assert queueing.p99_at(service, rate, **setting) <= budget
        over = queueing.p99_at(service, 1.05 * rate, **setting)
        assert over is None or over > budget or rate > 0.95 * best["instances"] * 520.0
    fewest = result["fewest_instances_meeting_goal"]
    meeting = [b["instances"] for b in result["best_per_instances"] if b["ratio"] <= 4.0]
    assert (fewest is None and not meeting) or fewest["instances"] == min(meeting)
    one_core = next(b for b in result["best_per_instances"] if b["instances"] == 1)
    assert one_core["ratio"] > 4.0  # a server busy 80 % of the time on one core: the tail of a single queue


def test_analyse_fits_calibrates_and_compares() -> None:
    times = {1: (400.0, 2.4), 2: (100.0, 4.1), 4: (50.0, 7.5), 8: (10.0, 14.3)}
    points = [{"fraction": 0.05, "p50_ms": 5.0, "p99_ms": 7.0}, {"fraction": 0.8, "p50_ms": 9.0, "p99_ms": 30.0}]
    q = queueing.analyse(times, points, 500.0, max_batch=64, delay_us=0, delays_us=[0, 500], goal=4.0)
    assert q["service"]["overhead_ms"] == pytest.approx(5.0 - q["service"]["fixed_ms"] - q["service"]["per_image_ms"])
    assert q["compared"][0]["model_p50_ms"] == pytest.approx(5.0)  # calibrated on the low-load p50
    assert q["compared"][1]["model_p99_ms"] > q["compared"][1]["model_p50_ms"] > 5.0
    assert q["batches"]["8"] == [10.0, 14.3]
    chosen = q["chosen_setting"]
    assert chosen["ratio"] == pytest.approx(chosen["p99_ms"] / q["low_load_p50_ms"])
    assert {g["max_batch"] for g in q["grid"]} == {1, 2, 4, 8, 16, 32, 64}
    assert queueing.analyse(times, points, 0.0, max_batch=64, delay_us=0, delays_us=[0], goal=4.0) is None
    assert queueing.analyse({1: (5.0, 2.0)}, points, 500.0, max_batch=64, delay_us=0, delays_us=[0], goal=4.0) is None
