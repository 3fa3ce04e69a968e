"""DMSClassifier and the classification plumbing it shares with DistillationModule."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassRecall,
)
from typing_extensions import override

from dms_lightning.models.backbones import Activation, Head, build_backbone
from dms_lightning.models.batchnorm import BatchNormReestimation, find_reestimation
from dms_lightning.models.factories import OPTIMIZER_BASES, SCHEDULER_BASES, factory_config, resolve_factory
from dms_lightning.utils.checkpoint import checkpoint_records, restore_architecture
from dms_lightning.utils.plotting import confusion_matrix_figure
from dms_lightning.utils.predictions import batch_images, batch_labels, require_labels
from dms_lightning.utils.rng import RNG_RECORD, restore_rng_states, resuming_fit, rng_states
from dms_lightning.utils.tensorboard import log_figure
from dms_lightning.utils.validation import check_fraction, is_positive_finite


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.03):
    """Linear warm-up then cosine decay to zero over ``total_steps`` optimizer steps (stepped per batch)."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def images_and_labels(batch, owner: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a labelled batch: ``(images, labels, ...)`` or a dict such as
    ``{"image": ..., "label": ...}`` (keys of :data:`~dms_lightning.utils.predictions.IMAGE_KEYS` / ``LABEL_KEYS``)."""
    if isinstance(batch, Mapping):
        return batch_images(batch), require_labels(batch, owner)
    return batch[0], batch[1]


class ClassificationModule(LightningModule):
    """Metrics, logging, prediction and optimizers of an image classifier whose network is ``self.model``.

    Subclasses build ``self.model`` (the network that is pruned, quantized and exported) and may override
    :meth:`training_loss`. Logged: ``train/loss``, ``train/acc``, ``{val,test}/{loss,acc,f1}``,
    per-class recall ``{val,test}/recall/<class>`` and the confusion matrix as a TensorBoard image.
    """

    model: nn.Module

    def __init__(self, num_classes: int, class_names: Sequence[str] | None, in_channels: int, image_size: int,
                 optimizer: OptimizerCallable | None, lr_scheduler: LRSchedulerCallable | None,
                 label_smoothing: float = 0.0, class_weights: Sequence[float] | None = None,
                 bn_reestimation: bool = False, channels_last: bool = True) -> None:
        super().__init__()
        for name, value in (("bn_reestimation", bn_reestimation), ("channels_last", channels_last)):
            if not isinstance(value, bool):
                raise ValueError(f"model.{name}={value!r} must be true or false")
        self.bn_reestimation, self.channels_last = bn_reestimation, channels_last
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"model.class_names has {len(class_names)} names {list(class_names)} but "
                             f"model.num_classes={num_classes}")
        label_smoothing = check_fraction("model.label_smoothing", label_smoothing, high_inclusive=False)
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(num_classes)]
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.optimizer_factory = resolve_factory(optimizer, "model.optimizer", OPTIMIZER_BASES) or torch.optim.AdamW
        self.lr_scheduler_factory = resolve_factory(lr_scheduler, "model.lr_scheduler", SCHEDULER_BASES)
        self.label_smoothing = label_smoothing
        if class_weights is not None and (isinstance(class_weights, (str, bytes)) or len(class_weights) != num_classes
                                          or not all(is_positive_finite(w) for w in class_weights)):
            shown = class_weights if isinstance(class_weights, (str, bytes)) else list(class_weights)
            raise ValueError(f"model.class_weights={shown!r} must be {num_classes} positive finite numbers, one "
                             "per class (DMSDataModule(balance='loss_weights') computes them)")
        # Not persistent: a checkpoint's state_dict stays the same with or without class weights.
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.tensor(list(class_weights), dtype=torch.float32), persistent=False)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)
        metrics = MetricCollection({
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="none"),
        })
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def _factories_as_config(self) -> None:
        """After ``save_hyperparameters``: the optimizer and scheduler factories as ``{class_path, init_args}``.

        A ``functools.partial`` would otherwise be pickled into every checkpoint, which ``weights_only`` loading
        (ours and ``load_from_checkpoint``'s) refuses (:mod:`dms_lightning.models.factories`). A factory that
        has no such form (a function, a lambda) is left out of the hyperparameters, as Lightning leaves out what
        it cannot pickle: ``load_from_checkpoint`` then builds the default optimizer unless given ``optimizer=``.
        """
        for key in ("optimizer", "lr_scheduler"):
            stores = [h for h in (getattr(self, "_hparams", None), getattr(self, "_hparams_initial", None))
                      if h is not None and h.get(key) is not None]
            if not stores:
                continue
            given = stores[0][key]
            config = factory_config(given)
            for hparams in stores:
                if config is None:
                    del hparams[key]
                else:
                    hparams[key] = config
            if config is None:
                rank_zero_info(f"[dms_lightning] model.{key}={given!r} is not recorded in checkpoints (only a class, "
                               "or a functools.partial of one with plain keyword arguments, is): load_from_checkpoint "
                               f"builds the default unless given {key}=...")

    @property
    def compression_target(self) -> nn.Module:
        """The network that pruning, quantization and export act on."""
        return self.model

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def networks_in_memory_format(self) -> list[nn.Module]:
        """The networks :attr:`channels_last` keeps in NHWC memory format (a subclass adds its teacher)."""
        return [self.model]

    def _keep_channels_last(self) -> None:
        # Convolutions run ~20-35 % faster in NHWC on CPUs (oneDNN) and on GPUs with mixed precision, but only
        # when input *and* weights are NHWC. Pruning and quantization rebuild layers with fresh (NCHW)
        # weights, so the format is checked at every batch; converting keeps each Parameter object (its
        # optimizer state stays attached). The values, hence checkpoints and exports, do not change.
        if not self.channels_last:
            return
        for network in self.networks_in_memory_format():
            if any(m.weight.dim() == 4 and not m.weight.is_contiguous(memory_format=torch.channels_last)
                   for m in network.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)):
                network.to(memory_format=torch.channels_last)

    @override
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._keep_channels_last()

    @override
    def on_train_start(self) -> None:
        self._warn_if_batch_norm_cannot_settle()

    def _warn_if_batch_norm_cannot_settle(self) -> None:
        # A few hundred images give a handful of optimizer steps per epoch: BatchNorm's running averages (a
        # time constant of 1 / momentum steps) then lag the weights and evaluation-mode BatchNorm feeds the
        # head the wrong distribution (a distilled student at 77 % instead of 100 % on a 150-image set).
        if find_reestimation(self.trainer) is not None:
            return
        short = BatchNormReestimation.short_epoch(self.trainer, self.compression_target)
        if short is not None:
            rank_zero_warn(f"{short[0]} optimizer steps per epoch, fewer than the {short[1]} that BatchNorm's "
                           "running statistics need to settle: evaluation (and every exported model) will use stale "
                           "statistics. Set model.bn_reestimation: true (re-estimates them from the training images "
                           "after each epoch and at the end) or add a BatchNormReestimation callback")

    @override
    def on_validation_start(self) -> None:
        self._keep_channels_last()

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, logits)`` of one training batch. Subclasses add their terms here."""
        logits = self(images)
        loss = F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=self.label_smoothing)
        return loss, logits

    def accuracy_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels ``train/acc`` scores the last :meth:`training_loss` against (a subclass that mixes images
        maps them)."""
        return labels

    @override
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = images_and_labels(batch, f"{type(self).__name__}.training_step")
        loss, logits = self.training_loss(images, labels)
        self.train_acc(logits.detach(), self.accuracy_targets(labels))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        images, labels = images_and_labels(batch, f"{type(self).__name__} {stage}")
        logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), prog_bar=stage == "val", sync_dist=True)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, labels)
        (self.val_confusion if stage == "val" else self.test_confusion).update(logits, labels)

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_epoch_end(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        confusion = self.val_confusion if stage == "val" else self.test_confusion
        values = metrics.compute()
        recall = values.pop(f"{stage}/recall")
        self.log_dict(values, prog_bar=stage == "val")
        self.log_dict({f"{stage}/recall/{name}": r for name, r in zip(self.class_names, recall)})
        matrix = confusion.compute()
        metrics.reset()
        confusion.reset()
        if not self.trainer.sanity_checking:
            title = f"{stage} confusion matrix (epoch {self.current_epoch})"
            log_figure(self.trainer, f"{stage}/confusion_matrix",
                       confusion_matrix_figure(matrix.cpu().numpy(), self.class_names, title))

    @override
    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    @override
    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    @override
    def predict_step(self, batch, batch_idx: int) -> dict:
        images = batch_images(batch) if isinstance(batch, Mapping) else batch[0]
        probs = torch.softmax(self(images).float(), dim=1)
        out = {"probs": probs, "pred": probs.argmax(dim=1)}
        if isinstance(batch, Mapping):
            labels = batch_labels(batch)
            return out if labels is None else {**out, "label": labels}
        if len(batch) > 2:
            out["ids"] = list(batch[2])
        if len(batch) > 1:
            out["label"] = batch[1]
        return out

    def trainable_parameters(self):
        """Parameters the optimizer updates (a distillation teacher is not among them)."""
        return [p for p in self.parameters() if p.requires_grad]

    @override
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": warmup_cosine(optimizer, total), "interval": "step"}}
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_factory(optimizer)}

    @override
    def configure_callbacks(self) -> list:
        # Running BatchNorm averages lag the weights (badly so in a short run) and go stale where the network
        # changes; the run's own BatchNormReestimation, if it has one, takes precedence over this default.
        trainer = self._trainer
        if not self.bn_reestimation or trainer is None or find_reestimation(trainer) is not None:
            return []
        return [BatchNormReestimation()]

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Pruned / quantized checkpoints hold a changed architecture: rebuild it before the weights load. Under a
        # Trainer the compression callbacks did so in setup already (then this finds nothing to change); for
        # load_from_checkpoint, which runs no callback, this is what rebuilds it.
        restore_architecture(self, checkpoint)
        # Resuming fit: the random generators as they were when the checkpoint was written (shuffling, dropout,
        # augmentation, mixing), so the resumed run ends where the uninterrupted one did. Loading for evaluation or
        # export leaves them alone.
        states = (checkpoint.get("dms_lightning") or {}).get(RNG_RECORD)
        if states is not None and resuming_fit(self._trainer):
            restore_rng_states(states)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint_records(checkpoint)[RNG_RECORD] = rng_states()


class DMSClassifier(ClassificationModule):
    """A driver-monitoring image classifier on a torchvision backbone.

    Args:
        backbone: torchvision model name (``mobilenet_v3_small``, ``resnet18``, ``efficientnet_b0`` ...).
        num_classes: number of classes; linked to the data module by the CLI.
        in_channels: 1 for NIR/grayscale cameras, 3 for RGB; the first conv is adapted.
        class_names: names of the classes, kept in the checkpoint and exported model metadata.
        image_size: side of the square input, for ``example_input_array`` and export.
        weights: local file with pretrained weights (never downloaded).
        head: ``"dms"`` (pooled features → Linear ``head_hidden`` → ReLU → Dropout → Linear) or
            ``"torchvision"`` (the backbone's own classifier, resized).
        optimizer: optimizer factory, LightningCLI style (default ``AdamW(lr=1e-3)``); from Python e.g.
            ``functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)``, recorded in checkpoints as
            ``{class_path, init_args}`` (a lambda or function is not recorded).
        lr_scheduler: scheduler factory (the same forms); default: 3 % linear warm-up then cosine decay per step.
        label_smoothing: cross-entropy label smoothing.
        class_weights: one cross-entropy weight per class (against class imbalance, or to favour a safety
            class's recall); linked by the CLI from ``DMSDataModule.class_weights`` (``data.class_weights`` as
            given, or computed with ``data.balance: loss_weights``; a ``model.class_weights`` given to the CLI is
            moved there). ``None``: unweighted.
        bn_momentum: momentum of every BatchNorm's running statistics (default 0.1). torchvision's
            MobileNets use 0.01, which leaves evaluation at chance level after a short run; ``None``
            keeps torchvision's value.
        bn_reestimation: add a :class:`~dms_lightning.callbacks.BatchNormReestimation` with its defaults to
            a run that has none (off by default for now) (BatchNorm statistics recomputed at the end of training, and after every
            epoch when epochs are too short for the running averages to settle).
        channels_last: train and evaluate in NHWC memory format (input and conv weights), ~20-35 % faster
            convolutions on CPUs and on GPUs with mixed precision; the values, checkpoints and exported
            files are the same either way.
        zero_init_residual: start residual blocks as the identity by zeroing the scale of their last
            BatchNorm; trains faster from scratch, most of all on few steps
            (:func:`~dms_lightning.models.backbones.zero_init_residual_branches`). ``None`` (default): the
            inverted residuals of MobileNet / EfficientNet / MnasNet; ``True``: ResNet blocks too; ``False``:
            torchvision's initialisation. Weights loaded from ``weights`` replace it.
        activation: ``"default"`` or ``"relu"``: hard-swish / SiLU replaced by ReLU, so that an INT8 CPU or
            NPU graph runs the activation inside the integer convolution
            (:func:`~dms_lightning.models.backbones.use_relu`).

    Example:
        >>> model = DMSClassifier("mobilenet_v3_small", num_classes=5, image_size=64)
        >>> model(torch.zeros(2, 1, 64, 64)).shape
        torch.Size([2, 5])
    """

    def __init__(
        self,
        backbone: str = "mobilenet_v3_small",
        num_classes: int = 5,
        in_channels: int = 1,
        class_names: list[str] | None = None,
        image_size: int = 96,
        weights: str | None = None,
        head: Head = "dms",
        head_hidden: int = 128,
        dropout: float = 0.2,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        bn_momentum: float | None = 0.1,
        class_weights: list[float] | None = None,
        bn_reestimation: bool = False,
        channels_last: bool = True,
        zero_init_residual: bool | None = None,
        activation: Activation = "default",
    ) -> None:
        super().__init__(num_classes, class_names, in_channels, image_size, optimizer, lr_scheduler, label_smoothing,
                         class_weights, bn_reestimation, channels_last)
        self.save_hyperparameters()
        self._factories_as_config()
        self.model = build_backbone(backbone, num_classes, in_channels, head, head_hidden, dropout, weights,
                                    bn_momentum, zero_init_residual, activation)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # The checkpoint holds the trained weights: reloading must not need the original weights file.
        checkpoint.get("hyper_parameters", {})["weights"] = None
