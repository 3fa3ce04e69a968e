"""Fault injection: ``kill -9`` a main-job-like ``fit`` at random points of its export and report phase.

The run is the main job in miniature (``configs/distill.yaml``'s callbacks at tiny sizes): distillation
from a ResNet-18 teacher with quantization-aware training from epoch 1, then ``ONNXExport`` (FP32 + INT8
QDQ), ``SNPEExport`` (bundle) and ``CompressionReport`` (against the teacher's ONNX), all into one
artifact folder. A reference run measures when export starts and when the run ends; then each trial

1. starts from a folder holding one complete earlier run,
2. starts the same run again, waits until its export phase begins and kills the process group with
   SIGKILL after a random delay inside the measured export + report window,
3. checks that every artifact left in the killed run's folder is complete (ONNX passes the checker,
   JSON parses, PNG decodes, checkpoints load, every manifest entry matches its file's sha256), that the
   earlier run's files are byte-for-byte intact (a rerun keeps them as ``<folder>-v1``), and counts the
   ``.partial`` leftovers (hidden temporaries, never at a finished artifact's path).

Finally the run is started once more on top of the last killed run and must succeed, clean every
leftover and list exactly its own artifacts in ``manifest.json``.

Run::

    python benchmarks/fault_injection.py              # 10 kills, writes benchmarks/results/fault_injection.md
    python benchmarks/fault_injection.py --kills 2 --no-save

It uses only subprocesses it starts itself and a temporary work folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TINY = ["--data.image_size=32", "--data.train_size=40", "--data.val_size=20", "--data.test_size=20",
        "--data.batch_size=10", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1"]
EXPORT_PREFIXES = ("student", ".student", "snpe_bundle", ".snpe_bundle", "report", ".report")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def write_configs(work: Path) -> tuple[Path, Path]:
    teacher = {
        "seed_everything": 1,
        "trainer": {"max_epochs": 1, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": str(work / "runs"), "name": "teacher"}},
                    "callbacks": [{"class_path": "dms_lightning.callbacks.ONNXExport",
                                   "init_args": {"dirpath": str(work / "teacher"), "name": "teacher",
                                                 "openvino": False}}]},
        "checkpoint": {"dirpath": str(work / "teacher"), "filename": "best", "enable_version_counter": False},
        "model": {"class_path": "dms_lightning.DMSClassifier", "init_args": {"backbone": "resnet18"}},
    }
    art = work / "art"
    student = {
        "seed_everything": 2,
        "trainer": {"max_epochs": 2, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": str(work / "runs"), "name": "distill"}},
                    "callbacks": [
                        {"class_path": "dms_lightning.callbacks.QuantizationAwareTraining",
                         "init_args": {"start_epoch": 1, "export": False}},
                        {"class_path": "dms_lightning.callbacks.ONNXExport",
                         "init_args": {"dirpath": str(art), "name": "student", "checkpoint": "last",
                                       "openvino": False}},
                        {"class_path": "dms_lightning.callbacks.SNPEExport",
                         "init_args": {"dirpath": str(art), "checkpoint": "last", "calibration_images": 8}},
                        {"class_path": "dms_lightning.callbacks.CompressionReport",
                         "init_args": {"output_dir": str(art / "report"), "baseline": "teacher_fp32",
                                       "extra_variants": {"teacher_fp32": str(work / "teacher" / "teacher_fp32.onnx")},
                                       "warmup_runs": 5, "latency_runs": 50, "throughput_batch": 8,
                                       "throughput_runs": 3, "progress_bar": False}},
                    ]},
        "checkpoint": {"dirpath": str(art), "filename": "best", "enable_version_counter": False},
        "model": {"class_path": "dms_lightning.DistillationModule",
                  "init_args": {"student": "mobilenet_v3_small",
                                "teacher_checkpoint": str(work / "teacher" / "best.ckpt")}},
    }
    paths = work / "teacher.yaml", work / "student.yaml"
    for path, config in zip(paths, (teacher, student)):
        path.write_text(yaml.safe_dump(config, sort_keys=False))
    return paths


def fit(config: Path, work: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dms_lightning", "fit", "--config", str(config), *TINY],
                            cwd=work, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def export_started(art: Path) -> bool:
    return art.is_dir() and any(p.name.startswith(EXPORT_PREFIXES) for p in art.iterdir())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every finished file (hidden ``.partial`` / ``.old`` leftovers are not artifacts)."""
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()
            and not any(part.endswith((".partial", ".old")) for part in p.relative_to(folder).parts)}


def leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.endswith((".partial", ".old"))]


def incomplete(folder: Path) -> list[str]:
    """Artifacts at their final names that are not complete, with the reason."""
    import onnx
    from PIL import Image

    from dms_lightning.utils.checkpoint import load_checkpoint

    problems = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts):
            continue  # hidden temporaries are counted as leftovers, not as artifacts
        try:
            if path.suffix == ".onnx":
                onnx.checker.check_model(str(path))
            elif path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".png":
                with Image.open(path) as image:
                    image.load()
            elif path.suffix == ".ckpt":
                load_checkpoint(path)
            elif path.stat().st_size == 0:
                raise ValueError("empty file")
        except Exception as err:  # noqa: BLE001 - any failure to read is what this script looks for
            problems.append(f"{relative}: {type(err).__name__}: {str(err)[:80]}")
    for manifest in folder.rglob("manifest.json"):
        if any(part.startswith(".") for part in manifest.relative_to(folder).parts):
            continue
        data = json.loads(manifest.read_text())
        entries = data.get("artifacts", [])
        records = [f for e in entries for f in (e.get("files") or [e]) if "sha256" in f]
        for record in records:
            target = manifest.parent / record["path"]
            if not target.is_file():
                problems.append(f"{manifest.relative_to(folder)} lists missing {record['path']}")
            elif sha256(target) != record["sha256"]:
                problems.append(f"{manifest.relative_to(folder)}: {record['path']} sha256 differs")
    return problems


