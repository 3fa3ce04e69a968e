"""benchmarks/bench_overhead.py: every configuration still runs against the current callbacks (a check the
callbacks added later must not turn into a silent "not run" row), and the CPU fake-quant path is what it compares."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_overhead", ROOT / "benchmarks" / "bench_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_configuration_runs_and_the_readme_is_left_alone(tmp_path):
    readme = (ROOT / "README.md").read_text()
    bench = _bench()
    result = bench.main(["--steps", "1", "--warmup", "1", "--rounds", "1", "--image-size", "32", "--batch-size", "4",
                         "--output", str(tmp_path / "overhead")])
    rows = {row["config"]: row for row in result["rows"]}
    assert set(rows) == set(bench.CONFIGS)
    assert all(row["status"] != "not run" for row in rows.values()), [r.get("reason") for r in rows.values()]
    assert json.loads((tmp_path / "overhead.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert (ROOT / "README.md").read_text() == readme, "a run with its own --output must not rewrite the README"
    from dms_lightning.quant.fake_quant import FakeQuantizer

    assert FakeQuantizer.vectorised_cpu, "the torch-kernel row restores the default"
