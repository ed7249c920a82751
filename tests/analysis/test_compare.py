"""``python -m analysis.compare``: real runs of a 2-job multirun compared through the CLI, bad inputs, and W&B
projects read through a fake ``wandb.Api`` built from recorded run data (tests/data/wandb_runs.json)."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import wandb

from analysis import compare
from analysis.compare import (
    CompareError,
    RunInfo,
    cv_groups,
    differing_keys,
    load_local_runs,
    load_wandb_runs,
    main,
    plot,
    rank,
)
from tests.conftest import FAST, REPO

WANDB_FIXTURE = REPO / "tests" / "data" / "wandb_runs.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("WANDB_API_KEY", None)
    return env


def run_compare(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "analysis.compare", *map(str, args)], cwd=REPO, env=env or clean_env(),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------------------- real runs (multirun)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, breastmnist_small: Path) -> Path:
    """Two real 2-epoch runs as one Hydra multirun that differ only in the learning rate."""
    sweep_dir = tmp_path_factory.mktemp("compare") / "sweep"
    cmd = [sys.executable, "-m", "train", "-m", "model.optimizer.lr=0.001,0.01", f"hydra.sweep.dir={sweep_dir}",
           *FAST, f"data.path={breastmnist_small}", "data.md5=false", "trainer.max_epochs=2",
           "trainer.limit_train_batches=3"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert sorted(p.parent.name for p in sweep_dir.rglob("run.json")) == ["0", "1"]
    return sweep_dir


def records(sweep_dir: Path) -> dict[Path, dict[str, Any]]:
    return {p.parent: json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("run.json"))}


def csv_val_auroc(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "metrics.csv").open() as fh:
        by_epoch = {int(r["epoch"]): float(r["val/auroc"]) for r in csv.DictReader(fh) if r.get("val/auroc")}
    return [by_epoch[e] for e in sorted(by_epoch)]


@pytest.mark.slow
def test_sweep_table_ranking_best_and_outputs(sweep: Path) -> None:
    recs = records(sweep)
    aurocs = {d: r["test"]["auroc"] for d, r in recs.items()}
    assert len(set(aurocs.values())) == 2, f"the two runs tie on test/auroc, the ranking test needs a winner: {aurocs}"
    best_dir = max(aurocs, key=aurocs.__getitem__)
    other_dir = min(aurocs, key=aurocs.__getitem__)

    proc = run_compare(sweep)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Traceback" not in proc.stderr and "not comparable" not in proc.stderr
    assert "model.optimizer.lr" in out
    for leaked in ("paths.", "hydra.", "output_dir", "save_dir", "default_root_dir", "dirpath"):
        assert leaked not in out, leaked
    # The ★ row is the best run: its name and its learning rate, its test AUROC as printed.
    star = next(line for line in out.splitlines() if "★" in line)
    best_lr = recs[best_dir]["config"]["model"]["optimizer"]["lr"]
    assert re.search(rf"\b{best_dir.name}\b", star) and f"{best_lr:g}" in star, star
    assert f"{aurocs[best_dir]:.4f}" in star
    table_rows = [line for line in out.splitlines() if re.search(r"\b0\.0?01\b", line)]
    assert len(table_rows) == 2

    report = json.loads((sweep / "compare.json").read_text())
    assert report["differing_keys"] == ["model.optimizer.lr"]
    assert [Path(r["source"]) for r in report["rows"]] == [best_dir, other_dir]
    assert report["rows"][0]["best"] and not report["rows"][1]["best"]
    assert report["rows"][0]["test"]["auroc"] == pytest.approx(aurocs[best_dir])
    assert report["rows"][0]["config"] == {"model.optimizer.lr": best_lr}
    assert [r["epochs"] for r in report["rows"]] == [2, 2]
    assert report["warnings"] == []

    png = (sweep / "compare.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000
    page = (sweep / "compare.html").read_text()
    embedded = re.search(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and base64.b64decode(embedded.group(1)) == png
    assert "model.optimizer.lr" in page and "<table" in page

    best = run_compare(sweep, "--best")
    assert best.returncode == 0, best.stderr
    assert best.stdout == f"{best_dir}\n"  # exactly the path, usable as $(python -m analysis.compare X --best)
    assert Path(best.stdout.strip()).joinpath("run.json").is_file()


@pytest.mark.slow
def test_local_runs_carry_history_and_rank_by_min_mode(sweep: Path) -> None:
    runs = load_local_runs([sweep])
    recs = records(sweep)
    assert {Path(r.source) for r in runs} == set(recs)
    for run in runs:
        rec = recs[Path(run.source)]
        assert run.history["val/auroc"] == pytest.approx(csv_val_auroc(Path(run.source)))
        assert len(run.history["val/auroc"]) == run.epochs == 2
        assert run.fingerprint == rec["data"]["fingerprint"] and run.fold is None
        assert run.config["model.optimizer.lr"] == rec["config"]["model"]["optimizer"]["lr"]
        assert run.fit_seconds == rec["timing"]["fit_seconds"]
    by_loss = rank(runs, "test/loss", "min")
    losses = [recs[Path(r.source)]["test"]["loss"] for r in by_loss]
    assert losses == sorted(losses)


@pytest.mark.slow
def test_different_fingerprints_warn_but_still_compare(sweep: Path, tmp_path: Path) -> None:
    src = sorted(sweep.rglob("run.json"))[0].parent
    copy = tmp_path / "other_data"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("*.ckpt"))
    record = json.loads((copy / "run.json").read_text())
    record["data"]["fingerprint"] = "sha256:" + "0" * 64
    (copy / "run.json").write_text(json.dumps(record))

    proc = run_compare(sweep, copy, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "different datasets" in proc.stderr and "not comparable" in proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert len(report["rows"]) == 3 and len(report["warnings"]) == 1
    assert {r["fingerprint"] for r in report["rows"]} == {record["data"]["fingerprint"],
                                                          records(sweep)[src]["data"]["fingerprint"]}


@pytest.mark.slow
def test_unknown_metric_lists_the_available_ones(sweep: Path) -> None:
    proc = run_compare(sweep, "--metric", "test/dice")
    assert proc.returncode == 2
    assert "unknown metric 'test/dice'" in proc.stderr
    assert "test/auroc" in proc.stderr and "val/loss" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ------------------------------------------------------------------------------------------ bad input


def test_folder_without_run_json_exits_2(tmp_path: Path) -> None:
    run_dir = tmp_path / "not_a_run"
    (run_dir / "csv").mkdir(parents=True)
    (run_dir / "csv" / "metrics.csv").write_text("epoch,val/auroc\n0,0.5\n")
    proc = run_compare(run_dir)
    assert proc.returncode == 2
    assert f"{run_dir}: no run.json found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_local_path_that_is_no_wandb_path(tmp_path: Path) -> None:
    proc = run_compare(tmp_path / "nowhere" / "at" / "all")
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr and "Traceback" not in proc.stderr


def test_wandb_offline_without_api_key_says_so() -> None:
    proc = run_compare("someone/someproject")
    assert proc.returncode == 2
    assert "cannot read W&B project someone/someproject" in proc.stderr
    assert "offline" in proc.stderr and "WANDB_API_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_without_credentials_reports_wandbs_own_error(tmp_path: Path) -> None:
    """Not offline, but no key anywhere (empty HOME): the real ``wandb.Api()`` refuses, reported cleanly."""
    env = clean_env(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb_cfg"))
    env.pop("WANDB_MODE")
    env.pop("NETRC", None)
    proc = run_compare("someone/someproject", env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot read W&B project someone/someproject" in proc.stderr
    assert "wandb login" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_run_json_is_named(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_text("{not json")
    with pytest.raises(CompareError, match=r"r/run\.json: not a readable run record"):
        load_local_runs([tmp_path / "r"])


# -------------------------------------------------------------------------------- W&B (recorded data)


class FakeRun:
    """What ``wandb.Api().runs()`` yields, for the attributes analysis.compare reads."""

    def __init__(self, data: dict[str, Any], entity: str, project: str) -> None:
        self.id, self.name, self.group = data["id"], data["name"], data["group"]
        self.tags, self.state = list(data["tags"]), data["state"]
        self.entity, self.project = entity, project
        self.config = data["config"]
        self.summary_metrics = data["summary"]
        self._history = data["history"]
        self.scanned: list[list[str] | None] = []

    @property
    def path(self) -> list[str]:
        return [self.entity, self.project, self.id]

    def scan_history(self, keys: list[str] | None = None, page_size: int = 1000, min_step: int = 0,
                     max_step: int | None = None, use_cache: bool = True):
        self.scanned.append(keys)  # like W&B: only rows holding every requested key, only those keys
        for row in self._history:
            if keys is None:
                yield dict(row)
            elif all(k in row for k in keys):
                yield {k: row[k] for k in keys} | {"_step": row["_step"]}


class FakeApi:
    """``wandb.Api`` over the recorded runs: ``runs(path, filters)`` with W&B's group / tags ``$in`` filters."""

    def __init__(self, recorded: dict[str, Any] | None = None, error: Exception | None = None) -> None:
        self.recorded = recorded or json.loads(WANDB_FIXTURE.read_text())
        self.error = error
        self.calls: list[tuple[str, Any]] = []
        self.served: list[FakeRun] = []

    def runs(self, path: str, filters: dict[str, Any] | None = None, order: str = "+created_at", per_page: int = 50):
        self.calls.append((path, filters))
        if self.error is not None:
            raise self.error
        if path != f"{self.recorded['entity']}/{self.recorded['project']}":
            raise wandb.errors.CommError(f"Could not find project {path}")
        runs = [FakeRun(r, self.recorded["entity"], self.recorded["project"]) for r in self.recorded["runs"]]
        filters = filters or {}
        if "group" in filters:
            runs = [r for r in runs if r.group == filters["group"]]
        if "tags" in filters:
            runs = [r for r in runs if set(r.tags) & set(filters["tags"]["$in"])]
        self.served += runs
        return runs


