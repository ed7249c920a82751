"""Batch-level data augmentation that runs on the training device (CPU or GPU).

Applied to whole batches after they reach the device (``on_after_batch_transfer``), so augmentation
costs one vectorised ``grid_sample`` per batch instead of per-image Python work in the loaders.
Inputs are float NCHW in [0, 1]; outputs stay in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    """Random geometric and intensity changes; zero or false switches each one off."""

    hflip: float = 0.5
    vflip: float = 0.0
    rotate_deg: float = 0.0
    translate: float = 0.0
    scale_min: float = 1.0
    scale_max: float = 1.0
    brightness: float = 0.0
    contrast: float = 0.0

    @property
    def geometric(self) -> bool:
        return bool(self.rotate_deg or self.translate or self.scale_min != 1.0 or self.scale_max != 1.0)


class BatchAugment(torch.nn.Module):
    """Random flips, affine warps (rotation, translation, scale) and brightness/contrast jitter."""

    def __init__(self, config: AugmentConfig | None = None, **kwargs: float) -> None:
        super().__init__()
        self.config = config or AugmentConfig(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        if n == 0:
            return x
        if cfg.hflip > 0:
            flip = torch.rand(n, device=x.device) < cfg.hflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if cfg.vflip > 0:
            flip = torch.rand(n, device=x.device) < cfg.vflip
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-2), x)
        if cfg.geometric:
            x = self._affine(x)
        if cfg.brightness or cfg.contrast:
            x = self._intensity(x)
        return x

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        dev = x.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return torch.empty(n, device=dev).uniform_(low, high)

        angle = uniform(-cfg.rotate_deg, cfg.rotate_deg) * (math.pi / 180)
        scale = uniform(cfg.scale_min, cfg.scale_max)
        tx, ty = uniform(-cfg.translate, cfg.translate) * 2, uniform(-cfg.translate, cfg.translate) * 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        shape = (x.shape[0], 1, 1, 1)
        if cfg.contrast:
            factor = torch.empty(shape, device=x.device).uniform_(1 - cfg.contrast, 1 + cfg.contrast)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * factor + mean
        if cfg.brightness:
            x = x + torch.empty(shape, device=x.device).uniform_(-cfg.brightness, cfg.brightness)
        return x.clamp(0.0, 1.0)
