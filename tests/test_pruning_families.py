"""30 % channel pruning + physical removal across the torchvision classification families.

For each family: the masked network and the physically smaller one compute the same logits, the smaller
one has fewer parameters, and its ONNX export matches PyTorch in ONNX Runtime (max abs diff <= 1e-4).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

from dms_lightning.export import export_onnx
from dms_lightning.models.backbones import build_backbone
from dms_lightning.pruning import UntraceableModelError, prune_channels, remove_pruned_channels

# (name, input side): VGG's AdaptiveAvgPool2d(7) exports to ONNX only from a 7×7 (224 px) feature map.
FAMILIES = [
    ("resnet18", 32), ("mobilenet_v2", 32), ("mobilenet_v3_small", 32), ("mobilenet_v3_large", 32),
    ("efficientnet_b0", 32), ("regnet_x_400mf", 32), ("shufflenet_v2_x0_5", 32), ("mnasnet0_5", 32),
    ("squeezenet1_1", 32), ("googlenet", 32), ("resnext50_32x4d", 32),
    pytest.param("densenet121", 32, marks=pytest.mark.slow),
    pytest.param("wide_resnet50_2", 32, marks=pytest.mark.slow),
    pytest.param("convnext_tiny", 32, marks=pytest.mark.slow),
    pytest.param("vgg11", 224, marks=pytest.mark.slow),
]
# LayerNorm normalises over channels, so zeroed channels still shift its statistics: removing them
# changes ConvNeXt's output slightly (it is fine-tuned afterwards). Everything else is exact.
CHANNEL_STATISTICS_FAMILIES = {"convnext_tiny"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two OpenMP threads on two shared, busy cores are ~50x slower than one (module scope: it must
    # also hold while module-scoped fixtures train).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build(name: str) -> tuple[torch.nn.Module, int]:
    torch.manual_seed(0)
    if name.startswith("squeezenet"):  # its classifier is a Conv2d, which build_backbone does not adapt
        return torchvision.models.get_model(name, num_classes=5), 3
    return build_backbone(name, num_classes=5, in_channels=1), 1


@pytest.mark.parametrize(("name", "size"), FAMILIES)
def test_channel_removal_shrinks_family_and_onnx_matches(name, size, tmp_path):
    model, channels = _build(name)
    model.eval()
    x = torch.randn(2, channels, size, size)
    chosen, _ = prune_channels(model, x[:1], 0.3, remove=False)
    with torch.no_grad():
        masked = model(x)
    params_before = sum(p.numel() for p in model.parameters())

    report = remove_pruned_channels(model, x[:1])  # finds the zeroed channels by itself

    assert report.removed_channels == {k: len(v) for k, v in chosen.items() if v}
    assert sum(p.numel() for p in model.parameters()) == report.params_after < params_before
    with torch.no_grad():
        pruned = model(x)
    assert pruned.shape == (2, 5)
    if name not in CHANNEL_STATISTICS_FAMILIES:
        torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=1e-4)
    path = export_onnx(model, x[:1], tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(onnx_out - pruned.numpy()).max() <= 1e-4


class _LeavesAutograd(torch.nn.Module):
    """A network whose forward pass goes through NumPy: no autograd graph to trace channels through."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.fc = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x).mean((2, 3))
        return self.fc(torch.from_numpy(features.detach().numpy() if not features.requires_grad
                                        else features.numpy()))


def test_untraceable_model_is_reported_clearly():
    with pytest.raises(UntraceableModelError, match="cannot trace _LeavesAutograd"):
        remove_pruned_channels(_LeavesAutograd(), torch.zeros(1, 1, 8, 8))


class _UnequalSplit(torch.nn.Module):
    """A 1-channel slice of the stem feeds its own conv, like MobileViT-v2's query."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.query = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(1, 4, 1)
        self.rest, self.fc = torch.nn.Conv2d(7, 4, 1), torch.nn.Linear(4, 3)

    def forward(self, x):
        query, rest = self.stem(x).split([1, 7], dim=1)
        return self.fc((self.query(query) + self.rest(rest)).mean((2, 3)))


def test_explicit_channels_of_a_group_automatic_removal_skips_are_refused():
    # remove_pruned_channels(pruned_channels=...) applies the rules prunable_groups does: channels through an
    # unequal split (sizes fixed in the forward code), the classifier's logits, or a layer the caller keeps are
    # refused with the layer and the reason, before anything is changed.
    net = _UnequalSplit().eval()
    images = torch.randn(2, 1, 16, 16)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"pruned_channels\['stem'\]: its channel group passes through a split "
                                         r"into unequal parts \[1, 7\]"):
        remove_pruned_channels(net, images[:1], pruned_channels={"stem": [0, 3]})
    with pytest.raises(ValueError, match=r"pruned_channels\['fc'\]: the outputs of 'fc' are the network's outputs"):
        remove_pruned_channels(net, images[:1], pruned_channels={"fc": [0]})
    with pytest.raises(ValueError, match=r"removes output channels of \['query'\], which ignored_layers keeps"):
        remove_pruned_channels(net, images[:1], pruned_channels={"rest": [0]}, ignored_layers=["query"])
    with pytest.raises(ValueError, match=r"channel indices \[9\] are outside 0\.\.3"):
        remove_pruned_channels(net, images[:1], pruned_channels={"rest": [9]})
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_removal_never_leaves_a_coupled_layer_without_channels(monkeypatch):
    # The last guard, for a coupling pattern the group rules do not know: a removal that would empty a coupled
    # layer is skipped with a warning, the network intact.
    import dms_lightning.pruning.removal as removal

    monkeypatch.setattr(removal, "group_refusal", lambda graph, group, channels: (None, 1))
    net = _UnequalSplit().eval()
    images = torch.randn(2, 1, 16, 16)
    with pytest.warns(UserWarning, match="would leave 'query' \\(1 channels\\) with none"):
        report = remove_pruned_channels(net, images[:1], pruned_channels={"stem": [0, 3]})
    assert report.removed_channels == {}
    assert net.query.in_channels == 1 and net(images).shape == (2, 3)
