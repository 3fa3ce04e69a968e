"""LiteRT / TFLite files of the main job's student: parity on the test split, INT8 scales vs the bundle, latency.

Takes a finished ``python -m dms_lightning pipeline`` folder run with the ``[tflite]`` extra, whose
``TFLiteExport`` wrote ``artifacts/distill/student_{fp32,fp16,int8}.tflite`` (NHWC; INT8 full-integer
with int8 input and output) from the same final network as the run's ONNX files. On the run's whole
test split it measures, in the LiteRT interpreter:

* FP32 / FP16 max |logit diff| against the run's ``student_fp32.onnx`` (which matches PyTorch within
  ~4e-6, see its manifest), bars 1e-4 and 5e-2; INT8 top-1 agreement with ``student_int8.onnx`` run
  with its Q/DQ pairs unfused, i.e. exactly the fake-quant network's arithmetic (bar 99 %);
* each file's test accuracy beside the ONNX files in ONNX Runtime;
* every INT8 scale of the ``.tflite`` against the run's ``snpe_bundle/encodings.json`` (1e-6 relative),
  and the tensors without one, with the reason;
* batch-1 latency p50 / p99 on one thread, LiteRT and ONNX Runtime in the same run.

Run (about a minute on 2 cores, in an environment with the ``[tflite]`` extra)::

    python benchmarks/bench_tflite.py --artifacts /path/to/pipeline-run

Writes ``benchmarks/results/tflite.md`` and ``tflite.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DMSDataModule  # noqa: E402
from dms_lightning.export.parity import compare_outputs  # noqa: E402
from dms_lightning.export.tflite import tflite_latency, tflite_outputs  # noqa: E402
from dms_lightning.export.tflite_int8 import compare_with_encodings, float_operators  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.report.measure import open_session  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BARS = {"fp32": ("max |diff| vs FP32 ONNX", 1e-4), "fp16": ("max |diff| vs FP32 ONNX", 5e-2),
        "int8": ("top-1 agreement vs the fake-quant arithmetic", 0.99)}


def _latency(run, runs: int) -> tuple[float, float]:
    for _ in range(10):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def _ort_logits(session, images: np.ndarray) -> np.ndarray:
    feed = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {feed: images[i:i + 1]})[0] for i in range(len(images))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", required=True, help="folder of a finished `python -m dms_lightning pipeline`")
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--output", default=str(RESULTS / "tflite"), help="results path without suffix")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    run_dir = Path(args.artifacts).resolve()
    distill = run_dir / "artifacts" / "distill"
    needed = [distill / "snpe_bundle" / "encodings.json", distill / "student_int8.onnx"] + [
        distill / f"student_{p}.tflite" for p in ("fp32", "fp16", "int8")]
    for path in needed:
        if not path.exists():
            raise SystemExit(f"--artifacts {args.artifacts}: {path} does not exist (run `python -m dms_lightning "
                             "pipeline` there first, with the [tflite] extra installed)")
    config = yaml.safe_load((run_dir / "configs" / "distill.yaml").read_text())
    datamodule = DMSDataModule(**config["data"])
    datamodule.setup("test")
    images = torch.cat([batch[0] for batch in datamodule.test_dataloader()]).float().numpy()
    labels = torch.cat([batch[1] for batch in datamodule.test_dataloader()]).numpy()
    image = images[:1]
    manifest = json.loads((distill / "manifest.json").read_text())
    int8_scales = next(e for e in manifest["artifacts"] if e["name"] == "student_int8_tflite")["int8_scales"]
    exceptions = int8_scales["exceptions"]
    twins = {"fp32": _ort_logits(open_session(distill / "student_fp32.onnx"), images),
             "int8": _ort_logits(open_session(distill / "student_int8.onnx", fuse_qdq=False), images)}
    rows, scales = [], {}
    for precision in ("fp32", "fp16", "int8"):
        path = distill / f"student_{precision}.tflite"
        logits = tflite_outputs(path, images)
        result = compare_outputs(twins["int8" if precision == "int8" else "fp32"], logits,
                                 atol=None if precision == "int8" else BARS[precision][1], min_top1_agreement=0.99,
                                 runtime="litert")
        p50, p99 = tflite_latency(path, image, args.latency_runs)
        rows.append({"variant": path.name, "runtime": "LiteRT", "size_mb": path.stat().st_size / 1e6,
                     "accuracy": float((logits.argmax(1) == labels).mean()), "top1_agreement": result.top1_agreement,
                     "max_abs_diff": result.max_abs_diff, "p50_ms": p50, "p99_ms": p99, "passed": result.passed,
                     "float_ops": float_operators(path)})
        if precision == "int8":
            scales = compare_with_encodings(path, json.loads((distill / "snpe_bundle" / "encodings.json").read_text()),
                                            exceptions)
    for name in ("student_fp32.onnx", "student_int8.onnx"):
        session = open_session(distill / name)
        feed = session.get_inputs()[0].name
        logits = _ort_logits(session, images)
        p50, p99 = _latency(lambda: session.run(None, {feed: image}), args.latency_runs)
        rows.append({"variant": name, "runtime": "ONNX Runtime", "size_mb": (distill / name).stat().st_size / 1e6,
                     "accuracy": float((logits.argmax(1) == labels).mean()), "p50_ms": p50, "p99_ms": p99})
    lines = [
        "# LiteRT / TFLite files of the main job's student",
        "",
        f"Machine: {machine_summary(machine_info())}. The run's own `.tflite` files (TFLiteExport of the pruned "
        f"QAT MobileNetV3-small, QAT placement `every_tensor`), {len(images)} test images, NHWC; INT8 with int8 input "
        f"and output. FP32 / FP16 judged against the run's `student_fp32.onnx`, INT8 against `student_int8.onnx` "
        f"with Q/DQ unfused (the fake-quant network's arithmetic). Latency batch 1, one thread, {args.latency_runs} runs, LiteRT and ONNX Runtime in this run.",
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
    manifest_carried = int8_scales["carried_activation_scales"]
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
        f"{manifest_carried} quantizers of the QAT network carried. "
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
