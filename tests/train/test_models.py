"""Networks: every architecture runs forward for 1 and 3 channels, small and large inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from train.models import ARCHITECTURES, Ensemble, FusedEnsemble, Normalize, build_backbone, build_network, for_export
from train.module import ClassificationModule, ensemble_of


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


def test_ensemble_averages_independent_members_and_the_mirror_view() -> None:
    torch.manual_seed(0)
    net = build_network("resnet18", 1, 2, 28, [0.5], [0.25], members=3, tta="hflip", width=8).eval()
    ensemble = net[1]
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 3
    w = [m.conv1.weight for m in ensemble.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # independently initialised
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        z = net[0](x)
        per_member = torch.stack([m(z) for m in ensemble.members])
        mirrored = torch.stack([m(z.flip(-1)) for m in ensemble.members])
        assert torch.allclose(net(x), (per_member.mean(0) + mirrored.mean(0)) / 2, atol=1e-6)
        net.train()  # training sees the plain member mean (no test-time views)
        assert torch.allclose(ensemble(z), ensemble.member_logits(z).mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="test-time augmentation 'rot90'"):
        build_network("smallcnn", 1, 2, 28, [0.5], [0.25], members=2, tta="rot90")
    with pytest.raises(ValueError, match="members must be >= 1"):
        build_network("smallcnn", 1, 2, 28, [0.5], [0.25], members=0)


@pytest.mark.parametrize("arch", ["resnet18", "smallcnn"])
def test_fused_ensemble_is_one_head_over_averaged_features(arch: str) -> None:
    """Export's form: the same logits, its last linear layer is the ensemble's head, the trained net is untouched."""
    torch.manual_seed(1)
    net = build_network(arch, 3, 4, 28, [0.5] * 3, [0.25] * 3, members=2, tta="hflip", width=8).eval()
    fused = for_export(net).eval()
    assert isinstance(fused[1], FusedEnsemble) and isinstance(net[1], Ensemble)
    x = torch.rand(5, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(fused(x), net(x), atol=1e-5)
        features = fused[1].features(fused[0](x))
    linears = [m for m in fused.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [fused[1].head] and features.shape[1] == fused[1].head.in_features
    assert sum(m.in_features for m in net.modules() if isinstance(m, torch.nn.Linear)) == features.shape[1]
    single = build_network(arch, 3, 4, 28, [0.5] * 3, [0.25] * 3, width=8)
    assert for_export(single) is single  # plain networks pass through


def test_each_member_learns_from_its_own_loss() -> None:
    """The ensemble's training loss is the mean of the members' losses: a member's gradient is its own loss's
    gradient over the number of members, whatever the other members predict."""
    torch.manual_seed(2)
    module = ClassificationModule(2, 1, 28, [0.5], [0.25], net={"arch": "smallcnn", "width": 8, "members": 2},
                                  channels_last=False)
    ensemble = ensemble_of(module.net)
    assert ensemble is not None
    x, y = torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 0, 1, 1, 0])
    step_loss = module.training_step((x, y), 0)
    loss = torch.stack([module._loss(z, y) for z in ensemble.member_logits(module.net[0](x))]).mean()
    assert torch.allclose(step_loss, loss, atol=1e-6)
    loss.backward()
    got = ensemble.members[0].head[-1].weight.grad.clone()
    module.zero_grad()
    (module._loss(ensemble.members[0](module.net[0](x)), y) / 2).backward()
    assert torch.allclose(got, ensemble.members[0].head[-1].weight.grad, atol=1e-6)
