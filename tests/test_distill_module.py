"""DistillationModule with a real (tiny) ResNet-18 teacher checkpoint and a MobileNetV3-small student."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
import torch.nn.functional as F
from torch import nn

from dms_lightning import DMSClassifier, DMSDataModule, DistillationModule
from dms_lightning.distill import kd_loss
from dms_lightning.distill.teacher import TEACHER_DEFAULT_CHECKPOINT
from dms_lightning.export import export_onnx

REPO = Path(__file__).resolve().parents[1]
DATA = dict(image_size=64, train_size=96, val_size=48, test_size=48, batch_size=16, augment=False)


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A ResNet-18 DMSClassifier after two training steps at 64 px: a real Lightning teacher checkpoint."""
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    teacher = DMSClassifier("resnet18", image_size=64, class_names=DMSDataModule(**DATA).class_names)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_train_batches=2,
                      limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(teacher, datamodule=DMSDataModule(**DATA))
    path = root / "teacher.ckpt"
    trainer.save_checkpoint(path, weights_only=True)
    return str(path)


def _module(teacher_ckpt: str, **overrides) -> DistillationModule:
    kwargs = dict(student="mobilenet_v3_small", teacher_checkpoint=teacher_ckpt, image_size=64,
                  class_names=DMSDataModule(**DATA).class_names)
    kwargs.update(overrides)
    return DistillationModule(**kwargs)


