"""``python -m export run=<run dir> name=<model> [model_repository=<dir>] [target=python|onnxruntime|tensorrt]``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("export")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    """Export a run's best checkpoint into the model repository; exit 2 on a refused export."""
    from export.build import export_model
    from export.parity import ParityError
    from export.repository import RepositoryError
    from export.source import ExportError

    try:
        export_model(cfg)
    except (ExportError, ParityError, RepositoryError) as exc:
        log.error("export failed, nothing was written: %s", exc)
        sys.exit(2)


if __name__ == "__main__":
    main()
