"""Distilling with one's own networks and data: dict batches, a teacher in another dtype, edge settings that
would make the loss NaN or be misread, all answered before training."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dms_lightning import DistillationModule

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 16


class SmallCNN(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, 1, 1), nn.ReLU())
        self.fc = nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def _dict_batches(items):
    return {"image": torch.stack([i[0] for i in items]), "label": torch.stack([i[1] for i in items])}


class DictData(LightningDataModule):
    """A data module of one's own whose batches are ``{"image": ..., "label": ...}``."""

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        labels = torch.arange(48) % 5
        images = torch.randn(48, 1, SIZE, SIZE, generator=generator) + labels.view(-1, 1, 1, 1).float()
        self.data = TensorDataset(images, labels)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, shuffle=True, collate_fn=_dict_batches)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=24, collate_fn=_dict_batches)

    test_dataloader = predict_dataloader = val_dataloader


def _module(**overrides) -> DistillationModule:
    torch.manual_seed(0)
    kwargs = dict(teacher=SmallCNN(16), image_size=SIZE, attention_transfer=[{"student": "features.2",
                                                                               "teacher": "features.2"}])
    kwargs.update(overrides)
    return DistillationModule(SmallCNN(), **kwargs)


@pytest.mark.parametrize("teacher_cache", [False, True])
def test_dict_batches_train_validate_test_and_predict(fast_trainer_kwargs, teacher_cache):
    module = _module(teacher_cache=teacher_cache)
    trainer = Trainer(**{**fast_trainer_kwargs, "max_epochs": 2})
    trainer.fit(module, datamodule=DictData())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert {"val/acc", "val/teacher_acc", "train/loss_at"} <= set(trainer.callback_metrics)
    assert set(trainer.test(module, datamodule=DictData(), verbose=False)[0]) >= {"test/acc", "test/teacher_acc"}
    predictions = trainer.predict(module, datamodule=DictData())
    assert predictions[0]["pred"].shape == (24,) and torch.equal(predictions[0]["label"], torch.arange(24) % 5)


def test_dict_batch_without_labels_names_the_keys_it_looks_for(fast_trainer_kwargs):
    class Unlabelled(DictData):
        def train_dataloader(self):
            images_only = lambda items: {"image": _dict_batches(items)["image"]}  # noqa: E731
            return DataLoader(self.data, batch_size=16, collate_fn=images_only)

    with pytest.raises(ValueError, match=r"training_step needs labelled batches.*'label'"):
        Trainer(**fast_trainer_kwargs).fit(_module(), datamodule=Unlabelled())


def test_infinite_temperature_is_refused_instead_of_a_nan_loss():
    with pytest.raises(ValueError, match=r"model.temperature=inf must be a number in \(0, inf\)"):
        _module(temperature=float("inf"))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0, float("inf")], "1,1,1,1,1"])
def test_class_weights_that_are_not_finite_numbers_are_refused(weights):
    with pytest.raises(ValueError, match=r"model.class_weights=.* must be 5 positive finite numbers"):
        _module(class_weights=weights)


@pytest.mark.parametrize(("field", "value", "valid"), [("label_smoothing", "0.1", r"must be in \[0, 1\)"),
                                                   ("save_teacher", "no", "must be true or false")])
def test_a_setting_of_the_wrong_type_is_refused_naming_the_field(field, value, valid):
    # label_smoothing="0.1" raised a bare TypeError; save_teacher="no" was taken as true (a non-empty string).
    with pytest.raises(ValueError, match=rf"model.{field}={value!r} {valid}"):
        _module(**{field: value})


def test_a_teacher_on_another_device_passes_the_construction_checks():
    # A teacher loaded onto a GPU (load_from_checkpoint(map_location="cuda")) was run on a CPU example input and
    # refused; the checks now run on the teacher's own device. The meta device stands in for a GPU here.
    teacher = SmallCNN(width=16).to("meta")
    module = _module(teacher=teacher, attention_transfer=[{"student": "features.2", "teacher": "features.2"}])
    assert next(module.teacher.network.parameters()).device.type == "meta"


class SharedReLU(SmallCNN):
    """A student whose ReLU module runs twice per forward, as in torchvision ResNet's blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.features[4] = self.features[2]


def test_a_feature_layer_that_runs_twice_is_warned_about():
    # Its hook keeps only the last call's output: the comparison silently used the second use of the module.
    with pytest.warns(UserWarning, match=r"student module 'features.2' runs 2 times in one forward pass"):
        DistillationModule(SharedReLU(), teacher=SmallCNN(16), image_size=SIZE,
                           attention_transfer=[{"student": "features.2", "teacher": "features.2"}])


def test_class_weights_as_a_tensor_still_work():
    module = _module(class_weights=torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0]))
    assert module.class_weights.tolist() == [1.0, 2.0, 1.0, 1.0, 1.0]


def test_a_single_feature_pair_not_in_a_list_says_to_wrap_it():
    with pytest.raises(ValueError, match=r"model.attention_transfer=\{.*\} must be a list of pairs.*wrap a single"):
        _module(attention_transfer={"student": "features.2", "teacher": "features.2"})


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_teacher_in_another_dtype_is_refused_with_the_fix(dtype):
    with pytest.raises(ValueError, match=rf"model.teacher: .*parameters are {dtype}: pass the network in float32"):
        _module(teacher=SmallCNN(16).to(dtype))
