"""benchmarks/bench_peers.py: the side-by-side with NNCF, AIMET-onnx, torchao, ONNX Runtime, Torch-Pruning and
Lightning. The end-to-end run needs the peers (``pip install -e ".[peers]" -c benchmarks/peers-constraints.txt``)
and is skipped without them; the verdict logic is checked everywhere."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("nncf", "aimet_onnx", "torchao")
MISSING = [name for name in PEERS if importlib.util.find_spec(name) is None]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def _measured(bench, row, tool, accuracy, p50, ours=False):
    return bench.Cell(row, "mnv3", tool, "", ours=ours, seconds=1.0,
                      metrics={"accuracy": accuracy, "p50_ms": p50, "size_bytes": 1000})


def test_a_peer_as_accurate_and_as_fast_makes_the_row_a_loss_and_is_named(bench):
    cells = [_measured(bench, "PTQ INT8", "ours", 0.90, 1.0, ours=True), _measured(bench, "PTQ INT8", "A", 0.92, 0.9),
             _measured(bench, "PTQ INT8", "B", 0.95, 3.0),
             _measured(bench, "QAT INT8", "ours", 0.93, 1.0, ours=True), _measured(bench, "QAT INT8", "C", 0.92, 1.2)]
    ptq, qat = bench.verdicts(cells)
    assert ptq["best_peer"].startswith("B") and ptq["verdict"] == "loss" and ptq["dominated_by"] == ["A "]
    assert ptq["accuracy_pt"] == pytest.approx(-5.0)
    assert qat["verdict"] == "win" and qat["dominated_by"] == []


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"the peers are not installed ({', '.join(MISSING)}): "
                    'pip install -e ".[peers]" -c benchmarks/peers-constraints.txt')
def test_quick_run_on_tiny_models_fills_every_cell_or_says_why(bench, tmp_path):
    stem = tmp_path / "peers"
    result = bench.main(["--quick", "--image-size", "32", "--train-size", "128", "--val-size", "64", "--test-size",
                         "64", "--calibration-images", "32", "--teacher-epochs", "1", "--distill-epochs", "1",
                         "--qat-epochs", "1", "--finetune-epochs", "2", "--sparsities", "0.5", "--models", "mnv3",
                         "--rounds", "1", "--runs-per-round", "3", "--warmup-runs", "1",
                         "--output", str(stem), "--workdir", str(tmp_path / "work")])
    for suffix in (".md", ".json", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0
    saved = json.loads(stem.with_suffix(".json").read_text())
    assert len(saved["cells"]) == len(result["cells"])
    cells = result["cells"]
    tools = {(c["row"], c["tool"]) for c in cells}
    for expected in [("PTQ INT8", "dms_lightning"), ("PTQ INT8", "ONNX Runtime"), ("PTQ INT8", "NNCF"),
                     ("PTQ INT8", "AIMET-onnx"), ("PTQ INT8", "torchao"), ("QAT INT8", "dms_lightning"),
                     ("QAT INT8", "torchao"), ("channel pruning 50%", "dms_lightning"),
                     ("channel pruning 50%", "Torch-Pruning"), ("channel pruning 50%", "Lightning"),
                     ("distillation", "dms_lightning"), ("distillation", "plain PyTorch")]:
        assert expected in tools
    for cell in cells:
        metrics = cell["metrics"]
        if cell["ours"] or cell["reference"]:  # our own steps must run
            assert metrics.get("accuracy") is not None, cell
        if metrics.get("accuracy") is None:  # a peer that could not run says why, in its cell
            assert cell["note"], cell
            continue
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["p50_ms"] > 0 and metrics["size_bytes"] > 0
        assert metrics["p99_ms"] >= metrics["p50_ms"] and metrics["latency_runs"] == 3
    # The student shrinks under both pruners that remove channels, never under Lightning's masks.
    pruned = {c["tool"]: c["metrics"]["size_bytes"] for c in cells if c["row"] == "channel pruning 50%"}
    fp32 = next(c["metrics"]["size_bytes"] for c in cells if c["reference"] and c["model"] == "mnv3")
    assert pruned["dms_lightning"] < 0.7 * fp32 and pruned["Torch-Pruning"] < 0.7 * fp32
    assert pruned["Lightning"] >= 0.95 * fp32
    assert {(v["row"], v["model"]) for v in result["verdicts"]} == {
        ("PTQ INT8", "mnv3"), ("QAT INT8", "mnv3"), ("channel pruning 50%", "mnv3"), ("distillation", "mnv3")}
    text = stem.with_suffix(".md").read_text()
    assert "Quick run" in text and "worst safety recall" in text and "AVX2" in text
