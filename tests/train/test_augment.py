"""Batch augmentation keeps shape and range, and each switch really changes the images."""

from __future__ import annotations

import torch

from train.augment import BatchAugment


def test_identity_when_switched_off() -> None:
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(BatchAugment(hflip=0.0)(x), x)


def test_hflip_always() -> None:
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(BatchAugment(hflip=1.0)(x), x.flip(-1))


def test_affine_and_intensity_stay_in_range() -> None:
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28)
    aug = BatchAugment(hflip=0.5, rotate_deg=20, translate=0.1, scale_min=0.9, scale_max=1.1,
                       brightness=0.2, contrast=0.2)
    y = aug(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert not torch.allclose(y, x)


def test_translation_moves_content() -> None:
    x = torch.zeros(1, 1, 20, 20)
    x[..., 8:12, 8:12] = 1.0
    torch.manual_seed(1)
    y = BatchAugment(hflip=0.0, translate=0.25)(x.repeat(32, 1, 1, 1))
    centres = [(img[0] > 0.5).nonzero().float().mean(0) for img in y if (img[0] > 0.5).any()]
    assert torch.stack(centres).std(0).max() > 1.0  # the square lands in different places
