"""Every deployment target of a QAT MobileNetV3-small student: parity matrix, sizes, latency, coverage.

One short ``fit`` with ``QuantizationAwareTraining``, then on the final weights: ``ONNXExport`` (FP32,
INT8 QDQ, FP16), ``TritonExport``, ``TensorRTExport``, ``CompressionReport`` (latency / size in ONNX
Runtime, and the parity matrix) and, when the ``[tflite]`` extra is installed, ``TFLiteExport``
(FP32, FP16, INT8 with the QAT scales; LiteRT batch-1 latency measured by the exporter). Operator coverage per target is read from
the manifest.

Run (several minutes on 2 cores, under the shared lock; in an environment with the [tflite] extra for
the LiteRT rows)::

    flock /tmp/cpu.lock python benchmarks/bench_targets.py
    python benchmarks/bench_targets.py --quick      # wiring check, no result written

Writes ``benchmarks/results/targets.md`` and ``targets.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DMSClassifier, DMSDataModule  # noqa: E402
from dms_lightning.callbacks import (  # noqa: E402
    CompressionReport,
    ONNXExport,
    QuantizationAwareTraining,
    TensorRTExport,
    TritonExport,
)
from dms_lightning.export.tflite import tflite_available  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.report.parity_matrix import parity_matrix, parity_matrix_markdown  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=768)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--qat-start", type=int, default=2)
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.train_size, args.epochs, args.qat_start, args.latency_runs = 32, 64, 2, 1, 20
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    seed_everything(0)
    workdir = Path(tempfile.mkdtemp(prefix="bench_targets_"))
    export_dir = workdir / "export"
    datamodule = DMSDataModule(image_size=args.image_size, train_size=args.train_size, val_size=128, test_size=256,
                               batch_size=32)
    module = DMSClassifier("mobilenet_v3_small", num_classes=datamodule.num_classes, image_size=args.image_size,
                           class_names=datamodule.class_names,
                           optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01))
    callbacks = [
        QuantizationAwareTraining(start_epoch=args.qat_start, freeze_bn_epoch=args.epochs - 1, export=False),
        ONNXExport(dirpath=str(export_dir), name="student", checkpoint="last", export_fp16=True, parity_batches=2),
        TritonExport(dirpath=str(export_dir / "triton")),
        TensorRTExport(dirpath=str(export_dir / "tensorrt")),
    ]
    if tflite_available():
        from dms_lightning.callbacks import TFLiteExport

        callbacks.append(TFLiteExport(dirpath=str(export_dir), name="student", checkpoint="last", layout="NHWC",
                                      parity_images=64, latency_runs=args.latency_runs))
    callbacks.append(CompressionReport(output_dir=str(workdir / "report"), baseline="student_fp32", print_table=False,
                                       progress_bar=False, log_to_tensorboard=False,
                                       latency_runs=args.latency_runs))
    trainer = Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(workdir),
                      callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    seconds = time.perf_counter() - start
    report = callbacks[-1].report
    manifest = json.loads((export_dir / "manifest.json").read_text())
    rows = parity_matrix(report, [manifest])
    coverage = {e["name"]: e["coverage"] for e in manifest["artifacts"] if "coverage" in e}
    accuracy = {row.name: row.accuracy for row in report.rows}
    lines = [
        "# Deployment targets of a QAT MobileNetV3-small student",
        "",
        f"Machine: {machine_summary(machine_info())}. {args.image_size} px, {args.train_size} training images, "
        f"{args.epochs} epochs, QAT from epoch {args.qat_start}; the whole fit with every export took {seconds:.0f} s. "
        "Parity on the exporters' validation images; latency batch 1, one thread (ONNX Runtime from the report, "
        f"LiteRT by TFLiteExport, {args.latency_runs} runs). LiteRT installed: {tflite_available()}.",
        "",
        parity_matrix_markdown(rows),
        "Test accuracy (ONNX Runtime): " + ", ".join(f"{k} {v:.2%}" for k, v in accuracy.items() if v is not None) + ".",
        "",
        "Operator coverage (targets that cannot run everything):",
        "",
    ]
    for name, targets in coverage.items():
        lacking = {t: c for t, c in targets.items() if not c["supported"]}
        lines.append(f"- {name}: " + ("every target runs every operator" if not lacking else "; ".join(
            f"{t}: {', '.join(c.get('unsupported') or [])} {' '.join(c.get('quantization') or [])}".strip()
            for t, c in lacking.items())))
    triton = sorted(p.name for p in (export_dir / "triton").iterdir())
    lines += ["", f"Triton repository: {', '.join(triton)}; TensorRT bundle: "
              f"{', '.join(sorted(p.name for p in (export_dir / 'tensorrt').iterdir()))}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_text_atomic(RESULTS / "targets.md", text)
        write_json_atomic(RESULTS / "targets.json", {"machine": machine_info(), "args": vars(args), "seconds": seconds,
                                                     "parity_matrix": rows, "accuracy": accuracy,
                                                     "coverage": coverage})


if __name__ == "__main__":
    main()
