"""Nothing a user loads or generates runs foreign code: pickle payloads in checkpoints, shell in convert.sh."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dms_lightning import DistillationModule, DMSClassifier
from dms_lightning.export.sdk import SDKStep, conversion_steps, render_convert_script
from dms_lightning.models.backbones import load_state_dict_file
from dms_lightning.utils.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class _Payload:
    """Unpickling this object creates ``marker``: what an attacker's checkpoint would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def payload_checkpoint(tmp_path, tiny_datamodule, fast_trainer_kwargs):
    """A real DMSClassifier Lightning checkpoint with a pickle payload hidden in its hyper-parameters."""
    datamodule = tiny_datamodule(image_size=32, train_size=16, val_size=16, test_size=16)
    datamodule.setup("fit")
    model = DMSClassifier(backbone="mobilenet_v3_small", num_classes=datamodule.num_classes, in_channels=1,
                          image_size=32)
    trainer = pl.Trainer(**fast_trainer_kwargs, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule)
    path = tmp_path / "payload.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    checkpoint["hyper_parameters"]["note"] = _Payload(marker)
    torch.save(checkpoint, path)
    assert not marker.exists()
    return path, marker


def test_the_payload_fixture_really_runs_code_when_unpickled(payload_checkpoint):
    # Guards the tests below: if this payload did not fire, refusing it would prove nothing.
    path, marker = payload_checkpoint
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_loader_refuses_a_payload_checkpoint_without_running_it(payload_checkpoint):
    path, marker = payload_checkpoint
    with pytest.raises(CheckpointError, match="not loaded.*arbitrary code"):
        load_checkpoint(path, "model.teacher_checkpoint")
    assert not marker.exists()


def test_weights_file_with_a_payload_is_refused(payload_checkpoint):
    path, marker = payload_checkpoint
    with pytest.raises(CheckpointError, match="weights="):
        load_state_dict_file(path)
    assert not marker.exists()


def test_teacher_checkpoint_with_a_payload_is_refused(payload_checkpoint):
    path, marker = payload_checkpoint
    with pytest.raises(CheckpointError, match="model.teacher_checkpoint"):
        DistillationModule(student="mobilenet_v3_small", teacher_checkpoint=str(path), num_classes=5,
                           in_channels=1, image_size=32)
    assert not marker.exists()


def test_report_cli_refuses_a_payload_checkpoint(payload_checkpoint, tmp_path):
    path, marker = payload_checkpoint
    result = subprocess.run(
        [sys.executable, "-m", "dms_lightning.report", "--ckpt", f"student={path}", "--output_dir", str(tmp_path / "r"),
         "--data.image_size", "32", "--data.test_size", "8", "--progress_bar", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "arbitrary code" in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_cli_ckpt_path_with_a_payload_is_refused(payload_checkpoint, tmp_path, subcommand):
    from dms_lightning.cli import main

    path, marker = payload_checkpoint
    args = [subcommand, "--config", str(ROOT / "configs/student.yaml"), f"--ckpt_path={path}",
            "--data.image_size=32", "--data.train_size=16", "--data.val_size=16", "--data.test_size=16",
            "--trainer.logger=false", "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"]
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        main(args=args)
    assert not marker.exists()


def test_truncated_checkpoint_error_names_the_file(payload_checkpoint, tmp_path):
    path, _ = payload_checkpoint
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=re.escape(str(truncated))):
        load_checkpoint(truncated, "ckpt_path")


HOSTILE = ["sm8550\ntouch /tmp/dms_pwned", "sm8550; rm -rf ~", "$(reboot)", "sm8550`id`", "a b", "", "x\r"]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("field", ["htp_socs", "qnn_lib_target"])
def test_snpe_export_refuses_script_values_that_are_not_plain_names(field, value):
    from dms_lightning.callbacks import SNPEExport

    with pytest.raises(ValueError, match=f"SNPEExport.{field}="):
        SNPEExport(**{field: value})


@pytest.mark.parametrize("field", ["htp_socs", "qnn_lib_target"])
def test_conversion_steps_refuse_hostile_values_too(field):
    with pytest.raises(ValueError, match=field):
        conversion_steps(runtime="htp", has_encodings=True, **{field: "sm8550\ntouch /tmp/x"})


def test_plain_names_are_accepted():
    steps = conversion_steps(runtime="htp", has_encodings=True, htp_socs="sm8650,sm8750",
                             qnn_lib_target="aarch64-android")
    assert any("sm8650,sm8750" in step.args for step in steps)


def test_convert_script_keeps_hostile_text_inside_comments_and_parses(tmp_path):
    """Text reaching a comment line (a purpose, the header) cannot end the comment and start a command."""
    steps = conversion_steps(runtime="htp", has_encodings=True)
    steps.append(SDKStep("qnn", "qnn-net-run", ["--input_list", "x; touch /tmp/dms_pwned"], [],
                         "evil\ntouch /tmp/dms_pwned\r\n# more"))
    script = render_convert_script(steps, runtime="htp", header="header\n$(touch /tmp/dms_pwned)")
    path = tmp_path / "convert.sh"
    path.write_text(script)
    bash = shutil.which("bash")
    assert bash is not None
    parsed = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr
    # Every line that runs is one the renderer writes itself; the hostile text only ever sits after a '#'
    # or inside single quotes.
    for line in script.splitlines():
        code = line.strip()
        if "dms_pwned" in code:
            assert code.startswith("#") or "'x; touch /tmp/dms_pwned'" in code, line
    # Run it for real with a fake SDK that accepts everything: nothing hostile is executed.
    sdk = tmp_path / "sdk"
    tools = sdk / "bin" / "x86_64-linux-clang"
    tools.mkdir(parents=True)
    for step in steps:
        tool = tools / step.tool
        tool.write_text("#!/usr/bin/env bash\nexit 0\n")
        tool.chmod(0o755)
    marker = Path("/tmp/dms_pwned")
    marker.unlink(missing_ok=True)
    subprocess.run([bash, str(path)], cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "SNPE_ROOT": str(sdk),
                                                           "QNN_SDK_ROOT": str(sdk)}, capture_output=True, timeout=60)
    assert not marker.exists()
