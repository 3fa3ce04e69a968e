"""Per-quantizer sensitivity: the analysis finds the quantizer that hurts, leaves the network as it was, and the
callback writes its table, JSON and chart at the end of a fit."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from dms_lightning import DMSDataModule
from dms_lightning.callbacks import PostTrainingQuantization, QuantizationSensitivity
from dms_lightning.quant import post_training_quantize
from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.sensitivity import named_quantizers, quantization_sensitivity


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()


@pytest.fixture
def quantized_with_labels():
    net = _net()
    images = torch.randn(64, 1, 16, 16)
    with torch.no_grad():
        labels = net(images).argmax(dim=1)  # the float network is right on every image
    quantized = post_training_quantize(net, [images])
    return quantized, [(images[:32], labels[:32]), (images[32:], labels[32:])]


def test_a_damaged_quantizer_is_ranked_first_and_keeping_it_float_recovers_accuracy(quantized_with_labels):
    quantized, batches = quantized_with_labels
    kind, victim = named_quantizers(quantized)["_5"]  # the second conv block's output (after its ReLU)
    assert kind == "activation"
    victim.set_range(0.0, float(victim.max_val) / 30)  # clips almost every activation of that layer
    report = quantization_sensitivity(quantized, batches)
    assert report.float_accuracy == 1.0
    worst = report.rows[0]
    assert (worst.name, worst.kind) == ("_5", "activation")
    assert worst.only < 0.95 and worst.only < min(row.only for row in report.rows[1:])
    assert worst.sqnr_db == min(row.sqnr_db for row in report.rows)
    assert worst.all_but > report.quantized_accuracy  # keeping only it in float recovers accuracy
    assert {row.kind for row in report.rows} == {"weight", "activation"}
    assert len(report.rows) == len(named_quantizers(quantized))
    markdown = report.to_markdown()
    assert "`_5` | activation" in markdown.splitlines()[4]


def test_the_analysis_leaves_quantizers_mode_and_outputs_unchanged(quantized_with_labels):
    quantized, batches = quantized_with_labels
    quantized.train()
    quantizers = [m for m in quantized.modules() if isinstance(m, FakeQuantizer)]
    with torch.no_grad():
        before = quantized.eval()(batches[0][0])
    quantized.train()
    report = quantization_sensitivity(quantized, batches, batches=1, kinds=["activation"])
    assert quantized.training and not any(q.bypass for q in quantizers)
    assert {row.kind for row in report.rows} == {"activation"} and report.images == 32
    with torch.no_grad():
        assert torch.equal(quantized.eval()(batches[0][0]), before)


def test_images_caps_the_analysed_images_across_batches(quantized_with_labels):
    quantized, batches = quantized_with_labels
    report = quantization_sensitivity(quantized, batches, kinds=["activation"], images=40)
    assert report.images == 40  # all of the first batch, 8 of the second
    full = quantization_sensitivity(quantized, batches[:1], kinds=["activation"])
    capped = quantization_sensitivity(quantized, batches, kinds=["activation"], images=32)
    assert capped.to_dict() == full.to_dict()


def test_bad_input_names_what_is_wrong(quantized_with_labels):
    quantized, batches = quantized_with_labels
    with pytest.raises(ValueError, match="no fake quantizer"):
        quantization_sensitivity(_net(), batches)
    with pytest.raises(ValueError, match="kinds"):
        quantization_sensitivity(quantized, batches, kinds=["bias"])
    with pytest.raises(ValueError, match="images, labels"):
        quantization_sensitivity(quantized, [batches[0][0]])
    with pytest.raises(ValueError, match="split"):
        QuantizationSensitivity(split="train")
    with pytest.raises(ValueError, match="batches"):
        QuantizationSensitivity(batches=0)


class _PlainModule(L.LightningModule):
    """Someone else's LightningModule: no compression_target, its own network."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net().train()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, _):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_callback_after_ptq_writes_table_json_and_chart_for_a_plain_module(tmp_path):
    L.seed_everything(0)
    sensitivity = QuantizationSensitivity(dirpath=str(tmp_path / "sens"), batches=1, top=5)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0, limit_train_batches=2, limit_val_batches=1,
                        callbacks=[PostTrainingQuantization(calibration_batches=1, calibration_split="train",
                                                            export=False), sensitivity])
    datamodule = DMSDataModule(image_size=32, train_size=32, val_size=16, test_size=16, batch_size=16, augment=False)
    trainer.fit(_PlainModule(), datamodule)
    (name, report), = sensitivity.sensitivity_reports.items()
    files = {p.name for p in (tmp_path / "sens").iterdir()}
    assert files == {f"{name}_sensitivity.md", f"{name}_sensitivity.json", f"{name}_sensitivity.png"}
    saved = json.loads((tmp_path / "sens" / f"{name}_sensitivity.json").read_text())
    assert len(saved["rows"]) == len(report.rows) == len(named_quantizers(trainer.lightning_module))
    assert saved["images"] == 16
    table = (tmp_path / "sens" / f"{name}_sensitivity.md").read_text()
    assert table.count("\n| `") == 5


def test_callback_without_a_quantized_network_warns_and_writes_nothing(tmp_path):
    sensitivity = QuantizationSensitivity(dirpath=str(tmp_path / "sens"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                        num_sanity_val_steps=0, limit_train_batches=1, limit_val_batches=1, callbacks=[sensitivity])
    datamodule = DMSDataModule(image_size=32, train_size=16, val_size=16, test_size=16, batch_size=16, augment=False)
    with pytest.warns(UserWarning, match="no fake-quantized network"):
        trainer.fit(_PlainModule(), datamodule)
    assert not (tmp_path / "sens").exists() and not sensitivity.sensitivity_reports


def test_the_compression_report_carries_every_row_worst_first(quantized_with_labels):
    from dms_lightning.report.measure import Report
    from dms_lightning.report.tables import to_markdown

    quantized, batches = quantized_with_labels
    analysed = quantization_sensitivity(quantized, batches)
    report = Report(rows=[], baseline="fp32", machine={}, settings={}, sensitivity={"student_int8": analysed.to_dict()})
    text = to_markdown(report)
    section = text[text.index("Quantization sensitivity of **student_int8**"):]
    assert section.count("\n| `") == len(analysed.rows)
    assert f"most harmful: `{analysed.rows[0].name}` ({analysed.rows[0].kind})" in section
    assert report.to_dict()["sensitivity"]["student_int8"]["rows"][0]["name"] == analysed.rows[0].name
