"""benchmarks/bench_main_job_proxy.py: the row it keeps is what the run wrote (stage times, the report's top-1), and
its wrapper calls the pipeline the way `python -m dms_lightning pipeline` does and saves the stages it returns."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    path = ROOT / "benchmarks" / "bench_main_job_proxy.py"
    spec = importlib.util.spec_from_file_location("bench_main_job_proxy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(workdir: Path, accuracies: dict[str, float]) -> None:
    report = workdir / "artifacts" / "distill" / "report" / "report.json"
    report.parent.mkdir(parents=True)
    variants = [{"name": name, "accuracy": value} for name, value in accuracies.items()]
    report.write_text(json.dumps({"variants": variants}))


def test_the_row_reads_the_stage_times_and_the_report(tmp_path):
    bench = _bench()
    (tmp_path / "pipeline_stages.json").write_text(json.dumps(
        {"seconds": 900.0, "stages": {"teacher": 480.0, "student_setup": 1.2, "student_training": 324.0,
                                      "after_training": 78.0}}))
    _report(tmp_path, {"teacher_fp32": 0.98, "student_fp32": 0.964, "student_int8": 0.968, "student_fp16": 0.964})
    row = bench.row("abc1234", 0, 15.0, tmp_path)
    assert row["stages_min"] == {"teacher": 8.0, "student_setup": 0.02, "student_training": 5.4, "after_training": 1.3}
    assert row["accuracy_pct"] == {"teacher_fp32": 98.0, "student_fp32": 96.4, "student_int8": 96.8}
    low, high = row["estimate_avx2_min"]
    assert 15.0 < low < high, "the proxy is calibrated as faster than the AVX2 kind, never slower"
    table = bench.write_table([row, bench.row("def5678", 1, 3.0, tmp_path / "missing")])
    assert "| abc1234 | **15.0 min** | 8.0 | 5.4 | 1.3 |" in table
    assert "| 98.00 % | 96.40 % | 96.80 % | — |" in table
    # A failed run is marked, and has no stage times.
    assert "| def5678 (failed) | **3.0 min** | — | — | — |" in table
    labelled = bench.write_table([{**row, "label": "student 5 epochs"}])
    assert "| abc1234: student 5 epochs | **15.0 min** |" in labelled


def test_the_wrapper_saves_what_run_pipeline_returns(tmp_path):
    package = tmp_path / "dms_lightning"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "pipeline.py").write_text(
        "def run_pipeline(argv):\n"
        "    assert argv == [], argv\n"
        "    return {'seconds': 2.0, 'stages': {'teacher': 1.0, 'after_training': 1.0}, 'student': object()}\n")
    subprocess.run([sys.executable, "-c", _bench()._WRAPPER], cwd=tmp_path, check=True,
                   env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert json.loads((tmp_path / "pipeline_stages.json").read_text()) == {
        "seconds": 2.0, "stages": {"teacher": 1.0, "after_training": 1.0}}
