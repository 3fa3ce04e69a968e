"""``python -m dms_lightning pipeline``: the whole default flow in one command.

1. ``fit --config configs/teacher.yaml`` — the ResNet-18 teacher (skipped when its checkpoint exists,
   unless ``--retrain-teacher``), exported to ONNX as the report's baseline;
2. ``fit --config configs/distill.yaml`` — the MobileNetV3-small student distilled from it, with
   iterative channel pruning, then quantization-aware training in the same ``fit``; at the end FP32 and
   INT8 ONNX (parity-checked), the SNPE/QNN bundle and the compression report;
3. prints where everything is and the TensorBoard command.

Each stage is an ordinary LightningCLI run, so anything after ``--`` is passed to both ``fit`` calls as
overrides (``python -m dms_lightning pipeline -- --trainer.max_epochs 2``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from dms_lightning.cli import DMSLightningCLI

DEFAULT_TEACHER_CONFIG = "configs/teacher.yaml"
DEFAULT_STUDENT_CONFIG = "configs/distill.yaml"
DEFAULT_TEACHER_CHECKPOINT = "artifacts/teacher/best.ckpt"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dms_lightning pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-config", default=DEFAULT_TEACHER_CONFIG)
    parser.add_argument("--student-config", default=DEFAULT_STUDENT_CONFIG)
    parser.add_argument("--teacher-checkpoint", default=DEFAULT_TEACHER_CHECKPOINT,
                        help="where the teacher config writes its best checkpoint (and the student reads it)")
    parser.add_argument("--retrain-teacher", action="store_true", help="train the teacher even if its checkpoint exists")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="after '--': LightningCLI overrides given to both fit runs")
    return parser


def run_pipeline(argv: list[str] | None = None) -> dict:
    """Run the flow; return ``{"teacher": cli or None, "student": cli, "seconds": float}``."""
    args = _parser().parse_args(argv)
    overrides = [a for a in args.overrides if a != "--"]
    for path in (args.teacher_config, args.student_config):
        if not Path(path).is_file():
            raise FileNotFoundError(f"pipeline config {path!r} does not exist (run from the repository root, "
                                    "or pass --teacher-config / --student-config)")
    start = time.perf_counter()
    teacher_cli = None
    if args.retrain_teacher or not Path(args.teacher_checkpoint).is_file():
        rank_zero_info(f"[pipeline] 1/2 training the teacher: fit --config {args.teacher_config}")
        teacher_cli = DMSLightningCLI(args=["fit", "--config", args.teacher_config, *overrides])
        if not Path(args.teacher_checkpoint).is_file():
            raise FileNotFoundError(f"the teacher run did not write {args.teacher_checkpoint!r}; check "
                                    f"`checkpoint.dirpath`/`checkpoint.filename` in {args.teacher_config}")
    else:
        rank_zero_info(f"[pipeline] 1/2 teacher checkpoint {args.teacher_checkpoint} exists: not retraining "
                       "(--retrain-teacher to force)")
    rank_zero_info(f"[pipeline] 2/2 distil + prune + QAT + export + report: fit --config {args.student_config}")
    student_cli = DMSLightningCLI(args=["fit", "--config", args.student_config,
                                        f"--model.init_args.teacher_checkpoint={args.teacher_checkpoint}", *overrides])
    seconds = time.perf_counter() - start
    log_root = Path(student_cli.trainer.log_dir or "runs").parent.parent
    rank_zero_info(f"[pipeline] done in {seconds / 60:.1f} min. TensorBoard: tensorboard --logdir {log_root}")
    return {"teacher": teacher_cli, "student": student_cli, "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    run_pipeline(argv)


if __name__ == "__main__":
    main()
