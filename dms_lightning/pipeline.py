"""``python -m dms_lightning pipeline``: the whole default flow in one command.

1. ``fit --config configs/teacher.yaml`` — the ResNet-18 teacher (skipped when its checkpoint exists,
   unless ``--retrain-teacher``), exported to ONNX as the report's baseline;
2. ``fit --config configs/distill.yaml`` — the MobileNetV3-small student distilled from it, with
   iterative channel pruning, then quantization-aware training in the same ``fit``; at the end FP32 and
   INT8 ONNX (parity-checked), the SNPE/QNN bundle and the compression report;
3. prints where the time went (teacher stage, student training, the exports and report after it) and the
   TensorBoard command.

Each stage is an ordinary LightningCLI run, so anything after ``--`` is passed to both ``fit`` calls as
overrides (``python -m dms_lightning pipeline -- --data.train_size 3000``: both stages on half the images).
The student's command line (its config and the overrides) is parsed before the teacher trains, so an unknown key,
a value of the wrong type or a missing file fails at once. Epoch overrides must leave the student config's schedule
room: its pruning ends at epoch 1 and QAT starts at epoch 2, so ``--trainer.max_epochs`` below 3 is refused when the
student stage starts (before it trains).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info

from dms_lightning.cli import DMSLightningCLI, check_arguments

DEFAULT_TEACHER_CONFIG = "configs/teacher.yaml"
DEFAULT_STUDENT_CONFIG = "configs/distill.yaml"
DEFAULT_TEACHER_CHECKPOINT = "artifacts/teacher/best.ckpt"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dms_lightning pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-config", default=DEFAULT_TEACHER_CONFIG)
    parser.add_argument("--student-config", default=DEFAULT_STUDENT_CONFIG)
    parser.add_argument("--teacher-checkpoint", default=DEFAULT_TEACHER_CHECKPOINT,
                        help="an existing teacher checkpoint to reuse; when the teacher is trained, the student "
                             "reads the checkpoint that run wrote")
    parser.add_argument("--retrain-teacher", action="store_true", help="train the teacher even if its checkpoint exists")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="after '--': LightningCLI overrides given to both fit runs")
    return parser


class _FitClock(Callback):
    """When the student's training started and ended (the exporters and the report run after ``on_train_end``)."""

    def __init__(self) -> None:
        self.train_start = self.train_end = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.train_end = time.perf_counter()


def _teacher_checkpoint_written(teacher_cli: DMSLightningCLI, config: str) -> str:
    """The checkpoint the teacher run itself wrote (its ModelCheckpoint's best, else its last)."""
    callback = teacher_cli.trainer.checkpoint_callback
    written = (getattr(callback, "best_model_path", "") or getattr(callback, "last_model_path", "")) if callback else ""
    if not written or not Path(written).is_file():
        raise FileNotFoundError(f"the teacher run ({config}) wrote no checkpoint; it needs a ModelCheckpoint "
                                "(`checkpoint:` section, `trainer.enable_checkpointing: true`)")
    return written


def _report_baselines(config: str) -> list[str]:
    """ONNX files the student config's CompressionReport measures as given variants (the teacher's, usually)."""
    text = yaml.safe_load(Path(config).read_text()) or {}
    callbacks = (text.get("trainer") or {}).get("callbacks") or []
    paths = []
    for callback in callbacks if isinstance(callbacks, list) else []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("CompressionReport"):
            extra = (callback.get("init_args") or {}).get("extra_variants") or {}
            values = extra.values() if isinstance(extra, dict) else [str(v).partition("=")[2] or v for v in extra]
            paths += [str(v) for v in values]
    return paths


def _check_report_baseline(teacher_cli: DMSLightningCLI, student_config: str) -> None:
    written = [Path(path).resolve() for callback in teacher_cli.trainer.callbacks
               for path in (getattr(callback, "exported", None) or {}).values()]
    baselines = [Path(p).resolve() for p in _report_baselines(student_config)]
    if written and baselines and not set(written) & set(baselines):
        raise ValueError(f"the teacher run wrote {[str(p) for p in written]} but {student_config}'s CompressionReport "
                         f"measures {[str(p) for p in baselines]} as the teacher: the report would compare with "
                         "another model. Point extra_variants at the teacher run's ONNX file")