@pytest.fixture
def recorded() -> dict[str, Any]:
    return json.loads(WANDB_FIXTURE.read_text())


def test_wandb_runs_loaded_ranked_and_compared(recorded: dict[str, Any]) -> None:
    api = FakeApi(recorded)
    runs = load_wandb_runs("medops-lab/medops", api=api)
    assert api.calls == [("medops-lab/medops", None)]
    assert len(runs) == len(recorded["runs"]) == 3
    assert [run.scanned for run in api.served] == [[["val/auroc"]]] * 3  # test/auroc -> val/auroc curves

    by_id = {r["id"]: r for r in recorded["runs"]}
    for run in runs:
        rec = by_id[run.id]
        assert run.source == f"medops-lab/medops/{run.id}" and run.name == rec["name"]
        assert run.test["auroc"] == rec["summary"]["test/auroc"]
        assert run.val["auroc"] == rec["summary"]["best_val/auroc"]  # val of the best checkpoint
        assert run.epochs == rec["summary"]["epoch"] + 1
        assert run.fingerprint == rec["config"]["data_summary"]["fingerprint"]
        assert run.history["val/auroc"] == [h["val/auroc"] for h in rec["history"] if "val/auroc" in h]
        assert len(run.history["val/auroc"]) == 2
        assert run.config["model.optimizer.lr"] == rec["config"]["model"]["optimizer"]["lr"]
        assert "paths.output_dir" in run.config and not any(k.startswith(("data_summary.", "git.")) for k in run.config)

    expected = sorted(by_id, key=lambda i: by_id[i]["summary"]["test/auroc"], reverse=True)
    assert [r.id for r in rank(runs, "test/auroc", "max")] == expected
    assert [r.id for r in rank(runs, "test/auroc", "min")] == expected[::-1]

    keys = differing_keys(runs)
    assert "model.optimizer.lr" in keys and "logger.wandb.group" in keys  # the third run is in another group
    assert not [k for k in keys if k.startswith(("paths.", "hydra.", "optimizer.", "trainer.default_root_dir"))]


