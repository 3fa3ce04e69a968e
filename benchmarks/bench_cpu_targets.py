"""What a CPU target's quantization choices cost in ONNX Runtime: INT8 latency against FP32, per placement and signedness.

    python benchmarks/bench_cpu_targets.py            # MobileNetV3-small (the student, also with ReLU) and ResNet-18, 96 px
    python benchmarks/bench_cpu_targets.py --quick    # one model, few runs: a wiring check, no result written

For each network (random weights: latency does not depend on them), the FP32 ONNX model and INT8 QDQ models
calibrated on the same random images: the ``cpu_x86`` and ``cpu_arm`` profiles of
:mod:`dms_lightning.quant.targets`, and the choices they are made of taken one at a time (every tensor
quantized as for an NPU, signed int8 activations, depthwise convs left in float, 7-bit weights). Batch-1 p50
latency, 1 intra-op thread, sessions interleaved round by round, and the ratio to FP32 in the same run. The
profile's choices are judged by these ratios on the CPU named in the table (AVX2 and AVX-512 VNNI machines
differ most on signed activations). A model named ``backbone:relu`` is that backbone with ``activation="relu"``
(hard-swish replaced by ReLU, :func:`dms_lightning.models.backbones.use_relu`). A second table times a MobileNet
stem alone (3×3 over 1, 3, 8 and 16 channels) with its first conv integer or float, what the ``cpu_x86`` profile's
``min_integer_reduction`` rests on. Writes ``benchmarks/results/cpu_targets.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_quant import latencies  # noqa: E402

from dms_lightning import DMSClassifier  # noqa: E402
from dms_lightning.export import export_onnx  # noqa: E402
from dms_lightning.export.qdq import export_qdq_onnx  # noqa: E402
from dms_lightning.quant import post_training_quantize  # noqa: E402
from dms_lightning.quant.targets import target_profile  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def variants() -> dict[str, object]:
    x86, arm = target_profile("cpu_x86"), target_profile("cpu_arm")
    return {
        "target cpu_x86 (every tensor, uint8 act., int8 per-channel w.)": x86.config(),
        "target cpu_arm (every tensor, int8 act.)": arm.config(),
        "cpu_x86 but only conv inputs / outputs quantized (placement fused)": x86.config(placement="fused"),
        "cpu_x86 but int8 (signed) activations": x86.config(symmetric_activations=True),
        "cpu_x86 but depthwise convs in float": x86.config(quantize_depthwise=False),
        "cpu_x86 with 7-bit weights (reduce_range)": x86.config(weight_bits=7),
        "cpu_x86 but the image stem quantized too (min_integer_reduction=0)": x86.config(min_integer_reduction=0),
        "cpu_x86 but a 7×7 stem in float too (min_integer_reduction=64)": x86.config(min_integer_reduction=64),
    }


def stem_network(channels: int, kernel: int) -> torch.nn.Module:
    """A MobileNet stem: a stride-2 conv from the image, then a depthwise and a pointwise conv."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(channels, 16, kernel, 2, kernel // 2), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 1)).eval()


STEMS = ((1, 3), (3, 3), (8, 3), (16, 3))  # (image channels, kernel)


