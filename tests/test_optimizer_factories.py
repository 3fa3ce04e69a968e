"""Optimizers given from Python the usual way leave checkpoints that every loader reads.

Reproduction: ``DMSClassifier(optimizer=functools.partial(torch.optim.SGD, lr=0.05))`` trained under a plain
Trainer with ``ONNXExport(checkpoint="best")`` failed when fit ended ("holds Python objects other than tensors"),
and the same checkpoint could not be reloaded by ``load_from_checkpoint`` or used as a distillation teacher:
the partial was pickled into the checkpoint's hyper-parameters, which weights_only loading refuses.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch

from dms_lightning import DistillationModule, DMSClassifier
from dms_lightning.callbacks import ONNXExport
from dms_lightning.models.factories import OPTIMIZER_BASES, factory_config, resolve_factory
from dms_lightning.utils.checkpoint import CheckpointError, load_checkpoint

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
STEP = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5)


def _fit(tmp_path, tiny_datamodule, fast_trainer_kwargs, **model_kwargs):
    datamodule = tiny_datamodule(image_size=32, train_size=32, val_size=16, test_size=16)
    model = DMSClassifier(backbone="mobilenet_v3_small", num_classes=5, in_channels=1, image_size=32, **model_kwargs)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    kwargs = {**fast_trainer_kwargs, "enable_checkpointing": True}
    trainer = pl.Trainer(**kwargs, callbacks=[checkpoint, ONNXExport(dirpath=str(tmp_path / "onnx"), checkpoint="best")])
    trainer.fit(model, datamodule)
    return checkpoint.best_model_path


def test_partial_optimizer_and_scheduler_leave_a_checkpoint_every_loader_reads(tmp_path, tiny_datamodule,
                                                                               fast_trainer_kwargs):
    best = _fit(tmp_path, tiny_datamodule, fast_trainer_kwargs, optimizer=SGD, lr_scheduler=STEP)
    assert (tmp_path / "onnx" / "model_fp32.onnx").is_file()  # ONNXExport read the best checkpoint

    hparams = load_checkpoint(best)["hyper_parameters"]
    assert hparams["optimizer"] == {"class_path": "torch.optim.sgd.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}
    assert hparams["lr_scheduler"]["init_args"] == {"step_size": 3, "gamma": 0.5}

    # Reloaded, the module trains with the optimizer and schedule it was given.
    reloaded = DMSClassifier.load_from_checkpoint(best)
    configured = reloaded.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["lr"] == 0.05 and optimizer.defaults["momentum"] == 0.9
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 3

    student = DistillationModule(student="mobilenet_v3_small", teacher_checkpoint=best, num_classes=5, in_channels=1,
                                 image_size=32, optimizer=SGD)
    assert student.hparams["optimizer"]["class_path"] == "torch.optim.sgd.SGD"


def test_a_function_factory_is_left_out_and_the_checkpoint_still_reads(tmp_path, tiny_datamodule,
                                                                       fast_trainer_kwargs):
    best = _fit(tmp_path, tiny_datamodule, fast_trainer_kwargs,
                optimizer=lambda params: torch.optim.SGD(params, lr=0.05))
    assert "optimizer" not in load_checkpoint(best)["hyper_parameters"]
    reloaded = DMSClassifier.load_from_checkpoint(best, optimizer=SGD)  # what the message says to do
    assert isinstance(reloaded.configure_optimizers()["optimizer"], torch.optim.SGD)


def test_factory_config_forms():
    assert factory_config(torch.optim.AdamW) == {"class_path": "torch.optim.adamw.AdamW", "init_args": {}}
    nested = functools.partial(functools.partial(torch.optim.AdamW, lr=0.1), weight_decay=0.0, betas=(0.8, 0.9))
    assert factory_config(nested)["init_args"] == {"lr": 0.1, "weight_decay": 0.0, "betas": (0.8, 0.9)}
    cli = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}}
    assert factory_config(cli) == cli
    assert factory_config(lambda params: None) is None
    assert factory_config(functools.partial(torch.optim.SGD, 0.1)) is None  # positional: no keyword form
    assert factory_config(functools.partial(torch.optim.SGD, lr=torch.tensor(0.1))) is None  # not plain data


@pytest.mark.parametrize("class_path", ["os.system", "subprocess.Popen", "torch.nn.Linear", "no.such.Thing", "SGD"])
def test_a_checkpoint_cannot_name_an_arbitrary_callable(class_path):
    with pytest.raises(ValueError, match=r"model\.optimizer\.class_path=.*torch\.optim\.optimizer\.Optimizer"):
        resolve_factory({"class_path": class_path, "init_args": {}}, "model.optimizer", OPTIMIZER_BASES)
    with pytest.raises(ValueError, match=r"model\.optimizer="):
        DMSClassifier(backbone="mobilenet_v3_small", num_classes=5, optimizer={"lr": 0.1})


def test_an_older_checkpoint_with_a_pickled_partial_gets_the_recipe(tmp_path, tiny_datamodule, fast_trainer_kwargs):
    best = _fit(tmp_path, tiny_datamodule, fast_trainer_kwargs)
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["hyper_parameters"]["optimizer"] = SGD  # what earlier versions wrote
    torch.save(checkpoint, best)
    with pytest.raises(CheckpointError, match=r"functools\.partial.*delete ckpt\['hyper_parameters'\]\['optimizer'\]"):
        load_checkpoint(best, "model.teacher_checkpoint")