@pytest.fixture(scope="module")
def distilled(teacher_ckpt, tmp_path_factory):
    """Two short epochs with logit KD, a FitNets hint and attention transfer."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    module = _module(teacher_ckpt, feature_hints=[{"student": "features.8", "teacher": "layer3"}],
                     attention_transfer=[{"student": "features.3", "teacher": "layer2"}])
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=3, log_every_n_steps=1,
                      logger=CSVLogger(root, name="csv"), callbacks=[checkpoint], enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=1, default_root_dir=str(root))
    trainer.fit(module, datamodule=DMSDataModule(**DATA))
    return SimpleNamespace(module=module, trainer=trainer, root=root, last=root / "ckpt" / "last.ckpt",
                           teacher_before=teacher_before, student_before=student_before,
                           metrics_csv=Path(trainer.logger.log_dir) / "metrics.csv")


def _metric_rows(path: Path, name: str) -> list[float]:
    with open(path) as fh:
        return [float(row[name]) for row in csv.DictReader(fh) if row.get(name)]


# ---------------------------------------------------------------------------------------------- the loss
def test_training_loss_matches_hand_computed_formula(teacher_ckpt):
    temperature, alpha = 3.0, 0.6
    module = _module(teacher_ckpt, temperature=temperature, alpha=alpha).eval()  # eval: dropout off
    torch.manual_seed(1)
    images, labels = torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 2, 4])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss, _ = module.training_loss(images, labels)

    with torch.no_grad():
        s = module.model(images).double()
        t = module.teacher.network(images).double()
    log_p_s = s / temperature - torch.logsumexp(s / temperature, dim=1, keepdim=True)
    p_t = torch.exp(t / temperature) / torch.exp(t / temperature).sum(dim=1, keepdim=True)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum() / len(images)
    ce = -(s[torch.arange(4), labels] - torch.logsumexp(s, dim=1)).mean()
    expected = (1 - alpha) * ce + alpha * temperature**2 * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_mixing_shows_teacher_and_student_the_same_mixed_images_and_mixes_the_labels(teacher_ckpt):
    module = _module(teacher_ckpt, mixing="mixup", alpha=0.5).eval()  # eval: dropout off
    torch.manual_seed(1)
    images, labels = torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 2, 4])
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen.setdefault(name, args[0])
        return hook

    module.teacher.network.register_forward_hook(record("teacher"))
    module.model.register_forward_hook(record("student"))

    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss, logits = module.training_loss(images, labels)

    mixed = module._mixed
    assert not torch.equal(mixed.images, images)
    assert torch.equal(seen["teacher"], seen["student"]) and torch.allclose(seen["student"], mixed.images)
    with torch.no_grad():
        s, t = module.model(mixed.images), module.teacher.network(mixed.images)
    ce = (mixed.share * F.cross_entropy(s, labels) + (1 - mixed.share) * F.cross_entropy(s, labels[mixed.partner]))
    expected = 0.5 * ce + 0.5 * kd_loss(s, t, module.temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert module.accuracy_targets(labels).tolist() == mixed.dominant_labels(labels).tolist()


def test_mixing_with_the_teacher_cache_is_refused_with_the_fix(teacher_ckpt):
    with pytest.raises(ValueError, match=r"model\.mixing='cutmix'.*teacher_cache: false"):
        _module(teacher_ckpt, mixing="cutmix", teacher_cache=True)


def test_mixup_fit_trains_and_validates_on_unmixed_images(teacher_ckpt, tmp_path):
    torch.manual_seed(0)
    module = _module(teacher_ckpt, mixing="mixup")
    calls = []
    module.model.register_forward_hook(lambda m, args, out: calls.append(m.training))
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=DMSDataModule(**DATA))
    assert module._mixed is not None and calls.count(True) == 2 and calls.count(False) >= 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize("mixing", ["none", "mixup"])
def test_a_small_training_set_without_mixing_is_pointed_to_function_matching(teacher_ckpt, tmp_path, caplog, mixing):
    module = _module(teacher_ckpt, mixing=mixing)
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, default_root_dir=str(tmp_path))
    with caplog.at_level("INFO"):
        trainer.fit(module, datamodule=DMSDataModule(**DATA))
    hinted = "96 training images" in caplog.text and "model.mixing: mixup" in caplog.text
    assert hinted == (mixing == "none")


# ---------------------------------------------------------------------------------------------- frozen teacher
def test_teacher_stays_in_eval_mode_after_train_is_called(teacher_ckpt):
    module = _module(teacher_ckpt)

    module.train()

    assert module.model.training
    assert not any(m.training for m in module.teacher.modules())


def test_teacher_weights_and_batchnorm_statistics_do_not_change_during_fit(distilled):
    after = distilled.module.teacher.state_dict()

    assert all(torch.equal(distilled.teacher_before[k], after[k]) for k in after)
    assert all(p.grad is None and not p.requires_grad for p in distilled.module.teacher.parameters())
    changed = [k for k, v in distilled.module.model.state_dict().items()
               if not torch.equal(distilled.student_before[k], v)]
    assert changed, "the student must learn"


def test_optimizer_holds_student_and_adapters_but_no_teacher_parameter(distilled):
    optimized = {id(p) for group in distilled.trainer.optimizers[0].param_groups for p in group["params"]}
    teacher = {id(p) for p in distilled.module.teacher.parameters()}
    expected = {id(p) for p in distilled.module.model.parameters()} | \
        {id(p) for p in distilled.module.hint_adapters.parameters()}

    assert optimized == expected and not optimized & teacher


def test_fit_logs_every_loss_component(distilled):
    metrics = distilled.trainer.callback_metrics
    alpha = distilled.module.alpha
    total = (1 - alpha) * metrics["train/loss_ce"] + alpha * metrics["train/loss_kd"] + metrics["train/loss_hint"] \
        + metrics["train/loss_at"]

    assert all(torch.isfinite(metrics[name]) for name in ("train/loss_ce", "train/loss_kd", "train/loss_hint",
                                                           "train/loss_at"))
    assert metrics["train/loss"].item() == pytest.approx(total.item(), rel=1e-4)


def test_bf16_mixed_precision_fit_trains_the_student_with_a_frozen_teacher(teacher_ckpt, tmp_path):
    # bf16 on a CPU without native bf16 is slow: one batch of four 32 px images is enough to cover the path.
    data = DMSDataModule(**{**DATA, "image_size": 32, "batch_size": 4, "train_size": 8})
    module = _module(teacher_ckpt, image_size=32, feature_hints=[{"student": "features.8", "teacher": "layer3"}])
    student_before = [p.clone() for p in module.model.parameters()]
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                      precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path))

    trainer.fit(module, datamodule=data)

    assert torch.isfinite(trainer.callback_metrics["train/loss_kd"])
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, module.model.parameters()))
    assert not any(m.training for m in module.teacher.modules())


def test_teacher_accuracy_is_logged_once_per_run_and_not_from_the_sanity_check(distilled):
    teacher_acc = _metric_rows(distilled.metrics_csv, "val/teacher_acc")
    student_acc = _metric_rows(distilled.metrics_csv, "val/acc")

    assert len(student_acc) == 2 and len(teacher_acc) == 1
    assert 0.0 <= teacher_acc[0] <= 1.0


# ---------------------------------------------------------------------------------------------- what is saved
def test_saved_checkpoint_holds_the_student_but_no_teacher_weights(distilled):
    state = torch.load(distilled.last, map_location="cpu", weights_only=True)["state_dict"]

    assert not [k for k in state if k.startswith("teacher.")]
    assert {f"model.{k}" for k in distilled.module.model.state_dict()} <= set(state)
    teacher_size = sum(p.numel() for p in distilled.module.teacher.parameters())
    assert sum(v.numel() for v in state.values()) < teacher_size / 4


def test_save_teacher_keeps_teacher_weights_in_the_state_dict(teacher_ckpt):
    module = _module(teacher_ckpt, save_teacher=True)

    assert any(k.startswith("teacher.network.") for k in module.state_dict())


def test_exported_onnx_is_the_student_alone(distilled, tmp_path):
    student = distilled.module.compression_target
    path = export_onnx(student, torch.zeros(1, 1, 64, 64), tmp_path / "student.onnx")
    graph = onnx.load(str(path)).graph
    exported = sum(int(np.prod(init.dims)) for init in graph.initializer)
    images = torch.randn(3, 1, 64, 64)

    (onnx_logits,) = ort.InferenceSession(str(path)).run(None, {"input": images.numpy()})

    assert student is distilled.module.model
    assert exported <= sum(p.numel() for p in student.parameters())
    assert not any(tuple(init.dims) == (64, 1, 7, 7) for init in graph.initializer)  # ResNet stem conv
    with torch.no_grad():
        torch_logits = student.eval()(images).numpy()
    student.train()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4)


def test_student_checkpoint_reloads_with_identical_predictions(distilled):
    reloaded = DistillationModule.load_from_checkpoint(distilled.last, map_location="cpu").eval()
    student = distilled.module.model
    images = torch.randn(2, 1, 64, 64)

    with torch.no_grad():
        expected = student.eval()(images)
        got = reloaded(images)
    student.train()

    assert torch.equal(got, expected)
    assert all(torch.equal(v, reloaded.teacher.state_dict()[k]) for k, v in distilled.teacher_before.items())


def test_cli_fit_then_validate_test_and_predict_from_the_student_checkpoint(teacher_ckpt, tmp_path, monkeypatch):
    from dms_lightning.cli import main

    monkeypatch.setattr(sys, "argv", ["dms_lightning"])  # main(args=...) is `python -m dms_lightning ...`
    args = ["--config", str(REPO / "configs" / "distill.yaml"),
            "--model.init_args.teacher_checkpoint", teacher_ckpt,
            "--model.init_args.feature_hints", "[{student: features.8, teacher: layer3}]",
            "--data.image_size", "64", "--data.train_size", "96", "--data.val_size", "16", "--data.test_size", "16",
            "--data.batch_size", "16", "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--checkpoint.dirpath", str(tmp_path / "ckpt"),
            "--trainer.callbacks=[]"]  # distillation alone; the compression callbacks are tested in test_configs
    fit = main(["fit", *args, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    fit_val_acc = fit.trainer.callback_metrics["val/acc"].item()
    ckpt = str(tmp_path / "ckpt" / "best.ckpt")

    validate = main(["validate", *args, "--ckpt_path", ckpt])
    test = main(["test", *args, "--ckpt_path", ckpt])
    predict = main(["predict", *args, "--ckpt_path", ckpt])

    assert validate.trainer.callback_metrics["val/acc"].item() == pytest.approx(fit_val_acc)
    assert {"test/acc", "test/teacher_acc"} <= set(test.trainer.callback_metrics)
    rows = list(csv.DictReader(open(Path(predict.trainer.log_dir) / "predictions.csv")))
    assert len(rows) == 16 and rows[0]["predicted"] in DMSDataModule(**DATA).class_names


# ---------------------------------------------------------------------------------------------- any student
def test_any_nn_module_classifier_can_be_the_student(teacher_ckpt):
    student = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(8, 5))
    module = _module(teacher_ckpt, student=student, feature_hints=[["0", "layer1", 1.0]])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, logits = module.train().training_loss(torch.randn(4, 1, 64, 64), torch.tensor([0, 1, 2, 3]))
    loss.backward()

    assert module.compression_target is student and logits.shape == (4, 5)
    assert student[0].weight.grad is not None and "student" not in module.hparams


class _OwnTeacherProject(LightningModule):
    """Someone's own LightningModule (no DMSClassifier hyper-parameters): its checkpoint cannot build a teacher."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_own_teacher_network_distils_and_reloads_and_stays_untouched(tmp_path):
    torch.manual_seed(0)
    project = _OwnTeacherProject()
    fit = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    Trainer(default_root_dir=str(tmp_path / "own"), **fit).fit(project, datamodule=DMSDataModule(**DATA))
    own_ckpt = next((tmp_path / "own").rglob("*.ckpt"))
    with pytest.raises(ValueError, match=r"Lightning checkpoint of another LightningModule.*teacher=YourModule"):
        DistillationModule(teacher_checkpoint=str(own_ckpt), image_size=64)

    teacher = _OwnTeacherProject.load_from_checkpoint(own_ckpt).train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = _module("", teacher=teacher, teacher_checkpoint=TEACHER_DEFAULT_CHECKPOINT,
                     attention_transfer=[{"student": "features.3", "teacher": "net.3"}])
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = Trainer(default_root_dir=str(tmp_path / "distil"), logger=False, callbacks=[checkpoint], **fit)
    trainer.fit(module, datamodule=DMSDataModule(**DATA))

    # the caller's module is not frozen, put in eval mode or changed; the run's copy taught with its weights
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    images = torch.randn(3, 1, 64, 64)
    with torch.no_grad():  # the run's copy is in NHWC memory format (channels_last): equal up to float rounding
        torch.testing.assert_close(module.teacher(images), teacher.eval()(images), rtol=0, atol=1e-5)
    teacher.train()
    assert "teacher" not in module.hparams
    reloaded = DistillationModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", teacher=teacher).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(images), module.eval()(images))
    with pytest.raises(FileNotFoundError, match=r"DistillationModule\(teacher=\.\.\.\)"):
        DistillationModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")


def test_teacher_network_and_teacher_checkpoint_together_are_refused(teacher_ckpt):
    with pytest.raises(ValueError, match=r"model\.teacher .*model\.teacher_checkpoint=.*give one of them"):
        _module(teacher_ckpt, teacher=_OwnTeacherProject())
    with pytest.raises(ValueError, match=r"model\.teacher=.*must be a trained nn\.Module"):
        _module(teacher_ckpt, teacher="resnet18")


# ---------------------------------------------------------------------------------------------- clear errors
def test_missing_teacher_checkpoint_says_how_to_train_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"configs/teacher\.yaml.*artifacts/teacher/best\.ckpt"):
        DistillationModule(teacher_checkpoint=str(tmp_path / "nope.ckpt"), image_size=64)


def test_teacher_trained_for_other_classes_is_rejected(teacher_ckpt):
    with pytest.raises(ValueError, match=r"5 classes .* num_classes=3"):
        DistillationModule(teacher_checkpoint=teacher_ckpt, num_classes=3, image_size=64)


def test_teacher_with_other_class_order_is_rejected(teacher_ckpt):
    names = list(reversed(DMSDataModule(**DATA).class_names))

    with pytest.raises(ValueError, match="same order"):
        _module(teacher_ckpt, class_names=names)


def test_teacher_trained_on_other_input_channels_is_rejected(teacher_ckpt):
    with pytest.raises(ValueError, match=r"1-channel images .* in_channels=3"):
        _module(teacher_ckpt, in_channels=3)


