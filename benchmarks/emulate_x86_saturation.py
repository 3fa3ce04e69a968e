"""What ONNX Runtime's default INT8 kernels on an x86 CPU without VNNI would do to the main job's student.

On such a CPU (AVX2, or AVX-512 without VNNI) ONNX Runtime multiplies uint8 activations by int8 weights with
``vpmaddubsw``: adjacent products along the reduction are added in pairs into int16, which saturates at ±32767,
before the pairs are summed in int32. A VNNI CPU, an NPU and LiteRT sum every product exactly. A machine with
VNNI cannot run the saturating kernels, so this script emulates them on the fake-quantized network of a main-job
checkpoint: for every integer conv (without groups: ONNX Runtime's depthwise kernel does not pair products) and
linear layer it recovers the integer activations and weights, sums the products pairwise in the order of ONNX
Runtime's NHWC im2col (kernel row, kernel column, input channel), clamps each pair to int16, and adds the
difference, times the two scales, to the layer's exact output. Test top-1 with and without, and which layers
saturate.

    python benchmarks/emulate_x86_saturation.py --artifacts /path/to/pipeline-run

reads ``artifacts/distill/last.ckpt`` there (the data settings come from the checkpoint) and writes
``benchmarks/results/x86_saturation.md`` and ``.json``. About 2.5 min on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dms_lightning import DistillationModule, DMSDataModule  # noqa: E402
from dms_lightning.quant.fake_quant import FakeQuantizer  # noqa: E402
from dms_lightning.quant.modules import QUANTIZED_LAYERS  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.utils.checkpoint import compression_target, load_checkpoint  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

INT16 = (-32768, 32767)


def input_quantizers(network: torch.fx.GraphModule) -> dict[str, FakeQuantizer]:
    """The activation quantizer that feeds each integer layer (through range-preserving ops)."""
    modules = dict(network.named_modules())
    found = {}
    for node in network.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), QUANTIZED_LAYERS):
            source = node.args[0]
            while source.op == "call_module" and not isinstance(modules.get(source.target), FakeQuantizer):
                source = source.args[0]
            if source.op == "call_module":
                found[str(node.target)] = modules[source.target]
    return found


def pair_excess(activations: torch.Tensor, weights: torch.Tensor, counts: dict, name: str) -> torch.Tensor:
    """Sum over pairs of (int16-saturated pair sum - exact pair sum): ``(..., K)`` x ``(C, K)`` -> ``(..., C)``."""
    if activations.shape[-1] % 2:
        activations, weights = F.pad(activations, (0, 1)), F.pad(weights, (0, 1))
    pairs_a = activations.reshape(*activations.shape[:-1], -1, 2)
    pairs_w = weights.reshape(weights.shape[0], -1, 2).permute(1, 0, 2)  # (P, C, 2)
    out = []
    for start in range(0, pairs_w.shape[1], 64):  # output channels in chunks: (..., P, c) fits in memory
        sums = (pairs_a.unsqueeze(-2) * pairs_w[:, start:start + 64]).sum(-1)
        clamped = sums.clamp(*INT16)
        counts[name] = counts.get(name, 0) + int((clamped != sums).sum())
        counts["pairs"] = counts.get("pairs", 0) + sums.numel()
        out.append((clamped - sums).sum(-2))
    return torch.cat(out, -1)


def emulate(layer: torch.nn.Module, quantizer: FakeQuantizer, x: torch.Tensor, y: torch.Tensor, counts: dict,
            name: str) -> torch.Tensor:
    """``y`` (the layer's exact fake-quant output for ``x``) plus what saturating pair sums would change."""
    conv = getattr(layer, "conv", None)
    if conv is not None and conv.groups != 1:
        return y
    scale_a, zero_a = float(quantizer.scale), int(quantizer.zero_point)
    weight, _ = layer.deploy_weight_and_bias()
    scale_w = layer.weight_quantizer.scale.detach()
    shape = (-1,) + (1,) * (weight.dim() - 1)
    weight_int = torch.round(layer.weight_quantizer(weight).detach() / scale_w.reshape(shape))
    q = torch.round(x.detach() / scale_a) + zero_a  # the uint8 activations the kernel reads
    if conv is None:  # linear
        return y + scale_a * scale_w * pair_excess(q, weight_int, counts, name)
    area = conv.kernel_size[0] * conv.kernel_size[1]
    columns = F.unfold(q, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, Cin * area, L)
    n, _, length = columns.shape
    columns = columns.reshape(n, conv.in_channels, area, length).permute(0, 3, 2, 1)  # NHWC im2col order
    inside = F.unfold(torch.ones_like(q[:1, :1]), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    padding = (inside.reshape(1, area, length).permute(0, 2, 1) == 0).unsqueeze(-1)
    columns = torch.where(padding, torch.full_like(columns, zero_a), columns).reshape(n, length, -1)  # pad = zero point
    weights = weight_int.permute(0, 2, 3, 1).reshape(weight_int.shape[0], -1)
    excess = pair_excess(columns, weights, counts, name).permute(0, 2, 1).reshape(y.shape)
    return y + scale_a * scale_w.reshape(1, -1, 1, 1) * excess


def accuracy(network, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels, *_ in loader:
            correct += int((network(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True, help="a folder where `python -m dms_lightning pipeline` ran")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/x86_saturation"))
    args = parser.parse_args()
    started = time.time()
    path = Path(args.artifacts) / "artifacts" / "distill" / "last.ckpt"
    checkpoint = load_checkpoint(path, "--artifacts")
    module = DistillationModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    network = compression_target(module).eval()
    data = {k: v for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")}
    datamodule = DMSDataModule(**data)
    datamodule.setup("test")
    quantizers = input_quantizers(network)
    counts: dict[str, int] = {}
    enabled = [False]
    for name, layer in network.named_modules():
        if name in quantizers:
            def hook(layer, inputs, output, name=name):
                return emulate(layer, quantizers[name], inputs[0], output, counts, name) if enabled[0] else output
            layer.register_forward_hook(hook)
    exact = accuracy(network, datamodule.test_dataloader())
    enabled[0] = True
    saturated = accuracy(network, datamodule.test_dataloader())
    pairs = counts.pop("pairs", 0)
    worst = sorted(counts.items(), key=lambda item: -item[1])
    info = {"machine": machine_info(), "checkpoint": str(path), "test_images": len(datamodule.test_dataloader().dataset),
            "wall_minutes": (time.time() - started) / 60}
    result = {"info": info, "accuracy_exact": exact, "accuracy_saturating": saturated, "pair_sums": pairs,
              "saturated_pair_sums": sum(counts.values()), "saturated_by_layer": dict(worst)}
    lines = ["# ONNX Runtime's INT8 kernels on x86 without VNNI, emulated (`benchmarks/emulate_x86_saturation.py`)\n",
             f"Checkpoint: `{path}`; {info['test_images']} test images; emulated on {machine_summary(info['machine'])}, "
             f"{info['wall_minutes']:.1f} min.\n",
             "| arithmetic | test top-1 |", "|---|---:|",
             "| exact integer products (the fake-quant network: what VNNI CPUs, NPUs, LiteRT and "
             f"`session.x64quantprecision=1` compute, up to rounding) | {100 * exact:.2f} % |",
             f"| u8 × s8 pairs saturated to int16 (`vpmaddubsw`: AVX2, AVX-512 without VNNI) | {100 * saturated:.2f} % |",
             "",
             f"{result['saturated_pair_sums']:,} of {pairs:,} pair sums saturate "
             f"({100 * result['saturated_pair_sums'] / max(pairs, 1):.3f} %). By layer (most first):", "",
             "| layer | saturated pair sums |", "|---|---:|"]
    lines += [f"| `{name}` | {count:,} |" for name, count in worst[:10] if count]
    output = Path(args.output)
    write_json_atomic(output.with_suffix(".json"), result)
    write_text_atomic(output.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
