"""Side by side with the tools a team would otherwise use: same models, same data, one run.

    pip install -e ".[peers]" -c benchmarks/peers-constraints.txt   # NNCF, AIMET-onnx, torchao (never at run time)
    nice -n 19 python benchmarks/bench_peers.py --artifacts .          # reuse artifacts/teacher/best.ckpt
    python benchmarks/bench_peers.py --quick                           # smaller data and epochs (budget 10 min)
    python benchmarks/bench_peers.py --render-only                     # rewrite the table from peers.json

The teacher is the main job's ResNet-18 (``--artifacts DIR`` reuses ``DIR/artifacts/teacher/best.ckpt`` from a
``python -m dms_lightning pipeline`` run; otherwise it is trained here with ``configs/teacher.yaml``'s recipe).
The students are distilled here with ``configs/distill.yaml``'s recipe (KD + attention transfer, teacher cache,
fixed augmented views) without its pruning / QAT callbacks, so every compression step below starts from the
same float network: MobileNetV3-small (the main job's student) and MobileNetV2.

Rows (ours against each peer, every number of one table measured in this one run):

* **PTQ INT8** (every model): our ``post_training_quantize`` (calibrator chosen on the validation split) exported
  as QDQ; ONNX Runtime ``quantize_static`` with its defaults and per-channel uint8 (its documented x86
  setting); NNCF ``nncf.quantize`` (ONNX backend) default and ``MIXED`` preset; AIMET-onnx min-max and
  AdaRound; torchao PT2E ``X86InductorQuantizer`` exported with ``torch.onnx.export(dynamo=True)``.
* **QAT INT8** (MobileNetV3-small): ``QuantizationAwareTraining`` vs torchao ``prepare_qat_pt2e``, same epochs,
  optimizer, schedule and data (both trained by the same Lightning loop).
* **channel pruning 30 % / 50 %** (MobileNetV3-small): ``IterativePruning`` inside fit vs Torch-Pruning's
  ``MetaPruner`` (prune, then fine-tune the same epochs) vs Lightning's ``ModelPruning`` (L1 filter masks).
* **distillation** (MobileNetV3-small): ``DistillationModule`` (KD + attention transfer) vs a plain logit-KD
  loop written the usual way (teacher forward every step), same epochs.

Every file is measured the same way: accuracy, macro-F1 and per-class recall from ONNX Runtime (CPU) on the
whole test split; file size on disk; batch-1 latency p50 / p99 with 1 intra-op thread, all sessions timed in
interleaved rounds so background load hits each alike; wall time of the compression step. The 256
calibration images are the first validation images, the same for every tool.

Writes ``benchmarks/results/peers.md``, ``peers.json`` and ``peers.png`` (``peers_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dms_lightning import DistillationModule, DMSClassifier, DMSDataModule  # noqa: E402
from dms_lightning.callbacks import IterativePruning, QuantizationAwareTraining  # noqa: E402
from dms_lightning.export import export_onnx  # noqa: E402
from dms_lightning.export.ort_quantize import BatchCalibrationReader, quantize_onnx  # noqa: E402
from dms_lightning.export.qdq import export_qdq_onnx  # noqa: E402
from dms_lightning.pruning.functional import default_ignored_layers  # noqa: E402
from dms_lightning.quant import CalibrationConfig, QuantizationConfig, post_training_quantize  # noqa: E402
from dms_lightning.quant.spec import QuantSpec  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.report.measure import (CachedBatches, _Runner, _time_runs, evaluate_onnx,  # noqa: E402
                                          onnx_file_size, per_class_metrics)
from dms_lightning.report.plots import pareto_front  # noqa: E402
from dms_lightning.report.safety import worst_safety_recall  # noqa: E402
from dms_lightning.utils.compression import compression_target  # noqa: E402
from dms_lightning.utils.io import atomic_path, write_json_atomic, write_text_atomic  # noqa: E402
from dms_lightning.utils.plotting import plt  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
THREADS = 1  # ONNX Runtime intra-op threads for latency (accuracy runs with 2)
# Two p50 latencies closer than this count as equal in the verdicts (run-to-run spread of the interleaved rounds
# on the shared 2-core machine); the table shows the raw ratio either way.
LATENCY_NOISE = 0.03
SAFETY_CLASSES = ("eyes_closed", "looking_away", "phone")
CALIBRATORS = ("minmax", "percentile", "entropy", "mse")
MODELS = {"teacher": "ResNet-18 (teacher)", "mnv3": "MobileNetV3-small (student)", "mnv2": "MobileNetV2 (student)",
          "mainjob": "main job's student (pruned, QAT)"}
# Attention transfer, student stage -> teacher stage of the same spatial size (1/4, 1/8, 1/16 of the input).
ATTENTION = {"mobilenet_v3_small": [("features.1", "layer1"), ("features.3", "layer2"), ("features.8", "layer3")],
             "mobilenet_v2": [("features.3", "layer1"), ("features.6", "layer2"), ("features.13", "layer3")]}
TRAINER = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, num_sanity_val_steps=0)

log = logging.getLogger("bench_peers")


# ----------------------------------------------------------------------------------------------- cells
@dataclass
class Cell:
    """One line of the table: a tool's result for one (row, model), or the reason it has none."""

    row: str
    model: str
    tool: str
    setting: str
    ours: bool = False
    path: str | None = None
    seconds: float | None = None
    note: str = ""
    reference: bool = False  # the FP32 line a row's Δ is measured against
    metrics: dict = field(default_factory=dict)