def present(folder: Path) -> list[str]:
    names = ["student_fp32.onnx", "student_int8.onnx", "snpe_bundle", "report/report.md"]
    return [n for n in names if (folder / n).exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, deleted after")
    parser.add_argument("--no-save", action="store_true", help="print only, do not write the results table")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dms_fault_"))
    work.mkdir(parents=True, exist_ok=True)
    art = work / "art"
    teacher_config, student_config = write_configs(work)
    started = time.time()

    print(f"work folder {work}\nteacher ...", flush=True)
    if fit(teacher_config, work, work / "teacher.log").wait() != 0:
        sys.exit(f"teacher run failed, see {work / 'teacher.log'}")
    print("reference run ...", flush=True)
    process, begin = fit(student_config, work, work / "reference.log"), time.perf_counter()
    export_at = None
    while process.poll() is None:
        if export_at is None and export_started(art):
            export_at = time.perf_counter() - begin
        time.sleep(0.02)
    total = time.perf_counter() - begin
    if process.returncode != 0 or export_at is None:
        sys.exit(f"reference run failed (rc={process.returncode}), see {work / 'reference.log'}")
    window = total - export_at
    reference = snapshot(art)
    print(f"reference: export + report from {export_at:.1f} s to {total:.1f} s ({window:.1f} s window), "
          f"{len(reference)} files", flush=True)

    rows = []
    for trial in range(1, args.kills + 1):
        delay = rng.uniform(0.0, 0.95 * window)
        process = fit(student_config, work, work / f"kill{trial}.log")
        kept = work / "art-v1"
        # The run first moves the earlier run to art-v1; its own export then starts in a fresh art.
        while process.poll() is None and not (kept.is_dir() and export_started(art)):
            time.sleep(0.02)
        time.sleep(delay)
        finished_first = process.poll() is not None
        if not finished_first:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        intact = kept.is_dir() and snapshot(kept) == reference
        problems = incomplete(art) if art.is_dir() else []
        row = {"trial": trial, "delay_s": round(delay, 2), "killed": not finished_first,
               "artifacts_present": present(art) if art.is_dir() else [], "incomplete": problems,
               "leftovers": len(leftovers(art)) if art.is_dir() else 0, "earlier_run_intact": intact}
        rows.append(row)
        print(f"kill {trial}: +{delay:.2f} s into export, present {row['artifacts_present']}, "
              f"incomplete {len(problems)}, leftovers {row['leftovers']}, earlier run intact {intact}", flush=True)
        for problem in problems:
            print(f"    {problem}")
        if trial < args.kills:
            # Back to "one complete earlier run in art" for the next trial.
            shutil.rmtree(art, ignore_errors=True)
            if kept.is_dir():
                os.replace(kept, art)

    print("next run on top of the last killed one ...", flush=True)
    for stale in sorted(work.glob("art-v*")):
        shutil.rmtree(stale)  # keep only the killed run, which the next run must move aside itself
    killed_snapshot = snapshot(art)
    final_rc = fit(student_config, work, work / "final.log").wait()
    manifest = json.loads((art / "manifest.json").read_text()) if (art / "manifest.json").is_file() else {}
    names = sorted(e["name"] for e in manifest.get("artifacts", []))
    final = {"rc": final_rc, "incomplete": incomplete(art), "leftovers": leftovers(art), "manifest": names,
             "killed_run_kept": (work / "art-v1").is_dir() and snapshot(work / "art-v1") == killed_snapshot}
    print(f"next run: rc={final_rc}, manifest {names}, incomplete {len(final['incomplete'])}, "
          f"leftovers {len(final['leftovers'])}, killed run kept as art-v1: {final['killed_run_kept']}")

    killed = [r for r in rows if r["killed"]]
    summary = {
        "kills": len(killed),
        "runs_that_finished_before_the_kill": len(rows) - len(killed),
        "kills_with_a_half_written_artifact": sum(bool(r["incomplete"]) for r in killed),
        "kills_with_the_earlier_run_damaged": sum(not r["earlier_run_intact"] for r in rows),
        "kills_leaving_partial_leftovers": sum(r["leftovers"] > 0 for r in killed),
        "next_run_succeeded": final_rc == 0 and not final["incomplete"] and not final["leftovers"],
    }
    lines = [
        "# Fault injection: `kill -9` during export and report",
        "",
        "`python benchmarks/fault_injection.py` (seed %d): a main-job-like `fit` (distillation from ResNet-18, "
        "QAT from epoch 1, ONNXExport FP32 + INT8, SNPEExport, CompressionReport; 32 px, 40 training images, "
        "2 epochs) killed with SIGKILL at random points of its export + report window (%.1f s of a %.1f s run "
        "in the reference run), each time on top of a complete earlier run in the same folder. %s, %s."
        % (args.seed, window, total, time.strftime("%Y-%m-%d"), f"{(time.time() - started) / 60:.1f} min"),
        "",
        "| kill | delay into export (s) | finished artifacts present | half-written artifacts | `.partial` leftovers "
        "| earlier run intact |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['trial']}{'' if r['killed'] else ' (run ended first)'} | {r['delay_s']} | "
                     f"{', '.join(r['artifacts_present']) or '-'} | {len(r['incomplete'])} | {r['leftovers']} | "
                     f"{'yes' if r['earlier_run_intact'] else 'NO'} |")
    lines += [
        "",
        f"* kills: {summary['kills']} (+{summary['runs_that_finished_before_the_kill']} runs that ended before "
        "their kill time)",
        f"* kills that left a half-written artifact at a finished artifact's path: "
        f"{summary['kills_with_a_half_written_artifact']}",
        f"* trials where the earlier run's files changed: {summary['kills_with_the_earlier_run_damaged']} "
        "(the rerun keeps them byte-for-byte as `art-v1`)",
        f"* kills that left `.partial` temporaries: {summary['kills_leaving_partial_leftovers']} (hidden names; "
        "the next run removes them)",
        f"* next run on top of the last killed one: rc={final_rc}, manifest {names}, half-written "
        f"{len(final['incomplete'])}, leftovers {len(final['leftovers'])}, the killed run kept as `art-v1`: "
        f"{'yes' if final['killed_run_kept'] else 'no'}",
        "",
    ]
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_save:
        from dms_lightning.utils.io import write_json_atomic, write_text_atomic

        write_text_atomic(RESULTS / "fault_injection.md", table)
        write_json_atomic(RESULTS / "fault_injection.json", {"summary": summary, "trials": rows, "final": final,
                                                              "window_s": window, "reference_s": total})
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    ok = (summary["kills_with_a_half_written_artifact"] == 0 and summary["kills_with_the_earlier_run_damaged"] == 0
          and summary["next_run_succeeded"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
