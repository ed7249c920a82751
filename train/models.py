"""Classification networks: torchvision ResNets adapted to medical inputs, and a small CNN.

Every network built here takes float32 NCHW input in [0, 1] (uint8 intensity / 255, the contract
defined in :mod:`medops.io`) and starts with a :class:`Normalize` layer holding the training-split
mean and std as buffers, so the normalisation travels inside checkpoints and exported graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

RESNETS: dict[str, tuple[type[nn.Module], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}
ARCHITECTURES = (*RESNETS, "smallcnn")
SMALL_INPUT_MAX_SIZE = 64


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """A VGG-style CNN: three stages of two 3x3 conv-BN-ReLU blocks, then global pooling."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, out in enumerate((width, width * 2, width * 4)):
            for _ in range(2):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
                channels = out
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class WidthResNet(ResNet):
    """torchvision's ResNet with a configurable base width (64 is the standard network)."""

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int, width: int) -> None:
        super().__init__(block, layers, num_classes=num_classes)  # type: ignore[arg-type]
        if width == 64:
            return
        # Rebuild the stages with scaled widths; torchvision hard-codes 64-128-256-512.
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, layers[0])  # type: ignore[arg-type]
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)  # type: ignore[arg-type]
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)  # type: ignore[arg-type]
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)  # type: ignore[arg-type]
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)  # type: ignore[attr-defined]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _adapt_stem(net: ResNet, in_channels: int, small_input: bool) -> None:
    """Swap the stem for the input's channel count; for small images use a 3x3 stride-1 stem, no max-pool."""
    old = net.conv1
    out = old.out_channels
    if small_input:
        net.conv1 = nn.Conv2d(in_channels, out, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    elif in_channels != old.in_channels:
        net.conv1 = nn.Conv2d(in_channels, out, 7, 2, 3, bias=False)
        with torch.no_grad():  # keep pretrained filters meaningful: average (or tile) the RGB kernels
            mean_kernel = old.weight.mean(dim=1, keepdim=True)
            net.conv1.weight.copy_(mean_kernel.repeat(1, in_channels, 1, 1) * (3 / in_channels))


def _load_weights(net: nn.Module, weights: str | Path) -> None:
    """Load a local state dict (torchvision ``.pth`` or a Lightning checkpoint), skipping mismatched heads."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor in these weights matches the network's parameters")
    net.load_state_dict(usable, strict=False)


def build_backbone(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    *,
    width: int = 64,
    small_input: bool | str = "auto",
    dropout: float = 0.0,
    weights: str | Path | None = None,
) -> nn.Module:
    """Build the classification network (without normalisation) for the given input geometry."""
    if arch == "smallcnn":
        net: nn.Module = SmallCNN(in_channels, num_classes, width=width, dropout=dropout)
    elif arch in RESNETS:
        block, layers = RESNETS[arch]
        resnet = WidthResNet(block, layers, num_classes=1000 if weights else num_classes, width=width)
        if weights:
            _load_weights(resnet, weights)  # loaded with the original stem and head, then adapted
            resnet.fc = nn.Linear(resnet.fc.in_features, num_classes)
        small = image_size <= SMALL_INPUT_MAX_SIZE if small_input == "auto" else bool(small_input)
        _adapt_stem(resnet, in_channels, small)
        if dropout > 0:
            resnet.fc = nn.Sequential(nn.Dropout(dropout), resnet.fc)  # type: ignore[assignment]
        net = resnet
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return net


def build_network(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    **kwargs: object,
) -> nn.Sequential:
    """Normalisation followed by the backbone: the whole graph that is trained and exported."""
    backbone = build_backbone(arch, in_channels, num_classes, image_size, **kwargs)  # type: ignore[arg-type]
    return nn.Sequential(Normalize(mean, std), backbone)