def _cell(cells: list[Cell], row: str, model: str, tool: str, setting: str, work, *, ours: bool = False,
          note: str = "") -> Cell:
    """Run ``work()`` -> ``(path, seconds)`` and record it; a peer that fails gets its reason in the cell."""
    cell = Cell(row, model, tool, setting, ours=ours, note=note)
    try:
        started = time.perf_counter()
        result = work()
        path, seconds = result if isinstance(result, tuple) else (result, time.perf_counter() - started)
        cell.path, cell.seconds = str(path), seconds
    except Exception as err:  # noqa: BLE001 - a peer that cannot run this case is a result, not a crash
        cell.note = (f"{note} " if note else "") + f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        log.warning("%s / %s / %s %s: %s", row, model, tool, setting, cell.note)
        log.debug(traceback.format_exc())
    cells.append(cell)
    return cell


def _skipped(cells: list[Cell], row: str, model: str, tool: str, setting: str, reason: str, ours: bool = False):
    cells.append(Cell(row, model, tool, setting, ours=ours, note=reason))


# ----------------------------------------------------------------------------------------------- configs
def recipe(name: str) -> dict:
    """The model / trainer / data sections of ``configs/<name>.yaml`` (the main job's recipes)."""
    return yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())


def adamw(lr: float, weight_decay: float = 0.01):
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def datamodule(args) -> DMSDataModule:
    data = recipe("distill")["data"]
    dm = DMSDataModule(source="synthetic", image_size=args.image_size, channels=data["channels"],
                       batch_size=args.batch_size, train_size=args.train_size, val_size=args.val_size,
                       test_size=args.test_size, augment_views=data.get("augment_views", 1))
    dm.setup("fit")
    dm.setup("test")
    return dm


def calibration_batches(dm: DMSDataModule, images: int, batch: int = 32) -> list[torch.Tensor]:
    """The first ``images`` validation images (un-augmented), in batches: the one calibration set of every tool."""
    collected = torch.cat([b[0] for b in dm.val_dataloader()])[:images]
    if len(collected) < images:
        log.warning("only %d validation images for %d calibration images", len(collected), images)
    return list(collected.split(batch))


# ----------------------------------------------------------------------------------------------- training
def fit(module: LightningModule, dm: DMSDataModule, epochs: int, workdir: Path, callbacks=()) -> float:
    started = time.perf_counter()
    Trainer(max_epochs=epochs, default_root_dir=str(workdir), limit_val_batches=0, callbacks=list(callbacks),
            **TRAINER).fit(module, dm)
    return time.perf_counter() - started


def teacher_checkpoint(args, dm: DMSDataModule, workdir: Path) -> tuple[Path, str]:
    if args.artifacts:
        path = Path(args.artifacts) / "artifacts" / "teacher" / "best.ckpt"
        if not path.is_file():
            raise SystemExit(f"--artifacts {args.artifacts}: {path} does not exist (run `python -m dms_lightning "
                             "pipeline` there, or leave --artifacts out to train the teacher here)")
        return path, f"the main job's teacher ({path})"
    config = recipe("teacher")
    optimizer = config["model"]["init_args"]["optimizer"]["init_args"]
    seed_everything(config.get("seed_everything", 42))
    teacher = DMSClassifier(config["model"]["init_args"]["backbone"], image_size=args.image_size,
                            optimizer=adamw(optimizer["lr"], optimizer.get("weight_decay", 0.01)))
    trainer = Trainer(max_epochs=args.teacher_epochs, default_root_dir=str(workdir), limit_val_batches=0, **TRAINER)
    started = time.perf_counter()
    trainer.fit(teacher, dm)
    path = workdir / "teacher.ckpt"
    trainer.save_checkpoint(str(path))
    return path, f"trained here, configs/teacher.yaml recipe, {args.teacher_epochs} epochs " \
                 f"({time.perf_counter() - started:.0f} s)"


def distill_ours(student: str, teacher: Path, args, dm: DMSDataModule, workdir: Path) -> tuple[nn.Module, float]:
    """configs/distill.yaml's DistillationModule (KD + attention transfer, teacher cache), no compression callbacks."""
    init = recipe("distill")["model"]["init_args"]
    seed_everything(42)
    module = DistillationModule(student=student, teacher_checkpoint=str(teacher), image_size=args.image_size,
                                temperature=init["temperature"], alpha=init["alpha"],
                                teacher_cache=init.get("teacher_cache", False),
                                attention_transfer=[{"student": s, "teacher": t} for s, t in ATTENTION[student]],
                                optimizer=adamw(init["optimizer"]["init_args"]["lr"]))
    seconds = fit(module, dm, args.distill_epochs, workdir)
    return compression_target(module).eval(), seconds


