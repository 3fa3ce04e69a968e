"""LiteRT / TFLite files of the main job's student: parity in the LiteRT interpreter, INT8 scales vs the bundle.

Takes a finished ``python -m dms_lightning pipeline`` folder, rebuilds its final (QAT) student from
``artifacts/distill/last.ckpt`` (the weights the run's exporters wrote), and writes the student as FP32,
FP16 and full-integer INT8 ``.tflite`` (NHWC; INT8 with int8 input and output, as NPU delegates take it)
with the functions ``TFLiteExport`` uses. On the run's test split it measures, in the LiteRT interpreter:

* FP32 max |logit diff| against PyTorch (bar 1e-4), FP16 (bar 5e-2), INT8 top-1 agreement with the
  fake-quant PyTorch network (bar 99 %), and each file's test accuracy beside the run's ONNX files in
  ONNX Runtime;
* every INT8 scale of the ``.tflite`` against the run's ``snpe_bundle/encodings.json`` (1e-6 relative),
  and the tensors without one, with the reason;
* batch-1 latency p50 / p99 on one thread, LiteRT and ONNX Runtime in the same run.

Run (about 4 minutes on 2 cores, in an environment with the ``[tflite]`` extra)::

    python benchmarks/bench_tflite.py --artifacts /path/to/pipeline-run

Writes ``benchmarks/results/tflite.md`` and ``tflite.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DistillationModule, DMSDataModule  # noqa: E402
from dms_lightning.export.parity import compare_outputs  # noqa: E402
from dms_lightning.export.qdq import fake_quant_disabled  # noqa: E402
from dms_lightning.export.tflite import export_tflite_model, tflite_latency, tflite_outputs  # noqa: E402
from dms_lightning.export.tflite_int8 import compare_with_encodings, float_operators  # noqa: E402
from dms_lightning.quant import float_model  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BARS = {"fp32": ("max |diff| vs PyTorch", 1e-4), "fp16": ("max |diff| vs PyTorch", 5e-2),
        "int8": ("top-1 agreement vs fake-quant PyTorch", 0.99)}


def _latency(run, runs: int) -> tuple[float, float]:
    for _ in range(10):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def onnx_runtime(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True, help="folder of a finished `python -m dms_lightning pipeline`")
    parser.add_argument("--calibration-images", type=int, default=128)
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--output", default=str(RESULTS / "tflite"), help="results path without suffix")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    run_dir = Path(args.artifacts).resolve()
    distill = run_dir / "artifacts" / "distill"
    checkpoint = distill / "last.ckpt"
    for needed in (checkpoint, distill / "snpe_bundle" / "encodings.json", distill / "student_int8.onnx"):
        if not needed.exists():
            raise SystemExit(f"--artifacts {args.artifacts}: {needed} does not exist (run `python -m dms_lightning "
                             "pipeline` there first)")
    os.chdir(run_dir)  # the checkpoint names the teacher by its path relative to the run
    config = yaml.safe_load((run_dir / "configs" / "distill.yaml").read_text())
    datamodule = DMSDataModule(**config["data"])
    datamodule.setup("fit")
    datamodule.setup("test")
    images = torch.cat([batch[0] for batch in datamodule.test_dataloader()]).float()
    labels = torch.cat([batch[1] for batch in datamodule.test_dataloader()]).numpy()
    calibration = torch.cat([batch[0] for batch in datamodule.val_dataloader()])[:args.calibration_images].float()
    module = DistillationModule.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=True)
    student = module.compression_target.cpu().float().eval()
    network = float_model(student)
    with torch.no_grad():
        fake_quant = student(images).numpy()
        with fake_quant_disabled():
            reference = network(images).numpy()
    example = images[:1]
    image = example.numpy()
    work = Path(tempfile.mkdtemp(prefix="bench_tflite_"))
    rows, scales, exceptions = [], {}, []
    for precision in ("fp32", "fp16", "int8"):
        path = work / f"student_{precision}.tflite"
        start = time.perf_counter()
        source = student if precision == "int8" else network
        with fake_quant_disabled() if precision != "int8" else contextlib.nullcontext():
            _, form = export_tflite_model(source, example, path, precision=precision, layout="NHWC",
                                          io="int8" if precision == "int8" else "float", calibration=calibration)
        seconds = time.perf_counter() - start
        logits = tflite_outputs(path, images.numpy())
        judged = fake_quant if precision == "int8" else reference
        result = compare_outputs(judged, logits, atol=None if precision == "int8" else BARS[precision][1],
                                 min_top1_agreement=0.99, runtime="litert")
        p50, p99 = tflite_latency(path, image, args.latency_runs)
        row = {"variant": f"student_{precision}.tflite", "runtime": "LiteRT", "size_mb": path.stat().st_size / 1e6,
               "accuracy": float((logits.argmax(1) == labels).mean()), "top1_agreement": result.top1_agreement,
               "max_abs_diff": result.max_abs_diff, "p50_ms": p50, "p99_ms": p99, "convert_s": seconds,
               "passed": result.passed, "float_ops": float_operators(path)}
        rows.append(row)
        if form is not None:
            scales = compare_with_encodings(path, json.loads((distill / "snpe_bundle" / "encodings.json").read_text()),
                                            form.exceptions)
            exceptions = form.exceptions
            carried = form.carried
    for name in ("student_fp32.onnx", "student_int8.onnx"):
        session = onnx_runtime(distill / name)
        feed = session.get_inputs()[0].name
        logits = np.concatenate([session.run(None, {feed: images[i:i + 1].numpy()})[0] for i in range(len(images))])
        p50, p99 = _latency(lambda: session.run(None, {feed: image}), args.latency_runs)
        rows.append({"variant": name, "runtime": "ONNX Runtime", "size_mb": (distill / name).stat().st_size / 1e6,
                     "accuracy": float((logits.argmax(1) == labels).mean()), "p50_ms": p50, "p99_ms": p99})
    lines = [
        "# LiteRT / TFLite files of the main job's student",
        "",
        f"Machine: {machine_summary(machine_info())}. Student: `{run_dir.name}/artifacts/distill/last.ckpt` (the "
        f"pruned QAT MobileNetV3-small the run exported), {len(images)} test images, NHWC; INT8 with int8 input "
        f"and output. Latency batch 1, one thread, {args.latency_runs} runs, LiteRT and ONNX Runtime in this run.",
        "",
        "| variant | runtime | size MB | test acc | parity | bar | passed | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        precision = row["variant"].split("_")[1].split(".")[0]
        if row["runtime"] == "LiteRT":
            what, bar = BARS[precision]
            value = f"{row['top1_agreement']:.2%} agree" if precision == "int8" else f"{row['max_abs_diff']:.2e}"
            bar_text = f"≥ {bar:.0%}" if precision == "int8" else f"≤ {bar:g}"
            parity = f"{value} ({what})"
            passed = "yes" if row["passed"] else "**no**"
        else:
            parity, bar_text, passed = "", "", ""
        lines.append(f"| {row['variant']} | {row['runtime']} | {row['size_mb']:.2f} | {row['accuracy']:.2%} | {parity} "
                     f"| {bar_text} | {passed} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
    int8_row = next(r for r in rows if r["variant"] == "student_int8.tflite")
    sources: dict[str, int] = {}
    for entry in exceptions:
        sources[entry["source"]] = sources.get(entry["source"], 0) + 1
    lines += [
        "",
        f"INT8 file: operators reading or writing float32 (I/O converters excepted): "
        f"{int8_row['float_ops'] or 'none, full-integer'}.",
        "",
        "Scales against the run's `snpe_bundle/encodings.json` (1e-6 relative): "
        f"{scales['activation_encodings'] - len(scales['activation_encodings_missing'])} of "
        f"{scales['activation_encodings']} activation encodings and "
        f"{scales['weight_encodings'] - len(scales['weight_encodings_missing'])} of {scales['weight_encodings']} "
        f"weight encodings are in the file (missing: {scales['activation_encodings_missing'] + scales['weight_encodings_missing'] or 'none'}); "
        f"{carried} quantizers of the QAT network carried. "
        f"{scales['tflite_activations_not_in_encodings']} of the file's {scales['tflite_activations']} int8 "
        f"activation tensors have no encoding: the tensors the QAT placement keeps in float "
        f"({', '.join(f'{n} {s}' for s, n in sources.items())}), each listed with its reason in the manifest; "
        f"unexplained: {scales['tflite_activations_unexplained'] or 'none'}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    output = Path(args.output)
    write_text_atomic(output.with_suffix(".md"), text)
    write_json_atomic(output.with_suffix(".json"), {"machine": machine_info(), "args": vars(args), "rows": rows,
                                                    "scales": scales, "exceptions": exceptions})


if __name__ == "__main__":
    main()