def test_wandb_group_and_tag_filters(recorded: dict[str, Any]) -> None:
    api = FakeApi(recorded)
    train_group = load_wandb_runs("medops-lab/medops", group="train", api=api)
    assert api.calls[-1] == ("medops-lab/medops", {"group": "train"})
    assert {r.id for r in train_group} == {r["id"] for r in recorded["runs"] if r["group"] == "train"}
    assert len(train_group) == 2
    assert differing_keys(train_group) == ["model.optimizer.lr"]

    tagged = load_wandb_runs("medops-lab/medops", tag="ablation", api=api)
    assert api.calls[-1] == ("medops-lab/medops", {"tags": {"$in": ["ablation"]}})
    assert [r.id for r in tagged] == [r["id"] for r in recorded["runs"] if "ablation" in r["tags"]]

    with pytest.raises(CompareError, match=r"no runs found in W&B project medops-lab/medops \(group=nothing\)"):
        load_wandb_runs("medops-lab/medops", group="nothing", api=api)


def test_wandb_errors_become_compare_errors() -> None:
    with pytest.raises(CompareError, match="cannot read W&B project nobody/none: CommError: Could not find project"):
        load_wandb_runs("nobody/none", api=FakeApi())
    down = FakeApi(error=wandb.errors.CommError("Network error (ConnectionError): connection refused"))
    with pytest.raises(CompareError, match="cannot read W&B project medops-lab/medops: CommError: Network error"):
        load_wandb_runs("medops-lab/medops", api=down)


class ApiRecorder:
    """Stands in for the ``wandb.Api`` class: records how it was constructed, serves the recorded runs."""

    made: list[dict[str, Any]] = []
    instances: list[FakeApi] = []
    error: Exception | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> FakeApi:  # type: ignore[misc]
        cls.made.append({"args": args, **kwargs})
        if cls.error is not None:
            raise cls.error
        api = FakeApi()
        cls.instances.append(api)
        return api


