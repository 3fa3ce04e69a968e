"""The full pipeline against the reference case study: FP32 teacher → INT8 → pruned + distilled + INT8 student.

Reference case study (issue 7): FP32 45 MB / 25 ms / 94.2 % → INT8 12 MB / 8 ms / 93.8 % →
pruning + distillation + INT8 6 MB / 3 ms / 92.5 %.
Our goal on the synthetic DMS set, ONNX Runtime CPU, batch 1: the INT8 pruned distilled MobileNetV3-small is
≥ 25× smaller and ≥ 10× faster than the FP32 ResNet-18 teacher, with an accuracy drop ≤ 1.0 pt.

What runs (one process, every ratio measured in this run on this machine):

1. the ResNet-18 teacher: ``--teacher-ckpt`` (default ``artifacts/teacher/best.ckpt``, written by
   ``python -m dms_lightning fit --config configs/teacher.yaml``) or, when absent, trained here;
   exported to FP32 ONNX, and to INT8 QDQ with post-training quantization (the case study's middle row);
2. one ``fit`` of ``DistillationModule`` (MobileNetV3-small student) with ``IterativePruning`` (channel
   pruning, AGP schedule, channels physically removed), then ``QuantizationAwareTraining``, then
   ``ONNXExport`` (FP32 + INT8 QDQ of the final student) and ``CompressionReport`` (teacher FP32 baseline);
3. the report's rows are set beside the case study, and each goal is checked (missed targets say by how much).

Run (heavy: ~15-30 minutes on 2 cores with the default sizes; under the shared lock)::

    flock /tmp/cpu.lock python benchmarks/bench_pipeline.py
    python benchmarks/bench_pipeline.py --quick      # wiring check on tiny sizes; not a result

Writes ``benchmarks/results/pipeline.md``, ``pipeline.json``, ``pipeline_report.{md,csv,json}`` (the full
CompressionReport) and ``pipeline_pareto_{size,latency}.png``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DMSClassifier, DMSDataModule  # noqa: E402
from dms_lightning.export import export_onnx  # noqa: E402
from dms_lightning.report import MeasureSettings, Report  # noqa: E402
from dms_lightning.report.machine import machine_summary  # noqa: E402
from dms_lightning.utils.io import write_json_atomic, write_text_atomic  # noqa: E402

import readme_results  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

RESULTS = ROOT / "benchmarks" / "results"
#: The distillation recipe of configs/distill.yaml: logit KD plus attention transfer at three resolutions.
ATTENTION_PAIRS = yaml.safe_load((ROOT / "configs/distill.yaml").read_text())["model"]["init_args"]["attention_transfer"]

#: The reference case study: (stage, size MB, latency ms, accuracy %).
CASE_STUDY = (
    ("FP32", 45.0, 25.0, 94.2),
    ("INT8", 12.0, 8.0, 93.8),
    ("pruning + distillation + INT8", 6.0, 3.0, 92.5),
)
GOALS = {"size_ratio": 25.0, "speedup": 10.0, "accuracy_drop_pt": 1.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-ckpt", default=None,
                        help="a trained ResNet-18 DMSClassifier checkpoint (e.g. artifacts/teacher/best.ckpt from "
                             "configs/teacher.yaml); default: <workdir>/teacher/best.ckpt, trained here with the "
                             "configs/teacher.yaml recipe when missing and reused by later runs")
    parser.add_argument("--teacher-epochs", type=int, default=6, help="only when the teacher is trained here")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-size", type=int, default=6000)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30, help="student epochs: distil, prune, fine-tune, QAT")
    parser.add_argument("--target-sparsity", type=float, default=0.3, help="channel sparsity of the student")
    parser.add_argument("--prune-start", type=int, default=3)
    parser.add_argument("--prune-end", type=int, default=10, help="channels are physically removed here")
    parser.add_argument("--qat-start", type=int, default=24)
    parser.add_argument("--round-to", type=int, default=8, help="kept channels rounded to a multiple (NPUs)")
    parser.add_argument("--quantize-depthwise", type=int, default=1, choices=(0, 1),
                        help="QAT also quantizes depthwise convs (0: keep them float)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency")
    parser.add_argument("--torch-threads", type=int, default=2, help="torch threads for training")
    parser.add_argument("--latency-runs", type=int, default=300)
    parser.add_argument("--warmup-runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "bench_pipeline"))
    parser.add_argument("--output", default=str(RESULTS / "pipeline"), help="path stem of the results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes to check the wiring (not a result)")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.train_size, args.val_size, args.test_size, args.batch_size = 64, 256, 64, 128, 32
        args.epochs, args.prune_start, args.prune_end, args.qat_start, args.teacher_epochs = 4, 0, 2, 3, 1
        args.latency_runs, args.warmup_runs = 30, 5
        args.output = str(Path(args.workdir) / "quick" / "pipeline")
    if args.teacher_ckpt is None:
        args.teacher_ckpt = str(Path(args.workdir) / ("teacher_quick" if args.quick else "teacher") / "best.ckpt")
    return args


def datamodule(args) -> DMSDataModule:
    return DMSDataModule(image_size=args.image_size, train_size=args.train_size, val_size=args.val_size,
                         test_size=args.test_size, batch_size=args.batch_size, seed=0)


def adamw(params, lr: float):
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def train_teacher(args, path: Path) -> Path:
    """The configs/teacher.yaml recipe, for when no teacher checkpoint exists yet."""
    print(f"[bench_pipeline] training the ResNet-18 teacher for {args.teacher_epochs} epochs -> {path}", flush=True)
    seed_everything(args.seed, verbose=False)
    model = DMSClassifier("resnet18", image_size=args.image_size)
    # Set after construction so the checkpoint's hyper-parameters stay loadable with weights_only=True.
    model.optimizer_factory = partial(adamw, lr=2e-3)
    checkpoint = ModelCheckpoint(dirpath=str(path.parent), filename=path.stem, monitor="val/acc", mode="max",
                                 enable_version_counter=False)
    trainer = Trainer(accelerator="cpu", max_epochs=args.teacher_epochs, logger=False, callbacks=[checkpoint],
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(path.parent))
    trainer.fit(model, datamodule=datamodule(args))
    return Path(checkpoint.best_model_path)


def export_teacher(args, ckpt: Path, workdir: Path) -> dict[str, str]:
    """Teacher FP32 ONNX and its post-training INT8 QDQ twin (calibrated on training images)."""
    teacher = DMSClassifier.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=False).eval()
    state = torch.load(str(ckpt), map_location="cpu", weights_only=False)
    scores = [v.get("best_model_score") for k, v in state.get("callbacks", {}).items() if "ModelCheckpoint" in k]
    args.teacher_info = {"checkpoint": str(ckpt), "epochs_trained": int(state.get("epoch", -1)) + 1,
                         "val_acc": float(scores[0]) if scores and scores[0] is not None else None}
    example = torch.zeros(1, 1, args.image_size, args.image_size)
    fp32 = export_onnx(teacher.model, example, workdir / "teacher_fp32.onnx")
    int8 = workdir / "teacher_int8.onnx"
    quantize_teacher(args, fp32, int8)
    return {"teacher_fp32": str(fp32), "teacher_int8": str(int8)}


def quantize_teacher(args, fp32: Path, int8: Path, calibration_batches: int = 8) -> None:
    """Static INT8 QDQ (per-channel int8 weights, uint8 activations, min-max) with our PTQ function.

    Calibrated on validation images: the training loader augments, calibration should see deployment inputs.
    """
    from dms_lightning.export.ort_quantize import quantize_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = datamodule(args).val_dataloader()
        quantize_onnx(fp32, int8, loader, calibration_batches=min(calibration_batches, len(loader)))


def student_callbacks(args, extra_variants: dict[str, str], report_dir: Path) -> list:
    from dms_lightning.callbacks import CompressionReport, IterativePruning, ONNXExport, QuantizationAwareTraining

    # Late-QAT recipe: fake quantization after the channels are removed, BN statistics then observer
    # ranges frozen for the last epochs.
    freeze_bn = min(args.epochs - 1, args.qat_start + max(1, (args.epochs - args.qat_start) // 2))
    return [
        IterativePruning(method="channel", target_sparsity=args.target_sparsity, schedule="agp",
                         start_epoch=args.prune_start, end_epoch=args.prune_end, round_to=args.round_to),
        QuantizationAwareTraining(start_epoch=args.qat_start, freeze_bn_epoch=freeze_bn,
                                  freeze_observers_epoch=freeze_bn, quantize_depthwise=args.quantize_depthwise,
                                  dirpath=str(report_dir.parent / "export"), filename="student_int8"),
        # FP32 twin of the final (pruned, distilled) student; the INT8 file is the QAT callback's export.
        ONNXExport(dirpath=str(report_dir.parent / "export"), name="student", checkpoint="last", export_int8=False),
        CompressionReport(output_dir=str(report_dir), baseline="teacher_fp32", extra_variants=extra_variants,
                          threads=args.threads, warmup_runs=args.warmup_runs, latency_runs=args.latency_runs,
                          progress_bar=False),
    ]


def run_student(args, teacher_ckpt: Path, extra_variants: dict[str, str], workdir: Path):
    from dms_lightning import DistillationModule

    seed_everything(args.seed, verbose=False)
    module = DistillationModule("mobilenet_v3_small", teacher_checkpoint=str(teacher_ckpt), temperature=4.0,
                                alpha=0.7, attention_transfer=ATTENTION_PAIRS, image_size=args.image_size)
    # Kept out of the checkpoint's hyper-parameters. A per-epoch cosine to 0 over the run (configs/distill.yaml
    # keeps the default per-step warm-up + cosine, which is much the same curve).
    module.optimizer_factory = partial(adamw, lr=args.lr)
    module.lr_scheduler_factory = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=args.epochs)
    callbacks = student_callbacks(args, extra_variants, workdir / "report")
    logger = TensorBoardLogger(save_dir=str(workdir), name="tb")
    trainer = Trainer(accelerator="cpu", max_epochs=args.epochs, logger=logger, callbacks=callbacks,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(workdir))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule(args))
    print(f"[bench_pipeline] student pipeline fit: {time.perf_counter() - start:.0f} s", flush=True)
    return callbacks[-1].report


def _pick(report: Report, *candidates: str):
    for name in candidates:
        for row in report.rows:
            if row.name == name:
                return row
    return None


def _vs_goal(kind: str, value: float | None) -> str:
    if value is None:
        return "not measured"
    target = GOALS[kind]
    if kind == "accuracy_drop_pt":
        return "met" if value <= target else f"missed by {value - target:.2f} pt"
    return "met" if value >= target else f"missed by {target - value:.1f}× ({value / target:.0%} of the target)"


def results_markdown(report: Report, args, seconds: float) -> tuple[str, dict]:
    teacher = report.row("teacher_fp32")
    teacher_int8 = _pick(report, "teacher_int8")
    student_fp32 = _pick(report, "student_fp32")
    student_int8 = _pick(report, "student_int8")
    ours = [("FP32 (ResNet-18 teacher)", teacher), ("INT8 (teacher, post-training quantization)", teacher_int8),
            ("pruning + distillation + INT8 (MobileNetV3-small, QAT)", student_int8)]
    base_size, base_lat, base_acc = CASE_STUDY[0][1:]
    lines = [
        "# Full pipeline vs the reference case study\n",
        f"Machine: {machine_summary(report.machine)}.  ",
        f"Synthetic DMS set, {args.image_size} px grayscale, {args.train_size} train / {args.test_size} test images; "
        f"student: {args.epochs} epochs of distillation (T=4, α=0.7, attention transfer as in configs/distill.yaml; "
        f"AdamW lr {args.lr}, per-epoch cosine to 0) "
        f"with channel pruning to "
        f"{args.target_sparsity:.0%} (AGP, epochs {args.prune_start}-{args.prune_end}, channels removed) and QAT "
        f"from epoch {args.qat_start}. Latency: ONNX Runtime CPU, batch 1, p50 of {args.latency_runs} runs after "
        f"{args.warmup_runs} warm-up runs. Accuracy: ONNX Runtime on the test split. Wall time {seconds / 60:.1f} min.  ",
        f"Teacher: ResNet-18 checkpoint after {args.teacher_info['epochs_trained']} epochs"
        + (f" (val acc {100 * args.teacher_info['val_acc']:.1f} %)" if args.teacher_info["val_acc"] else "")
        + "; INT8 teacher: post-training static QDQ quantization (dms_lightning.export.ort_quantize.quantize_onnx, min-max, "
          "8 validation batches).\n",
        "| stage | case study: size / latency / accuracy | case study vs FP32 | ours: size / latency p50 / accuracy "
        "| ours vs FP32 teacher |",
        "|---|---|---|---|---|",
    ]
    for (stage, size, latency, accuracy), (label, row) in zip(CASE_STUDY, ours):
        reference = f"{size:g} MB / {latency:g} ms / {accuracy:.1f} %"
        ratios = (f"{base_size / size:.1f}× smaller, {base_lat / latency:.1f}× faster, "
                  f"{accuracy - base_acc:+.1f} pt")
        if row is None:
            measured, ours_ratio = "not produced", "–"
        else:
            measured = (f"{label}: {row.file_size_mb:.2f} MB / {row.latency_ms_p50:.2f} ms / "
                        f"{100 * row.accuracy:.2f} %")
            ours_ratio = (f"{row.size_ratio:.1f}× smaller, {row.speedup:.1f}× faster, "
                          f"{row.accuracy_delta_pt:+.2f} pt")
        lines.append(f"| {stage} | {reference} | {ratios} | {measured} | {ours_ratio} |")
    goals = {}
    if student_int8 is not None:
        goals = {"size_ratio": student_int8.size_ratio, "speedup": student_int8.speedup,
                 "accuracy_drop_pt": -student_int8.accuracy_delta_pt}
    lines += ["", "Goal: INT8 pruned distilled MobileNetV3-small vs FP32 ResNet-18 teacher (ONNX Runtime CPU, batch 1).",
              "", "| goal | target | measured | result |", "|---|---|---|---|"]
    for kind, label, unit in (("size_ratio", "smaller (file size)", "×"), ("speedup", "faster (p50 latency)", "×"),
                              ("accuracy_drop_pt", "accuracy drop", " pt")):
        target = f"{'≤' if kind == 'accuracy_drop_pt' else '≥'} {GOALS[kind]:g}{unit}"
        value = goals.get(kind)
        measured = "–" if value is None else f"{value:.2f}{unit}"
        lines.append(f"| {label} | {target} | {measured} | {_vs_goal(kind, value)} |")
    if student_fp32 is not None:
        lines += ["", f"The pruned distilled student before quantization (FP32 ONNX): {student_fp32.file_size_mb:.2f} MB, "
                      f"{student_fp32.latency_ms_p50:.2f} ms, {100 * student_fp32.accuracy:.2f} % "
                      f"({student_fp32.size_ratio:.1f}× smaller, {student_fp32.speedup:.1f}× faster, "
                      f"{student_fp32.accuracy_delta_pt:+.2f} pt vs the teacher)."]
    graph_acc = student_int8.info.get("accuracy_qdq_graph") if student_int8 is not None else None
    if graph_acc is not None and teacher is not None and teacher.accuracy is not None:
        flags = set(report.machine.get("cpu_flags") or [])
        kernels = ("u8s8 with int32 sums on this VNNI CPU" if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}
                   else "u8s8 with int16 intermediate sums on a CPU without VNNI")
        lines += ["", f"The INT8 student's accuracy above is ONNX Runtime's fused x86 integer kernels ({kernels}). "
                      f"The same QDQ graph run with its own arithmetic (Q/DQ "
                      f"unfused, what an NPU converter reads): {100 * graph_acc:.2f} % "
                      f"({100 * (graph_acc - teacher.accuracy):+.2f} pt vs the teacher)."]
    lines += ["", "All variants (CompressionReport):", "", _table_only(report)]
    summary = {"case_study": [dict(zip(("stage", "size_mb", "latency_ms", "accuracy_pct"), c)) for c in CASE_STUDY],
               "goals": {k: {"target": GOALS[k], "measured": goals.get(k), "result": _vs_goal(k, goals.get(k))}
                         for k in GOALS},
               "settings": {k: v for k, v in vars(args).items()}, "wall_seconds": seconds,
               "report": report.to_dict()}
    return "\n".join(lines) + "\n", summary


def _table_only(report: Report) -> str:
    from dms_lightning.report.tables import markdown_table

    return markdown_table(report)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    workdir = Path(args.workdir) / ("quick" if args.quick else "full")
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    start = time.perf_counter()

    teacher_ckpt = Path(args.teacher_ckpt)
    if not teacher_ckpt.is_file():
        teacher_ckpt = train_teacher(args, teacher_ckpt)
    extra = export_teacher(args, teacher_ckpt, workdir)
    report = run_student(args, teacher_ckpt, extra, workdir)
    if report is None:
        raise RuntimeError("CompressionReport produced no report; see the log above")
    seconds = time.perf_counter() - start

    markdown, summary = results_markdown(report, args, seconds)
    print(markdown)
    output = Path(args.output)
    write_text_atomic(output.with_suffix(".md"), markdown)
    write_json_atomic(output.with_suffix(".json"), summary)
    report_dir = workdir / "report"
    for name in ("report.md", "report.csv", "report.json", "pareto_size.png", "pareto_latency.png"):
        source = report_dir / name
        if source.is_file():
            stem = output.name + ("_report" if name.startswith("report") else "")
            target = output.parent / (f"{stem}{source.suffix}" if name.startswith("report")
                                      else f"{output.name}_{name}")
            shutil.copyfile(source, target)
    print(f"written: {output.with_suffix('.md')} and siblings; artifacts under {workdir}")
    if not args.quick:
        readme_results.main()  # the README shows the latest table
    return summary


if __name__ == "__main__":
    main()
