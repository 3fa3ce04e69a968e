"""``python -m dms_lightning``: configs with overrides, checkpoints, TensorBoard, predictions, errors."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from dms_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.image_size=32", "--data.train_size=40", "--data.val_size=20", "--data.test_size=20",
        "--data.batch_size=10", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1"]


def _run(tmp_path, *args):
    return main(args=[*args, *TINY, f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                      f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cli")
    cli = _run(tmp_path, "fit", "--config", str(ROOT / "configs/student.yaml"))
    return tmp_path, cli


def test_fit_with_overrides_writes_best_and_last_checkpoints(fitted):
    tmp_path, cli = fitted
    assert cli.model.hparams.image_size == 32
    assert cli.datamodule.hparams.train_size == 40
    names = sorted(p.name for p in (tmp_path / "ckpt").glob("*.ckpt"))
    assert "last.ckpt" in names and any(n.startswith("best-epoch") for n in names)


def test_fit_logs_scalars_and_the_confusion_matrix_to_tensorboard(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp_path, _ = fitted
    events = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"val/acc", "val/f1", "train/loss", "val/recall/eyes_closed"} <= set(events.Tags()["scalars"])
    assert "val/confusion_matrix" in events.Tags()["images"]
    assert "data/class_counts/text_summary" in events.Tags()["tensors"]


def test_data_classes_are_linked_into_the_model(fitted):
    _, cli = fitted
    assert cli.model.hparams.class_names == cli.datamodule.class_names
    assert cli.model.hparams.num_classes == 5 and cli.model.hparams.in_channels == 1


def test_predict_writes_class_and_probabilities_per_image(fitted, tmp_path):
    run_dir, _ = fitted
    out = tmp_path / "predictions.csv"
    main(args=["predict", "--config", str(ROOT / "configs/student.yaml"), *TINY,
               f"--ckpt_path={run_dir / 'ckpt' / 'last.ckpt'}", "--trainer.logger=false",
               "--trainer.callbacks+=dms_lightning.callbacks.PredictionWriter",
               f"--trainer.callbacks.output_path={out}", f"--trainer.default_root_dir={tmp_path}"])
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 20
    probabilities = [float(rows[0][f"p_{name}"]) for name in ("alert", "eyes_closed", "yawning", "looking_away", "phone")]
    assert abs(sum(probabilities) - 1.0) < 1e-4
    assert rows[0]["predicted"] in {"alert", "eyes_closed", "yawning", "looking_away", "phone"}
    assert rows[0]["id"] == "synthetic/test/000000"


def test_test_subcommand_reloads_a_checkpoint_and_reports_accuracy(fitted):
    run_dir, _ = fitted
    cli = main(args=["test", "--config", str(ROOT / "configs/student.yaml"), *TINY,
                     f"--ckpt_path={run_dir / 'ckpt' / 'last.ckpt'}", "--trainer.logger=false",
                     f"--trainer.default_root_dir={run_dir / 'test'}"])
    assert "test/acc" in cli.trainer.callback_metrics


def test_bad_config_value_fails_before_training_naming_the_field(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dms_lightning", "fit", "--config", str(ROOT / "configs/student.yaml"),
         "--data.source=image_folder", "--data.data_dir=/no/such/folder", *TINY],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "data.data_dir='/no/such/folder'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_backbone_in_config_is_reported(tmp_path):
    with pytest.raises((ValueError, SystemExit)) as info:
        _run(tmp_path, "fit", "--config", str(ROOT / "configs/student.yaml"), "--model.init_args.backbone=resnet19")
    assert info.type is ValueError and "resnet19" in str(info.value) or info.type is SystemExit


def test_loss_weights_of_an_imbalanced_folder_reach_the_model_and_its_loss(tmp_path):
    import torch
    from PIL import Image

    from dms_lightning.cli import DMSLightningCLI

    for name, count in (("alert", 12), ("phone", 3)):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("L", (16, 16), color=40 * i % 255).save(tmp_path / "data" / name / f"{i}.png")
    cli = DMSLightningCLI(args=["--config", str(ROOT / "configs/student.yaml"), "--data.source=image_folder",
                                f"--data.data_dir={tmp_path / 'data'}", "--data.balance=loss_weights",
                                "--data.val_split=0.2", "--data.test_split=0.2"], run=False)
    assert cli.model.class_weights.tolist() == pytest.approx(cli.datamodule.class_weights)
    assert cli.model.class_weights[1] > 3 * cli.model.class_weights[0]
    images, labels = torch.zeros(4, 1, 96, 96), torch.tensor([0, 0, 0, 1])
    weighted, logits = cli.model.training_loss(images, labels)
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert not torch.isclose(weighted, plain)
