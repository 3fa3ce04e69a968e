"""What pruning did to a network: sparsity per layer and overall, parameters and MACs, a bar chart.

Every tensor is counted once: parameters shared between modules (tied weights) or reachable under two
names are de-duplicated by identity, unlike Lightning's ``ModelPruning`` which counts a re-parametrised
weight once as ``weight_orig`` and again as ``weight`` (Lightning issue #13595). Names are the float
network's (:func:`~dms_lightning.utils.compression.named_float_parameters`), also while quantization-aware
training runs the network as its fake-quantized twin, so pruning's masks and reports keep matching.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dms_lightning.pruning.graph import PRUNABLE_TYPES
from dms_lightning.utils.compression import named_float_modules, named_float_parameters


@dataclass
class SparsityReport:
    """Zeros in the pruned layers' weights, the whole network's parameters, and its cost."""

    layer_sparsity: dict[str, float] = field(default_factory=dict)
    sparsity: float = 0.0  # over the weights of the layers the callback prunes
    model_sparsity: float = 0.0  # over every parameter of the network
    params: int = 0  # all parameters (dense count)
    nonzero_params: int = 0
    macs: int = 0  # dense multiply-accumulates of Conv/Linear layers for one input
    nonzero_macs: int = 0  # MACs that touch a non-zero weight: what zero-skipping hardware executes

    def metrics(self, prefix: str = "pruning/") -> dict[str, float]:
        return {f"{prefix}sparsity": self.sparsity, f"{prefix}model_sparsity": self.model_sparsity,
                f"{prefix}params": float(self.params), f"{prefix}nonzero_params": float(self.nonzero_params),
                f"{prefix}macs": float(self.macs), f"{prefix}nonzero_macs": float(self.nonzero_macs)}


def unique_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Parameters by (float-network) name, each tensor once."""
    return dict(named_float_parameters(model))


@torch.no_grad()
def layer_output_positions(model: nn.Module, example_input: Tensor) -> dict[str, int]:
    """For each Conv/Linear layer, how many output positions one input produces (H·W for a conv, 1 for a Linear)."""
    positions: dict[str, int] = {}

    def hook(name):
        def record(module, _inputs, output):
            channels = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
            positions[name] = positions.get(name, 0) + output[:1].numel() // max(1, channels)
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in named_float_modules(model) if isinstance(m, PRUNABLE_TYPES)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1].detach().to(device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return positions


def count_module_macs(model: nn.Module, example_input: Tensor,
                      positions: Mapping[str, int] | None = None) -> tuple[int, int]:
    """``(dense MACs, MACs on non-zero weights)`` of the Conv/Linear layers for one input."""
    positions = positions if positions is not None else layer_output_positions(model, example_input)
    dense = nonzero = 0
    for name, module in named_float_modules(model):
        if name in positions and isinstance(module, PRUNABLE_TYPES):
            # Each output position multiplies every weight of its filter once (groups included).
            per_output_channel = module.weight.numel() // module.weight.shape[0]
            channels = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
            dense += positions[name] * channels * per_output_channel
            nonzero += positions[name] * int(torch.count_nonzero(module.weight))
    return dense, nonzero


@torch.no_grad()
def sparsity_report(model: nn.Module, pruned_tensors: Iterable[str], example_input: Tensor | None = None,
                    positions: Mapping[str, int] | None = None) -> SparsityReport:
    """Sparsity of ``pruned_tensors`` (parameter names) one by one and together, plus size and MACs."""
    params = unique_parameters(model)
    report = SparsityReport()
    zeros = total = 0
    for name in pruned_tensors:
        if name not in params:
            continue
        tensor = params[name]
        nz = int(torch.count_nonzero(tensor))
        report.layer_sparsity[name] = 1.0 - nz / max(1, tensor.numel())
        zeros += tensor.numel() - nz
        total += tensor.numel()
    report.sparsity = zeros / total if total else 0.0
    report.params = sum(p.numel() for p in params.values())
    report.nonzero_params = sum(int(torch.count_nonzero(p)) for p in params.values())
    report.model_sparsity = 1.0 - report.nonzero_params / max(1, report.params)
    if example_input is not None or positions is not None:
        report.macs, report.nonzero_macs = count_module_macs(model, example_input, positions)
    return report


def layer_sparsity_figure(layer_sparsity: Mapping[str, float], title: str = "per-layer sparsity"):
    """A horizontal bar per pruned tensor (network order), sparsity on the x axis."""
    from dms_lightning.utils.plotting import plt

    names = list(layer_sparsity)
    values = [layer_sparsity[n] for n in names]
    height = max(2.5, 0.18 * len(names) + 1.2)
    fig, ax = plt.subplots(figsize=(7.5, height))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("fraction of zero weights")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig
