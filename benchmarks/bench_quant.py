"""Quantization acceptance benchmark: ResNet-18 PTQ and MobileNetV3-small QAT / PTQ vs FP32 in ONNX Runtime.

    flock /tmp/cpu.lock python benchmarks/bench_quant.py            # ~10 min on 2 shared cores
    flock /tmp/cpu.lock python benchmarks/bench_quant.py --quick    # smaller data, for a smoke run
    flock /tmp/cpu.lock python benchmarks/bench_quant.py --only-ptq # the ResNet-18 PTQ comparison alone (~5 min)

Both networks are trained briefly on the synthetic DMS set (96 px, 1 channel). Every ratio is measured
within this one run: file size on disk, CPU latency at batch 1 (ONNX Runtime, fixed intra-op threads,
warm-up, sessions measured in interleaved rounds so background load hits all of them alike, median of
all runs) and test accuracy in ONNX Runtime on the whole test split.

MobileNetV3-small: quantizing everything makes ONNX Runtime on an AVX2 CPU *slower* than FP32 (its FP32
kernels fuse conv + hardswish; the int8 graph needs Q/DQ around every hardswish, hardsigmoid and SE
multiply). The script measures each candidate placement with PTQ, picks the most-quantized one that is
not slower than FP32 and trains QAT with it. Table: ``benchmarks/results/quantization.md``.

ResNet-18 PTQ is measured twice on the same calibration images: our torch-side PTQ (the fake-quant twin
calibrated by ``dms_lightning.quant.post_training_quantize``, exported as QDQ) and ONNX Runtime's
``quantize_static`` on the FP32 ONNX file (``dms_lightning.export.ort_quantize.quantize_onnx``), each with
its calibrators; ``--only-ptq`` refreshes that section of the saved table alone. The MobileNetV3-small
placement study names ONNX nodes, so it quantizes with ONNX Runtime.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402

from dms_lightning import DMSClassifier, DMSDataModule  # noqa: E402
from dms_lightning.callbacks import ONNXExport, QuantizationAwareTraining  # noqa: E402
from dms_lightning.export import export_onnx  # noqa: E402
from dms_lightning.export.ort_quantize import quantize_onnx  # noqa: E402
from dms_lightning.export.qdq import export_qdq_onnx  # noqa: E402
from dms_lightning.export.runtimes import accuracy, loader_logits, ort_session, top1_agreement, torch_logits  # noqa: E402
from dms_lightning.quant import CalibrationConfig, QuantizationConfig, post_training_quantize  # noqa: E402
from dms_lightning.quant.spec import QuantSpec  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 1
PTQ_BEGIN, PTQ_END = "<!-- ptq-comparison:begin -->", "<!-- ptq-comparison:end -->"

# Candidate placements for MobileNetV3-small, most quantized first: (PTQ options, QAT options). PTQ options
# name ONNX nodes (``/features/features.9/block/block.0/...``), QAT options torch modules (``features.9.block.0.0``).
# Partial placements quantize only Conv / Gemm nodes: every other int8 op would add Q/DQ pairs to a float region.
_STEM_SE_PTQ = ["/features/features.0/*", "*/fc1/*", "*/fc2/*"]
_STEM_SE_QAT = ["features.0.*", "*.fc1", "*.fc2"]
_LATE_PTQ = ["/features/features.9/block/block.[03]/*", "/features/features.1[01]/block/block.[03]/*",
             "/features/features.12/*", "/classifier/*"]
_LATE_QAT = ["features.9.block.[03].0", "features.1[01].block.[03].0", "features.12.0", "classifier.*"]
POLICIES = {
    "full": (dict(), dict()),
    "no_depthwise": (dict(quantize_depthwise=False), dict(quantize_depthwise=False)),
    "pointwise_head": (dict(quantize_depthwise=False, exclude_nodes=_STEM_SE_PTQ, only_conv_gemm=True),
                       dict(quantize_depthwise=False, exclude=_STEM_SE_QAT)),
    "late_pointwise_head": (dict(include_nodes=_LATE_PTQ, only_conv_gemm=True), dict(include=_LATE_QAT)),
    "last_stage_head": (dict(include_nodes=["/features/features.11/block/block.[03]/*", "/features/features.12/*",
                                            "/classifier/*"], only_conv_gemm=True),
                        dict(include=["features.11.block.[03].0", "features.12.0", "classifier.*"])),
    "head_only": (dict(include_nodes=["/classifier/*"], only_conv_gemm=True), dict(include=["classifier.*"])),
}


def ptq_options(options: dict, fp32_path: Path) -> dict:
    import onnx

    options = dict(options)
    if options.pop("only_conv_gemm", False):
        op_types = {n.op_type for n in onnx.load(str(fp32_path)).graph.node}
        options["exclude_op_types"] = sorted(op_types - {"Conv", "Gemm"})
    return options


def log(message: str) -> None:
    print(f"[bench_quant {time.strftime('%H:%M:%S')}] {message}", flush=True)


def trainer(root: Path, epochs: int, callbacks=(), limit_train_batches=None) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root),
                     num_sanity_val_steps=0, callbacks=list(callbacks), limit_train_batches=limit_train_batches)


def latencies(paths: dict[str, Path], rounds: int, runs: int, image_size: int, channels: int = 1) -> dict[str, float]:
    """Median batch-1 latency (ms) of each model, sessions interleaved round by round."""
    sessions = {name: ort_session(path, threads=THREADS) for name, path in paths.items()}
    x = np.random.default_rng(0).standard_normal((1, channels, image_size, image_size)).astype(np.float32)
    for session in sessions.values():
        for _ in range(20):
            session.run(None, {"input": x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(runs):
                start = time.perf_counter()
                session.run(None, {"input": x})
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def ort_accuracy(path: Path, loader) -> tuple[float, np.ndarray]:
    logits, labels = loader_logits(ort_session(path, threads=2), loader)
    return accuracy(logits, labels), logits


@torch.no_grad()
def recalibrate_batch_norm(model: torch.nn.Module, loader, batches: int = 16) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over ``batches`` training batches.

    torchvision's MobileNetV3 uses BatchNorm momentum 0.01: after a few hundred steps its running
    statistics still lag the weights and the eval-mode model scores at chance (20 %) while the same
    weights with batch statistics score > 50 %. A brief run needs this standard post-training step;
    it changes no weight and both the FP32 and the INT8 models start from it.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        model(batch[0])
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.eval()


def train_float(backbone: str, datamodule: DMSDataModule, epochs: int, lr: float, root: Path, limit) -> DMSClassifier:
    L.seed_everything(0)
    model = DMSClassifier(backbone, image_size=datamodule.image_size,
                          optimizer=lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.01))
    start = time.time()
    trainer(root, epochs, limit_train_batches=limit).fit(model, datamodule)
    recalibrate_batch_norm(model.model, datamodule.calibration_dataloader("train"))
    log(f"{backbone}: {epochs} float epochs in {time.time() - start:.0f} s")
    return model


def torch_ptq(network: torch.nn.Module, calibration, batches: int, method: str, weight_bits: int = 8):
    """Our PTQ: the fake-quant twin of a copy of ``network`` calibrated with ``method``; (model, seconds)."""
    config = QuantizationConfig(weight=QuantSpec(weight_bits, symmetric=True, per_channel=True))
    start = time.perf_counter()
    model = post_training_quantize(copy.deepcopy(network), calibration, config, CalibrationConfig(method),
                                   calibration_batches=batches)
    return model, time.perf_counter() - start


def compare_ptq(network: torch.nn.Module, fp32_path: Path, calibration, batches: int, test_loader, work: Path,
                example: torch.Tensor) -> list[dict]:
    """Torch-side PTQ vs ONNX Runtime quantize_static, each calibrator, same calibration images and test split."""
    fp32_acc, _ = ort_accuracy(fp32_path, test_loader)
    rows = []
    for method in ("minmax", "percentile", "entropy", "mse"):
        model, seconds = torch_ptq(network, calibration, batches, method)
        ours = export_qdq_onnx(model, example, work / f"resnet18_torch_ptq_{method}.onnx")
        fake_quant, _ = torch_logits(model, test_loader)
        graph, labels = loader_logits(ort_session(ours, threads=2, fuse_qdq=False), test_loader)
        fused, _ = loader_logits(ort_session(ours, threads=2), test_loader)
        row = {"method": method, "fp32": fp32_acc, "ours_onnxruntime": accuracy(fused, labels),
               "ours_fake_quant": accuracy(fake_quant, labels), "agreement_qdq_graph": top1_agreement(graph, fake_quant),
               "agreement_fused_kernels": top1_agreement(fused, fake_quant), "ours_seconds": seconds,
               "ort": None, "ort_seconds": None}
        if method != "mse":  # ONNX Runtime has no MSE calibrator
            start = time.perf_counter()
            ort = quantize_onnx(fp32_path, work / f"resnet18_ort_ptq_{method}.onnx", calibration,
                                calibration_batches=batches, calibration_method=method)
            row["ort_seconds"] = time.perf_counter() - start
            row["ort"], _ = ort_accuracy(ort, test_loader)
        rows.append(row)
        log(f"PTQ {method}: ours {row['ours_onnxruntime']:.4f} (fake-quant {row['ours_fake_quant']:.4f}, "
            f"agreement {row['agreement_qdq_graph']:.4f}), ONNX Runtime {row['ort']}")
    return rows


def ptq_section(rows: list[dict], info: dict, args, resnet_note: str) -> list[str]:
    lines = [PTQ_BEGIN, "## ResNet-18 PTQ: torch-side calibration vs ONNX Runtime `quantize_static`", "",
             f"Machine: {machine_summary(info)}. ResNet-18: {resnet_note}. Both paths calibrate on the same "
             f"{args.calibration_batches} batches of 64 un-augmented training images "
             "(`DMSDataModule.calibration_dataloader('train')`), int8 per-channel symmetric weights, uint8 "
             f"activations; test accuracy on the whole test split ({args.image_size} px). *Ours* is "
             "`post_training_quantize` (the fake-quant twin QAT uses) exported as QDQ and run by ONNX Runtime "
             "(fused CPU integer kernels); *fake-quant* is the same model in PyTorch; agreement is ONNX Runtime "
             "vs fake-quant top-1 (QDQ graph semantics / fused kernels). Regenerate: "
             "`python benchmarks/bench_quant.py --only-ptq`.", "",
             "| calibrator | FP32 | ONNX Runtime quantize_static | ours (ONNX Runtime) | ours − ORT (pt) | ours (fake-quant) "
             "| agreement QDQ graph | agreement fused kernels | calibration s (ours / ORT) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ort = f"{r['ort'] * 100:.2f} %" if r["ort"] is not None else "n/a (no MSE calibrator)"
        delta = f"{(r['ours_onnxruntime'] - r['ort']) * 100:+.2f}" if r["ort"] is not None else ""
        ort_s = f"{r['ort_seconds']:.1f}" if r["ort_seconds"] is not None else "–"
        lines.append(f"| {r['method']} | {r['fp32'] * 100:.2f} % | {ort} | {r['ours_onnxruntime'] * 100:.2f} % | {delta} "
                     f"| {r['ours_fake_quant'] * 100:.2f} % | {r['agreement_qdq_graph'] * 100:.2f} % "
                     f"| {r['agreement_fused_kernels'] * 100:.2f} % | {r['ours_seconds']:.1f} / {ort_s} |")
    checks = []
    for r in rows:
        if r["ort"] is not None:
            gap = (r["ort"] - r["ours_onnxruntime"]) * 100
            checks.append((f"{r['method']}: ours ≥ ONNX Runtime − 0.5 pt", f"{-gap:+.2f} pt", gap <= 0.5))
        checks.append((f"{r['method']}: ONNX Runtime vs fake-quant agreement ≥ 99 %",
                       f"{r['agreement_qdq_graph'] * 100:.2f} %", r["agreement_qdq_graph"] >= 0.99))
    lines += ["", "| acceptance check | measured | pass |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in checks]
    return lines + ["", f"Measured {info.get('measured_at', '')}.", PTQ_END]


def write_ptq_section(section: list[str], args) -> None:
    """Replace the PTQ comparison block of the saved table (or append it), leaving the rest as measured."""
    path = RESULTS / ("quantization_quick.md" if args.quick else "quantization.md")
    text = path.read_text() if path.is_file() else "# Quantization benchmark (`benchmarks/bench_quant.py`)\n"
    block = "\n".join(section)
    if PTQ_BEGIN in text and PTQ_END in text:
        head, rest = text.split(PTQ_BEGIN, 1)
        text = head + block + rest.split(PTQ_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    print(block)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data and few epochs (smoke run)")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--resnet-checkpoint", default=str(Path(__file__).resolve().parents[1] /
                                                           "artifacts/teacher/best.ckpt"),
                        help="the trained ResNet-18 teacher (configs/teacher.yaml); trained here if missing")
    parser.add_argument("--resnet-epochs", type=int, default=3, help="epochs when the teacher must be trained here")
    parser.add_argument("--mobilenet-epochs", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--only-ptq", action="store_true",
                        help="only the ResNet-18 PTQ comparison (ours vs ONNX Runtime); updates that section")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sizes = dict(train_size=2000, val_size=500, test_size=1000) if not args.quick else \
        dict(train_size=256, val_size=64, test_size=256)
    limit = 4 if args.quick else None
    datamodule = DMSDataModule(image_size=args.image_size, channels=1, batch_size=64, **sizes)
    datamodule.setup("fit")
    datamodule.setup("test")
    test_loader = datamodule.test_dataloader()
    calibration = datamodule.calibration_dataloader("train")  # training images, no augmentation
    args.calibration_batches = min(args.calibration_batches, len(calibration))
    work = Path(tempfile.mkdtemp(prefix="bench_quant_"))
    rows, checks, notes = [], [], {}
    rounds, runs = (5, 10) if args.quick else (15, 20)

    # ---------------------------------------------------------------- ResNet-18: PTQ
    if Path(args.resnet_checkpoint).is_file() and not args.quick:
        resnet = DMSClassifier.load_from_checkpoint(args.resnet_checkpoint, map_location="cpu").eval()
        repo = Path(__file__).resolve().parents[1]
        notes["resnet"] = f"teacher checkpoint {os.path.relpath(args.resnet_checkpoint, repo)}"
        if resnet.image_size != args.image_size:
            raise SystemExit(f"--resnet-checkpoint was trained at {resnet.image_size} px, not --image-size "
                             f"{args.image_size}")
    else:
        resnet = train_float("resnet18", datamodule, args.resnet_epochs, 2e-3, work / "r18", limit)
        notes["resnet"] = f"trained here for {args.resnet_epochs} epochs"
    example = datamodule.example_input(1)
    r_fp32 = export_onnx(resnet.model, example, work / "resnet18_fp32.onnx")
    ptq_rows = compare_ptq(resnet.model, r_fp32, calibration, args.calibration_batches, test_loader, work, example)
    section = ptq_section(ptq_rows, machine_info(threads=THREADS), args, notes["resnet"])
    if args.only_ptq:
        write_ptq_section(section, args)
        return
    # Calibration choices are tuned like any hyper-parameter: on the validation split, then reported on test.
    ptq_configs = {"minmax": ("minmax", 8), "percentile": ("percentile", 8), "entropy": ("entropy", 8),
                   "mse": ("mse", 8), "minmax, 7-bit weights": ("minmax", 7)}
    r_ptq = {}
    for i, (name, (method, bits)) in enumerate(ptq_configs.items()):
        model, _ = torch_ptq(resnet.model, calibration, args.calibration_batches, method, bits)
        r_ptq[name] = export_qdq_onnx(model, example, work / f"resnet18_ptq_{i}.onnx")
    val_loader = datamodule.val_dataloader()
    val_acc = {name: ort_accuracy(path, val_loader)[0] for name, path in r_ptq.items()}
    best = max(val_acc, key=val_acc.get)
    acc_fp32, _ = ort_accuracy(r_fp32, test_loader)
    lat = latencies({"fp32": r_fp32, **r_ptq}, rounds, runs // 2 or 1, args.image_size)
    size_fp32 = r_fp32.stat().st_size
    rows.append(("ResNet-18", "FP32", "", size_fp32, 1.0, lat["fp32"], 1.0, acc_fp32, 0.0))
    for name, path in r_ptq.items():
        acc, _ = ort_accuracy(path, test_loader)
        marker = " ← best on val" if name == best else ""
        rows.append(("ResNet-18", f"PTQ INT8, torch-side ({name}){marker}", "all Conv/Gemm/Add", path.stat().st_size,
                     path.stat().st_size / size_fp32, lat[name], lat[name] / lat["fp32"], acc, (acc - acc_fp32) * 100))
    notes["resnet_ptq_val_accuracy"] = val_acc
    main_row = next(r for r in rows if r[1].startswith(f"PTQ INT8, torch-side ({best})"))
    checks.append((f"ResNet-18 PTQ ({best}) file ≤ 0.27× FP32", f"{main_row[4]:.3f}×", main_row[4] <= 0.27))
    checks.append((f"ResNet-18 PTQ ({best}) latency ≤ 0.6× FP32", f"{main_row[6]:.3f}×", main_row[6] <= 0.6))
    checks.append((f"ResNet-18 PTQ ({best}) accuracy within 0.5 pt", f"{main_row[8]:+.2f} pt",
                   abs(main_row[8]) <= 0.5))
    del resnet

    # ---------------------------------------------------------------- MobileNetV3-small: placement, PTQ, QAT
    mobilenet = train_float("mobilenet_v3_small", datamodule, args.mobilenet_epochs, 3e-3, work / "mnv3", limit)
    m_fp32 = export_onnx(mobilenet.model, example, work / "mobilenet_fp32.onnx")
    m_acc_fp32, _ = ort_accuracy(m_fp32, test_loader)
    m_size = m_fp32.stat().st_size
    candidates = {name: quantize_onnx(m_fp32, work / f"mobilenet_ptq_{name}.onnx", calibration,
                                      calibration_batches=args.calibration_batches, **ptq_options(ptq, m_fp32))
                  for name, (ptq, _) in POLICIES.items()}
    lat = latencies({"fp32": m_fp32, **candidates}, rounds * 2, runs, args.image_size)
    rows.append(("MobileNetV3-small", "FP32", "", m_size, 1.0, lat["fp32"], 1.0, m_acc_fp32, 0.0))
    chosen = None
    for name, path in candidates.items():
        acc, _ = ort_accuracy(path, test_loader)
        ratio = lat[name] / lat["fp32"]
        rows.append(("MobileNetV3-small", "PTQ INT8", name, path.stat().st_size, path.stat().st_size / m_size,
                     lat[name], ratio, acc, (acc - m_acc_fp32) * 100))
        if chosen is None and ratio <= 1.0:
            chosen = name
    fastest = min(candidates, key=lambda n: lat[n])
    chosen = chosen or fastest
    notes["mobilenet_policy"] = chosen
    log(f"MobileNetV3-small placement for QAT: {chosen} (latency ratios "
        f"{ {n: round(lat[n] / lat['fp32'], 3) for n in candidates} })")

    def continued() -> DMSClassifier:  # the float weights, trained on with QAT's optimizer and schedule
        model = DMSClassifier("mobilenet_v3_small", image_size=args.image_size,
                              optimizer=lambda params: torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01))
        model.load_state_dict(mobilenet.state_dict())
        L.seed_everything(1)
        return model

    # QAT trains on for qat_epochs: the same epochs without fake quantization separate the cost of INT8
    # from the gain of training longer.
    float_more = continued()
    trainer(work / "float_more_run", args.qat_epochs, limit_train_batches=limit).fit(float_more, datamodule)
    m_more = export_onnx(float_more.model, example, work / "mobilenet_fp32_more.onnx")
    m_acc_more, _ = ort_accuracy(m_more, test_loader)
    rows.append(("MobileNetV3-small", f"FP32 + {args.qat_epochs} epochs", "", m_more.stat().st_size, 1.0,
                 lat["fp32"], 1.0, m_acc_more, (m_acc_more - m_acc_fp32) * 100))

    qat_runs = {}
    for policy in dict.fromkeys([chosen, "full"]):  # the CPU placement, and everything (what an NPU runs)
        qat_model = continued()
        qat = QuantizationAwareTraining(start_epoch=0, freeze_bn_epoch=args.qat_epochs - 1,
                                        freeze_observers_epoch=args.qat_epochs - 1, dirpath=str(work / "qat"),
                                        filename=f"mobilenet_qat_{policy}", **POLICIES[policy][1])
        writer = ONNXExport(export_fp32=False, export_int8=False, openvino=False, dirpath=str(work / "qat_export"))
        start = time.time()
        trainer(work / "qat_run", args.qat_epochs, [qat, writer], limit_train_batches=limit).fit(qat_model, datamodule)
        (variant,) = [v for v in writer.variants if v.producer == "QuantizationAwareTraining"]
        exported = {"onnx_path": variant.onnx_path, "encodings_path": variant.info["encodings_path"],
                    "agreement": variant.info["parity"]["top1_agreement"]}
        log(f"QAT ({policy}): {args.qat_epochs} epochs in {time.time() - start:.0f} s; parity {exported['agreement']}")
        qat_runs[policy] = exported
    qat_paths = {policy: Path(result["onnx_path"]) for policy, result in qat_runs.items()}
    qat_lat = latencies({"fp32": m_fp32, **qat_paths}, rounds * 2, runs, args.image_size)
    for policy, path in qat_paths.items():
        acc, _ = ort_accuracy(path, test_loader)
        ratio = qat_lat[policy] / qat_lat["fp32"]
        rows.append(("MobileNetV3-small", "QAT INT8", policy, path.stat().st_size, path.stat().st_size / m_size,
                     qat_lat[policy], ratio, acc, (acc - m_acc_fp32) * 100))
        agreement = qat_runs[policy]["agreement"]
        # A quantization cost is a loss: INT8 above its float reference meets "within 0.5 pt" too.
        for reference, ref_acc in (("FP32 it started from", m_acc_fp32),
                                   (f"FP32 + {args.qat_epochs} epochs", m_acc_more)):
            checks.append((f"MobileNetV3-small QAT ({policy}) accuracy ≥ {reference} − 0.5 pt",
                           f"{(acc - ref_acc) * 100:+.2f} pt", (ref_acc - acc) * 100 <= 0.5))
        if policy == chosen:
            checks.append((f"MobileNetV3-small QAT ({policy}) INT8 not slower than FP32", f"{ratio:.3f}×",
                           ratio <= 1.0))
        checks.append((f"QAT ({policy}) ONNX Runtime vs fake-quant top-1 agreement ≥ 99 %", f"{agreement:.4f}",
                       agreement >= 0.99))
    notes.update(qat={p: {k: v for k, v in r.items() if k != "encodings_path"} for p, r in qat_runs.items()},
                 qat_latency_ms=qat_lat)
    write_table(rows, checks, notes, args, section)


def write_table(rows, checks, notes, args, ptq_comparison: list[str]) -> None:
    info = machine_info(threads=THREADS)
    lines = ["# Quantization benchmark (`benchmarks/bench_quant.py`)", "",
             f"Machine: {machine_summary(info)}", "",
             f"Data: synthetic DMS, {args.image_size} px, 1 channel; test accuracy in ONNX Runtime on the whole "
             f"test split. Latency: batch 1, {THREADS} intra-op thread, median over interleaved rounds.", "",
             f"ResNet-18: {notes.get('resnet')}. MobileNetV3-small: {args.mobilenet_epochs} float epochs, then "
             f"{args.qat_epochs} QAT epochs from those weights (and, as a reference, the same {args.qat_epochs} epochs "
             "without fake quantization). Δ acc is against the FP32 model QAT started from.", "",
             "| model | variant | quantized | file (MB) | size × FP32 | latency (ms) | latency × FP32 | test acc | Δ acc (pt) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for model, variant, policy, size, size_ratio, latency, latency_ratio, acc, delta in rows:
        lines.append(f"| {model} | {variant} | {policy} | {size / 1e6:.2f} | {size_ratio:.3f} | {latency:.3f} | "
                     f"{latency_ratio:.3f} | {acc * 100:.2f} % | {delta:+.2f} |")
    lines += ["", "| acceptance check | measured | pass |", "| --- | --- | --- |"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in checks]
    lines += ["", f"MobileNetV3-small placement chosen for QAT: `{notes['mobilenet_policy']}` (the most quantized "
              "candidate whose PTQ model is not slower than FP32; see docs/quantization.md).", "",
              *ptq_comparison, "",
              "```json", json.dumps({"machine": info, "args": vars(args), "notes": notes}, indent=2, default=str), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "quantization_quick.md" if args.quick else "quantization.md"
    (RESULTS / name).write_text(text)


if __name__ == "__main__":
    main()
