"""The training job: data -> fit -> best checkpoint on the test split -> plots and ``run.json``."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from datatools.validate_data import data_arguments, run_validation
from datatools.validate_data import summary as validation_summary
from medops import to_unit_range
from medops.abnormal import abnormal_operating_point
from medops.calibration import (
    apply_temperature,
    ece_consistency,
    expected_calibration_error,
    label_columns,
    nll,
    sigmoid_temperature,
    trusted_temperature,
)
from medops.datasets import positive_index
from medops.metrics import (
    choose_threshold,
    confusion_matrix,
    label_thresholds,
    operating_point_figures,
    per_label,
    task_summary,
)
from medops.pipeline_record import tracked_version
from medops.plots import plot_confusion, plot_roc
from medops.run_record import new_record, write_record
from train.datamodules import DataError, ImageClassificationDataModule
from train.loggers import wandb_run_info
from train.module import ClassificationModule, count_parameters
from train.recipe import MonitorFallback, Recipe, fit_length, name_checkpoints_by, note_fallback, plan, print_recipe
from train.wandb_report import log_checkpoint_artifact, log_evaluation, run_name

log = logging.getLogger(__name__)
# Augmentation runs in the module's on_after_batch_transfer on purpose (on the training device).
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")


def environment() -> dict[str, Any]:
    """Host, platform and accelerator facts worth keeping with a result (the run record's ``environment``)."""
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def resolve_ckpt_path(ckpt_path: str | None) -> str | None:
    """A checkpoint file, or a run directory whose ``checkpoints/last.ckpt`` is used for resuming."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
    return str(path)


def choose_precision(precision: Any, accelerator: str) -> Any:
    """Resolve ``precision: auto``: bf16 mixed where the hardware runs it natively, else full float32."""
    if precision != "auto":
        return precision
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("cpu", "auto") and torch.backends.mkldnn.is_available():
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "bf16-mixed"
    return "32-true"


def instantiate_list(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group such as callbacks or logger."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


def build_module(cfg: DictConfig, dm: ImageClassificationDataModule, recipe: Recipe | None = None
                 ) -> ClassificationModule:
    """The LightningModule of ``cfg.model`` (its ``_target_``, instantiated as a partial), completed with what the
    data says: classes, channels, size, the training split's normalisation statistics, the task where the module
    takes one, and the class weights the recipe chose (``model.loss.class_weights: auto``)."""
    recipe = recipe or plan(cfg, dm)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model_cfg, dict)
    compile_net = bool(model_cfg.pop("compile", False))
    model_cfg["loss"] = {**(model_cfg.get("loss") or {}), "class_weights": recipe.class_weights}
    factory = hydra.utils.instantiate(model_cfg, _partial_=True, _convert_="all")
    data_args: dict[str, Any] = {"task": recipe.task} if "task" in inspect.signature(factory.func).parameters else {}
    module = factory(
        num_classes=dm.num_classes,
        in_channels=dm.channels,
        image_size=dm.image_size,
        mean=dm.mean,
        std=dm.std,
        class_names=dm.class_names,
        class_counts=dm.class_counts("train"),
        **data_args,
    )
    if compile_net:
        module.net.compile()
    return module


def predict_split(trainer: L.Trainer, module: ClassificationModule, dm: ImageClassificationDataModule,
                  split: str) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [N, classes] (multi-label: one sigmoid per label) and labels [N] (multi-label: [N, K] of 0/1)
    of a split, as numpy arrays."""
    probs = torch.cat(trainer.predict(module, dataloaders=dm.predict_split_dataloader(split)))  # type: ignore[arg-type]
    return probs.float().numpy(), dm.datasets[split].labels.numpy()


def evaluate(
    cfg: DictConfig, best_path: str, dm: ImageClassificationDataModule, loggers: list[Logger], out_dir: Path,
    step: int,
) -> dict[str, Any]:
    """Test the best checkpoint on one device in float32; returns the record part.

    The figures, the operating point and the plots come from the same code as the clinical evaluation report
    (:mod:`medops.metrics`, :mod:`medops.plots`); the loss from the module. The metrics go to the run's loggers at
    the fit's last ``step`` (as ``test/*`` and ``best_val/*``). Task-aware (``task`` in the record): ordinal runs add
    ``qwk`` and ``mae``; multi-label runs record per-label figures and thresholds under ``labels``.
    """
    module = ClassificationModule.load_from_checkpoint(best_path, map_location="cpu", weights_only=False)
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, logger=False, precision="32-true",
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    loss = {"val": trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"],
            "test": trainer.test(module, datamodule=dm, verbose=False)[0]["test/loss"]}
    task = module.task
    (raw_val, y_val), (raw_test, y_test) = (predict_split(trainer, module, dm, s) for s in ("val", "test"))
    calibration = calibrate(cfg, (raw_val, y_val), (raw_test, y_test), task)
    temperature = calibration.get("temperature") or 1.0
    scale = sigmoid_temperature if task == "multilabel" else apply_temperature
    val, test = (scale(raw_val, temperature), y_val), (scale(raw_test, temperature), y_test)
    result: dict[str, Any] = {
        "task": task,
        "val": {**task_summary(*val, task), "loss": float(loss["val"])},
        "test": {**task_summary(*test, task), "loss": float(loss["test"])},
        "calibration": calibration,
    }
    decisions = multilabel_results if task == "multilabel" else single_label_results
    plots = decisions(result, dm, val, test, out_dir)
    result["plots"] = {k: p.name for k, p in plots.items()}
    log_final(loggers, result, plots, test, dm, step)
    return result


def single_label_results(result: dict[str, Any], dm: ImageClassificationDataModule, val: tuple[np.ndarray, np.ndarray],
                         test: tuple[np.ndarray, np.ndarray], out_dir: Path) -> dict[str, Path]:
    """Binary, multi-class and ordinal runs: the confusion matrix, the binary operating point (Youden's J on val)
    and a declared abnormal set into ``result``; returns the ROC and confusion plots."""
    (probs_val, y_val), (probs_test, y_test) = val, test
    names = dm.class_names
    confusion = confusion_matrix(y_test, probs_test.argmax(1), len(names))
    pos = positive_index(names, dm.positive_class) if result["task"] == "binary" else None
    result["confusion_matrix"] = confusion.tolist()
    if pos is not None:
        thr = choose_threshold(probs_val, y_val, "youden", positive_class=pos)
        result["threshold"] = {
            "method": "youden_j_on_val", "positive_class": names[pos], "positive_index": pos, "value": thr,
            "calibrated": bool(result["calibration"].get("temperature")),
            "val": operating_point_figures(probs_val, y_val, thr, pos),
            "test": operating_point_figures(probs_test, y_test, thr, pos),
        }
    if dm.abnormal is not None:  # multi-class with a declared abnormal set / ordinal cut-off
        result["abnormal"] = abnormal_operating_point(probs_val, y_val, probs_test, y_test, names, dm.abnormal)
    return {
        "roc": plot_roc(probs_test, y_test, names, out_dir / "roc_test.png", "ROC, test split",
                        positive_class=1 if pos is None else pos),
        "confusion_matrix": plot_confusion(confusion, names, out_dir / "confusion_test.png",
                                           "Confusion, test split (arg-max decision)"),
    }


def multilabel_results(result: dict[str, Any], dm: ImageClassificationDataModule, val: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray], out_dir: Path) -> dict[str, Path]:
    """Multi-label runs: one threshold per label chosen on val (Youden's J; 0.5 for a label with one value in val),
    and each label's AUROC, sensitivity, specificity, precision and F1 at it on val and test, into
    ``result["labels"]``; returns the per-label ROC plot."""
    names = dm.class_names
    thresholds = label_thresholds(*val)
    result["labels"] = {
        "method": "youden_j_per_label_on_val", "calibrated": bool(result["calibration"].get("temperature")),
        "names": list(names),
        "thresholds": {n: (0.5 if t is None else t) for n, t in zip(names, thresholds, strict=True)},
        "chosen_on_val": [n for n, t in zip(names, thresholds, strict=True) if t is not None],
        "val": per_label(*val, names, thresholds), "test": per_label(*test, names, thresholds),
    }
    return {"roc": plot_roc(test[0], test[1], names, out_dir / "roc_test.png", "ROC per label, test split")}


