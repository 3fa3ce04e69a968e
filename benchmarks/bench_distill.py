"""Distilled MobileNetV3-small vs the same student trained alone: test accuracy over several seeds.

All arms use the same data, epochs, optimizer and seeds; the only difference is the loss:
``alone`` (``DMSClassifier``: CE), ``kd`` (``DistillationModule``: (1 − α)·CE + α·T²·KL against the
ResNet-18 teacher) and ``kd+at`` (the same plus attention transfer at three resolutions, the recipe of
``configs/distill.yaml``). Each arm is evaluated with its final weights on the same test split (no
best-epoch selection).

    flock /tmp/cpu.lock python benchmarks/bench_distill.py                   # defaults below, ~15 min on 2 shared cores
    flock /tmp/cpu.lock python benchmarks/bench_distill.py --quick           # smoke run, ~1 min

The teacher is ``artifacts/teacher/best.ckpt`` (``python -m dms_lightning fit --config configs/teacher.yaml``);
pass ``--train-teacher`` to train one here with ``configs/teacher.yaml``'s settings if it is missing.
The table is printed and saved to ``benchmarks/results/distillation.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning  # noqa: E402
from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from dms_lightning import DMSClassifier, DMSDataModule, DistillationModule  # noqa: E402
from dms_lightning.utils.io import sha256_file, write_text_atomic  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-checkpoint", default=str(REPO / "artifacts/teacher/best.ckpt"))
    parser.add_argument("--train-teacher", action="store_true",
                        help="train the teacher with configs/teacher.yaml's settings if the checkpoint is missing")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=1500)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    # One intra-op thread: on 2 shared cores, 2 OpenMP threads spin-wait for each other (10x slower here).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/distillation.md"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs, args.train_size, args.val_size, args.test_size = [0, 1], 1, 128, 64, 128
        args.output = str(Path(args.output).with_name("distillation_quick.md"))
    return args


def datamodule(args) -> DMSDataModule:
    # Same synthetic data (data seed 0) for every arm and seed; the training seed varies init and shuffling.
    return DMSDataModule(image_size=args.image_size, train_size=args.train_size, val_size=args.val_size,
                         test_size=args.test_size, batch_size=args.batch_size, seed=0)


def optimizer(args):
    return lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)


def trainer(args) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, default_root_dir=str(REPO / "runs/bench_distill"))


def ensure_teacher(args) -> Path:
    path = Path(args.teacher_checkpoint)
    if path.is_file():
        return path
    if not args.train_teacher:
        sys.exit(f"{path} does not exist: run `python -m dms_lightning fit --config configs/teacher.yaml` first, "
                 "or pass --train-teacher")
    from dms_lightning.cli import main
    main(["fit", "--config", str(REPO / "configs/teacher.yaml"), "--trainer.enable_progress_bar", "false"])
    return path


def describe_teacher(path: Path) -> str:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hp = ckpt.get("hyper_parameters", {})
    data = ckpt.get("datamodule_hyper_parameters", {})
    trained = f"{data.get('train_size', '?')} images, {data.get('image_size', '?')} px, " if data else ""
    return (f"{hp.get('backbone', '?')} trained {trained}best epoch {ckpt.get('epoch', '?')}, "
            f"sha256 {sha256_file(path)[:12]}")


#: Attention-transfer pairs of configs/distill.yaml (MobileNetV3-small stage → ResNet-18 stage of the same size).
ATTENTION_PAIRS = yaml.safe_load((REPO / "configs/distill.yaml").read_text())["model"]["init_args"]["attention_transfer"]
ARMS = ("alone", "kd", "kd+at")


def run_arm(arm: str, seed: int, args, teacher: Path) -> tuple[float, float, float | None]:
    """``(test accuracy, fit seconds, teacher test accuracy)`` of one arm and seed."""
    seed_everything(seed, workers=True)
    data = datamodule(args)
    common = dict(num_classes=data.num_classes, class_names=data.class_names, in_channels=data.channels,
                  image_size=data.image_size, optimizer=optimizer(args))
    if arm == "alone":
        module = DMSClassifier("mobilenet_v3_small", head="dms", **common)
    else:
        module = DistillationModule("mobilenet_v3_small", teacher_checkpoint=str(teacher), temperature=args.temperature,
                                    alpha=args.alpha, attention_transfer=ATTENTION_PAIRS if arm == "kd+at" else None,
                                    **common)
    fit = trainer(args)
    start = time.perf_counter()
    fit.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    test = trainer(args)
    metrics = test.test(module, datamodule=data, verbose=False)[0]
    return metrics["test/acc"], seconds, metrics.get("test/teacher_acc")


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * std:.2f}"


def machine_info(args) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}; "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    source = ensure_teacher(args)
    # Work on a copy: the teacher checkpoint may be re-trained by someone else while this runs.
    teacher = REPO / "runs/bench_distill/teacher.ckpt"
    teacher.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, teacher)
    teacher_text = f"`{os.path.relpath(source, REPO)}` ({describe_teacher(teacher)})"
    results: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    teacher_acc = None
    for seed in args.seeds:
        for arm in ARMS:
            acc, seconds, t_acc = run_arm(arm, seed, args, teacher)
            teacher_acc = t_acc if t_acc is not None else teacher_acc
            results[arm].append((acc, seconds))
            print(f"[bench_distill] seed {seed} {arm:9s} test/acc {acc:.4f}  fit {seconds:.0f} s", flush=True)

    accs = {arm: [a for a, _ in results[arm]] for arm in ARMS}
    gains = {arm: statistics.mean(accs[arm]) - statistics.mean(accs["alone"]) for arm in ARMS[1:]}
    verdict = {arm: "not worse than alone" if gain >= 0 else "WORSE THAN ALONE" for arm, gain in gains.items()}
    lines = [
        "# Distillation: MobileNetV3-small distilled from ResNet-18 vs trained alone",
        "",
        f"Command: `flock /tmp/cpu.lock python benchmarks/bench_distill.py{' --quick' if args.quick else ''}`",
        "",
        f"Machine: {machine_info(args)}",
        "",
        f"Setup: synthetic DMS data (data seed 0), {args.image_size} px, 1 channel, train {args.train_size} / "
        f"test {args.test_size} images, {args.epochs} epochs, batch {args.batch_size}, AdamW lr {args.lr} "
        "wd 0.01 with the default warm-up + cosine schedule, augmentation on, final weights evaluated (no "
        "best-epoch selection), training seeds " + ", ".join(map(str, args.seeds)) + ". "
        f"kd: logit distillation, T = {args.temperature}, alpha = {args.alpha}. kd+at: the same plus attention "
        "transfer (weight 500) on " + ", ".join(f"{p['student']}→{p['teacher']}" for p in ATTENTION_PAIRS)
        + f", as in configs/distill.yaml. Teacher {teacher_text}.",
        "",
        "| seed | " + " | ".join(f"{arm} test acc (%)" for arm in ARMS) + " | "
        + " | ".join(f"{arm} fit (s)" for arm in ARMS) + " |",
        "| ---: |" + " ---: |" * (2 * len(ARMS)),
    ]
    for i, seed in enumerate(args.seeds):
        lines.append(f"| {seed} | " + " | ".join(f"{100 * results[arm][i][0]:.2f}" for arm in ARMS) + " | "
                     + " | ".join(f"{results[arm][i][1]:.0f}" for arm in ARMS) + " |")
    lines += [
        "| **mean ± std** | " + " | ".join(f"**{mean_std(accs[arm])}**" for arm in ARMS) + " | "
        + " | ".join(f"{statistics.mean(s for _, s in results[arm]):.0f}" for arm in ARMS) + " |",
        "",
        f"Teacher (ResNet-18) test accuracy on the same test split: {100 * teacher_acc:.2f} %." if teacher_acc
        is not None else "",
        "",
    ]
    lines += [f"- {arm} − alone: {100 * gain:+.2f} points (mean over {len(args.seeds)} seeds): **{verdict[arm]}**."
              for arm, gain in gains.items()]
    lines.append("")
    table = "\n".join(lines)
    print(table)
    write_text_atomic(args.output, table)
    print(f"[bench_distill] saved {args.output}")


if __name__ == "__main__":
    main()