class PlainLogitKD(DMSClassifier):
    """The peer of DistillationModule: Hinton et al.'s logit KD as a team writes it, the teacher run every step."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self._teacher = [teacher.eval()]  # a list: not a sub-module, so neither trained nor checkpointed
        self.temperature, self.alpha = temperature, alpha

    def training_loss(self, images, labels):
        logits = self(images)
        with torch.no_grad():
            teacher_logits = self._teacher[0](images)
        t = self.temperature
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                      reduction="batchmean") * t * t
        return self.alpha * kd + (1 - self.alpha) * F.cross_entropy(logits, labels), logits


def distill_plain(teacher: Path, args, dm: DMSDataModule, workdir: Path) -> tuple[nn.Module, float]:
    init = recipe("distill")["model"]["init_args"]
    seed_everything(42)
    teacher_net = DMSClassifier.load_from_checkpoint(str(teacher), map_location="cpu").model
    for p in teacher_net.parameters():
        p.requires_grad_(False)
    module = PlainLogitKD(teacher_net, init["temperature"], init["alpha"], backbone="mobilenet_v3_small",
                          image_size=args.image_size, optimizer=adamw(init["optimizer"]["init_args"]["lr"]))
    seconds = fit(module, dm, args.distill_epochs, workdir)
    return module.model.eval(), seconds


def finetune_module(network: nn.Module, args) -> DMSClassifier:
    """A DMSClassifier around a copy of ``network``: the one fine-tune loop (optimizer, schedule) of every tool."""
    module = DMSClassifier("mobilenet_v3_small", image_size=args.image_size, optimizer=adamw(args.finetune_lr))
    module.model = copy.deepcopy(network)
    return module


# ----------------------------------------------------------------------------------------------- PTQ
def ours_ptq(network: nn.Module, calib, val, example, out: Path, work: Path) -> tuple[Path, float, dict]:
    """Every calibrator of post_training_quantize; the one best on the validation split is the table's."""
    val_acc, seconds, paths = {}, {}, {}
    config = QuantizationConfig(weight=QuantSpec(8, symmetric=True, per_channel=True))
    for method in CALIBRATORS:
        started = time.perf_counter()
        model = post_training_quantize(copy.deepcopy(network), calib, config, CalibrationConfig(method))
        paths[method] = export_qdq_onnx(model, example, work / f"{out.stem}_{method}.onnx")
        seconds[method] = time.perf_counter() - started
        val_acc[method] = evaluate_onnx(_Runner(paths[method], 2), val)["accuracy"]
    best = max(CALIBRATORS, key=lambda m: (val_acc[m], -CALIBRATORS.index(m)))
    paths[best].replace(out)
    return out, seconds[best], {"calibrator": best, "validation_accuracy": val_acc, "seconds": seconds}


def ort_defaults(fp32: Path, calib, out: Path) -> Path:
    """``onnxruntime.quantization.quantize_static`` as its documentation calls it: every default."""
    from onnxruntime.quantization import quantize_static

    with atomic_path(out) as tmp:
        quantize_static(str(fp32), str(tmp), BatchCalibrationReader(calib, "input"))
    return out


def nncf_quantize(fp32: Path, calib, out: Path, preset: str | None) -> Path:
    import nncf
    import onnx

    dataset = nncf.Dataset([b.numpy() for b in calib], lambda images: {"input": images})
    options = {"preset": getattr(nncf.QuantizationPreset, preset)} if preset else {}
    quantized = nncf.quantize(onnx.load(str(fp32)), dataset, subset_size=sum(len(b) for b in calib), **options)
    with atomic_path(out) as tmp:
        onnx.save(quantized, str(tmp))
    return out


def aimet_quantize(fp32: Path, calib, out: Path, adaround_iterations: int | None) -> Path:
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround

    inputs = [{"input": b.numpy()} for b in calib]
    sim = QuantizationSimModel(onnx.load(str(fp32)))
    if adaround_iterations:
        apply_adaround(sim, inputs, num_iterations=adaround_iterations)
    sim.compute_encodings(inputs)
    with atomic_path(out) as tmp:
        onnx.save(sim.to_onnx_qdq(), str(tmp))
    return out


def _exported(network: nn.Module, example: torch.Tensor):
    batch = torch.export.Dim("batch", min=1, max=1024)
    return torch.export.export(network, (example.repeat(2, 1, 1, 1),), dynamic_shapes=({0: batch},)).module()


def _onnx_of_pt2e(converted, example: torch.Tensor, out: Path) -> Path:
    with atomic_path(out) as tmp:
        torch.onnx.export(converted, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                          dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
                          verbose=False)
    return out


def torchao_ptq(network: nn.Module, calib, example, out: Path) -> Path:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(_exported(copy.deepcopy(network).eval(), example), quantizer)
    with torch.no_grad():
        for images in calib:
            prepared(images)
    return _onnx_of_pt2e(convert_pt2e(prepared), example, out)


def onnx_ptq_peer_cells(cells: list[Cell], row: str, model: str, fp32: Path, calib, w: Path) -> None:
    """The peers that quantize an FP32 ONNX file: ONNX Runtime (defaults, x86 advice), NNCF (default, MIXED),
    AIMET-onnx min-max, each from ``fp32`` with the same ``calib`` images, written under ``w``."""
    _cell(cells, row, model, "ONNX Runtime", "quantize_static defaults (QDQ, s8 act., per-tensor)",
          lambda: ort_defaults(fp32, calib, w / "ort_default.onnx"))
    _cell(cells, row, model, "ONNX Runtime", "per-channel, u8 act. (x86 advice)",
          lambda: quantize_onnx(fp32, w / "ort_per_channel.onnx", calib, per_channel=True))
    _cell(cells, row, model, "NNCF", "nncf.quantize default (PERFORMANCE)",
          lambda: nncf_quantize(fp32, calib, w / "nncf_default.onnx", None))
    _cell(cells, row, model, "NNCF", "nncf.quantize MIXED preset",
          lambda: nncf_quantize(fp32, calib, w / "nncf_mixed.onnx", "MIXED"))
    _cell(cells, row, model, "AIMET-onnx", "QuantizationSimModel min-max",
          lambda: aimet_quantize(fp32, calib, w / "aimet_minmax.onnx", None))


def ptq_cells(cells: list[Cell], model: str, network: nn.Module, fp32: Path, calib, val, example, args, work: Path):
    row = "PTQ INT8"
    w = work / model
    w.mkdir(exist_ok=True)
    info = {}

    def ours():
        path, seconds, info["ours"] = ours_ptq(network, calib, val, example, w / "ours.onnx", w)
        return path, seconds

    cell = _cell(cells, row, model, "dms_lightning", "post_training_quantize, best calibrator on val", ours, ours=True)
    if "ours" in info:
        cell.setting = f"post_training_quantize ({info['ours']['calibrator']}, chosen on val)"
        cell.metrics["calibrators"] = info["ours"]
    onnx_ptq_peer_cells(cells, row, model, fp32, calib, w)
    if model in args.adaround_models:
        _cell(cells, row, model, "AIMET-onnx", f"AdaRound ({args.adaround_iterations} it./layer) + min-max",
              lambda: aimet_quantize(fp32, calib, w / "aimet_adaround.onnx", args.adaround_iterations))
    else:
        _skipped(cells, row, model, "AIMET-onnx", "AdaRound + min-max",
                 f"not run for this model (--adaround-models {','.join(args.adaround_models) or 'none'}): "
                 "AIMET-onnx AdaRound costs minutes per model on 2 CPU cores")
    _cell(cells, row, model, "torchao", "PT2E X86InductorQuantizer -> torch.onnx (dynamo)",
          lambda: torchao_ptq(network, calib, example, w / "torchao_pt2e.onnx"))


def main_job_cells(cells: list[Cell], artifacts: Path, calib, work: Path) -> None:
    """The main job's own student: its QAT INT8 file against every peer's PTQ of its FP32 twin.

    ``student_fp32.onnx`` is the float network of the last (QAT) checkpoint, the one ``student_int8.onnx`` quantizes,
    so the peers start where our QAT ended and see the same calibration images as every other row.
    """
    row, model, w = "main job INT8", "mainjob", work / "mainjob"
    w.mkdir(parents=True, exist_ok=True)
    folder = artifacts / "artifacts" / "distill"
    fp32, int8 = folder / "student_fp32.onnx", folder / "student_int8.onnx"
    for path in (fp32, int8):
        if not path.is_file():
            raise SystemExit(f"--rows mainjob: {path} does not exist; run `python -m dms_lightning pipeline` in "
                             f"--artifacts {artifacts} first")
    cells.append(Cell("FP32", model, "FP32", "the main job's student_fp32.onnx (its FP32 twin)", path=str(fp32),
                      reference=True))
    cells.append(Cell(row, model, "dms_lightning", "the main job's student_int8.onnx (QAT, configs/distill.yaml)",
                      ours=True, path=str(int8)))
    onnx_ptq_peer_cells(cells, row, model, fp32, calib, w)


# ----------------------------------------------------------------------------------------------- QAT
def qat_cells(cells: list[Cell], network: nn.Module, dm, args, example, work: Path):
    row, model, epochs = "QAT INT8", "mnv3", args.qat_epochs
    last = max(0, epochs - 1)

    def ours():
        module = finetune_module(network, args)
        qat = QuantizationAwareTraining(start_epoch=0, freeze_bn_epoch=last, freeze_observers_epoch=last,
                                        export=False)
        seconds = fit(module, dm, epochs, work / "qat_ours", [qat])
        return export_qdq_onnx(compression_target(module).eval(), example, work / "qat_ours.onnx"), seconds

    def torchao_qat():
        from torchao.quantization.pt2e import allow_exported_model_train_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

        quantizer = x86.X86InductorQuantizer().set_global(
            x86.get_default_x86_inductor_quantization_config(is_qat=True))
        module = finetune_module(network, args)
        module.channels_last = False  # an exported graph keeps the memory format it was traced with
        prepared = prepare_qat_pt2e(_exported(module.model.train(), example), quantizer)
        allow_exported_model_train_eval(prepared)  # Lightning calls train() / eval()
        module.model = prepared
        seconds = fit(module, dm, epochs, work / "qat_torchao")
        prepared.eval()
        return _onnx_of_pt2e(convert_pt2e(prepared), example, work / "qat_torchao.onnx"), seconds

    _cell(cells, row, model, "dms_lightning", f"QuantizationAwareTraining, {epochs} epochs", ours, ours=True)
    _cell(cells, row, model, "torchao", f"PT2E prepare_qat_pt2e (X86), {epochs} epochs -> torch.onnx", torchao_qat)


# ----------------------------------------------------------------------------------------------- pruning
def _prunable_convs(network: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    skip = set(default_ignored_layers(network, example))
    return [(n, m) for n, m in network.named_modules() if isinstance(m, nn.Conv2d) and n not in skip]


def pruning_cells(cells: list[Cell], network: nn.Module, dm, args, example, work: Path):
    model, epochs = "mnv3", args.finetune_epochs
    for sparsity in args.sparsities:
        row = f"channel pruning {sparsity:.0%}"
        tag = f"{int(round(sparsity * 100))}"

        def ours(sparsity=sparsity, tag=tag):
            module = finetune_module(network, args)
            pruning = IterativePruning("channel", target_sparsity=sparsity, schedule="agp", start_epoch=0,
                                       end_epoch=max(1, epochs - 1), round_to=8, plot_layer_sparsity=False)
            seconds = fit(module, dm, epochs, work / f"prune_ours_{tag}", [pruning])
            return export_onnx(compression_target(module).eval(), example, work / f"prune_ours_{tag}.onnx"), seconds

        def torch_pruning(sparsity=sparsity, tag=tag):
            import torch_pruning as tp

            started = time.perf_counter()
            pruned = copy.deepcopy(network).eval()
            ignored = {n for n in default_ignored_layers(pruned, example)}
            tp.pruner.MetaPruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                 pruning_ratio=sparsity, round_to=8,
                                 ignored_layers=[m for n, m in pruned.named_modules() if n in ignored]).step()
            module = finetune_module(pruned, args)
            fit(module, dm, epochs, work / f"prune_tp_{tag}")
            return export_onnx(module.model.eval(), example, work / f"prune_tp_{tag}.onnx"), \
                time.perf_counter() - started

        def lightning_masks(sparsity=sparsity, tag=tag):
            from lightning.pytorch.callbacks import ModelPruning

            module = finetune_module(network, args)
            convs = [(m, "weight") for _, m in _prunable_convs(module.model, example)]
            # Masks applied once, after the first fine-tune epoch; training goes on with them; made permanent.
            pruning = ModelPruning("ln_structured", parameters_to_prune=convs, pruning_dim=0, pruning_norm=1,
                                   amount=lambda epoch: sparsity if epoch == 0 else 0.0,
                                   use_global_unstructured=False, verbose=0)
            seconds = fit(module, dm, epochs, work / f"prune_pl_{tag}", [pruning])
            return export_onnx(module.model.eval(), example, work / f"prune_pl_{tag}.onnx"), seconds

        _cell(cells, row, model, "dms_lightning", f"IterativePruning (AGP, channels removed, round_to 8), {epochs} ep.",
              ours, ours=True)
        _cell(cells, row, model, "Torch-Pruning", f"MetaPruner L1 (round_to 8) + {epochs} ep. fine-tune",
              torch_pruning)
        _cell(cells, row, model, "Lightning", f"ModelPruning ln_structured (masks), {epochs} ep.", lightning_masks)


# ----------------------------------------------------------------------------------------------- measuring
def measure(cells: list[Cell], test, args, sample: np.ndarray) -> None:
    """Accuracy / F1 / per-class recall / size of every file, then latency in interleaved rounds."""
    runners = {}
    for i, cell in enumerate(cells):
        if not cell.path:
            continue
        try:
            result = evaluate_onnx(_Runner(cell.path, 2), test)
        except Exception as err:  # noqa: BLE001 - a file ONNX Runtime cannot run is a result too
            cell.note += f" ONNX Runtime cannot run it: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
            cell.path = None
            continue
        per_class = per_class_metrics(result["confusion_matrix"], test.class_names)
        worst = worst_safety_recall(type("Row", (), {"per_class": per_class})(), SAFETY_CLASSES)
        cell.metrics.update(accuracy=result["accuracy"], macro_f1=result["macro_f1"], samples=result["samples"],
                            recall={k: v["recall"] for k, v in per_class.items()},
                            worst_safety=list(worst) if worst else None, size_bytes=onnx_file_size(cell.path))
        runners[i] = _Runner(cell.path, THREADS)
    times: dict[int, list[np.ndarray]] = {i: [] for i in runners}
    for round_index in range(args.rounds):  # interleaved: a noisy neighbour slows every file alike
        for i, runner in runners.items():
            times[i].append(_time_runs(lambda runner=runner: runner.run(sample),
                                       args.warmup_runs if round_index == 0 else 2, args.runs_per_round))
    for i, chunks in times.items():
        values = np.concatenate(chunks)
        cells[i].metrics.update(p50_ms=float(np.percentile(values, 50)), p99_ms=float(np.percentile(values, 99)),
                                latency_runs=int(values.size))


# ----------------------------------------------------------------------------------------------- table
def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _reference(cells: list[Cell], cell: Cell) -> Cell | None:
    """The FP32 line a cell is compared with: its own model's, or the teacher's for a distilled student."""
    model = "teacher" if cell.row == "distillation" else cell.model
    return next((c for c in cells if c.reference and c.model == model and c.metrics.get("accuracy") is not None),
                None)


def _delta(cells: list[Cell], cell: Cell) -> float | None:
    ref = _reference(cells, cell)
    acc = cell.metrics.get("accuracy")
    return None if ref is None or acc is None else 100 * (acc - ref.metrics["accuracy"])


def verdicts(cells: list[Cell]) -> list[dict]:
    """Per (row, model): ours against the most accurate peer, and any peer at least as accurate and as fast."""
    out = []
    for key in dict.fromkeys((c.row, c.model) for c in cells if not c.reference):
        group = [c for c in cells if (c.row, c.model) == key and c.metrics.get("accuracy") is not None
                 and c.metrics.get("p50_ms") is not None]
        ours = next((c for c in group if c.ours), None)
        peers = [c for c in group if not c.ours]
        if ours is None or not peers:
            out.append({"row": key[0], "model": key[1], "verdict": "no comparison (ours or every peer missing)"})
            continue
        best = max(peers, key=lambda c: (c.metrics["accuracy"], -c.metrics["p50_ms"]))
        a, b = ours.metrics, best.metrics
        def faster(x: dict, y: dict) -> bool:  # x at most as slow as y, within the noise
            return x["p50_ms"] <= y["p50_ms"] * (1 + LATENCY_NOISE)

        dominating = [f"{c.tool} {c.setting}" for c in peers
                      if c.metrics["accuracy"] >= a["accuracy"] and faster(c.metrics, a)
                      and (c.metrics["accuracy"] > a["accuracy"] or not faster(a, c.metrics))]
        wins = a["accuracy"] >= b["accuracy"] and faster(a, b)
        out.append({"row": key[0], "model": key[1], "ours": f"{ours.tool} {ours.setting}",
                    "best_peer": f"{best.tool} {best.setting}", "accuracy_pt": 100 * (a["accuracy"] - b["accuracy"]),
                    "latency_ratio": a["p50_ms"] / b["p50_ms"], "size_ratio": a["size_bytes"] / b["size_bytes"],
                    "seconds_ratio": (ours.seconds / best.seconds) if ours.seconds and best.seconds else None,
                    "ours_accuracy": a["accuracy"], "peer_accuracy": b["accuracy"], "ours_p50_ms": a["p50_ms"],
                    "peer_p50_ms": b["p50_ms"], "dominated_by": dominating,
                    "verdict": "win" if wins else ("loss" if dominating else "trade-off")})
    return out


