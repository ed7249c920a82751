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


TTA_MODES = ("none", "hflip")


class Ensemble(nn.Module):
    """``members`` independently initialised networks trained side by side, averaged, with optional test-time
    augmentation: a deep ensemble (Lakshminarayanan et al., NeurIPS 2017) in one module, so that it trains,
    checkpoints, calibrates and exports as one model.

    Each member keeps its own classifier head; training optimises every member on its own loss
    (:meth:`member_logits`, see :class:`train.module.ClassificationModule`), so the members do not co-adapt. The
    ensemble's logits are the mean of the members' logits; in eval mode with ``tta="hflip"`` they are also averaged
    over the image and its horizontal mirror. Because the heads are linear, both averages equal one linear head over
    the averaged, concatenated penultimate features: :meth:`fused` builds that form for export, whose last
    ``nn.Linear`` is the ensemble's head and whose features feed the out-of-distribution score.
    """

    def __init__(self, members: list[nn.Module], tta: str = "none") -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise ValueError(f"unknown test-time augmentation {tta!r}; choose one of {', '.join(TTA_MODES)}")
        self.members = nn.ModuleList(members)
        self.tta = tta

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every member, [members, N, K] (no test-time augmentation)."""
        return torch.stack([member(x) for member in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.member_logits(x).mean(0)
        if self.tta == "hflip" and not self.training:
            logits = (logits + self.member_logits(x.flip(-1)).mean(0)) / 2
        return logits

    def fused(self) -> FusedEnsemble:
        """The same function as one body and one linear head (for export; see the class docstring)."""
        return FusedEnsemble(self)


class FusedEnsemble(nn.Module):
    """:class:`Ensemble` as ``head(mean over TTA views of concat(member features))``; equal to it in eval mode.

    The head's weight is the members' head weights side by side, each divided by the number of members, its bias
    the mean of theirs: ``sum_i W_i f_i / M + mean_i b_i`` is the mean of the members' logits.
    """

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        import copy

        members = [copy.deepcopy(m) for m in ensemble.members]
        heads = [_detach_last_linear(m) for m in members]
        n = len(members)
        self.members = nn.ModuleList(members)
        self.tta = ensemble.tta
        self.head = nn.Linear(sum(h.in_features for h in heads), heads[0].out_features)
        with torch.no_grad():
            self.head.weight.copy_(torch.cat([h.weight for h in heads], dim=1) / n)
            self.head.bias.copy_(torch.stack([h.bias for h in heads]).mean(0))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated penultimate features of the members, averaged over the test-time views."""
        feats = torch.cat([m(x).flatten(1) for m in self.members], dim=1)
        if self.tta == "hflip":
            flipped = x.flip(-1)
            feats = (feats + torch.cat([m(flipped).flatten(1) for m in self.members], dim=1)) / 2
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _detach_last_linear(net: nn.Module) -> nn.Linear:
    """Replace the last ``nn.Linear`` of ``net`` (in module order) by ``nn.Identity`` and return it."""
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(net).__name__} has no nn.Linear head to fuse")
    parent_name, _, child = names[-1].rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    head = getattr(parent, child)
    setattr(parent, child, nn.Identity())
    return head


def for_export(net: nn.Module) -> nn.Module:
    """``net`` with every :class:`Ensemble` in it replaced by its :class:`FusedEnsemble` (a copy; other networks
    are returned as they are)."""
    if not any(isinstance(m, Ensemble) for m in net.modules()):
        return net
    import copy

    clone = copy.deepcopy(net)
    for name, module in list(clone.named_modules()):
        if isinstance(module, Ensemble):
            parent_name, _, child = name.rpartition(".")
            parent = clone.get_submodule(parent_name) if parent_name else clone
            setattr(parent, child, module.fused())
    return clone


def build_network(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    members: int = 1,
    tta: str = "none",
    **kwargs: object,
) -> nn.Sequential:
    """Normalisation followed by the backbone: the whole graph that is trained and exported. ``members > 1`` or
    ``tta != "none"`` builds an :class:`Ensemble` of independently initialised backbones."""
    if members < 1:
        raise ValueError(f"model.net.members must be >= 1, got {members}")
    if members == 1 and tta == "none":
        backbone = build_backbone(arch, in_channels, num_classes, image_size, **kwargs)  # type: ignore[arg-type]
        return nn.Sequential(Normalize(mean, std), backbone)
    nets = [build_backbone(arch, in_channels, num_classes, image_size, **kwargs)  # type: ignore[arg-type]
            for _ in range(members)]
    return nn.Sequential(Normalize(mean, std), Ensemble(nets, tta=tta))


