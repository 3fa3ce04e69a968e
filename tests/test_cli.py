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


def test_predict_classifies_a_folder_of_new_unlabelled_frames(fitted, tmp_path):
    import numpy as np
    from PIL import Image

    from dms_lightning.data.synthetic import render_sample

    run_dir, _ = fitted
    frames = tmp_path / "new_frames"
    (frames / "cam2").mkdir(parents=True)
    written = []
    for i in range(5):  # frames of the synthetic set, saved as a camera would (no class folders)
        path = frames / ("cam2" if i % 2 else ".") / f"frame_{i:03d}.png"
        Image.fromarray(render_sample(7, "test", i, 32)[0]).save(path)
        written.append(str(path.resolve()))
    (frames / "notes.txt").write_text("not an image")
    (frames / ".thumbs").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(frames / ".thumbs" / "x.png")
    out = tmp_path / "predictions.csv"
    main(args=["predict", "--config", str(ROOT / "configs/student.yaml"), *TINY, f"--data.predict_dir={frames}",
               f"--ckpt_path={run_dir / 'ckpt' / 'last.ckpt'}", "--trainer.logger=false",
               "--trainer.callbacks+=dms_lightning.callbacks.PredictionWriter",
               f"--trainer.callbacks.output_path={out}", f"--trainer.default_root_dir={tmp_path}"])

    rows = list(csv.DictReader(open(out)))
    assert sorted(str(Path(r["id"]).resolve()) for r in rows) == sorted(written)  # every frame once, nothing else
    assert all(r["label"] == "" and r["predicted"] in {"alert", "eyes_closed", "yawning", "looking_away", "phone"}
               for r in rows)


@pytest.mark.parametrize("make, message", [(lambda p: None, "is not a folder"),
                                           (lambda p: p.mkdir(), "holds no image")])
def test_predict_dir_without_images_is_refused_naming_the_field(tmp_path, make, message):
    from dms_lightning import DMSDataModule

    folder = tmp_path / "frames"
    make(folder)
    with pytest.raises(FileNotFoundError, match=rf"data\.predict_dir=.*{message}"):
        DMSDataModule(image_size=32, predict_dir=str(folder))


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


@pytest.mark.parametrize("given", [["--model.init_args.class_weights=[1, 2, 1, 1, 1]"],
                                   ["--data.class_weights={eyes_closed: 2.0}"]])
def test_class_weights_given_by_the_user_reach_the_model(given):
    # model.class_weights is linked from data.class_weights: a value given for the model was silently replaced
    # by the data's None (the link overwrites its target), and the loss stayed unweighted.
    from dms_lightning.cli import DMSLightningCLI

    cli = DMSLightningCLI(args=["--config", str(ROOT / "configs/student.yaml"), "--data.train_size=20",
                                "--data.val_size=10", "--data.test_size=10", *given], run=False)
    assert cli.datamodule.class_names[1] == "eyes_closed"
    assert cli.model.class_weights.tolist() == [1.0, 2.0, 1.0, 1.0, 1.0]
    assert cli.model.hparams.class_weights == [1.0, 2.0, 1.0, 1.0, 1.0], "recorded in the checkpoint"


@pytest.mark.parametrize("given", [["--data.class_weights={eyes_closed: 2.0}"], ["--data.balance=loss_weights"]])
def test_fit_with_class_weights_logs_its_hyperparameters(given, tmp_path):
    # Lightning refuses a run whose module and data module disagree on an hparam of the same name: data
    # weights given by class name ({eyes_closed: 2.0}) against the model's list stopped the fit at its start.
    cli = _run(tmp_path, "fit", "--config", str(ROOT / "configs/student.yaml"), *given,
               "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1")
    assert cli.trainer.state.finished
    assert cli.model.class_weights is not None and cli.model.hparams.class_weights == cli.datamodule.class_weights


def test_class_weights_set_twice_are_refused(capsys):
    code, err = _console(capsys, "fit", "--config", str(ROOT / "configs/student.yaml"),
                         "--data.balance=loss_weights", "--model.init_args.class_weights=[1, 2, 1, 1, 1]")
    assert code == 1
    assert "model.class_weights=[1.0, 2.0, 1.0, 1.0, 1.0] and data.balance='loss_weights' both set" in err


# ----------------------------------------------------------------------------- errors as one message
def _console(capsys, *argv):
    from dms_lightning.cli import console_main

    code = console_main(main, list(argv))
    return code, capsys.readouterr().err


def test_an_error_raised_while_building_a_class_is_printed_once_without_the_union_report(tmp_path, capsys):
    code, err = _console(capsys, "fit", "--config", str(ROOT / "configs/distill.yaml"),
                         f"--model.init_args.teacher_checkpoint={tmp_path / 'missing.ckpt'}")
    assert code == 1
    assert err.count("missing.ckpt' does not exist") == 1
    assert "Union subtypes" not in err and "Traceback" not in err and "Given value" not in err
    assert len(err.strip().splitlines()) <= 3


def test_a_value_the_parser_refuses_is_one_short_message_naming_the_key(capsys):
    code, err = _console(capsys, "fit", "--config", str(ROOT / "configs/student.yaml"), "--data.image_size=abc")
    assert code == 2
    assert 'Parser key "data.image_size"' in err and "abc" in err
    assert "usage:" not in err and len(err.strip().splitlines()) <= 4


