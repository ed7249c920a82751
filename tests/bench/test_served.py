"""bench/served.py helpers that need no server: CPU time of a process tree and the CPU-time figures."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench import served

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\nprint('done', flush=True)\n" \
       "time.sleep(30)"


def test_tree_cpu_seconds_counts_a_child_process() -> None:
    """A child that burns 0.4 s of CPU shows up in its parent's tree total (the server is such a tree: tritonserver
    and its Python-backend stubs), and a process that is not in the tree does not."""
    before = served.tree_cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", BURN], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "done"
        assert child.pid in served.process_tree(os.getpid())
        own_only = served.tree_cpu_seconds(child.pid)
        total = served.tree_cpu_seconds(os.getpid())
        assert own_only >= 0.35
        assert total - before >= 0.35
    finally:
        child.kill()
        child.wait()


def test_process_cpu_time_is_finer_than_proc_ticks() -> None:
    """Read from the process's CPU-time clock: within a few ms of what the process itself counted, where
    /proc/<pid>/stat's 10 ms ticks would be up to 20 ms short."""
    child = subprocess.Popen([sys.executable, "-c", BURN.replace("print('done'", "print(time.process_time()")],
                             stdout=subprocess.PIPE, text=True)
    try:
        own = float(child.stdout.readline())
        seen = served.process_cpu_seconds_of(child.pid)
        assert own <= seen < own + 0.005
    finally:
        child.kill()
        child.wait()
    assert served.process_cpu_seconds_of(child.pid) is None  # reaped


def test_tree_cpu_seconds_of_a_missing_process_is_zero() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    time.sleep(0.05)
    assert served.tree_cpu_seconds(gone.pid) == 0.0


def test_cpu_time_figures_only_with_one_onnxruntime_thread() -> None:
    figures = served.cpu_time_figures(2.0, 1.6, single_thread=True)
    assert figures == {"server_cpu_ms_per_image": 2.0, "ort_cpu_ms_per_image": 1.6,
                       "cpu_time_ratio": pytest.approx(0.8)}
    assert set(served.cpu_time_figures(2.0, 1.6, single_thread=False).values()) == {None}
    assert served.cpu_time_figures(0.0, 1.6, single_thread=True)["cpu_time_ratio"] is None
