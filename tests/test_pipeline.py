"""``python -m dms_lightning pipeline``: stage hand-over uses the exact checkpoint the previous stage wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dms_lightning.cli import USER_ERRORS
from dms_lightning.pipeline import run_pipeline
from dms_lightning.utils.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.image_size=32", "--data.train_size=20", "--data.val_size=10", "--data.test_size=10",
        "--data.batch_size=10", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false"]


def _config(tmp_path, name: str, dirpath: Path) -> str:
    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    config["trainer"]["callbacks"] = []
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["checkpoint"]["dirpath"] = str(dirpath)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def configs(tmp_path):
    teacher_dir = tmp_path / "teacher"
    return (["--teacher-config", _config(tmp_path, "teacher", teacher_dir),
             "--student-config", _config(tmp_path, "distill", tmp_path / "distill"),
             "--teacher-checkpoint", str(teacher_dir / "best.ckpt")], teacher_dir)


def _teacher_weights(state_dict: dict) -> dict:
    return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}


def test_retrain_teacher_hands_the_new_checkpoint_to_the_student(configs):
    args, teacher_dir = configs
    from dms_lightning.cli import main

    main(args=["fit", "--config", args[1], *TINY])  # the earlier teacher
    old_teacher = _teacher_weights(load_checkpoint(teacher_dir / "best.ckpt")["state_dict"])

    result = run_pipeline([*args, "--retrain-teacher", "--", "--seed_everything=7", *TINY])
    written = Path(result["teacher_checkpoint"])
    assert written == Path(result["teacher"].trainer.checkpoint_callback.best_model_path)
    assert written.name == "best.ckpt", "the teacher config's file name, not Lightning's best-v1.ckpt"
    assert (teacher_dir.parent / "teacher-v1" / "best.ckpt").is_file(), "the earlier teacher is kept"

    student = result["student"].model
    assert Path(student.hparams.teacher_checkpoint) == written
    new_teacher = _teacher_weights(load_checkpoint(written)["state_dict"])
    used = student.teacher.network.state_dict()
    key = next(k for k in used if k.endswith("weight") and used[k].dim() == 4)
    assert torch.equal(used[key], new_teacher[key])
    assert not torch.equal(used[key], old_teacher[key])


def test_pipeline_says_where_the_time_went(configs):
    args, _ = configs
    result = run_pipeline([*args, "--", *TINY])
    stages = result["stages"]
    assert list(stages) == ["teacher", "student_setup", "student_training", "after_training"]
    assert all(value >= 0 for value in stages.values())
    assert stages["teacher"] > 0 and stages["student_training"] > 0
    assert abs(sum(stages.values()) - result["seconds"]) < 1e-6
    callbacks = result["student"].trainer.callbacks
    assert any(type(c).__name__ == "LearningRateMonitor" for c in callbacks), "the clock joins the defaults"


@pytest.mark.parametrize("edit, named", [
    (lambda config: config["trainer"].update(max_epoch=5), "max_epoch"),  # a typo'd key
    (lambda config: config["trainer"].update(max_epochs="five"), "max_epochs"),  # a value of the wrong type
])
def test_a_bad_student_config_fails_before_the_teacher_trains(configs, edit, named):
    args, teacher_dir = configs
    student = Path(args[args.index("--student-config") + 1])
    config = yaml.safe_load(student.read_text())
    edit(config)
    student.write_text(yaml.safe_dump(config))
    with pytest.raises(Exception, match=named) as raised:
        run_pipeline([*args, "--", *TINY])
    assert isinstance(raised.value, USER_ERRORS), "shown by the console as one message"
    assert not teacher_dir.exists(), "nothing trained before the error"
