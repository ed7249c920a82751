"""``python -m bench [CASE|all] [--quick] [--out DIR] [--repeats N] [--threads N] ...``

CASE: engines, pipeline, training, training-loop, training-cost, gpu, metrics, latency or int8.

Each case prints its table (with the machine it ran on) and writes ``<case>.json`` and ``<case>.png`` into
``--out`` (default ``logs/bench/<timestamp>/``). ``--quick`` runs tiny sizes and few iterations (the tests use it);
its figures only show that the benchmark works. Exit code 0 when every case ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench import CASES, MODULES


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", nargs="?", default="all", choices=(*CASES, "all"), help="which case (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (for tests)")
    parser.add_argument("--out", default=None, help="output folder (default: logs/bench/<timestamp>)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per figure (median over them)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch, onnxruntime and Triton's model (default: physical cores)")
    parser.add_argument("--channels", type=_ints, default=None, help="engines: channel counts, e.g. 1,3")
    parser.add_argument("--sizes", type=_ints, default=None,
                        help="engines/pipeline/training-cost: image sizes, e.g. 28,64,224; metrics: numbers of "
                             "predictions")
    parser.add_argument("--batches", type=_ints, default=None, help="engines: batch sizes, e.g. 1,32")
    parser.add_argument("--concurrency", type=_ints, default=None, help="engines: Triton client threads, e.g. 1,4,16")
    parser.add_argument("--engines", default=None,
                        help="engines: comma-separated subset of eager,onnxruntime,triton-http,triton-grpc,"
                             "triton-grpc-shm")
    parser.add_argument("--archs", default=None, help="gpu: comma-separated architectures, e.g. resnet50,resnet18")
    parser.add_argument("--images", type=int, default=None, help="pipeline/training/training-cost: images per run")
    parser.add_argument("--min-seconds", type=float, default=None, help="engines: work per measurement")
    parser.add_argument("--export", default=None,
                        help="engines/latency/int8: an exported version folder (model_repository/<name>/<version>); "
                             "latency/int8 default: the newest of model_repository/breastmnist")
    parser.add_argument("--int8-export", default=None, help="int8: the INT8 version folder of the same model")
    parser.add_argument("--write-config", default=None,
                        help="latency: write the chosen dynamic batcher settings to this JSON (export reads "
                             "conf/triton_batcher.json)")
    return parser


def _configs(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    from bench.engines import EnginesConfig
    from bench.gpu import GpuConfig
    from bench.int8 import Int8Config
    from bench.latency import LatencyConfig
    from bench.metrics import MetricsConfig
    from bench.serve_batch import PipelineConfig
    from bench.time_to_accuracy import TimeToAccuracyConfig
    from bench.training_cost import TrainingCostConfig
    from bench.training_loop import TrainingConfig

    configs: dict[str, Any] = {}
    for case, cls in (("engines", EnginesConfig), ("pipeline", PipelineConfig), ("training", TimeToAccuracyConfig),
                      ("training-loop", TrainingConfig), ("training-cost", TrainingCostConfig),
                      ("gpu", GpuConfig), ("metrics", MetricsConfig), ("latency", LatencyConfig),
                      ("int8", Int8Config)):
        cfg = cls.quick(threads) if args.quick else cls(threads=threads)
        names = {f.name for f in fields(cls)}
        overrides = {"repeats": args.repeats, "channels": args.channels, "sizes": args.sizes,
                     "batches": args.batches, "concurrency": args.concurrency, "images": args.images,
                     "min_seconds": args.min_seconds,
                     "engines": args.engines.split(",") if args.engines else None,
                     "archs": args.archs.split(",") if args.archs else None, "export": args.export,
                     "int8_export": args.int8_export, "write_config": args.write_config}
        for key, value in overrides.items():
            if value is not None and key in names:
                setattr(cfg, key, value)
        configs[case] = cfg
    return configs


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """``timeout`` and CI stop a benchmark with SIGTERM: leave through the ``finally`` blocks, so the
    ``tritonserver`` processes a case started are stopped instead of outliving it and skewing later figures."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch load
            os.environ.setdefault(var, str(args.threads))

    from rich.console import Console

    from bench import common, report
    from serve.local_backend import physical_cores

    threads = args.threads or physical_cores()
    out_dir = Path(args.out) if args.out else common.default_out_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(width=max(160, Console().width), soft_wrap=False)
    info = common.machine_info(threads)
    print(common.machine_line(info), flush=True)
    configs = _configs(args, threads)
    cases = list(CASES) if args.case == "all" else [args.case]
    failed = []
    for case in cases:
        started = time.perf_counter()
        console.rule(f"[bold]bench {case}{' (quick)' if args.quick else ''}")
        try:
            module = __import__(f"bench.{MODULES.get(case, case)}", fromlist=["run"])
            result = module.run(configs[case], out_dir, info, log=lambda m: console.print(m, highlight=False))
            result.setdefault("seconds", time.perf_counter() - started)
            result["quick"] = bool(args.quick)
            common.write_json(out_dir / f"{case}.json", result)
            report.CHARTS[case](result, out_dir / f"{case}.png")
            report.print_result(console, result)
            console.print(f"{case}: {time.perf_counter() - started:.0f} s; wrote {out_dir / (case + '.json')} and "
                          f"{out_dir / (case + '.png')}", highlight=False)
        except Exception:  # one case failing must not lose the others
            failed.append(case)
            console.print(f"[bold red]bench {case} failed[/]")
            traceback.print_exc()
    if failed:
        print(f"failed cases: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
