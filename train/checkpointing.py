"""The run's checkpoint callback: the best epoch by the recipe's metric, and a ``last.ckpt`` that is really the last.

Lightning 2.6 writes ``last.ckpt`` only when a top-k checkpoint is written in the same step (and once more at the
end of training when none was), so after the best epoch ``last.ckpt`` stays at the best epoch: a run killed later
would resume from there and redo every epoch since. :class:`ResumableCheckpoint` refreshes ``last.ckpt`` after
every validation, as the "last one, for resuming" of the README promises.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class ResumableCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` follows every validation."""

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)
                and self._last_global_step_saved != trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
