"""Case training-loop: a Lightning epoch against a hand-written PyTorch loop on the same model, data and batch size.

Both loops train the project's :class:`train.module.ClassificationModule` (same seed, same weights, the same
batch augmentation, AdamW with the module's parameter groups, no LR schedule) on the same in-memory BreastMNIST
DataLoader with the same shuffling seed; they alternate within each repetition.

Data wait share: in the plain loop, the time spent in ``next(iterator)`` over the epoch time; in Lightning, the
time between one batch's ``on_train_batch_end`` and the next ``on_train_batch_start`` (fetching the batch, moving
it to the device and ``on_after_batch_transfer``, i.e. the augmentation, plus Lightning's own per-batch
bookkeeping) over the epoch time (``on_train_epoch_start`` to ``on_train_epoch_end``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import common

DATA = Path(__file__).resolve().parent.parent / "data" / "breastmnist.npz"


@dataclass
class TrainingConfig:
    arch: str = "resnet18"
    data: str = str(DATA)
    images: int = 0  # training images per epoch (0: the whole train split)
    batch_size: int = 32
    num_workers: int = 0  # the project's default for in-memory MedMNIST
    repeats: int = 3
    threads: int = 1

    @classmethod
    def quick(cls, threads: int) -> TrainingConfig:
        return cls(images=32, batch_size=16, repeats=1, threads=threads)


class _EpochTimer:
    """Lightning callback: epoch time, per-batch step time and the gaps between batches."""

    def __init__(self) -> None:
        self.epoch_start = self.epoch_end = self.last_end = self.batch_start = 0.0
        self.waits: list[float] = []
        self.steps: list[float] = []

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self.epoch_start = self.last_end = time.perf_counter()

    def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
        self.batch_start = time.perf_counter()
        self.waits.append(self.batch_start - self.last_end)

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.last_end = time.perf_counter()
        self.steps.append(self.last_end - self.batch_start)

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        self.epoch_end = time.perf_counter()


def _callback() -> Any:
    import lightning as L

    class EpochTimer(_EpochTimer, L.Callback):
        pass

    return EpochTimer()


def run(cfg: TrainingConfig, out_dir: Path, info: dict[str, Any],
        log: Callable[[str], None] = print) -> dict[str, Any]:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from medops.datasets import channel_stats, load_medmnist_npz
    from train.datamodules.base import ArrayDataset
    from train.module import ClassificationModule

    started = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    data = load_medmnist_npz(cfg.data)
    images, labels = data.images["train"], data.labels["train"]
    if cfg.images:
        images, labels = images[: cfg.images], labels[: cfg.images]
    mean, std = channel_stats(images)
    channels, size = int(images.shape[-1]), int(images.shape[1])
    dataset = ArrayDataset(images, labels)
    steps = len(dataset) // cfg.batch_size
    if steps < 1:
        raise ValueError(f"{len(dataset)} images make no full batch of {cfg.batch_size}")

    def loader() -> DataLoader:
        return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                          num_workers=cfg.num_workers, persistent_workers=False,
                          generator=torch.Generator().manual_seed(0))

    def module() -> ClassificationModule:
        torch.manual_seed(0)
        m = ClassificationModule(num_classes=len(data.class_names), in_channels=channels, image_size=size,
                                 mean=mean, std=std, net={"arch": cfg.arch}, scheduler={"name": "none"},
                                 augment={"hflip": 0.5, "translate": 0.1}, channels_last=True)
        return m

    def lightning_epoch(limit: int | None = None) -> dict[str, float]:
        timer = _callback()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, callbacks=[timer], precision="32-true",
                            limit_train_batches=limit)
        t = time.perf_counter()
        trainer.fit(module(), train_dataloaders=loader())
        fit = time.perf_counter() - t
        epoch = timer.epoch_end - timer.epoch_start
        return {"epoch_seconds": epoch, "fit_seconds": fit, "wait_seconds": sum(timer.waits),
                "step_ms_median": 1e3 * common.median(timer.steps), "steps": len(timer.steps)}

    def plain_epoch(limit: int | None = None) -> dict[str, float]:
        m = module()
        optimizer = m.configure_optimizers()  # AdamW with the module's groups (no schedule configured)
        m.train()
        waits, step_times = [], []
        t_epoch = time.perf_counter()
        it = iter(loader())
        while limit is None or len(step_times) < limit:
            t = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            t_got = time.perf_counter()
            waits.append(t_got - t)
            x = m.augment(x)
            loss = m._loss(m(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_times.append(time.perf_counter() - t_got)
        epoch = time.perf_counter() - t_epoch
        return {"epoch_seconds": epoch, "fit_seconds": epoch, "wait_seconds": sum(waits),
                "step_ms_median": 1e3 * common.median(step_times), "steps": len(step_times)}

    loops = {"lightning": lightning_epoch, "plain": plain_epoch}
    for warm_up in loops.values():  # untimed: one-time costs (kernel selection, allocator, imports) paid here
        warm_up(min(2, steps - 1) or 1)
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in loops}
    for rep in range(cfg.repeats):
        order = list(loops) if rep % 2 == 0 else list(reversed(loops))  # neither always goes first
        for name in order:
            r = loops[name]()
            r["images_per_s"] = r["steps"] * cfg.batch_size / r["epoch_seconds"]
            r["data_wait_share"] = r["wait_seconds"] / r["epoch_seconds"]
            runs[name].append(r)
            log(f"run {rep + 1}/{cfg.repeats} {name}: {r['images_per_s']:.1f} images/s, epoch "
                f"{r['epoch_seconds']:.2f} s, data wait {r['data_wait_share']:.1%}")
    flops = common.count_flops(module().net, (channels, size, size))
    rows = []
    for name, values in runs.items():
        row = {"loop": name, "runs": len(values)}
        for key in ("images_per_s", "epoch_seconds", "fit_seconds", "data_wait_share", "step_ms_median"):
            row[key] = common.median([v[key] for v in values])
        row["images_per_s_runs"] = [v["images_per_s"] for v in values]
        row["data_wait_share_runs"] = [v["data_wait_share"] for v in values]
        rows.append(row)
    pairs = list(zip([v["images_per_s"] for v in runs["lightning"]], [v["images_per_s"] for v in runs["plain"]],
                     strict=True))
    time_pairs = list(zip([v["epoch_seconds"] for v in runs["lightning"]],
                          [v["epoch_seconds"] for v in runs["plain"]], strict=True))
    rows[0]["ratio_to_plain"] = common.median_ratio(pairs)
    rows[1]["ratio_to_plain"] = 1.0
    epoch_ratio = common.median_ratio(time_pairs)
    result = {
        **common.header("training-loop", info, {**asdict(cfg), "size": size, "channels": channels}),
        "images": steps * cfg.batch_size,
        "flops_per_image_forward": flops,
        "rows": rows,
        "lightning_over_plain_images_per_s": rows[0]["ratio_to_plain"],
        "lightning_over_plain_epoch_time": epoch_ratio,
        "targets": [
            common.target("Lightning epoch time / plain loop epoch time", epoch_ratio, 1.05,
                          higher_is_better=False),
            *[common.target(f"data wait share of step time, {r['loop']}", r["data_wait_share"], 0.05,
                            higher_is_better=False, unit="share") for r in rows],
        ],
        "seconds": time.perf_counter() - started,
    }
    return result
