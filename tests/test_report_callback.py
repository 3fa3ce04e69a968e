"""CompressionReport in a real fit and the ``python -m dms_lightning.report`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from dms_lightning import DMSClassifier, DMSDataModule
from dms_lightning.callbacks import CompressionReport
from dms_lightning.export import export_onnx
from dms_lightning.utils.artifacts import Variant
from dms_lightning.utils.checkpoint import compression_target

IMAGE_SIZE = 32
FAST = dict(warmup_runs=2, latency_runs=20, throughput_batch=8, throughput_runs=2)


class ExportAtFitEnd(Callback):
    """Stand-in for a user's exporting callback: writes the trained network to ONNX and lists it."""

    produces_variants = True

    def __init__(self, path: Path, name: str = "student_fp32") -> None:
        self.path, self.name = path, name
        self.variants: list[Variant] = []

    def on_fit_end(self, trainer, pl_module):
        network = compression_target(pl_module)
        export_onnx(network, torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE), self.path)
        self.variants = [Variant(self.name, str(self.path), precision="fp32", producer="ExportAtFitEnd")]


def _datamodule() -> DMSDataModule:
    return DMSDataModule(image_size=IMAGE_SIZE, train_size=32, val_size=16, test_size=32, batch_size=16,
                         augment=False)


def _trainer(tmp_path, callbacks, logger=False) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                   logger=logger, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                   callbacks=callbacks)


@pytest.fixture(scope="module")
def teacher_onnx(tmp_path_factory) -> Path:
    teacher = DMSClassifier("resnet18", image_size=IMAGE_SIZE).model.eval()
    return export_onnx(teacher, torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE),
                       tmp_path_factory.mktemp("teacher") / "teacher.onnx")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, teacher_onnx):
    """One real fit with an exporter and CompressionReport (teacher ONNX as baseline), logged to TensorBoard."""
    root = tmp_path_factory.mktemp("report_fit")
    report = CompressionReport(baseline="teacher", extra_variants={"teacher": str(teacher_onnx)}, **FAST)
    logger = TensorBoardLogger(save_dir=str(root), name="tb")
    trainer = _trainer(root, [ExportAtFitEnd(root / "student.onnx"), report], logger=logger)
    model = DMSClassifier("mobilenet_v3_small", image_size=IMAGE_SIZE)
    trainer.fit(model, datamodule=_datamodule())
    return trainer, report, model


def test_callback_measures_every_registered_variant_against_the_baseline(fitted):
    trainer, report, _ = fitted

    assert [row.name for row in report.report.rows] == ["teacher", "student_fp32"]
    student = report.report.row("student_fp32")
    assert student.baseline == "teacher" and student.producer == "ExportAtFitEnd"
    assert student.test_samples == 32 and student.accuracy is not None
    assert student.size_ratio > 5  # MobileNetV3-small vs ResNet-18: ~11× fewer bytes


def test_callback_writes_report_files_into_the_log_dir(fitted):
    trainer, report, _ = fitted
    output_dir = Path(trainer.log_dir) / "compression_report"

    for name in ("report.md", "report.csv", "report.json", "pareto_size.png", "pareto_latency.png"):
        assert (output_dir / name).is_file(), name
    data = json.loads((output_dir / "report.json").read_text())
    assert data["baseline"] == "teacher" and len(data["variants"]) == 2


