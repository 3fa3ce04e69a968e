"""Automatic mixed precision (W8A16 where it matters) against uniform W8A8 PTQ with every calibrator.

    python benchmarks/bench_mixed_precision.py                       # trains a MobileNetV2, ~15 min on 2 cores
    python benchmarks/bench_mixed_precision.py --checkpoint m.ckpt   # a trained DMSClassifier checkpoint
    python benchmarks/bench_mixed_precision.py --quick               # smaller data, a wiring check

A MobileNetV2 (depthwise-heavy, ReLU6, the network PTQ papers use to show per-tensor weights failing) is
trained on the synthetic DMS set (96 px, 1 channel), BatchNorm statistics re-estimated. Then, from the same
float network and the same calibration images (the first validation batches):

* uniform W8A8 PTQ with per-channel and per-tensor weights, each calibrator (min-max, percentile, entropy, MSE);
* per-tensor and per-channel min-max after cross-layer equalization, with bias correction, and both
  (:mod:`dms_lightning.quant.equalization`); with AdaRound (:mod:`dms_lightning.quant.adaround`, ``--adaround-iterations``
  Adam steps per layer), alone and after CLE, before bias correction;
* automatic mixed precision (:func:`dms_lightning.quant.mixed_precision.select_mixed_precision`): layers promoted
  to W8A16 until the *validation* top-1 drop is within ``--budget`` points, at most ``--max-promoted`` of them,
  starting from each calibrator's uniform model (``--auto-calibrators``).

Every INT8 model is exported as QDQ ONNX and measured in ONNX Runtime on the whole test split (accuracy, Δ vs
FP32, size on disk, batch-1 p50 latency with 1 thread, sessions interleaved). 16-bit Q/DQ pairs run in float on
ONNX Runtime's CPU provider (there is no 16-bit integer kernel), so the latency column says what a CPU pays, not
what HTP pays. Writes ``benchmarks/results/mixed_precision.md`` and ``.json`` (``_quick`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quant import latencies, ort_accuracy, recalibrate_batch_norm, train_float  # noqa: E402

from dms_lightning import DMSClassifier, DMSDataModule  # noqa: E402
from dms_lightning.export import export_onnx  # noqa: E402
from dms_lightning.export.qdq import export_qdq_onnx  # noqa: E402
from dms_lightning.quant import CalibrationConfig, QuantizationConfig, post_training_quantize  # noqa: E402
from dms_lightning.quant.calibration import calibration_inputs  # noqa: E402
from dms_lightning.quant.mixed_precision import select_mixed_precision  # noqa: E402
from dms_lightning.quant.spec import QuantSpec  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")


def log(message: str) -> None:
    print(f"[bench_mixed_precision {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--checkpoint", help="a trained DMSClassifier checkpoint (skips training)")
    parser.add_argument("--save-checkpoint", help="where to save the trained float model")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration-batches", type=int, default=4, help="first validation batches (4 x 64 = 256)")
    parser.add_argument("--budget", type=float, default=0.5, help="max validation top-1 drop, points")
    parser.add_argument("--max-promoted", type=float, default=0.2, help="fraction of the quantized layers")
    parser.add_argument("--auto-calibrators", default=",".join(CALIBRATORS),
                        help="calibrators whose uniform W8A8 model the automatic selection starts from")
    parser.add_argument("--selection-batches", type=int, default=4, help="validation batches the selection measures")
    parser.add_argument("--adaround-iterations", type=int, default=500,
                        help="Adam steps per layer of the AdaRound rows (0: no AdaRound rows)")
    parser.add_argument("--relu6", default="clamp", choices=("clamp", "relu"),
                        help="what CLE makes of a ReLU6 inside an equalized pair (clamp: exact; relu: AIMET's choice)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.val_size, args.test_size, args.epochs, args.image_size = 640, 256, 256, 1, 64
        args.rounds, args.runs, args.adaround_iterations = 3, 10, 20
    torch.set_num_threads(2)
    started = time.time()
    datamodule = DMSDataModule(image_size=args.image_size, train_size=args.train_size, val_size=args.val_size,
                               test_size=args.test_size, batch_size=args.batch_size, augment=False)
    datamodule.setup("fit")
    datamodule.setup("test")
    work = Path(tempfile.mkdtemp(prefix="bench_mp_"))
    if args.checkpoint:
        saved = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        module = DMSClassifier(**saved["hyper_parameters"])  # what --save-checkpoint writes, or a Lightning one
        module.load_state_dict(saved["state_dict"])
        train_seconds = 0.0
    else:
        start = time.time()
        module = train_float(args.backbone, datamodule, args.epochs, args.lr, work, None)
        train_seconds = time.time() - start
        if args.save_checkpoint:
            torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
                       args.save_checkpoint)
    network = module.model.eval()
    recalibrate_batch_norm(network, datamodule.calibration_dataloader("train"))
    example = torch.zeros(1, 1, args.image_size, args.image_size)
    fp32_path = export_onnx(network, example, work / "fp32.onnx")
    test_loader = datamodule.test_dataloader()
    fp32_accuracy, _ = ort_accuracy(fp32_path, test_loader)
    log(f"FP32 {args.backbone}: test {100 * fp32_accuracy:.2f} %")
    calibration = calibration_inputs(datamodule.val_dataloader(), args.calibration_batches)
    val_loader = datamodule.val_dataloader()

    rows, paths = [], {"FP32": fp32_path}
    rows.append({"weights": "–", "method": "FP32", "setting": "float", "accuracy": fp32_accuracy,
                 "promoted": 0, "layers": None, "path": "FP32", "seconds": None})
    for weights, per_channel in (("per-channel", True), ("per-tensor", False)):
        config = QuantizationConfig(weight=QuantSpec(8, True, per_channel=per_channel))
        for method in CALIBRATORS:
            start = time.perf_counter()
            model = post_training_quantize(network, calibration, config, CalibrationConfig(method))
            seconds = time.perf_counter() - start
            name = f"{weights} {method}"
            path = export_qdq_onnx(model, example, work / f"{name.replace(' ', '_')}.onnx")
            accuracy, _ = ort_accuracy(path, test_loader)
            paths[name] = path
            rows.append({"weights": weights, "method": method, "setting": "uniform W8A8", "accuracy": accuracy,
                         "promoted": 0, "layers": None, "path": name, "seconds": seconds})
            log(f"{name}: {100 * accuracy:.2f} % ({seconds:.1f} s)")
        # Cross-layer equalization and bias correction (Nagel et al., 2019) on a copy: CLE changes the float
        # network in place (each ReLU6 inside an equalized pair becomes a per-channel clamp, or a ReLU).
        for label, cle, bias, ada in (("+ CLE", True, False, False), ("+ bias correction", False, True, False),
                                      ("+ CLE + bias correction", True, True, False),
                                      ("+ AdaRound", False, False, True),
                                      ("+ CLE + AdaRound + bias correction", True, True, True)):
            if ada and not args.adaround_iterations:
                continue
            start = time.perf_counter()
            float_copy = copy.deepcopy(network)
            model = post_training_quantize(float_copy, calibration, config, cross_layer_equalization=cle,
                                           relu6=args.relu6, bias_correction=bias, adaround=ada,
                                           adaround_iterations=args.adaround_iterations or 1)
            seconds = time.perf_counter() - start
            name = f"{weights} minmax {label}"
            path = export_qdq_onnx(model, example, work / f"{name.replace(' ', '_').replace('+', 'p')}.onnx")
            accuracy, _ = ort_accuracy(path, test_loader)
            paths[name] = path
            rows.append({"weights": weights, "method": "minmax", "setting": f"uniform W8A8 {label}",
                         "accuracy": accuracy, "promoted": 0, "layers": None, "path": name, "seconds": seconds})
            log(f"{name}: {100 * accuracy:.2f} % ({seconds:.1f} s)")
            if cle and "FP32 + CLE" not in paths:  # the equalized float network once
                cle_path = export_onnx(float_copy.eval(), example, work / "fp32_cle.onnx")
                cle_accuracy, _ = ort_accuracy(cle_path, test_loader)
                paths["FP32 + CLE"] = cle_path
                replaced = model.meta["equalization"]
                what = "a per-channel clamp" if replaced.relu6_mode == "clamp" else "ReLU"
                rows.insert(1, {"weights": "–", "method": "FP32", "setting": f"float, after CLE (ReLU6 → {what} "
                                f"in {len(replaced.relu6_replaced)} places)",
                                "accuracy": cle_accuracy, "promoted": 0, "layers": None, "path": "FP32 + CLE",
                                "seconds": None})
        # Per-channel weights leave the activations as the error: W8A16. Per-tensor weights are their own error,
        # which a wider activation grid cannot fix: there the float promotion is measured too.
        # Every calibrator's uniform model is a starting point: one that clips (entropy) can lose what min-max
        # does not, and the selection is then judged on a drop that is there.
        for method, promote_to in itertools.product(
                args.auto_calibrators.split(","), ("w8a16",) if per_channel else ("w8a16", "float")):
            start = time.perf_counter()
            result = select_mixed_precision(network, calibration, val_loader, max_accuracy_drop_pt=args.budget,
                                            config=config, calibration=CalibrationConfig(method),
                                            max_promoted=args.max_promoted, promote_to=promote_to,
                                            evaluation_batches=args.selection_batches)
            seconds = time.perf_counter() - start
            name = f"{weights} {method} mixed {promote_to}"
            path = export_qdq_onnx(result.model, example, work / f"{name.replace(' ', '_')}.onnx")
            accuracy, _ = ort_accuracy(path, test_loader)
            paths[name] = path
            label = "W8A16" if promote_to == "w8a16" else "float"
            rows.append({"weights": weights, "method": method,
                         "setting": f"auto, promoted to {label} (val budget −{args.budget:g} pt)",
                         "accuracy": accuracy, "promoted": len(result.promoted), "layers": result.quantized_layers,
                         "path": name, "seconds": seconds, "selection": result.to_dict()})
            log(f"{name}: {100 * accuracy:.2f} %, {len(result.promoted)}/{result.quantized_layers} promoted "
                f"({', '.join(result.promoted)}), val drop {result.drop_pt:.2f} pt ({seconds:.1f} s)")

    p50 = latencies(paths, args.rounds, args.runs, args.image_size)
    for row in rows:
        row["p50_ms"] = p50[row["path"]]
        row["mb"] = os.path.getsize(paths[row["path"]]) / 1e6
        row["delta_pt"] = 100 * (row["accuracy"] - fp32_accuracy)
    info = {"machine": machine_info(), "backbone": args.backbone, "epochs": args.epochs,
            "train_seconds": train_seconds, "image_size": args.image_size, "train_size": args.train_size,
            "val_size": args.val_size, "test_size": args.test_size,
            "calibration_images": sum(len(b) for b in calibration), "budget_pt": args.budget,
            "max_promoted": args.max_promoted, "selection_images": args.selection_batches * args.batch_size,
            "checkpoint": args.checkpoint, "quick": args.quick, "relu6": args.relu6,
            "auto_calibrators": args.auto_calibrators.split(","),
            "wall_minutes": (time.time() - started) / 60}
    stem = Path(args.output) if args.output else RESULTS / ("mixed_precision_quick" if args.quick else "mixed_precision")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(info, rows))
    log(f"wrote {stem}.md / .json in {info['wall_minutes']:.1f} min")


def render(info: dict, rows: list[dict]) -> str:
    lines = [f"# Automatic mixed precision vs uniform W8A8 (`benchmarks/bench_mixed_precision.py`"
             f"{' --quick' if info['quick'] else ''})\n",
             f"Machine: {machine_summary(info['machine'])}.\n",
             f"Model: {info['backbone']} trained {info['epochs']} epochs on the synthetic DMS set "
             f"({info['train_size']} images, {info['image_size']} px, 1 channel)"
             + (f" from `{info['checkpoint']}`" if info["checkpoint"] else f", {info['train_seconds'] / 60:.1f} min")
             + f". Calibration: the first {info['calibration_images']} validation images, the same for every row. "
             f"Mixed precision selects on the first {info['selection_images']} validation images (budget "
             f"−{info['budget_pt']:g} pt, at most {100 * info['max_promoted']:.0f} % of layers); every accuracy below "
             f"is ONNX Runtime on the {info['test_size']}-image test split. Latency: batch 1, 1 thread; 16-bit Q/DQ "
             f"pairs run in float on the CPU provider, so the mixed rows' latency is a CPU's cost, not HTP's. "
             f"The automatic rows start from the uniform models of {', '.join(info['auto_calibrators'])}. "
             f"Wall time of the run: {info['wall_minutes']:.1f} min.\n",
             "| weights | calibration | setting | test top-1 | Δ vs FP32 (pt) | layers promoted | MB | p50 ms | s |",
             "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for row in rows:
        promoted = "–" if row["layers"] is None else (
            f"{row['promoted']} / {row['layers']} ({100 * row['promoted'] / row['layers']:.0f} %)")
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.1f}"
        delta = "" if row["path"] == "FP32" else f"{row['delta_pt']:+.2f}"
        lines.append(f"| {row['weights']} | {row['method']} | {row['setting']} | {100 * row['accuracy']:.2f} % | "
                     f"{delta} | {promoted} | {row['mb']:.2f} | {row['p50_ms']:.2f} | {seconds} |")
    for row in rows:
        if "selection" in row:
            selection = row["selection"]
            lines += ["", f"**{row['weights']} weights, {row['method']}, {row['setting']}** (validation top-1 float "
                          f"{100 * selection['float_accuracy']:.2f} %, uniform {100 * selection['uniform_accuracy']:.2f} %, "
                          f"mixed {100 * selection['accuracy']:.2f} %; {'met' if selection['met'] else 'not met'}): "
                          + (", ".join(f"`{layer}`" for layer in selection["promoted"]) or "none")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
