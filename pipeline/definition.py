"""The one pipeline definition of the lifecycle (kfp v2 DSL), and its settings from ``conf/pipeline.yaml``.

validate -> train (GPU) -> evaluate -> export (parity gate) -> promotion gate -> [gate passed] canary or shadow
trial -> [trial passed and auto_promote] promote; an exit handler writes the run's end (completed, stopped by a gate,
failed) into the pipeline record. ``python -m pipeline compile`` compiles it to the IR YAML a Kubeflow cluster runs,
``python -m pipeline run`` runs the same definition through ``kfp.local``, and the Airflow DAG calls the same steps.
"""

from pathlib import Path
from typing import Any

from kfp import dsl
from omegaconf import DictConfig, OmegaConf

from medops.pipeline_record import new_run_id
from pipeline import components as c

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "conf" / "pipeline.yaml"
NAME = "medops-continuous-training"
PATH_KEYS = ("data", "model_repository", "records_dir")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """``conf/pipeline.yaml`` (or ``path``) with ``key=value`` overrides applied."""
    cfg = OmegaConf.load(path or CONFIG)
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must be key=value, got {bad}")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    assert isinstance(cfg, DictConfig)
    return cfg


def arguments(cfg: DictConfig, *, engine: str, trigger: dict[str, Any] | None = None, pipeline_run: str = "",
              cluster: bool = False, data_version: str = "") -> dict[str, Any]:
    """The pipeline's run-time arguments from the config. Locally, paths are made absolute against the repository
    (the steps run in other processes); ``cluster``: the shared-volume paths of ``kfp.cluster``."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    where = dict(plain["kfp"]["cluster"]) if cluster else {}

    def path(key: str, value: Any) -> str:
        if key in where:
            return str(where[key])
        return str(value) if cluster or Path(str(value)).is_absolute() else str((REPO / str(value)).resolve())

    return {
        "data": path("data", plain["data"]), "data_version": data_version, "data_config": plain["data_config"],
        "data_overrides": list(plain["data_overrides"]), "train_overrides": list(plain["train_overrides"]),
        "task_name": plain["task_name"], "n_resamples": int(plain["n_resamples"]), "model_name": plain["model_name"],
        "model_repository": path("model_repository", plain["model_repository"]),
        "export_overrides": list(plain["export_overrides"]),
        "eval_data": path("eval_data", plain["gate"]["eval_data"]), "eval_split": plain["gate"]["split"],
        "gate_tolerance": float(plain["gate"]["tolerance"]), "trial_mode": plain["trial"]["mode"],
        "canary_share": float(plain["trial"]["share"]), "trial_limits": dict(plain["trial"]["limits"]),
        "auto_promote": bool(plain["trial"]["auto_promote"]), "triton_url": str(plain["trial"]["triton_url"] or ""),
        "records_dir": path("records_dir", plain["records_dir"]),
        "pipeline_run": pipeline_run or ("" if cluster else new_run_id()), "engine": engine,
        "trigger": trigger or {"kind": "manual"},
    }


def build(cfg: DictConfig, *, retries: int | None = None) -> Any:
    """The ``@dsl.pipeline`` of the lifecycle with the build-time settings of ``cfg.kfp`` (images, GPU, retries);
    ``retries`` overrides ``kfp.retries`` (the local run uses ``local.retries``)."""
    k = cfg.kfp
    retries = int(k.retries if retries is None else retries)

    def step(task: Any, image: str, cached: bool = True, retry: bool = True) -> Any:
        task.set_container_image(image).set_caching_options(enable_caching=cached)
        if retry and retries > 0:
            task.set_retry(num_retries=retries, backoff_duration=str(k.backoff), backoff_factor=2.0)
        return task

    @dsl.pipeline(name=NAME, description="Validate, train (GPU), evaluate, export (parity gate), promotion gate, "
                                         "canary or shadow trial, promote: medops continuous training")
    def lifecycle(data: str, data_version: str, data_config: str, data_overrides: list, train_overrides: list,
                  task_name: str, n_resamples: int, model_name: str, model_repository: str, export_overrides: list,
                  eval_data: str, eval_split: str, gate_tolerance: float, trial_mode: str, canary_share: float,
                  trial_limits: dict, auto_promote: bool, triton_url: str, records_dir: str, pipeline_run: str,
                  engine: str, trigger: dict) -> None:
        job = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        run = {"records_dir": records_dir, "pipeline_run": pipeline_run, "job_id": job}
        final = step(c.finalize_op(**run), k.images.default, cached=False, retry=False).set_display_name("record")
        with dsl.ExitHandler(final, name="lifecycle"):
            begin = step(c.begin_op(**run, engine=engine, trigger=trigger, data=data, data_version=data_version,
                                    train_overrides=train_overrides, model_name=model_name, eval_data=eval_data,
                                    trial_mode=trial_mode, auto_promote=auto_promote),
                         k.images.default, cached=False, retry=False)
            validate = step(c.validate_op(data=data, data_version=data_version, data_config=data_config,
                                          data_overrides=data_overrides), k.images.default).after(begin)
            train = step(c.train_op(dataset=validate.outputs["dataset"], data_overrides=data_overrides,
                                    train_overrides=train_overrides, task_name=task_name), k.images.train)
            train.set_accelerator_type(str(k.gpu.type)).set_accelerator_limit(int(k.gpu.count))
            evaluate = step(c.evaluate_op(run=train.outputs["run"], n_resamples=n_resamples), k.images.train)
            export = step(c.export_op(dataset=validate.outputs["dataset"], run=train.outputs["run"],
                                      evaluation=evaluate.outputs["evaluation"], model_name=model_name,
                                      model_repository=model_repository, export_overrides=export_overrides, **run),
                          k.images.export, cached=False)
            gate = step(c.gate_op(model=export.outputs["model"], eval_data=eval_data, eval_split=eval_split,
                                  tolerance=gate_tolerance, **run), k.images.default, cached=False, retry=False)
            with dsl.If(gate.outputs["Output"] == "pass", name="gate-passed"):
                trial = step(c.trial_op(model=export.outputs["model"], mode=trial_mode, share=canary_share,
                                        eval_data=eval_data, eval_split=eval_split, limits=trial_limits,
                                        auto_promote=auto_promote, triton_url=triton_url, **run),
                             k.images.default, cached=False, retry=False)
                with dsl.If(trial.outputs["Output"] == "promote", name="trial-passed"):
                    step(c.promote_op(model=export.outputs["model"], eval_data=eval_data, eval_split=eval_split,
                                      tolerance=gate_tolerance, triton_url=triton_url, **run),
                         k.images.default, cached=False, retry=False)

    return lifecycle
