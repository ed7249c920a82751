"""``python -m train [hydra overrides]``: train, test and record one model (see conf/train.yaml)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from train.datamodules import DataError
from train.summary import print_summary

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimised metric for sweepers (``optimized_metric``)."""
    from train.fit import train  # imported here so `--help` and config errors stay fast

    try:
        record = train(cfg)
    except DataError as exc:
        log.error("bad input data: %s", exc)
        sys.exit(2)
    if not record:
        return None
    print_summary(record)
    metric = cfg.get("optimized_metric")
    if metric == "auto":  # the metric the recipe selected the checkpoint by (val/auroc; ordinal data: val/qwk)
        metric = (record.get("recipe") or {}).get("monitor") or "val/auroc"
    if metric:
        split, _, name = metric.partition("/")
        return record.get(split, {}).get(name)
    return None


if __name__ == "__main__":
    main()