def calibrate(cfg: DictConfig, val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
              task: str | None = None) -> dict[str, Any]:
    """Temperature scaling fitted on the validation split (``calibrate: true``, the default), with the expected
    calibration error (15 bins) and NLL of both splits before and after; the temperature goes into the export.

    Multi-label runs fit one temperature shared by all labels' sigmoid logits (``sigmoid(logit / T)``), and the
    ECE and NLL are those of every (image, label) pair as a binary prediction
    (:func:`medops.calibration.label_columns`).
    """
    n_images = len(val[1])
    if task == "multilabel":
        val, test = label_columns(*val), label_columns(*test)
    temperature, refused = (trusted_temperature(*val, n_images=n_images) if cfg.get("calibrate", True)
                            else (None, None))
    if refused:
        log.warning("%s", refused)

    def figures(P: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"ece_before": expected_calibration_error(P, y), "nll_before": nll(P, y)}
        if temperature:
            scaled = apply_temperature(P, temperature)
            out |= {"ece_after": expected_calibration_error(scaled, y), "nll_after": nll(scaled, y)}
        # the ECE a perfectly calibrated model with these probabilities would show on this many images
        out["consistency"] = ece_consistency(apply_temperature(P, temperature) if temperature else P, y)
        return out

    method = None if not temperature else ("one temperature on the sigmoid logits of every label, fitted on val (NLL)"
                                           if task == "multilabel" else "temperature scaling fitted on val (NLL)")
    return {"method": method, "temperature": temperature, "val": figures(*val), "test": figures(*test),
            **({"not_calibrated": refused} if refused else {})}