def test_callback_logs_table_plots_and_hparams_to_tensorboard(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _, _ = fitted
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()

    assert {"compression/pareto_size", "compression/pareto_latency"} <= set(tags["images"])
    assert any(tag.startswith("compression/report") for tag in tags["tensors"])
    assert "compression/speedup/student_fp32" in tags["scalars"]
    for name in ("teacher", "student_fp32"):
        assert list((Path(trainer.log_dir) / f"compression_{name}").glob("events.out.tfevents*")), name


def test_report_placed_before_an_exporter_is_rejected_before_training(tmp_path):
    trainer = _trainer(tmp_path, [CompressionReport(**FAST), ExportAtFitEnd(tmp_path / "m.onnx")])
    model = DMSClassifier("mobilenet_v3_small", image_size=IMAGE_SIZE)

    with pytest.raises(MisconfigurationException, match="Put CompressionReport last"):
        trainer.fit(model, datamodule=_datamodule())
    assert trainer.global_step == 0


def test_missing_extra_variant_file_fails_before_training(tmp_path):
    report = CompressionReport(extra_variants=[f"teacher={tmp_path / 'absent.onnx'}"], **FAST)
    trainer = _trainer(tmp_path, [report])

    with pytest.raises(FileNotFoundError, match="extra_variants\\['teacher'\\]"):
        trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=IMAGE_SIZE), datamodule=_datamodule())
    assert trainer.global_step == 0


def test_baseline_onnx_at_another_input_size_fails_before_training(tmp_path):
    # A 48 px teacher ONNX with a 32 px run used to train and export, then fail inside ONNX Runtime.
    teacher = DMSClassifier("mobilenet_v3_small", image_size=48).model.eval()
    path = export_onnx(teacher, torch.zeros(1, 1, 48, 48), tmp_path / "teacher48.onnx")
    trainer = _trainer(tmp_path, [CompressionReport(extra_variants={"teacher": str(path)}, **FAST)])

    with pytest.raises(ValueError, match=r"extra_variants\['teacher'\].*takes input \['N', 1, 48, 48\].*1 × 32 × 32"):
        trainer.fit(DMSClassifier("mobilenet_v3_small", image_size=IMAGE_SIZE), datamodule=_datamodule())
    assert trainer.global_step == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(threads=0), "threads=0"),
    (dict(extra_variants="teacher.onnx"), "extra_variants"),
    (dict(extra_variants=["teacher=teacher.ckpt"]), "must be an .onnx file"),
    (dict(extra_variants=["a=x.onnx", "a=y.onnx"]), "repeated names"),
])
def test_invalid_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionReport(**kwargs)


def test_cli_exports_checkpoints_and_measures_onnx_files(fitted, teacher_onnx, tmp_path, capsys):
    from dms_lightning.report.__main__ import main

    trainer, _, _ = fitted
    ckpt = tmp_path / "student.ckpt"
    trainer.save_checkpoint(ckpt)
    output_dir = tmp_path / "cli_report"

    report = main(["--onnx", f"teacher={teacher_onnx}", "--ckpt", f"student={ckpt}", "--baseline", "teacher",
                   "--data.image_size", str(IMAGE_SIZE), "--data.test_size", "32", "--data.batch_size", "16",
                   "--measure.latency_runs", "10", "--measure.warmup_runs", "1", "--measure.throughput_runs", "1",
                   "--output_dir", str(output_dir), "--progress_bar", "false"])

    assert (output_dir / "onnx" / "student.onnx").is_file()
    assert [row.name for row in report.rows] == ["teacher", "student"]
    assert json.loads((output_dir / "report.json").read_text())["baseline"] == "teacher"
    # The checkpoint's ONNX classifies the test set exactly as the exporter's ONNX of the same weights did.
    assert report.row("student").accuracy == fitted[1].report.row("student_fp32").accuracy
    assert "| variant |" in capsys.readouterr().out


def test_cli_refuses_an_onnx_file_whose_input_is_not_the_data_naming_the_settings(teacher_onnx, tmp_path):
    # A user's 1 × 32 × 32 file measured with the default --data (96 px): ONNX Runtime said only "invalid
    # dimensions" once measuring had started.
    from dms_lightning.report.__main__ import main

    with pytest.raises(ValueError, match=rf"takes .*1 × 32 × 32 input but --data gives 1 × 96 × 96 images.*"
                                         rf"set --data.channels 1 --data.image_size {IMAGE_SIZE}"):
        main(["--onnx", f"teacher={teacher_onnx}", "--data.image_size", "96", "--data.test_size", "16",
              "--output_dir", str(tmp_path / "out"), "--progress_bar", "false"])
    assert not (tmp_path / "out").exists()
