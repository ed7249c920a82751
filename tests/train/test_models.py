"""Networks: every architecture runs forward for 1 and 3 channels, small and large inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.models import ARCHITECTURES, Normalize, build_backbone, build_network


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 28), (3, 96)])
def test_forward_shapes(arch: str, channels: int, size: int) -> None:
    net = build_network(arch, channels, 5, size, [0.5] * channels, [0.25] * channels, width=16)
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(2, channels, size, size))
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()


def test_small_input_stem_keeps_resolution() -> None:
    small = build_backbone("resnet18", 1, 2, 28)
    large = build_backbone("resnet18", 1, 2, 224)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    assert large.conv1.stride == (2, 2) and isinstance(large.maxpool, torch.nn.MaxPool2d)
    assert small.conv1.in_channels == 1


def test_width_scales_parameters() -> None:
    n64 = sum(p.numel() for p in build_backbone("resnet18", 1, 2, 28, width=64).parameters())
    n32 = sum(p.numel() for p in build_backbone("resnet18", 1, 2, 28, width=32).parameters())
    assert 3.5 < n64 / n32 < 4.5  # parameters grow with width squared
    assert 11_000_000 < n64 < 11_400_000  # the standard ResNet-18 (1-channel stem, 2 classes)


def test_normalize_is_inside_the_graph() -> None:
    net = build_network("smallcnn", 1, 2, 28, [0.3], [0.2], width=8)
    assert isinstance(net[0], Normalize)
    assert torch.allclose(net[0](torch.full((1, 1, 2, 2), 0.5)), torch.full((1, 1, 2, 2), 1.0))
    assert {"0.mean", "0.std"} <= set(net.state_dict())


def test_local_weights_are_loaded(tmp_path: Path) -> None:
    source = build_backbone("resnet18", 3, 1000, 224)
    path = tmp_path / "imagenet_like.pth"
    torch.save(source.state_dict(), path)
    net = build_backbone("resnet18", 3, 4, 224, weights=path)
    assert torch.equal(net.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert net.fc.out_features == 4
    grey = build_backbone("resnet18", 1, 4, 224, weights=path)  # RGB stem averaged into one channel
    assert torch.allclose(grey.conv1.weight, source.conv1.weight.mean(1, keepdim=True) * 3)


def test_bad_architecture_and_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        build_backbone("vgg", 1, 2, 28)
    with pytest.raises(FileNotFoundError, match="model weights not found"):
        build_backbone("resnet18", 1, 2, 28, weights=tmp_path / "none.pth")