def test_debug_shows_the_full_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DMS_LIGHTNING_DEBUG", "1")
    code, err = _console(capsys, "fit", "--config", str(ROOT / "configs/distill.yaml"),
                         f"--model.init_args.teacher_checkpoint={tmp_path / 'missing.ckpt'}")
    assert code == 1 and "Traceback" in err and "missing.ckpt" in err


def test_predict_with_a_checkpoint_of_another_class_count_says_so(fitted, tmp_path, capsys):
    from PIL import Image

    run_dir, _ = fitted
    for name in ("alert", "phone"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("L", (32, 32), color=50 * i).save(tmp_path / "data" / name / f"{i}.png")
    code, err = _console(capsys, "predict", "--config", str(ROOT / "configs/student.yaml"), *TINY,
                         "--data.source=image_folder", f"--data.data_dir={tmp_path / 'data'}",
                         f"--ckpt_path={run_dir / 'ckpt' / 'last.ckpt'}", "--trainer.logger=false",
                         f"--trainer.default_root_dir={tmp_path}")
    assert code == 1
    assert "was trained for 5 classes" in err and "the data has 2 classes ['alert', 'phone']" in err
    assert "size mismatch" not in err


def test_a_truncated_checkpoint_given_to_the_cli_is_named(fitted, tmp_path, capsys):
    run_dir, _ = fitted
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run_dir / "ckpt" / "last.ckpt").read_bytes()[:4000])
    code, err = _console(capsys, "predict", "--config", str(ROOT / "configs/student.yaml"), *TINY,
                         f"--ckpt_path={truncated}", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}")
    assert code == 1 and f"ckpt_path='{truncated}'" in err and "truncated or corrupted" in err


# ----------------------------------------------------------------------------- reruns
def test_a_rerun_keeps_the_earlier_run_and_the_manifest_lists_only_its_own_artifacts(tmp_path):
    import json

    art = tmp_path / "art"
    args = ["fit", "--config", str(ROOT / "configs/student.yaml"), *TINY,
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--checkpoint.dirpath={art}",
            "--trainer.callbacks+=dms_lightning.callbacks.ONNXExport", f"--trainer.callbacks.dirpath={art}",
            "--trainer.callbacks.name=student", "--trainer.callbacks.checkpoint=last",
            "--trainer.callbacks.openvino=false", "--trainer.callbacks.simplify=false"]
    main(args=args)
    # As if the earlier run had also trained with QAT: an INT8 model this run will not write.
    (art / "student_int8.onnx").write_bytes((art / "student_fp32.onnx").read_bytes())
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["artifacts"].append({**manifest["artifacts"][0], "name": "student_int8", "path": "student_int8.onnx"})
    (art / "manifest.json").write_text(json.dumps(manifest))
    earlier = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()}

    main(args=args)
    names = [entry["name"] for entry in json.loads((art / "manifest.json").read_text())["artifacts"]]
    assert names == ["student_fp32"]
    assert not (art / "student_int8.onnx").exists()
    kept = tmp_path / "art-v1"
    assert {p.name: p.read_bytes() for p in kept.iterdir() if p.is_file()} == earlier


def test_last_checkpoint_holds_the_final_epoch_even_when_the_best_is_earlier(tmp_path):
    # Lightning 2.6's save_last writes last.ckpt only with a new top-k checkpoint; reloading it gave the best
    # epoch's weights instead of the exported final ones (main job: epoch 9 of 10, 0.76 logit difference).
    import lightning as L
    import torch
    from test_export_callbacks import TinyClassifier, _datamodule

    from dms_lightning.cli import FinalLastCheckpoint

    checkpoint = FinalLastCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max", save_last=True,
                                     filename="best", enable_version_counter=False)
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=1, logger=False,
                        callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    module = TinyClassifier()
    trainer.fit(module, _datamodule())  # val/score = -epoch: the best is epoch 0
    best = torch.load(tmp_path / "ckpt" / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert best["epoch"] == 0 and last["epoch"] == 2 and last["global_step"] == trainer.global_step
    final = {k: v for k, v in module.state_dict().items()}
    assert all(torch.equal(last["state_dict"][k], v) for k, v in final.items())


def test_fit_without_a_logger_runs(tmp_path, monkeypatch):
    # `--trainer.logger=false`: the CLI's default learning-rate monitor would refuse to start without a logger.
    from dms_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    main(args=["fit", "--model=DMSClassifier", "--model.backbone=mobilenet_v3_small", "--trainer.logger=false",
               "--data.image_size=32", "--data.train_size=20", "--data.val_size=10", "--data.test_size=10",
               "--data.batch_size=10", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_trainer_default_callbacks_join_the_cli_defaults(tmp_path, monkeypatch):
    # One callback or a list, as LightningCLI takes them: added after the defaults, never replacing them.
    from lightning.pytorch import Callback
    from lightning.pytorch.callbacks import LearningRateMonitor

    from dms_lightning.cli import DMSLightningCLI

    monkeypatch.chdir(tmp_path)
    args = ["--model=DMSClassifier", "--model.backbone=mobilenet_v3_small", "--data.image_size=32",
            "--data.train_size=20", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"]
    for given in (Callback(), [Callback()]):
        cli = DMSLightningCLI(args=args, run=False, trainer_defaults={"callbacks": given})
        types = [type(c) for c in cli.trainer.callbacks]
        assert LearningRateMonitor in types and Callback in types