def run_pipeline(argv: list[str] | None = None) -> dict:
    """Run the flow; return ``{"teacher": cli or None, "student": cli, "teacher_checkpoint": str, "seconds": float,
    "stages": {stage: seconds}}``.

    The student distils from exactly the checkpoint the teacher stage wrote (its ModelCheckpoint's
    ``best_model_path``), never from a path guessed from the config. ``stages``: ``teacher`` (the whole teacher
    run, 0 when reused), ``student_setup`` (the student run up to its first step: reading the teacher, the
    data), ``student_training`` and ``after_training`` (the callbacks' work at the end of ``fit``: exports,
    checks, report).
    """
    args = _parser().parse_args(argv)
    overrides = [a for a in args.overrides if a != "--"]
    for path in (args.teacher_config, args.student_config):
        if not Path(path).is_file():
            raise FileNotFoundError(f"pipeline config {path!r} does not exist (run from the repository root, "
                                    "or pass --teacher-config / --student-config)")
    # The student's command line is parsed now: a typo in its config fails here, not after the teacher has trained.
    rank_zero_info(f"[pipeline] checking the student's config {args.student_config} (and the overrides)")
    check_arguments(_student_args(args.student_config, args.teacher_checkpoint, overrides))
    start = time.perf_counter()
    teacher_cli = None
    teacher_checkpoint = args.teacher_checkpoint
    if args.retrain_teacher or not Path(args.teacher_checkpoint).is_file():
        rank_zero_info(f"[pipeline] 1/2 training the teacher: fit --config {args.teacher_config}")
        teacher_cli = DMSLightningCLI(args=["fit", "--config", args.teacher_config, *overrides])
        teacher_checkpoint = _teacher_checkpoint_written(teacher_cli, args.teacher_config)
        if Path(teacher_checkpoint).resolve() != Path(args.teacher_checkpoint).resolve():
            rank_zero_info(f"[pipeline] the teacher run wrote {teacher_checkpoint} (not {args.teacher_checkpoint}); "
                           "the student distils from it")
        _check_report_baseline(teacher_cli, args.student_config)
    else:
        rank_zero_info(f"[pipeline] 1/2 teacher checkpoint {args.teacher_checkpoint} exists: not retraining "
                       "(--retrain-teacher to force)")
    rank_zero_info(f"[pipeline] 2/2 distil + prune + QAT + export + report from {teacher_checkpoint}: "
                   f"fit --config {args.student_config}")
    student_start, clock = time.perf_counter(), _FitClock()
    student_cli = DMSLightningCLI(args=_student_args(args.student_config, teacher_checkpoint, overrides),
                                  trainer_defaults={"callbacks": [clock]})
    end = time.perf_counter()
    seconds = end - start
    stages = _stages(start, student_start, clock, end)
    log_root = Path(student_cli.trainer.log_dir or "runs").parent.parent
    breakdown = ", ".join(f"{name.replace('_', ' ')} {value / 60:.1f}" for name, value in stages.items())
    rank_zero_info(f"[pipeline] done in {seconds / 60:.1f} min ({breakdown}; `-- --trainer.profiler=simple` times "
                   f"each callback). TensorBoard: tensorboard --logdir {log_root}")
    return {"teacher": teacher_cli, "student": student_cli, "teacher_checkpoint": teacher_checkpoint,
            "seconds": seconds, "stages": stages}


def _student_args(config: str, teacher_checkpoint: str, overrides: list[str]) -> list[str]:
    return ["fit", "--config", config, f"--model.init_args.teacher_checkpoint={teacher_checkpoint}", *overrides]


def _stages(start: float, student_start: float, clock: _FitClock, end: float) -> dict[str, float]:
    """Seconds per stage of the run; a stage the student run never reached (no training) counts from there on."""
    train_start = clock.train_start or end
    train_end = clock.train_end or train_start
    return {"teacher": student_start - start, "student_setup": train_start - student_start,
            "student_training": train_end - train_start, "after_training": end - train_end}


def main(argv: list[str] | None = None) -> None:
    run_pipeline(argv)


if __name__ == "__main__":
    main()