def stem_rows(work: Path, image_size: int, rounds: int, runs: int) -> list[dict]:
    """Latency of the stem block: all-float, all-integer, and integer with the first conv in float."""
    x86 = target_profile("cpu_x86")
    rows = []
    for channels, kernel in STEMS:
        network, example = stem_network(channels, kernel), torch.zeros(1, channels, image_size, image_size)
        calibration = [torch.randn(8, channels, image_size, image_size)]
        paths = {"FP32": export_onnx(network, example, work / f"stem{channels}k{kernel}_fp32.onnx")}
        for name, keep in (("INT8, first conv integer", 0), ("INT8, first conv float", channels * kernel ** 2 + 1)):
            model = post_training_quantize(network, calibration, x86.config(min_integer_reduction=keep))
            paths[name] = export_qdq_onnx(model, example, work / f"stem{channels}k{kernel}_{keep}.onnx")
        p50 = latencies(paths, rounds, runs, image_size, channels=channels)
        rows += [{"channels": channels, "kernel": kernel, "reduction": channels * kernel ** 2, "variant": name,
                  "p50_us": value * 1e3, "ratio": value / p50["FP32"]} for name, value in p50.items()]
        print(f"stem {channels} ch {kernel}x{kernel}: "
              + ", ".join(f"{n} {v * 1e3:.1f} us" for n, v in p50.items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mobilenet_v3_small,mobilenet_v3_small:relu,resnet18",
                        help="backbone names, each optionally ':relu' (activation='relu')")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.models, args.rounds, args.runs = "mobilenet_v3_small:relu", 2, 5
    torch.manual_seed(0)
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench_cpu_targets_"))
    example = torch.zeros(1, 1, args.image_size, args.image_size)
    calibration = [torch.randn(16, 1, args.image_size, args.image_size) for _ in range(2)]
    rows = []
    for backbone in args.models.split(","):
        name_only, _, activation = backbone.partition(":")
        network = DMSClassifier(name_only, image_size=args.image_size, activation=activation or "default").model.eval()
        stem = backbone.replace(":", "_")
        paths = {"FP32": export_onnx(network, example, work / f"{stem}_fp32.onnx")}
        for index, (name, config) in enumerate(variants().items()):
            model = post_training_quantize(network, calibration, config)
            paths[name] = export_qdq_onnx(model, example, work / f"{stem}_{index}.onnx")
        p50 = latencies(paths, args.rounds, args.runs, args.image_size)
        for name, value in p50.items():
            rows.append({"model": backbone, "variant": name, "p50_ms": value, "ratio": value / p50["FP32"]})
            print(f"{backbone:20s} {name:58s} {value:7.3f} ms  {value / p50['FP32']:.2f}x FP32", flush=True)
    stems = stem_rows(work, args.image_size, args.rounds, args.runs)
    info = {"machine": machine_info(), "image_size": args.image_size, "rounds": args.rounds, "runs": args.runs,
            "wall_minutes": (time.time() - started) / 60}
    if args.quick:
        return
    lines = ["# CPU targets: INT8 latency against FP32 in ONNX Runtime (`benchmarks/bench_cpu_targets.py`)\n",
             f"Machine: {machine_summary(info['machine'])}.\n",
             f"Input 1×1×{args.image_size}×{args.image_size}, batch 1, 1 intra-op thread, p50 over {args.rounds} "
             f"interleaved rounds of {args.runs} runs; ratio to the FP32 model in the same run (< 1: INT8 is "
             f"faster). Wall time {info['wall_minutes']:.1f} min.\n",
             "| model | variant | p50 ms | × FP32 |", "|---|---|---:|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['p50_ms']:.3f} | {r['ratio']:.2f} |" for r in rows]
    lines += ["", "## The image stem: integer or float first conv", "",
              f"A MobileNet stem alone (stride-2 conv from the image, BatchNorm, ReLU, depthwise 3×3, pointwise "
              f"1×1; 16 channels), {args.image_size} px, batch 1, same rounds. Reduction: the length of the first conv's dot "
              "products (image channels × kernel area). `cpu_x86` keeps spatial convs reducing over fewer than "
              f"{target_profile('cpu_x86').min_integer_reduction} values in float (`min_integer_reduction`).", "",
              "| image channels | kernel | reduction | variant | p50 µs | × FP32 |", "|---:|---:|---:|---|---:|---:|"]
    lines += [f"| {r['channels']} | {r['kernel']}×{r['kernel']} | {r['reduction']} | {r['variant']} | "
              f"{r['p50_us']:.1f} | {r['ratio']:.2f} |" for r in stems]
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / "cpu_targets.json", {"info": info, "rows": rows, "stem_rows": stems})
    write_text_atomic(RESULTS / "cpu_targets.md", "\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'cpu_targets.md'}")


if __name__ == "__main__":
    main()
