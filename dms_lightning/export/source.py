"""What the export callbacks export: the network of the chosen checkpoint, real images, and its preprocessing."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dms_lightning.export.metadata import preprocessing_info
from dms_lightning.quant.ptq import PostTrainingQuantization
from dms_lightning.utils.artifacts import ParityRule
from dms_lightning.utils.checkpoint import compression_target, load_checkpoint
from dms_lightning.utils.compression import as_network_input
from dms_lightning.utils.predictions import batch_images, eval_mode, split_dataloaders

CHECKPOINT_CHOICES = ("best", "last")


@dataclass
class ExportSource:
    """A CPU, float32, eval-mode copy of the network to export and where its weights came from."""

    model: nn.Module
    origin: dict = field(default_factory=dict)


def export_source(trainer: Trainer, pl_module: LightningModule, checkpoint: str = "best") -> ExportSource:
    """The compression target of ``pl_module`` with the weights of the ``best`` checkpoint or the ``last`` ones.

    ``best`` is ``trainer.checkpoint_callback.best_model_path`` (the monitored metric's best epoch). When
    that epoch had the architecture the module has now, its weights are loaded into a copy of the current
    network. When the architecture changed since (channels removed, fake-quant inserted later in the run),
    the checkpoint is loaded through the module's own ``load_from_checkpoint``, whose
    ``on_load_checkpoint`` re-applies the recorded architecture changes before the weights load. Without
    a best checkpoint the final weights are used, with a warning.
    """
    if checkpoint not in CHECKPOINT_CHOICES:
        raise ValueError(f"checkpoint={checkpoint!r} must be one of {CHECKPOINT_CHOICES}")
    target = compression_target(pl_module)
    callback = trainer.checkpoint_callback
    best_path = getattr(callback, "best_model_path", "") if callback is not None else ""
    if checkpoint == "best" and best_path and Path(best_path).is_file():
        model = _load_checkpoint_target(pl_module, target, best_path)
        score = getattr(callback, "best_model_score", None)
        origin = {"checkpoint": "best", "path": str(best_path), "monitor": getattr(callback, "monitor", None),
                  "score": float(score) if score is not None else None}
    else:
        if checkpoint == "best":
            rank_zero_warn("[dms_lightning] export: no best checkpoint was saved (no ModelCheckpoint, or it "
                           "monitors nothing); exporting the final weights")
        model = detached_copy(target, trainer)
        origin = {"checkpoint": "last", "epoch": trainer.current_epoch, "global_step": trainer.global_step}
    return ExportSource(model.cpu().float().eval(), origin)


def _load_checkpoint_target(pl_module: LightningModule, target: nn.Module, path: str) -> nn.Module:
    prefix = next(name for name, module in pl_module.named_modules() if module is target)
    prefix = f"{prefix}." if prefix else ""
    checkpoint = load_checkpoint(path, "best checkpoint")
    state = {key[len(prefix):]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
    current = target.state_dict()
    same_architecture = state.keys() == current.keys() and all(
        getattr(state[k], "shape", None) == getattr(current[k], "shape", None) for k in state)
    if same_architecture:
        model = detached_copy(target, pl_module._trainer)
        model.load_state_dict(state)
        return model
    try:
        restored = type(pl_module).load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(
            f"the best checkpoint {path} has a different architecture than the final model and "
            f"{type(pl_module).__name__}.load_from_checkpoint could not rebuild it ({err}). Save hyperparameters "
            "and restore architecture changes in on_load_checkpoint, or export with checkpoint='last'") from err
    return compression_target(restored)


def detached_copy(module: nn.Module, trainer: Trainer | None) -> nn.Module:
    """A deep copy of ``module`` that does not copy the Trainer a LightningModule holds."""
    # A LightningModule holds its Trainer: map it to None instead of deep-copying the whole run.
    memo = {id(trainer): None} if trainer is not None else {}
    return copy.deepcopy(module, memo)


class _QuantOpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if "quantize" in name:
            self.seen.add(name)
        return func(*args, **(kwargs or {}))


def uses_fake_quant(model: nn.Module, example_input: torch.Tensor) -> bool:
    """Whether one forward pass of ``model`` runs a (fake-)quantization op: the INT8 QDQ export applies."""
    recorder = _QuantOpRecorder()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder:
            model(example_input.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    return bool(recorder.seen)


def warn_if_best_is_float(owner: str, trainer: Trainer, pl_module: LightningModule, source: ExportSource,
                          example_input: torch.Tensor) -> bool:
    """Warn (and return True) when ``checkpoint='best'`` chose float weights although the run's network is now
    fake-quantized: the exporter then writes no INT8 file, which the user meant to get.

    With QAT the best epoch came before quantization started; with PTQ every checkpoint of the fit is float,
    because PTQ quantizes when ``fit`` ends.
    """
    if source.origin.get("checkpoint") != "best" or uses_fake_quant(source.model, example_input):
        return False
    target = compression_target(pl_module)
    if not uses_fake_quant(target, example_input.to(next(target.parameters()).device)):
        return False
    ptq = any(isinstance(callback, PostTrainingQuantization) for callback in trainer.callbacks)
    why = ("PostTrainingQuantization quantizes when fit ends, after the last checkpoint, so every checkpoint of the "
           "run is float" if ptq else "it predates quantization-aware training")
    fix = "checkpoint='last'" if ptq else "checkpoint='last' (or monitor a metric of the QAT epochs)"
    rank_zero_warn(f"[dms_lightning] {owner}: the best checkpoint ({source.origin.get('path')}) holds the float "
                   f"network: {why}. No INT8 file is written from it; use {fix} for the INT8 export")
    return True


def check_logits_output(owner: str, trainer: Trainer, pl_module: LightningModule) -> None:
    """Refuse, before training, a compression target whose forward does not return one ``N × classes`` logits tensor.

    The exporters trace that network and judge the file on its output's top-1; a LightningModule whose forward
    returns ``(logits, features)`` or a dict would fail only when ``fit`` ends. The example input is the module's
    ``example_input_array`` or one validation / training image; without either the check is skipped.
    """
    target = compression_target(pl_module)
    example = getattr(pl_module, "example_input_array", None)
    if not isinstance(example, torch.Tensor):
        try:
            example = sample_images(trainer, 1, "val")
        except (ValueError, TypeError, RuntimeError):
            return
    with eval_mode(target), torch.no_grad():
        output = target(as_network_input(example[:1], target))
    if isinstance(output, torch.Tensor) and output.dim() >= 2 and all(size == 1 for size in output.shape[2:]):
        return  # N x classes (or N x classes x 1 x 1 from a fully convolutional head)
    found = (f"a {type(output).__name__} of {len(output)}" if isinstance(output, (tuple, list, dict))
             else f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__)
    raise MisconfigurationException(
        f"{owner} exports {type(target).__name__} and judges the file on its class logits, but its forward returns "
        f"{found} for one image, not one N x classes logits tensor. Give {type(pl_module).__name__} a "
        "`compression_target` property that returns the sub-network producing the logits (e.g. `return self.net`); "
        "the compression callbacks and exporters then act on it")


def _loaders(trainer: Trainer, split: str) -> list:
    """The ``split`` dataloaders; without them (a module that brings only its own loaders) val, then train."""
    for candidate in dict.fromkeys((split, "val", "train")):
        loaders = split_dataloaders(trainer, candidate)
        if loaders is not None:
            break
    else:
        raise ValueError(f"no {split} data to export with: give the Trainer a datamodule (or val_dataloaders)")
    if candidate != split:
        rank_zero_warn(f"[dms_lightning] export: the run has no {split} dataloader; checking on {candidate} images")
    if isinstance(loaders, dict):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def sample_images(trainer: Trainer, count: int | None, split: str = "val") -> torch.Tensor:
    """Up to ``count`` (``None``: all) preprocessed images (``N × C × H × W``, CPU float32) of the ``split`` loader."""
    chunks, total = [], 0
    for loader in _loaders(trainer, split):
        for batch in loader:
            images = batch_images(batch).detach().cpu().float()
            chunks.append(images)
            total += len(images)
            if count is not None and total >= count:
                return torch.cat(chunks)[:count]
    if not chunks:
        raise ValueError(f"the {split} dataloader yielded no batches to export with")
    return torch.cat(chunks)[:count]


def parity_images(trainer: Trainer, rule: ParityRule) -> torch.Tensor:
    """The images ``rule`` judges an export on: ``rule.batches`` batches of its split (all when ``None``)."""
    datamodule = getattr(trainer, "datamodule", None)
    batch_size = getattr(datamodule, "batch_size", None) or 64
    return sample_images(trainer, None if rule.batches is None else rule.batches * batch_size, rule.split)


def model_preprocessing(trainer: Trainer, pl_module: LightningModule, example_input: torch.Tensor) -> dict:
    """The preprocessing fields of the run's model for its ONNX metadata (see ``export.metadata``)."""
    return preprocessing_info(getattr(trainer, "datamodule", None), pl_module, example_input)
