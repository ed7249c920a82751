"""Experiment loggers: CSV always, W&B online with an API key and offline without one."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


def wandb_mode() -> str:
    """``WANDB_MODE`` if set, else ``online`` when ``WANDB_API_KEY`` is set, else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def make_wandb_logger(save_dir: str, project: str = "medops", **kwargs: Any) -> WandbLogger:
    """A :class:`WandbLogger` that never needs the network unless an API key is configured."""
    mode = wandb_mode()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return WandbLogger(save_dir=save_dir, project=project, offline=mode != "online", mode=mode, **kwargs)


def wandb_run_info(logger: WandbLogger) -> dict[str, Any]:
    """Id, mode, local folder and (offline) the ``wandb sync`` command of a W&B run."""
    run = logger.experiment
    run_dir = Path(run.dir).parent  # .../wandb/offline-run-<date>-<id>/files -> the run folder
    mode = str(run.settings.mode)
    mode = "offline" if mode in ("offline", "dryrun") else mode
    info = {"id": run.id, "project": run.project, "name": run.name, "mode": mode, "dir": str(run_dir)}
    if info["mode"] != "online":
        info["sync_command"] = f"wandb sync {run_dir}"
    else:
        info["url"] = run.url
    return info