def log_final(loggers: list[Logger], result: dict[str, Any], plots: dict[str, Path],
              test: tuple[np.ndarray, np.ndarray], dm: ImageClassificationDataModule, step: int) -> None:
    """The best checkpoint's figures to every logger; W&B also gets the plots, charts and sample predictions."""
    final = {f"test/{k}": v for k, v in result["test"].items()}
    final |= {f"best_val/{k}": v for k, v in result["val"].items()}
    calibration = result.get("calibration") or {}
    test_calibration = calibration.get("test") or {}
    final |= {f"calibration/test_{k}": v for k, v in test_calibration.items() if isinstance(v, float)}
    if test_calibration.get("consistency"):  # ECE a perfectly calibrated model would show on the test split
        final["calibration/test_ece_if_calibrated_median"] = test_calibration["consistency"]["null_median"]
    if calibration.get("temperature"):
        final["calibration/temperature"] = calibration["temperature"]
    for name, figures in ((result.get("labels") or {}).get("test") or {}).items():  # multi-label: per label
        final |= {f"test_label/{name}/{k}": v for k, v in figures.items() if isinstance(v, float)}
    named = {"positive_class": result["threshold"]["positive_class"]} if result.get("threshold") else {}
    for lg in loggers:
        lg.log_metrics(final, step=step)
        if isinstance(lg, WandbLogger):
            lg.log_image("test/plots", [str(p) for p in plots.values()], caption=list(plots))
            if result.get("task") != "multilabel":  # the prediction table is per class (arg-max)
                log_evaluation(lg.experiment, torch.from_numpy(test[0]), torch.from_numpy(test[1]), dm.class_names,
                               torch.from_numpy(to_unit_range(dm.datasets["test"].images.numpy())))
            lg.experiment.summary.update({**final, **named})


def name_wandb_run(cfg: DictConfig, dm: ImageClassificationDataModule, module: ClassificationModule) -> None:
    """W&B run name from the overrides (what changed), tags with the model and dataset."""
    wb = (cfg.get("logger") or {}).get("wandb")
    if not wb:
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (library use)
        overrides = []
    dataset = Path(str(dm.summary()["source"])).stem
    with open_dict(cfg):
        if not wb.get("name"):
            fallback = f"{module.hparams.net.get('arch')}-{Path(cfg.paths.output_dir).name}"
            wb.name = run_name(overrides, fallback=fallback)
        wb.tags = sorted({*(wb.get("tags") or []), str(module.hparams.net.get("arch")), dataset})