@pytest.fixture
def api_recorder(monkeypatch: pytest.MonkeyPatch) -> type[ApiRecorder]:
    monkeypatch.setattr(ApiRecorder, "made", [])
    monkeypatch.setattr(ApiRecorder, "instances", [])
    monkeypatch.setattr(ApiRecorder, "error", None)
    monkeypatch.setattr(wandb, "Api", ApiRecorder)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # never sent anywhere: wandb.Api is the recorder
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return ApiRecorder


def test_default_path_constructs_wandb_api(api_recorder: type[ApiRecorder], recorded: dict[str, Any],
                                           capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["medops-lab/medops", "--group", "train", "--best"]) == 0
    assert len(api_recorder.made) == 1 and api_recorder.made[0]["timeout"] == compare.WANDB_TIMEOUT_S
    assert api_recorder.instances[0].calls == [("medops-lab/medops", {"group": "train"})]
    train_runs = [r for r in recorded["runs"] if r["group"] == "train"]
    best = max(train_runs, key=lambda r: r["summary"]["test/auroc"])
    captured = capsys.readouterr()
    assert captured.out == f"medops-lab/medops/{best['id']}\n"

    out_dir = tmp_path / "report"
    assert main(["medops-lab/medops", "--metric", "val/auroc", "--out", str(out_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric"] == "val/auroc" and len(report["rows"]) == 3
    vals = [r["val"]["auroc"] for r in report["rows"]]
    assert vals == sorted(vals, reverse=True)
    assert report["best"] == f"medops-lab/medops/{report['rows'][0]['id']}"
    assert (out_dir / "compare.png").read_bytes()[:8] == PNG_MAGIC
    assert (out_dir / "compare.json").is_file() and "base64," in (out_dir / "compare.html").read_text()
    last = api_recorder.instances[-1]
    assert last.calls == [("medops-lab/medops", None)]
    assert [run.scanned for run in last.served] == [[["val/auroc"]]] * 3  # the history of the chosen metric


def test_default_path_unreachable_exits_2(api_recorder: type[ApiRecorder],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    api_recorder.error = wandb.errors.CommError("Network error (ConnectTimeout): timed out")
    assert main(["medops-lab/medops"]) == 2
    err = capsys.readouterr().err
    assert "cannot read W&B project medops-lab/medops: CommError: Network error" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------- pure helpers, CV groups


def make_run(name: str, fold: int | None, auroc: float, lr: float = 0.001, seed: int = 42, **extra: Any) -> RunInfo:
    out = f"/logs/cv/multiruns/x/{name}"
    config = {"seed": seed, "data.fold": fold, "data.num_folds": 3, "model.optimizer.lr": lr,
              "paths.output_dir": out, "hydra.job.num": name, "logger.csv.save_dir": out,
              "callbacks.model_checkpoint.dirpath": f"{out}/checkpoints", **extra}
    return RunInfo(id=name, name=name, source=out, config=config, val={"auroc": auroc - 0.05},
                   test={"auroc": auroc, "acc": auroc - 0.1, "f1": auroc - 0.2}, epochs=3, fit_seconds=1.0,
                   fingerprint="sha256:same", fold=fold, history={"val/auroc": [0.5, 0.6, auroc - 0.05]})


def test_differing_keys_ignore_paths_and_show_seed_only_when_it_differs() -> None:
    a, b = make_run("0", None, 0.8), make_run("1", None, 0.7, lr=0.01)
    assert differing_keys([a, b]) == ["model.optimizer.lr"]
    c = make_run("2", None, 0.75, seed=1)
    assert differing_keys([a, b, c]) == ["seed", "model.optimizer.lr"]
    d = make_run("3", None, 0.7, **{"model.net.width": 16})  # a key only one run has
    assert differing_keys([a, d]) == ["model.net.width"]


def test_cv_group_mean_and_std_in_plot_and_report(tmp_path: Path) -> None:
    folds = [make_run(str(i), i, auroc) for i, auroc in enumerate((0.80, 0.86, 0.83))]
    single = make_run("solo", None, 0.9, lr=0.01)
    runs = rank([*folds, single], "test/auroc", "max")
    assert runs[0] is single
    groups = cv_groups(runs)
    assert len(groups) == 1 and sorted(r.fold for r in groups[0]) == [0, 1, 2]
    report = compare.build_report(runs, "test/auroc", "max")
    (group,) = report["groups"]
    assert group["mean"]["test/auroc"] == pytest.approx(statistics.fmean([0.80, 0.86, 0.83]))
    assert group["std"]["test/auroc"] == pytest.approx(statistics.stdev([0.80, 0.86, 0.83]))
    png = plot(runs, "test/auroc", tmp_path)
    assert png == tmp_path / "compare.png" and png.read_bytes()[:8] == PNG_MAGIC
    # Folds of different recipes are different groups.
    other = [make_run(f"b{i}", i, 0.7, lr=0.01) for i in range(3)]
    assert len(cv_groups([*folds, *other])) == 2