def markdown(result: dict) -> str:
    cells = [Cell(**c) for c in result["cells"]]
    args = result["args"]
    flags = set(result["machine"].get("cpu_flags") or [])
    vnni = "with" if flags & {"avx512_vnni", "avx_vnni", "avx512vnni", "avxvnni"} else "**without**"
    lines = [f"# Against the peers (`benchmarks/bench_peers.py`{' --quick' if args['quick'] else ''})", ""]
    if args["quick"]:
        lines += ["**Quick run** (`--quick`: smaller data, fewer epochs): a wiring check, not the result.", ""]
    lines += [f"Machine: {machine_summary(result['machine'])}; AVX2 {vnni} VNNI (ONNX Runtime's u8s8 / s8s8 integer "
              "kernels are slow there, which is why activation signedness shows in the latency column). Versions: "
              + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
              f"Data: synthetic DMS, {args['image_size']} px, 1 channel; {args['train_size']} training images, "
              f"calibration = the first {args['calibration_images']} validation images (every tool), test = "
              f"{result['test_samples']} images (accuracy, macro-F1, recall: ONNX Runtime CPU, fused kernels). "
              f"Latency: batch 1, {THREADS} intra-op thread, {args['rounds']} interleaved rounds × "
              f"{args['runs_per_round']} runs. Wall: seconds of the compression step itself (calibration, "
              "training epochs, export). Δ vs FP32: against the same model's FP32 line; a distilled student against the "
              "teacher.", "",
              f"Teacher: {result['teacher']}. Students distilled here for {args['distill_epochs']} epochs with "
              f"configs/distill.yaml's recipe (no pruning / QAT callbacks) in {result['distill_seconds']}. "
              f"QAT: {args['qat_epochs']} epochs; pruning: {args['finetune_epochs']} fine-tune epochs; both from the "
              f"distilled MobileNetV3-small, AdamW lr {args['finetune_lr']}, the same Lightning loop for every tool.", "",
              "| row | model | tool | setting | accuracy | Δ vs FP32 (pt) | macro-F1 | worst safety recall | MB "
              "| p50 ms | p99 ms | wall s | note |",
              "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for c in cells:
        m = c.metrics
        delta = _delta(cells, c)
        worst = m.get("worst_safety")
        tool = f"**{c.tool}**" if c.ours else c.tool
        if m.get("accuracy") is None:
            lines.append(f"| {c.row} | {MODELS.get(c.model, c.model)} | {tool} | {c.setting} | – | – | – | – | – | – "
                         f"| – | – | {c.note or 'not measured'} |")
            continue
        lines.append(
            f"| {c.row} | {MODELS.get(c.model, c.model)} | {tool} | {c.setting} | {_pct(m['accuracy'])} | "
            f"{'' if c.reference else f'{delta:+.2f}' if delta is not None else '–'} | {m['macro_f1']:.3f} | "
            f"{f'{worst[0]} {100 * worst[1]:.1f} %' if worst else '–'} | {m['size_bytes'] / 1e6:.2f} | "
            f"{m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {'' if c.seconds is None else f'{c.seconds:.1f}'} | {c.note} |")
    lines += ["", "## Ours against the best peer, row by row", "",
              "Best peer = the most accurate peer of that row and model (ties: the faster). *win*: ours at least as "
              "accurate as the best peer and at most as slow; *loss*: some peer is at least as accurate **and** at "
              f"least as fast (better on one); *trade-off*: neither. Latencies within {LATENCY_NOISE:.0%} count as "
              "equal (the spread between interleaved rounds here).", "",
              "| row | model | ours | best peer | Δ accuracy (pt) | latency × peer | size × peer | wall × peer "
              "| verdict | peers at least as good on both |", "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for v in result["verdicts"]:
        if "best_peer" not in v:
            lines.append(f"| {v['row']} | {MODELS.get(v['model'], v['model'])} | | | | | | | {v['verdict']} | |")
            continue
        wall = f"{v['seconds_ratio']:.2f}×" if v["seconds_ratio"] else "–"
        lines.append(f"| {v['row']} | {MODELS.get(v['model'], v['model'])} | {v['ours']} | {v['best_peer']} | "
                     f"{v['accuracy_pt']:+.2f} | {v['latency_ratio']:.2f}× | {v['size_ratio']:.2f}× | {wall} | "
                     f"**{v['verdict']}** | {'; '.join(v['dominated_by']) or '–'} |")
    notes = result.get("closing_notes") or CLOSING_NOTES
    if notes:
        lines += ["", "## Where we lose, why, and what would close it", ""] + [f"* {n}" for n in notes]
    lines += ["", f"Measured {result['machine'].get('measured_at', '')} in {result['total_seconds'] / 60:.1f} min. "
              f"Command: `{result['command']}`.", ""]
    return "\n".join(lines)


#: Written after reading a full run's table (the numbers are in it); kept with the script so a rerun keeps them.
CLOSING_NOTES: list[str] = []

MARKERS = {"dms_lightning": "*", "ONNX Runtime": "o", "NNCF": "s", "AIMET-onnx": "^", "torchao": "D",
           "Torch-Pruning": "v", "Lightning": "P", "plain PyTorch": "X", "FP32": "x"}


def plot(result: dict, path: Path) -> Path:
    """Accuracy vs p50 latency, one panel per model, every tool a marker."""
    cells = [Cell(**c) for c in result["cells"] if c["metrics"].get("p50_ms") is not None]
    models = [m for m in MODELS if any(c.model == m for c in cells)]
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        group = [c for c in cells if c.model == model]
        points = [(c.metrics["p50_ms"], 100 * c.metrics["accuracy"]) for c in group]
        front = set(pareto_front(points))
        seen = set()
        for i, (c, (x, y)) in enumerate(zip(group, points)):
            tool = "FP32" if c.reference else c.tool
            ax.scatter(x, y, marker=MARKERS.get(tool, "o"), s=150 if c.ours else 60,
                       color="#d64545" if c.ours else ("#222222" if c.reference else "#3e7cb1"),
                       edgecolor="black" if i in front else "none", zorder=3,
                       label=None if tool in seen else tool)
            seen.add(tool)
            ax.annotate(f"{c.row}: {c.setting[:28]}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("ONNX Runtime CPU p50 latency, batch 1 (ms, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(MODELS[model])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("accuracy vs latency: ours (red, large) vs the peers; black edge = Pareto front of the panel")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def write_outputs(result: dict, stem: Path) -> dict[str, Path]:
    text = markdown(result)
    print(text)
    paths = {"md": write_text_atomic(stem.with_suffix(".md"), text),
             "json": write_json_atomic(stem.with_suffix(".json"), result)}
    paths["png"] = plot(result, stem.with_suffix(".png"))
    return paths


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer epochs (< 10 min)")
    parser.add_argument("--artifacts", help="folder of a `python -m dms_lightning pipeline` run: reuse its teacher")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--teacher-epochs", type=int, default=6, help="when the teacher is trained here")
    parser.add_argument("--distill-epochs", type=int, default=6)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=3, help="pruning fine-tune epochs")
    parser.add_argument("--finetune-lr", type=float, default=3e-4)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--models", default="teacher,mnv3,mnv2", help="models of the PTQ row (teacher,mnv3,mnv2)")
    parser.add_argument("--rows", default="ptq,qat,pruning,distillation",
                        help="ptq,qat,pruning,distillation; mainjob (with --artifacts): the main job's QAT student "
                             "against the peers' PTQ of its FP32 twin")
    parser.add_argument("--adaround-models", default="mnv3", help="models AIMET AdaRound runs on ('' for none)")
    parser.add_argument("--adaround-iterations", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs-per-round", type=int, default=20)
    parser.add_argument("--warmup-runs", type=int, default=20)
    parser.add_argument("--train-threads", type=int, default=2)
    parser.add_argument("--output", help="path stem of the results (default benchmarks/results/peers[_quick])")
    parser.add_argument("--workdir", help="where models are written (default: a temporary folder)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md / .png from the saved .json")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in dict(train_size=768, val_size=256, test_size=500, teacher_epochs=2, distill_epochs=2,
                                qat_epochs=1, finetune_epochs=2, rounds=4, runs_per_round=10, warmup_runs=5,
                                adaround_models="").items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    args.models = [m for m in args.models.split(",") if m]
    args.rows = [r for r in args.rows.split(",") if r]
    args.adaround_models = [m for m in args.adaround_models.split(",") if m]
    trained = [m for m in MODELS if m != "mainjob"]  # the models this script trains itself
    for field_name, values, valid in (("--models", args.models, trained),
                                      ("--rows", args.rows, ("ptq", "qat", "pruning", "distillation", "mainjob")),
                                      ("--adaround-models", args.adaround_models, trained)):
        unknown = [v for v in values if v not in valid]
        if unknown:
            parser.error(f"{field_name}: {unknown} not in {list(valid)}")
    if "mainjob" in args.rows and not args.artifacts:
        parser.error("--rows mainjob needs --artifacts DIR (a folder where `python -m dms_lightning pipeline` ran)")
    return args


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "onnxruntime", "lightning", "nncf", "aimet-onnx", "torchao", "torch-pruning"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    stem = Path(args.output) if args.output else RESULTS / ("peers_quick" if args.quick else "peers")
    if args.render_only:
        result = json.loads(stem.with_suffix(".json").read_text())
        result["closing_notes"] = CLOSING_NOTES or result.get("closing_notes", [])
        result["verdicts"] = verdicts([Cell(**c) for c in result["cells"]])
        write_outputs(result, stem)
        if not args.output:
            import readme_results

            readme_results.main()
        return result
    # The peers log every graph pass at INFO; only this script's progress and their warnings are shown.
    logging.basicConfig(level=logging.ERROR, format="[bench_peers %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    for name in ("nncf", "Quant", "Utils", "ConnectedGraph", "Adaround"):  # AIMET's area loggers have own handlers
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    torch.set_num_threads(args.train_threads)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_peers_"))
    work.mkdir(parents=True, exist_ok=True)
    dm = datamodule(args)
    calib = calibration_batches(dm, args.calibration_images)
    val = CachedBatches(dm.val_dataloader())
    test = CachedBatches(dm.test_dataloader())
    test.class_names = list(dm.class_names)
    example = dm.example_input(1)
    cells: list[Cell] = []

    teacher_ckpt, teacher_note = teacher_checkpoint(args, dm, work)
    log.info("teacher: %s", teacher_note)
    teacher_module = DMSClassifier.load_from_checkpoint(str(teacher_ckpt), map_location="cpu")
    if teacher_module.image_size != args.image_size:
        raise SystemExit(f"the teacher {teacher_ckpt} was trained at {teacher_module.image_size} px, not "
                         f"--image-size {args.image_size}")
    networks = {"teacher": teacher_module.model.eval()}
    distill_seconds = {}
    need_mnv3 = any(r in args.rows for r in ("qat", "pruning", "distillation")) or "mnv3" in args.models
    if need_mnv3:
        networks["mnv3"], distill_seconds["mnv3"] = distill_ours("mobilenet_v3_small", teacher_ckpt, args, dm,
                                                                 work / "distill_mnv3")
        log.info("MobileNetV3-small distilled in %.0f s", distill_seconds["mnv3"])
    if "mnv2" in args.models:
        networks["mnv2"], distill_seconds["mnv2"] = distill_ours("mobilenet_v2", teacher_ckpt, args, dm,
                                                                 work / "distill_mnv2")
        log.info("MobileNetV2 distilled in %.0f s", distill_seconds["mnv2"])
    fp32 = {}
    for model, network in networks.items():
        fp32[model] = export_onnx(network, example, work / f"{model}_fp32.onnx")
        cells.append(Cell("FP32", model, "FP32", "float ONNX (what every row compresses)", path=str(fp32[model]),
                          reference=True, seconds=distill_seconds.get(model)))

    if "mainjob" in args.rows:
        log.info("the main job's student")
        main_job_cells(cells, Path(args.artifacts), calib, work)
    if "ptq" in args.rows:
        for model in args.models:
            log.info("PTQ: %s", model)
            ptq_cells(cells, model, networks[model], fp32[model], calib, val, example, args, work)
    if "qat" in args.rows:
        log.info("QAT")
        qat_cells(cells, networks["mnv3"], dm, args, example, work)
    if "pruning" in args.rows:
        log.info("pruning")
        pruning_cells(cells, networks["mnv3"], dm, args, example, work)
    if "distillation" in args.rows:
        log.info("distillation: plain logit-KD loop")
        row = "distillation"
        cells.append(Cell(row, "mnv3", "dms_lightning", "DistillationModule (KD + attention transfer, teacher cache)",
                          ours=True, path=str(fp32["mnv3"]), seconds=distill_seconds["mnv3"]))
        _cell(cells, row, "mnv3", "plain PyTorch", "logit KD (T, α as ours), teacher every step",
              lambda: (lambda net, s: (export_onnx(net, example, work / "plain_kd.onnx"), s))(
                  *distill_plain(teacher_ckpt, args, dm, work / "distill_plain")))
    log.info("measuring %d files", sum(1 for c in cells if c.path))
    image = next(iter(test))[0][:1].astype(np.float32)
    measure(cells, test, args, image)
    info = machine_info(threads=THREADS)
    result = {"args": vars(args), "machine": info, "versions": versions(), "teacher": teacher_note,
              "distill_seconds": ", ".join(f"{MODELS[m]} {s:.0f} s" for m, s in distill_seconds.items()) or "–",
              "test_samples": next((c.metrics["samples"] for c in cells if c.metrics.get("samples")), 0),
              "cells": [asdict(c) for c in cells], "verdicts": verdicts(cells), "closing_notes": CLOSING_NOTES,
              "total_seconds": time.perf_counter() - started,
              "command": "python benchmarks/bench_peers.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    write_outputs(result, stem)
    if not args.output:
        import readme_results  # benchmarks/ is on sys.path when the script runs

        readme_results.main()  # the README's "Against the peers" lines follow the saved table
    return result


if __name__ == "__main__":
    main()