def check_data(dm: ImageClassificationDataModule, settings: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Data-quality checks (datatools.validate_data): ``data_validation.json`` in the run folder, the summary back."""
    if not settings.get("enabled", True):
        return {"enabled": False}
    report = run_validation(dm, settings)
    if rank_zero_only.rank == 0:  # RANK (torchrun), LOCAL_RANK (Lightning's launcher) or SLURM_PROCID (srun)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "data_validation.json").write_text(json.dumps(report, indent=2, default=str))
    for warning in report["warnings"]:
        log.warning("data validation: %s", warning)
    if report["violations"]:
        raise DataError("data validation failed (see data_validation.json; each violation names the setting that "
                        "allows it: data.validation.allow_leakage, allow_corrupt or allow_label_issues=true):\n  "
                        + "\n  ".join(report["violations"]))
    return {"enabled": True, **validation_summary(report)}


class LaunchError(RuntimeError):
    """A distributed launch that would scatter one run over several Hydra run folders."""


def check_one_run_dir(trainer: L.Trainer) -> None:
    """Refuse launches where the ranks of one run would not share one Hydra run folder (before anything is written).

    * ``torchrun`` / ``srun`` start every rank themselves, so each rank runs Hydra, and Hydra names the run folder
      after the moment it starts: N ranks, N folders. They must be given one folder: ``hydra.run.dir=...``
      (scripts/slurm/train_multinode.sbatch passes ``logs/<task>/runs/slurm-<job id>``). Lightning's own
      launcher (``trainer=ddp`` on one node) passes its folder to the processes it starts, so it needs nothing.
    * A sweep (``-m``) with Lightning's launcher would start each extra rank as ``python -m train -m ...``: a
      second sweep. Sweeps run one process per trial (``trainer=gpu``, ``hydra/launcher=slurm_gpu``).
    """
    strategy = trainer.strategy
    env = getattr(strategy, "cluster_environment", None)
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except ValueError:  # not under Hydra (library use)
        return
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    launcher = getattr(strategy, "launcher", None)
    if sweep and isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1 \
            and env is not None and not env.creates_processes_externally:
        raise LaunchError(
            "a sweep (-m) cannot start DDP processes itself (each would start the sweep again): run the trials "
            "on one device each (trainer=gpu or trainer=cpu), e.g. on SLURM with hydra/launcher=slurm_gpu")
    if sweep or env is None or not env.creates_processes_externally or trainer.world_size < 2:
        return
    explicit = any(o.lstrip("+~").split("=", 1)[0] == "hydra.run.dir" for o in hydra_cfg.overrides.hydra)
    if not explicit:
        raise LaunchError(
            f"{trainer.world_size} ranks started by {type(env).__name__.removesuffix('Environment')} each ran Hydra, "
            "and each would make its own run folder: give them one with hydra.run.dir=..., e.g. "
            "hydra.run.dir=logs/train/runs/slurm-$SLURM_JOB_ID (SLURM) or hydra.run.dir=logs/train/runs/<run id> "
            "(torchrun)")


def prepare_data(cfg: DictConfig, out_dir: Path) -> tuple[ImageClassificationDataModule, dict[str, Any]]:
    """The DataModule, loaded and checked (raises DataError naming the file and the problem before any training),
    and the data-validation summary for the run record."""
    data_args, validation = data_arguments(cfg.data)  # the DataModule's arguments, the `validation` block
    dm: ImageClassificationDataModule = hydra.utils.instantiate(data_args)
    dm.prepare()
    return dm, check_data(dm, validation, out_dir)  # raises DataError on a violation not allowed


def without_logger_callbacks(callbacks: list[Callback]) -> list[Callback]:
    """The callbacks that work without a logger (``logger=none``): a learning-rate monitor has nothing to log to."""
    kept = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if len(kept) < len(callbacks):
        log.info("logger=none: the learning-rate monitor is left out (it needs a logger)")
    return kept


def build_trainer(cfg: DictConfig, loggers: list[Logger], recipe: Recipe | None = None
                  ) -> tuple[L.Trainer, dict[str, Any]]:
    """The Lightning Trainer of ``cfg.trainer`` (precision resolved, callbacks attached) and its resolved config.

    The callbacks monitor the recipe's metric (``${recipe.monitor}``/``${recipe.mode}`` resolved to its choice),
    with a fallback where the module does not log it; the epochs are set afterwards (:func:`train.recipe.fit_length`).
    """
    run_cfg = copy.deepcopy(cfg)
    with open_dict(run_cfg):
        run_cfg.recipe = {**(run_cfg.get("recipe") or {}), "monitor": recipe.monitor if recipe else "val/auroc",
                          "mode": recipe.mode if recipe else "max"}
    callbacks: list[Callback] = instantiate_list(run_cfg.get("callbacks"))
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor:
            name_checkpoints_by(cb, cb.monitor)
    if callbacks and recipe and recipe.monitor_fallback:
        callbacks.insert(0, MonitorFallback(recipe.monitor_fallback))
    if not loggers:
        callbacks = without_logger_callbacks(callbacks)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer_cfg, dict)
    trainer_cfg["precision"] = choose_precision(trainer_cfg.get("precision", "auto"),
                                                trainer_cfg.get("accelerator", "auto"))
    trainer: L.Trainer = hydra.utils.instantiate(
        trainer_cfg, callbacks=callbacks, logger=loggers or False, deterministic=cfg.get("deterministic", False)
    )
    check_one_run_dir(trainer)
    return trainer, trainer_cfg


def start_record(cfg: DictConfig, out_dir: Path, dm: ImageClassificationDataModule, data_validation: dict[str, Any],
                 module: ClassificationModule, trainer_cfg: dict[str, Any], recipe: Recipe | None = None
                 ) -> dict[str, Any]:
    """The run record of a run about to fit: config, data summary and validation, model and trainer settings, and
    what the recipe's rules chose for this data (``recipe``)."""
    record = new_record(out_dir, run_id=out_dir.name, environment=environment())
    record["config"] = OmegaConf.to_container(cfg, resolve=True)
    # the DataModule's own arguments keep the data config instantiable (evaluate, export, serve); allow_corrupt
    # stays as skip_unreadable, so they read the data as this run did
    record["config"]["data"] = data_arguments(cfg.data)[0]
    record["data"] = dm.summary()
    record["data"]["tracked_version"] = tracked_version(record["data"].get("source") or "")  # DVC / Git LFS
    record["data_validation"] = data_validation
    record["model"] = {"arch": module.hparams.net.get("arch"), "parameters": count_parameters(module.net)}
    record["trainer"] = {"precision": str(trainer_cfg["precision"]), "accelerator": trainer_cfg.get("accelerator"),
                         "devices": trainer_cfg.get("devices"), "strategy": str(trainer_cfg.get("strategy", "auto")),
                         "max_epochs": recipe.epochs if recipe and recipe.epochs else trainer_cfg.get("max_epochs")}
    if recipe is not None:
        record["recipe"] = recipe.as_record()
    return record


def fitted(trainer: L.Trainer) -> tuple[str | None, dict[str, Any]]:
    """The best checkpoint's path and the record's fit results: checkpoints, epochs, steps, validation metrics."""
    best_cb = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    best_path = best_cb.best_model_path if best_cb and best_cb.best_model_path else None
    last_path = next((c.last_model_path for c in trainer.callbacks
                      if isinstance(c, ModelCheckpoint) and c.last_model_path), None)
    return best_path, {
        "checkpoints": {
            "best": best_path and str(Path(best_path).resolve()),
            "last": last_path and str(Path(last_path).resolve()),
            "monitor": best_cb.monitor if best_cb else None,
            "best_score": float(best_cb.best_model_score) if best_cb and best_cb.best_model_score is not None
            else None,
        },
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "val": {k.removeprefix("val/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "status": "fitted",
    }


def finish_loggers(record: dict[str, Any], loggers: list[Logger], best_path: str | None) -> None:
    """W&B: the run's identity and the best checkpoint as a model artifact, into the record."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            record["wandb"] = wandb_run_info(lg)
            if best_path and record.get("test"):
                record["wandb"]["model_artifact"] = log_checkpoint_artifact(lg.experiment, best_path, record)


def close_loggers(loggers: list[Logger]) -> None:
    """Flush and close every logger."""
    for lg in loggers:
        lg.finalize("success")
        if isinstance(lg, WandbLogger):
            lg.experiment.finish()  # flush the run (config, summary, files) now, not at interpreter exit


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job as configured; returns the run record (empty on non-zero DDP ranks)."""
    started = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    dm, data_validation = prepare_data(cfg, out_dir)
    recipe = plan(cfg, dm)  # class weights and model-selection metric for this data
    module = build_module(cfg, dm, recipe)
    name_wandb_run(cfg, dm, module)
    loggers: list[Logger] = instantiate_list(cfg.get("logger"))
    trainer, trainer_cfg = build_trainer(cfg, loggers, recipe)
    fit_length(recipe, cfg, trainer, dm)  # epochs from the step budget, patience, cost estimate
    if trainer.is_global_zero:
        print_recipe(recipe)
    record = start_record(cfg, out_dir, dm, data_validation, module, trainer_cfg, recipe)
    for lg in loggers:
        lg.log_hyperparams({**record["config"], "data_summary": record["data"], "git": record["git"]})
    if trainer.is_global_zero:
        write_record(record, out_dir)

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"))
    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - fit_started
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()  # evaluation below runs on rank 0 alone
    if not trainer.is_global_zero:
        return {}
    best_path, results = fitted(trainer)
    record.update(results, resumed_from=ckpt_path)
    note_fallback(record, trainer)
    write_record(record, out_dir)

    if cfg.get("test", True) and best_path and not trainer.interrupted:
        record.update(evaluate(cfg, best_path, dm, loggers, out_dir, step=trainer.global_step))
    finish_loggers(record, loggers, best_path)
    record["timing"] = {"fit_seconds": round(fit_seconds, 1), "total_seconds": round(time.perf_counter() - started, 1)}
    record["status"] = "interrupted" if trainer.interrupted else "completed"
    write_record(record, out_dir)
    close_loggers(loggers)
    return record
