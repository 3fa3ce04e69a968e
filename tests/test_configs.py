"""Every config in configs/ parses; the headline flow (teacher -> distil + prune + QAT + export + report) and the
quantization configs run a short fit that writes their artifacts.

Runs use tiny overrides (32-48 px, a few dozen images, short schedules) so they take seconds, but they go
through the same config files, callbacks and artifacts as the full-size job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dms_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_and_prints(config, capsys, monkeypatch):
    # In-process (an interpreter start per config would cost more than the parse); ``python -m dms_lightning``
    # itself is run by tests/test_cli.py.
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_info:
        main(args=["fit", "--config", str(config), "--print_config"])
    printed = capsys.readouterr().out
    assert exit_info.value.code in (0, None), printed[-2000:]
    assert "model:" in printed and "data:" in printed
    assert yaml.safe_load(printed)["model"]


def _tiny(tmp_path, epochs):
    return ["--data.image_size=48", "--data.train_size=64", "--data.val_size=32", "--data.test_size=32",
            "--data.batch_size=16", f"--trainer.max_epochs={epochs}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--trainer.default_root_dir={tmp_path}"]


def _fast_config(tmp_path, name: str, callback_overrides: dict[str, dict]) -> Path:
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        callback.setdefault("init_args", {}).update(callback_overrides.get(callback["class_path"].rsplit(".", 1)[-1], {}))
    path = tmp_path / f"{name}_fast.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_teacher_then_distill_config_produces_the_deploy_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs write artifacts/ relative to the working directory
    main(args=["fit", "--config", str(ROOT / "configs/teacher.yaml"), *_tiny(tmp_path, 1),
               "--model.init_args.backbone=resnet18"])
    assert (tmp_path / "artifacts/teacher/best.ckpt").is_file()
    assert (tmp_path / "artifacts/teacher/teacher_fp32.onnx").is_file()
    fast = _fast_config(tmp_path, "distill", {
        "IterativePruning": dict(start_epoch=0, end_epoch=1),
        "QuantizationAwareTraining": dict(start_epoch=2, freeze_bn_epoch=2, freeze_observers_epoch=3),
        "CompressionReport": dict(latency_runs=5, warmup_runs=2, throughput_runs=1)})
    cli = main(args=["fit", "--config", str(fast), *_tiny(tmp_path, 3)])
    artifacts = tmp_path / "artifacts/distill"
    assert (artifacts / "student_fp32.onnx").is_file() and (artifacts / "student_int8.onnx").is_file()
    manifest = json.loads((artifacts / "manifest.json").read_text())
    listed = json.dumps(manifest)
    assert "student_fp32.onnx" in listed and "student_int8.onnx" in listed and "snpe_bundle" in listed
    assert (artifacts / "snpe_bundle/convert.sh").is_file()
    assert any((artifacts / "report").glob("*.md"))
    report = (artifacts / "report/report.md").read_text()
    assert "Quantization sensitivity of **" in report  # every quantizer of the QAT student, worst first
    assert any((artifacts / "report").glob("*_sensitivity.png"))
    assert cli.trainer.current_epoch == 3


@pytest.mark.slow
@pytest.mark.parametrize("name, overrides, artifact", [
    ("qat", {"QuantizationAwareTraining": dict(start_epoch=0, freeze_bn_epoch=1, freeze_observers_epoch=1)},
     "qat_int8.onnx"),
    ("ptq", {"PostTrainingQuantization": dict(calibration_batches=2)}, "ptq_int8.onnx"),
])
def test_quantization_configs_run_a_short_fit_and_write_their_int8_model(tmp_path, monkeypatch, name, overrides,
                                                                         artifact):
    monkeypatch.chdir(tmp_path)  # the configs write artifacts/ relative to the working directory
    cli = main(args=["fit", "--config", str(_fast_config(tmp_path, name, overrides)), *_tiny(tmp_path, 2)])
    assert cli.trainer.current_epoch == 2
    written = list(tmp_path.rglob(artifact))
    assert written, f"{artifact} not written under {tmp_path}"
    import onnx

    graph = onnx.load(str(written[0])).graph
    assert any(node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") for node in graph.node)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """150 small photos in three class folders: a first run on one's own data."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("alert", "eyes_closed", "phone"):
        (root / name).mkdir()
        for i in range(60):
            Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_data_gives_a_few_hundred_photos_enough_optimizer_steps(config, photo_folder):
    """The README points the configs at one's own folder (`--data.source image_folder`): a batch of 64 there would
    leave 2-3 optimizer steps an epoch and a network at chance. The synthetic set keeps its batches of 64 (32 for the
    teacher's short schedule, data.max_batch_size)."""
    from dms_lightning import DMSDataModule

    data = yaml.safe_load(config.read_text())["data"]
    own = DMSDataModule(**{**data, "source": "image_folder", "data_dir": str(photo_folder), "image_size": 16})
    assert own.batch_size == 8 and 144 // own.batch_size >= 16  # 144 of the 180 photos train (val / test split off)
    assert DMSDataModule(**data).batch_size == data.get("max_batch_size", 64)
