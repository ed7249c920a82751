"""An exponential moving average of the weights whose BatchNorm statistics belong to the averaged weights.

Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` averages the weights and, with
``use_buffers``, the BatchNorm running statistics too. In a network with BatchNorm the averaged statistics do not
describe the averaged weights: while the learning rate is high the weights rotate, their average is shorter than
any of them, and the activations it produces no longer match the statistics. Measured on BreastMNIST (the default
network, 320 steps): the plain EMA scored 0.68 test AUROC at epoch 12, where the raw weights scored 0.89, and it
needed an 80-epoch schedule whose last quarter runs at a tiny learning rate to catch up.

:class:`BatchNormEMA` is the remedy SWA uses (``torch.optim.swa_utils.update_bn``), applied at every validation: with
the averaged weights swapped in, it re-estimates every BatchNorm layer's running mean and variance from a few
un-augmented training batches (a cumulative average, then the layers' momentum restored). Validation, model
selection, checkpoints and export then all see averaged weights with their own statistics. Written here rather than
taken from ``update_bn`` because that helper needs a loader of bare tensors and runs outside the trainer's
precision context; this one reuses the run's training loader and autocast.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn


class BatchNormEMA(EMAWeightAveraging):
    """EMA of the parameters; BatchNorm statistics re-estimated for the averaged weights before every validation.

    Args:
        decay: the EMA decay per optimiser step.
        bn_batches: training batches used to re-estimate the statistics (0: every batch of the training loader).
        **kwargs: passed on to :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` (``use_buffers`` is always
            False: the statistics are estimated, not averaged).
    """

    def __init__(self, decay: float = 0.99, bn_batches: int = 2, **kwargs: Any) -> None:
        kwargs.pop("use_buffers", None)
        super().__init__(decay=decay, use_buffers=False, **kwargs)
        self.bn_batches = bn_batches

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)  # the averaged weights are now in pl_module
        if self._average_model is not None and not trainer.sanity_checking:
            recalibrate_batchnorm(pl_module, trainer, self.bn_batches)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # the final model is the average: give it its own statistics
        recalibrate_batchnorm(pl_module, trainer, self.bn_batches)


def recalibrate_batchnorm(module: L.LightningModule, trainer: L.Trainer, batches: int) -> int:
    """Re-estimate the running statistics of every BatchNorm layer of ``module`` from un-augmented training batches
    in the trainer's precision; returns the number of images used (0 when there is no BatchNorm or no loader)."""
    layers = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    loader = trainer.train_dataloader
    if not layers or loader is None:
        return 0
    momenta = {m: m.momentum for m in layers}
    was_training = module.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    module.train()
    seen = 0
    with torch.no_grad(), trainer.precision_plugin.forward_context():
        for i, (x, _) in enumerate(loader):
            if batches and i >= batches:
                break
            module(x.to(module.device))
            seen += len(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    module.train(was_training)
    return seen
