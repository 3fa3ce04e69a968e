"""The default distillation recipe on small data: teacher / student alone / distilled / INT8, with and without BN re-estimation.

A DMS team's first run is a few hundred of its own frames. This runs exactly what a new user writes, with
the library's defaults and a plain ``Trainer``::

    teacher = DMSClassifier(backbone="resnet18", ...)                          # 15 epochs
    student = DistillationModule(student="mobilenet_v3_small", teacher_checkpoint=...)   # 15 epochs
    alone   = DMSClassifier(backbone="mobilenet_v3_small", ...)                # 15 epochs, for reference

on the synthetic DMS set at several training sizes (3 seeds each) and on a small *real* grayscale set,
scikit-image's bundled ``lfw_subset`` (100 face / 100 non-face 25×25 crops shipped inside the package, no
download), written as an image folder at 64 px (train 150 / val 10 / test 40, stratified). Every number is
ONNX Runtime top-1 on the test split; INT8 is the distilled student quantized with ONNX Runtime's static
PTQ (16 calibration batches of un-augmented training images).

"Distilled (defaults)" is the trained student with the running statistics training left behind (the default,
``bn_reestimation=False``); "+ BN re-est." is the same network with its statistics re-estimated over the
training images (what ``bn_reestimation=True`` does at the end of training: training itself is identical,
re-estimation only replaces running buffers).

    flock /tmp/cpu.lock python benchmarks/bench_small_data.py            # ~20-30 min on 2 cores
    flock /tmp/cpu.lock python benchmarks/bench_small_data.py --quick    # smoke run, numbers meaningless

Needs ``pip install scikit-image`` for the real set (``--no-lfw`` skips it). Saves
``benchmarks/results/small_data.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from dms_lightning import DMSClassifier, DMSDataModule, DistillationModule  # noqa: E402
from dms_lightning.distill.losses import MIXING_MODES  # noqa: E402
from dms_lightning.export import export_onnx  # noqa: E402
from dms_lightning.models.batchnorm import reestimate_batch_norm, statistics_loader  # noqa: E402
from dms_lightning.report.measure import _Runner, evaluate_onnx, per_class_metrics  # noqa: E402
from dms_lightning.report.machine import machine_info, machine_summary  # noqa: E402
from dms_lightning.report.safety import DMS_SAFETY_CLASSES  # noqa: E402
from dms_lightning.utils.io import write_text_atomic  # noqa: E402

EARLIER = "## Earlier runs"
ARMS = ("teacher", "alone", "distilled_no_bn", "distilled", "int8")
ARM_TITLES = {"teacher": "teacher (ResNet-18)", "alone": "student alone", "distilled_no_bn":
              "distilled (defaults)", "distilled": "distilled + BN re-est.", "int8": "distilled + BN re-est., INT8 (PTQ)"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--distill-epochs", type=int, default=None,
                        help="epochs of the distilled student (default: --epochs)")
    parser.add_argument("--mixing", default="none", choices=MIXING_MODES,
                        help="DistillationModule(mixing=...): function matching on mixed images")
    parser.add_argument("--alpha", type=float, default=None,
                        help="DistillationModule(alpha=...) (default: the module's); 1.0 is function matching's "
                             "teacher-only loss")
    parser.add_argument("--skip-alone", action="store_true", help="leave out the student trained alone")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--val-size", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--no-lfw", action="store_true", help="skip the real lfw_subset set")
    parser.add_argument("--lfw-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per job")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel processes (one per core)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(REPO / "benchmarks/results/small_data.md"))
    return parser.parse_args()


def build_lfw_folder(root: Path, image_size: int = 64, seed: int = 0) -> Path:
    """``root/{train,val,test}/{face,non_face}/*.png`` from ``skimage.data.lfw_subset()`` (bundled, offline)."""
    from PIL import Image
    import skimage.data

    images = skimage.data.lfw_subset()  # 200 × 25 × 25 floats in [0, 1]: 100 faces, then 100 non-faces
    rng = np.random.default_rng(seed)
    for name, offset in (("face", 0), ("non_face", 100)):
        order = rng.permutation(100) + offset
        for split, indices in (("train", order[:75]), ("val", order[75:80]), ("test", order[80:])):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in indices:
                pixels = (images[index] * 255).round().astype(np.uint8)
                Image.fromarray(pixels).resize((image_size, image_size), Image.Resampling.BILINEAR).save(
                    folder / f"{index:03d}.png")
    return root


def _trainer(epochs: int, root: Path) -> Trainer:
    return Trainer(max_epochs=epochs, default_root_dir=str(root), logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)


def _onnx_metrics(network: torch.nn.Module, datamodule: DMSDataModule, path: Path) -> dict:
    network = network.eval().cpu()
    export_onnx(network, datamodule.example_input(1), path)
    return _measure(path, datamodule)


def _measure(path: Path, datamodule: DMSDataModule) -> dict:
    result = evaluate_onnx(_Runner(path, 1), datamodule.test_dataloader())
    return {"accuracy": result["accuracy"], "per_class": per_class_metrics(result["confusion_matrix"],
                                                                            datamodule.class_names)}


def _int8(fp32: Path, datamodule: DMSDataModule, trainer: Trainer) -> dict:
    from dms_lightning.export.ort_quantize import quantize_onnx

    loader = statistics_loader(trainer, seed=0)
    batches = min(16, len(loader))
    int8 = quantize_onnx(fp32, fp32.with_name("int8.onnx"), loader, calibration_batches=batches)
    return _measure(int8, datamodule)


def run_recipe(make_datamodule, epochs: int, seed: int, workdir: Path, distill_epochs: int | None = None,
               distill_options: dict | None = None, alone: bool = True) -> dict[str, dict]:
    """Teacher, student alone, distilled (without / with BN re-estimation) and INT8 for one data set and seed.

    ``distill_options`` go to :class:`DistillationModule` over its defaults (e.g. ``mixing``, ``alpha``).
    """
    results: dict[str, dict] = {}
    datamodule = make_datamodule()
    link = dict(num_classes=datamodule.num_classes, class_names=datamodule.class_names,
                in_channels=datamodule.channels, image_size=datamodule.image_size)

    seed_everything(seed, verbose=False)
    teacher = DMSClassifier(backbone="resnet18", **link)
    trainer = _trainer(epochs, workdir / "teacher")
    trainer.fit(teacher, datamodule=datamodule)
    checkpoint = workdir / "teacher.ckpt"
    trainer.save_checkpoint(checkpoint)
    results["teacher"] = _onnx_metrics(teacher.model, datamodule, workdir / "teacher.onnx")

    if alone:
        seed_everything(seed, verbose=False)
        student_alone = DMSClassifier(backbone="mobilenet_v3_small", **link)
        _trainer(epochs, workdir / "alone").fit(student_alone, datamodule=datamodule)
        results["alone"] = _onnx_metrics(student_alone.model, datamodule, workdir / "alone.onnx")

    seed_everything(seed, verbose=False)
    student = DistillationModule(student="mobilenet_v3_small", teacher_checkpoint=str(checkpoint),
                                 **(distill_options or {}), **link)
    student.bn_reestimation = False  # train once; training is the same with it, only the buffers differ
    trainer = _trainer(distill_epochs or epochs, workdir / "distilled")
    trainer.fit(student, datamodule=datamodule)
    results["distilled_no_bn"] = _onnx_metrics(student.model, datamodule, workdir / "distilled_no_bn.onnx")
    with torch.random.fork_rng(devices=[]):
        reestimate_batch_norm(student.model, statistics_loader(trainer, seed=0), num_batches=32)
    fp32 = workdir / "distilled.onnx"
    results["distilled"] = _onnx_metrics(student.model, datamodule, fp32)
    results["int8"] = _int8(fp32, datamodule, trainer)
    return results


def _worst(per_class: dict, classes) -> float:
    values = [per_class[c]["recall"] for c in classes if c in per_class and per_class[c]["recall"] is not None]
    return min(values) if values else float("nan")


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(rows: list[tuple[str, list[dict], list[str]]]) -> str:
    header = "| data (train images) | " + " | ".join(ARM_TITLES[a] for a in ARMS) + " |"
    lines = [header, "|" + "---|" * (len(ARMS) + 1)]
    for label, runs, classes in rows:
        cells = []
        for arm in ARMS:
            if any(arm not in run for run in runs):
                cells.append("–")
                continue
            top1 = [run[arm]["accuracy"] for run in runs]
            worst = [_worst(run[arm]["per_class"], classes) for run in runs]
            cells.append(f"{_cell(top1)} / {_cell(worst)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _make_datamodule(kind: str, size: int, seed: int, args: dict, folder: str | None) -> DMSDataModule:
    if kind == "lfw":
        return DMSDataModule(source="image_folder", data_dir=folder, image_size=args["image_size"])
    return DMSDataModule(source="synthetic", image_size=args["image_size"], train_size=size,
                         val_size=args["val_size"], test_size=args["test_size"], seed=seed)


def _job(kind: str, size: int, seed: int, args: dict, folder: str | None, workdir: str) -> tuple:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args["threads"])
    started = time.time()
    options = {"mixing": args["mixing"], **({} if args["alpha"] is None else {"alpha": args["alpha"]})}
    result = run_recipe(lambda: _make_datamodule(kind, size, seed, args, folder), args["epochs"], seed, Path(workdir),
                        distill_epochs=args["distill_epochs"], distill_options=options, alone=not args["skip_alone"])
    print(f"{kind} {size} seed {seed}: " + ", ".join(f"{a} {100 * result[a]['accuracy']:.1f}" for a in ARMS
                                                     if a in result),
          f"({time.time() - started:.0f} s)", flush=True)
    return kind, size, seed, result


def main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    args = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.seeds, args.epochs, args.lfw_seeds = [60], [0], 2, [0]
        args.val_size, args.test_size = 20, 40
    started = time.time()
    settings = {k: getattr(args, k) for k in ("image_size", "val_size", "test_size", "epochs", "threads",
                                              "distill_epochs", "mixing", "skip_alone", "alpha")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = [("synthetic", size, seed, None) for size in args.sizes for seed in args.seeds]
        if not args.no_lfw:
            folder = str(build_lfw_folder(tmp / "lfw", args.image_size))
            jobs += [("lfw", 150, seed, folder) for seed in args.lfw_seeds]
        # Largest first, so the two processes finish together.
        jobs.sort(key=lambda job: -job[1])
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = [pool.submit(_job, kind, size, seed, settings, folder, str(tmp / f"{kind}_{size}_{seed}"))
                       for kind, size, seed, folder in jobs]
            done = [future.result() for future in futures]
    rows = []
    for size in args.sizes:
        runs = [r for kind, s, _, r in sorted(done, key=lambda d: d[2]) if kind == "synthetic" and s == size]
        rows.append((f"synthetic, {size} ({len(runs)} seeds)", runs, list(DMS_SAFETY_CLASSES)))
    lfw = [r for kind, _, _, r in sorted(done, key=lambda d: d[2]) if kind == "lfw"]
    if lfw:
        rows.append((f"real: skimage lfw_subset faces, 150 ({len(lfw)} seeds)", lfw, ["face", "non_face"]))
    minutes = (time.time() - started) / 60
    distilled = "" if args.distill_epochs is None else f" ({args.distill_epochs} for the distilled student)"
    mixing = "" if args.mixing == "none" else f", `mixing: {args.mixing}`: function matching on mixed images"
    text = "\n".join([
        "# Small data: the default distillation recipe on a few hundred images\n",
        f"`benchmarks/bench_small_data.py`: {args.epochs} epochs per model{distilled}, {args.image_size} px, plain `Trainer`, "
        "library defaults (AdamW lr 1e-3, batch size auto: 8 for 150 images, warm-up + cosine, BatchNorm momentum 0.1, "
        "the student's inverted residual blocks zero-initialised); ONNX Runtime top-1 "
        f"on the test split ({args.test_size} synthetic images; 40 lfw images). Each cell: top-1 % / worst "
        "safety-class recall % (synthetic: eyes_closed, phone, looking_away; lfw: the worse of face / non-face), "
        "mean ± std over seeds.\n",
        table(rows),
        "Teacher: ResNet-18 trained alone; student alone: MobileNetV3-small trained alone; distilled: "
        f"`DistillationModule` defaults (T = 4, α = {0.7 if args.alpha is None else args.alpha}{mixing}) from that teacher; \"defaults\": the running BatchNorm "
        "statistics training left (the default); \"+ BN re-est.\": the same network with them re-estimated; INT8: "
        "the distilled student through ONNX Runtime static PTQ.\n",
        f"Run: {minutes:.1f} min wall on {machine_summary(machine_info())} with {args.jobs} parallel "
        f"job(s) of {args.threads} intra-op thread(s), torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.\n",
    ])
    print(text)
    if not args.quick:
        # Hand-written notes on earlier runs (what changed since, and what it gave) are kept below the table.
        previous = Path(args.output).read_text() if Path(args.output).is_file() else ""
        if EARLIER in previous:
            text += "\n" + EARLIER + previous.split(EARLIER, 1)[1]
        write_text_atomic(args.output, text)


if __name__ == "__main__":
    main()