def test_unknown_hint_path_lists_the_valid_module_paths(teacher_ckpt):
    with pytest.raises(ValueError, match=r"'layer9'.*Valid paths include.*'layer3'"):
        _module(teacher_ckpt, feature_hints=[{"student": "features.8", "teacher": "layer9"}])


def test_hint_on_a_layer_without_feature_map_is_rejected(teacher_ckpt):
    with pytest.raises(ValueError, match="N × C × H × W"):
        _module(teacher_ckpt, attention_transfer=[{"student": "features.8", "teacher": "fc"}])


@pytest.mark.parametrize(("field", "value"), [("temperature", 0.0), ("alpha", 1.5), ("student", 3),
                                             ("mixing", "blend")])
def test_invalid_distillation_settings_name_the_field(teacher_ckpt, field, value):
    with pytest.raises(ValueError, match=rf"model\.{field}="):
        _module(teacher_ckpt, **{field: value})


def test_attention_transfer_keeps_working_once_qat_rewrites_the_student(teacher_ckpt, tmp_path):
    import warnings

    from dms_lightning.callbacks import QuantizationAwareTraining
    from dms_lightning.quant import is_quantized

    pairs = [{"student": "features.1", "teacher": "layer1"}, {"student": "features.3", "teacher": "layer2"}]
    module = _module(teacher_ckpt, attention_transfer=pairs)
    logger = CSVLogger(str(tmp_path), name="log")
    trainer = Trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=1, logger=logger, log_every_n_steps=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[QuantizationAwareTraining(start_epoch=1, export=False)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no longer called")
        trainer.fit(module, datamodule=DMSDataModule(**DATA))

    assert is_quantized(module.model)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    at_steps = [int(r["step"]) for r in rows if r.get("train/loss_at")]
    assert max(at_steps) >= 2  # epoch 1 trained with fake quantization still has its attention-transfer term
