"""Every config in configs/ parses, and the headline flow (teacher -> distil + prune + QAT + export + report) runs.

Runs use tiny overrides (32-48 px, a few dozen images, short schedules) so they take seconds, but they go
through the same config files, callbacks and artifacts as the full-size job.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dms_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_and_prints(config):
    result = subprocess.run([sys.executable, "-m", "dms_lightning", "fit", "--config", str(config), "--print_config"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "model:" in result.stdout and "data:" in result.stdout


def _tiny(tmp_path, epochs):
    return ["--data.image_size=48", "--data.train_size=64", "--data.val_size=32", "--data.test_size=32",
            "--data.batch_size=16", f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--trainer.default_root_dir={tmp_path}"]


@pytest.mark.slow
def test_teacher_then_distill_config_produces_the_deploy_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write artifacts/ relative to the working directory
    main(args=["fit", "--config", str(ROOT / "configs/teacher.yaml"), *_tiny(tmp_path, 1),
               "--model.init_args.backbone=resnet18"])
    assert (tmp_path / "artifacts/teacher/best.ckpt").is_file()
    assert (tmp_path / "artifacts/teacher/teacher_fp32.onnx").is_file()
    config = yaml.safe_load((ROOT / "configs/distill.yaml").read_text())
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in config["trainer"]["callbacks"]}
    callbacks["IterativePruning"].update(start_epoch=0, end_epoch=1)
    callbacks["QuantizationAwareTraining"].update(start_epoch=2, freeze_bn_epoch=2, freeze_observers_epoch=3)
    callbacks["CompressionReport"].update(latency_runs=5, warmup_runs=2, throughput_runs=1)
    fast = tmp_path / "distill_fast.yaml"
    fast.write_text(yaml.safe_dump(config))
    cli = main(args=["fit", "--config", str(fast), *_tiny(tmp_path, 3)])
    artifacts = tmp_path / "artifacts/distill"
    assert (artifacts / "student_fp32.onnx").is_file() and (artifacts / "student_int8.onnx").is_file()
    manifest = json.loads((artifacts / "manifest.json").read_text())
    listed = json.dumps(manifest)
    assert "student_fp32.onnx" in listed and "student_int8.onnx" in listed and "snpe_bundle" in listed
    assert (artifacts / "snpe_bundle/convert.sh").is_file()
    assert any((artifacts / "report").glob("*.md"))
    assert cli.trainer.current_epoch == 3
