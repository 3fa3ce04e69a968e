"""Export of a QAT MobileNetV3-small student: parity, OpenVINO agreement, sizes, export cost, SNPE/QNN bundle.

One ``fit`` of the student with ``QuantizationAwareTraining`` (fake quantization from ``--qat-start``), then
``ONNXExport`` (FP32 + INT8 QDQ of the final weights) and ``SNPEExport`` (HTP bundle) run on the trained
module and are timed. The table reports for each file its size, the parity with PyTorch on
``--parity-batches`` validation batches (max |logit diff|, top-1 agreement), OpenVINO's agreement with
ONNX Runtime when OpenVINO is installed, and the test accuracy measured in ONNX Runtime.

Run (a few minutes on 2 cores, so under the shared lock)::

    flock /tmp/cpu.lock python benchmarks/bench_export.py
    python benchmarks/bench_export.py --quick          # wiring check on tiny sizes, no result written

Writes ``benchmarks/results/export.md`` and ``export.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DMSClassifier, DMSDataModule  # noqa: E402
from dms_lightning.callbacks import ONNXExport, QuantizationAwareTraining, SNPEExport  # noqa: E402
from dms_lightning.export.runtimes import onnxruntime_outputs, openvino_available  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def test_accuracy(path: Path, datamodule: DMSDataModule) -> float:
    correct = total = 0
    for images, labels in datamodule.test_dataloader():
        predictions = onnxruntime_outputs(path, images.numpy()).argmax(axis=1)
        correct += int((predictions == labels.numpy()).sum())
        total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-size", type=int, default=1024)
    parser.add_argument("--test-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--qat-start", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (configs/student.yaml's)")
    parser.add_argument("--bn-momentum", type=float, default=0.1, help="BatchNorm momentum (torchvision: 0.01)")
    parser.add_argument("--parity-batches", type=int, default=4)
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no result written")
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.test_size, args.epochs, args.qat_start = 64, 32, 2, 1
        args.parity_batches, args.calibration_images = 1, 8
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    seed_everything(0)
    workdir = Path(tempfile.mkdtemp(prefix="bench_export_"))
    datamodule = DMSDataModule(image_size=args.image_size, train_size=args.train_size, val_size=256,
                               test_size=args.test_size, batch_size=32)
    module = DMSClassifier("mobilenet_v3_small", num_classes=datamodule.num_classes, image_size=args.image_size,
                           class_names=datamodule.class_names,
                           optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01))
    # torchvision's MobileNetV3 BatchNorms use momentum 0.01: a few hundred steps leave the running statistics
    # near their initial values and the eval-mode network predicts one class. 0.1 lets this short run converge.
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = args.bn_momentum
    trainer = Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(workdir),
                      callbacks=[QuantizationAwareTraining(start_epoch=args.qat_start,
                                                           freeze_bn_epoch=min(args.qat_start + 1, args.epochs - 1),
                                                           export=False)])
    start = time.perf_counter()
    trainer.fit(module, datamodule)
    train_seconds = time.perf_counter() - start

    onnx_export = ONNXExport(dirpath=str(workdir / "export"), name="student", checkpoint="last",
                             parity_batches=args.parity_batches)
    start = time.perf_counter()
    paths = onnx_export.export(trainer, module)
    onnx_seconds = time.perf_counter() - start
    snpe_export = SNPEExport(dirpath=str(workdir / "export"), runtime="htp", checkpoint="last",
                             calibration_images=args.calibration_images)
    start = time.perf_counter()
    bundle = snpe_export.export(trainer, module)
    snpe_seconds = time.perf_counter() - start

    manifest = json.loads((workdir / "export" / "manifest.json").read_text())
    entries = {e["name"]: e for e in manifest["artifacts"]}
    rows = []
    for name, path in paths.items():
        entry = entries[name]
        parity, ov = entry["parity"], entry.get("openvino")
        rows.append({"variant": name, "MB": entry["bytes"] / 1e6, "max_abs_diff": parity["max_abs_diff"],
                     "top1_agreement": parity["top1_agreement"], "samples": parity["samples"],
                     "ort_kernels_agreement": (entry.get("onnxruntime_int8_kernels") or {}).get("top1_agreement"),
                     "ort_kernels_max_abs_diff": (entry.get("onnxruntime_int8_kernels") or {}).get("max_abs_diff"),
                     "openvino_agreement": ov["top1_agreement"] if ov else None,
                     "openvino_max_abs_diff": ov["max_abs_diff"] if ov else None,
                     "test_accuracy_ort": test_accuracy(path, datamodule)})
    bundle_manifest = json.loads((bundle / "manifest.json").read_text())
    coverage = bundle_manifest["encodings_coverage"] or {}
    result = {
        "machine": machine_info(),
        "args": vars(args),
        "train_seconds": train_seconds,
        "onnx_export_seconds": onnx_seconds,
        "snpe_export_seconds": snpe_seconds,
        "rows": rows,
        "bundle": {"MB": entries["snpe_bundle"]["bytes"] / 1e6, "files": len(entries["snpe_bundle"]["files"]),
                   "precision": bundle_manifest["precision"], "parity": bundle_manifest["parity"],
                   "encodings_covered": coverage.get("covered"), "not_overridden": coverage.get("not_overridden"),
                   "missing": coverage.get("missing"), "conversion": bundle_manifest["conversion"]["status"]},
    }
    lines = [
        "# Export of a QAT MobileNetV3-small student",
        "",
        f"{args.image_size} px, {args.train_size} training images, {args.epochs} epochs, QAT from epoch "
        f"{args.qat_start}, AdamW lr {args.lr}, BatchNorm momentum {args.bn_momentum}; parity (INT8: the QDQ graph's "
        f"semantics, ORT with Q/DQ unfused) on {rows[0]['samples']} validation images; "
        f"test accuracy in ONNX Runtime on "
        f"{args.test_size} images. OpenVINO installed: {openvino_available()}.",
        "",
        "| variant | size (MB) | max \\|diff\\| vs PyTorch | top-1 agreement "
        "| ORT fused INT8 kernels vs PyTorch | OpenVINO vs ORT agreement (max \\|diff\\|) | test acc (ORT) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        ov = ("n/a" if row["openvino_agreement"] is None
              else f"{row['openvino_agreement']:.2%} ({row['openvino_max_abs_diff']:.2g})")
        kernels = ("same as parity" if row["ort_kernels_agreement"] is None
                   else f"{row['ort_kernels_agreement']:.2%} ({row['ort_kernels_max_abs_diff']:.2g})")
        lines.append(f"| {row['variant']} | {row['MB']:.2f} | {row['max_abs_diff']:.2g} | {row['top1_agreement']:.2%} "
                     f"| {kernels} | {ov} | {row['test_accuracy_ort']:.2%} |")
    b = result["bundle"]
    lines += [
        "",
        f"SNPE/QNN bundle (HTP, {args.calibration_images} calibration raws): {b['MB']:.2f} MB in {b['files']} files, "
        f"{b['precision']}, INT8 parity {b['parity']['top1_agreement']:.2%} top-1 on the calibration images, "
        f"encodings for {b['encodings_covered']} tensors, missing {len(b['missing'] or [])}, weighted-layer tensors "
        f"without encoding {len(b['not_overridden'] or [])}; conversion {b['conversion']} (no SDK on this machine).",
        "",
        f"Time: training {train_seconds:.0f} s; ONNXExport {onnx_seconds:.1f} s (both precisions, parity"
        f"{', OpenVINO' if openvino_available() else ''}); SNPEExport {snpe_seconds:.1f} s.",
        "",
        f"Machine: {machine_summary(result['machine'])}",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.quick:
        write_text_atomic(RESULTS / "export.md", table)
        write_json_atomic(RESULTS / "export.json", result)


if __name__ == "__main__":
    main()
