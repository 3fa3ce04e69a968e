"""Per-class judgement of every variant and the safety gate: a lost safety class fails the run though top-1 holds."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning.callbacks import CompressionReport
from dms_lightning.export import export_onnx
from dms_lightning.report import build_report
from dms_lightning.report.safety import SafetyGateError, SafetyPolicy, check_safety
from dms_lightning.utils.artifacts import Variant

CLASSES = ["alert", "eyes_closed", "yawning", "looking_away", "phone"]
SAFETY = ["eyes_closed", "phone", "looking_away"]
FAST = dict(warmup_runs=1, latency_runs=3, throughput_batch=4, throughput_runs=1, progress_bar=False,
            print_table=False)


def _test_set() -> TensorDataset:
    """500 images, 100 per class: the class's channel holds a margin spread evenly over (0, 1)."""
    images = torch.zeros(500, 5, 2, 2)
    labels = torch.arange(500) % 5
    margins = (torch.arange(500) // 5 + 0.5) / 100
    images[torch.arange(500), labels] = margins.view(-1, 1, 1)
    return TensorDataset(images, labels)


def _classifier(suppress: str | None = None, by: float = 0.04) -> nn.Module:
    """Reads the class off the channel means; ``suppress`` lowers one class's logit by ``by``."""
    linear = nn.Linear(5, 5)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(5))
        linear.bias.zero_()
        if suppress is not None:
            linear.bias[CLASSES.index(suppress)] = -by
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear).eval()


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    example = torch.zeros(1, 5, 2, 2)
    return {"baseline": export_onnx(_classifier(), example, root / "baseline.onnx"),
            "intact": export_onnx(_classifier(), example, root / "intact.onnx"),
            # 4 of the 100 eyes_closed images (margins below 0.04) now lose to alert's logit of 0.
            "damaged": export_onnx(_classifier("eyes_closed"), example, root / "damaged.onnx")}


@pytest.fixture(scope="module")
def report(onnx_files):
    found = [Variant(name, str(path), "fp32") for name, path in onnx_files.items()]
    return build_report(found, DataLoader(_test_set(), batch_size=100), baseline="baseline", class_names=CLASSES)


def test_report_gives_recall_precision_and_their_change_per_class(report):
    damaged = report.row("damaged")
    assert damaged.class_names == CLASSES
    assert damaged.per_class["eyes_closed"] == {"recall": 0.96, "precision": 1.0, "support": 100}
    assert damaged.per_class["alert"]["precision"] == pytest.approx(100 / 104)
    assert damaged.per_class_delta_pt["eyes_closed"]["recall"] == pytest.approx(-4.0)
    assert damaged.per_class_delta_pt["phone"] == {"recall": 0.0, "precision": 0.0}


def test_safety_gate_flags_a_lost_safety_class_although_top1_stays_within_one_point(report):
    violations = check_safety(report, SafetyPolicy(SAFETY, max_recall_drop_pt=2.0))

    assert report.row("damaged").accuracy_delta_pt == pytest.approx(-0.8)  # top-1 alone would pass it
    assert [(v.variant, v.class_name) for v in violations] == [("damaged", "eyes_closed")]
    assert violations[0].drop_pt == pytest.approx(4.0)
    assert check_safety(report, SafetyPolicy(SAFETY, max_recall_drop_pt=5.0)) == []


class _Data(LightningDataModule):
    class_names = CLASSES

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(4, 5, 2, 2), torch.zeros(4, dtype=torch.long)), batch_size=4)

    def test_dataloader(self):
        return DataLoader(_test_set(), batch_size=100)


class _Module(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _classifier()

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, report: CompressionReport) -> None:
    trainer = Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                      callbacks=[report])
    trainer.fit(_Module(), datamodule=_Data())


def test_fit_fails_at_the_end_with_every_report_file_written(tmp_path, onnx_files):
    report = CompressionReport(output_dir=str(tmp_path / "report"), baseline="baseline", safety_classes=SAFETY,
                               extra_variants={k: str(v) for k, v in onnx_files.items()}, **FAST)
    with pytest.raises(SafetyGateError, match="damaged: recall of safety class 'eyes_closed' 96.00 %"):
        _fit(tmp_path, report)

    out = tmp_path / "report"
    data = json.loads((out / "report.json").read_text())
    assert data["safety"]["passed"] is False and data["safety"]["violations"][0]["variant"] == "damaged"
    rows = {row["name"]: row for row in data["variants"]}
    assert rows["damaged"]["per_class"]["eyes_closed"]["recall"] == 0.96
    markdown = (out / "report.md").read_text()
    assert "| eyes_closed † |" in markdown and "**96.0 (-4.0) ⚠**" in markdown and "1 violation(s)" in markdown
    for name in onnx_files:
        assert (out / f"confusion_{name}.png").stat().st_size > 1000, name


def test_warn_mode_flags_but_lets_the_run_finish(tmp_path, onnx_files):
    report = CompressionReport(output_dir=str(tmp_path / "report"), baseline="baseline", safety_classes=SAFETY,
                               on_safety_violation="warn", extra_variants={"baseline": str(onnx_files["baseline"]),
                                                                           "damaged": str(onnx_files["damaged"])},
                               **FAST)
    with pytest.warns(UserWarning, match="safety gate"):
        _fit(tmp_path, report)
    assert report.report.safety["passed"] is False


def test_unknown_safety_class_fails_before_training(tmp_path, onnx_files):
    report = CompressionReport(output_dir=str(tmp_path / "report"), safety_classes=["eyes_shut"],
                               extra_variants={"baseline": str(onnx_files["baseline"])}, **FAST)
    with pytest.raises(MisconfigurationException, match=r"safety_classes \['eyes_shut'\] are not classes"):
        _fit(tmp_path, report)


@pytest.mark.parametrize("kwargs, message", [
    (dict(safety_classes="eyes_closed"), "must be a list of class names"),
    (dict(safety_classes=["phone", "phone"]), "names a class twice"),
    (dict(max_recall_drop_pt=-1), "max_recall_drop_pt=-1"),
    (dict(on_safety_violation="ignore"), "on_safety_violation='ignore'"),
])
def test_invalid_safety_arguments_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionReport(**kwargs)
