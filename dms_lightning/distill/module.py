"""DistillationModule: a small student learns from a frozen DMSClassifier teacher."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from dms_lightning.distill.features import (
    FeaturePair,
    capture_outputs,
    check_module_path,
    feature_shapes,
    network_device,
    parse_feature_pairs,
)
from dms_lightning.distill.cache import TeacherCache
from dms_lightning.distill.losses import (
    MIXING_MODES,
    HintAdapter,
    MixedBatch,
    attention_transfer_loss,
    attention_transfer_loss_to,
    distillation_loss,
    mix_batch,
    teacher_attention_at,
)
from dms_lightning.distill.teacher import TEACHER_DEFAULT_CHECKPOINT, FrozenTeacher, load_teacher
from dms_lightning.models.backbones import Activation, Head, build_backbone
from dms_lightning.models.classifier import ClassificationModule, images_and_labels
from dms_lightning.utils.validation import check_fraction, check_number

#: Default attention-transfer weight: β/2 with β = 10³ as in Zagoruyko & Komodakis (2017).
DEFAULT_ATTENTION_WEIGHT = 500.0


def _training_images(trainer) -> int | None:
    """Size of the training set, when its dataloader has a sized dataset (not a dict of loaders, not an iterable)."""
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


class DistillationModule(ClassificationModule):
    """Train a student classifier on labels and on the soft predictions (and features) of a frozen teacher.

    Loss of a training batch::

        (1 − alpha) · CE(student, labels) + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))
        + Σ hint weight · MSE(adapter(student layer), teacher layer)          # feature_hints (FitNets)
        + Σ attention weight · AT(student layer, teacher layer)               # attention_transfer

    Logged: ``train/loss`` (the total), ``train/loss_ce``, ``train/loss_kd`` (``T²·KL``, before ``alpha``),
    ``train/loss_hint`` and ``train/loss_at`` (weighted sums, when configured), the usual ``val/*`` and
    ``test/*`` metrics of the student, and ``val/teacher_acc`` / ``test/teacher_acc`` once per run so the
    teacher-student gap shows in TensorBoard.

    The student is ``self.model``: validation, test, predict, export, pruning and quantization see only
    it. The teacher lives beside it, always in eval mode, without gradients, outside the optimizer and,
    unless ``save_teacher=True``, outside the saved checkpoint; it is re-read from ``teacher_checkpoint``
    whenever the module is built, so that file must exist also to reload a distilled checkpoint.

    Args:
        student: a torchvision backbone name (built like :class:`~dms_lightning.DMSClassifier` with
            ``student_head``, ``student_head_hidden``, ``dropout``, ``student_weights``) or any ``nn.Module``
            mapping ``N × in_channels × H × W`` images to ``N × num_classes`` logits.
        teacher_checkpoint: a ``DMSClassifier`` Lightning checkpoint (``configs/teacher.yaml`` writes
            ``artifacts/teacher/best.ckpt``) or a plain ``state_dict`` file (then ``teacher_backbone`` is needed).
            Not used when ``teacher`` is given.
        temperature: softmax temperature ``T`` of the soft targets (> 0).
        alpha: weight of the distillation term in ``[0, 1]``; ``1 − alpha`` weighs the label cross-entropy.
        feature_hints: FitNets hints, ``[{student: features.8, teacher: layer3, weight: 1.0}, ...]``; each
            gets a learned 1×1 conv + BN adapter from student to teacher channels.
        attention_transfer: attention-transfer pairs in the same format (default weight 500).
        teacher_backbone, teacher_head, teacher_head_hidden: the teacher's architecture; by default the
            one recorded in ``teacher_checkpoint``.
        save_teacher: keep the teacher's weights in saved checkpoints too (they are dropped by default).
        num_classes, class_names, in_channels, image_size: linked from the data module by the CLI; the
            teacher must agree on classes and input channels.
        teacher_cache: keep the teacher's outputs (logits, attention maps) per training image and run the
            teacher only on images it has not seen (:class:`~dms_lightning.distill.cache.TeacherCache`). It
            pays when images repeat: ``DMSDataModule(augment_views=K)`` (each image has K fixed augmented
            views) or a data module that does not augment; about half of a CPU distillation step is the
            teacher. Not used with ``feature_hints`` (they compare whole feature maps); switched off with a
            warning when no image repeated in the first two epochs.
        optimizer, lr_scheduler, label_smoothing, bn_momentum, class_weights, bn_reestimation, channels_last,
        zero_init_residual:
            as for :class:`~dms_lightning.DMSClassifier` (``bn_momentum`` and ``zero_init_residual`` apply to a
            student built by name;
            ``class_weights`` weigh the hard-label term only; ``channels_last`` covers the teacher too).
        student_activation: ``"default"`` or ``"relu"`` for a student built by name (``activation`` of
            :class:`~dms_lightning.DMSClassifier`: hard-swish replaced by ReLU for integer CPU / NPU graphs).
        teacher: your own trained teacher network instead of ``teacher_checkpoint`` (any ``nn.Module`` mapping the
            student's input to ``N × num_classes`` logits, e.g. ``MyModule.load_from_checkpoint(path)`` of your own
            LightningModule, or a timm / torchvision model with its weights loaded). A copy is frozen, so the
            module you pass is left as it is. Like a ``student`` module it is not part of the hyper-parameters:
            pass it again to ``load_from_checkpoint``.
        mixing: ``"none"`` (default), ``"mixup"`` or ``"cutmix"``: function matching (Beyer et al. 2022). Each
            training batch is mixed with a shuffled copy of itself (:func:`~dms_lightning.distill.losses.mix_batch`)
            and teacher and student see the same mixed images, so the teacher labels inputs between the training
            images. For a few hundred images and a long schedule, best with ``alpha=1.0`` (the teacher's answers
            only): on 150 synthetic images, 600 epochs reach 84.9 % against the 150-epoch teacher's 88.8 % (3 seeds),
            where the plain recipe in 150 epochs reaches 77.4 %, no better than the student trained alone
            (``benchmarks/results/small_data.md``); in 15 epochs it does worse. The teacher runs on every batch
            (``teacher_cache`` must be off); the label term is mixup's, each label weighed by its share.

    Example:
        >>> module = DistillationModule("mobilenet_v3_small", teacher_checkpoint="artifacts/teacher/best.ckpt",
        ...                             temperature=4.0, alpha=0.7, image_size=96)  # doctest: +SKIP
        >>> trainer.fit(module, datamodule=DMSDataModule())  # doctest: +SKIP
    """

    def __init__(
        self,
        student: str | nn.Module = "mobilenet_v3_small",
        teacher_checkpoint: str = TEACHER_DEFAULT_CHECKPOINT,
        temperature: float = 4.0,
        alpha: float = 0.7,
        feature_hints: list[dict[str, Any] | list[Any]] | None = None,
        attention_transfer: list[dict[str, Any] | list[Any]] | None = None,
        teacher_backbone: str | None = None,
        teacher_head: Head | None = None,
        teacher_head_hidden: int | None = None,
        save_teacher: bool = False,
        num_classes: int = 5,
        in_channels: int = 1,
        class_names: list[str] | None = None,
        image_size: int = 96,
        student_head: Head = "dms",
        student_head_hidden: int = 128,
        dropout: float = 0.2,
        student_weights: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        bn_momentum: float | None = 0.1,
        class_weights: list[float] | None = None,
        teacher_cache: bool = False,
        bn_reestimation: bool = False,
        channels_last: bool = True,
        zero_init_residual: bool | None = None,
        student_activation: Activation = "default",
        mixing: str = "none",
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__(num_classes, class_names, in_channels, image_size, optimizer, lr_scheduler, label_smoothing,
                         class_weights, bn_reestimation, channels_last)
        if not isinstance(teacher_cache, bool):
            raise ValueError(f"model.teacher_cache={teacher_cache!r} must be true or false")
        # Not inf: logits / inf are all 0, and T² · KL is then inf · 0 = NaN.
        check_number("model.temperature", temperature, 0.0, math.inf, low_inclusive=False, high_inclusive=False,
                     hint="(typical: 2 to 8)")
        check_fraction("model.alpha", alpha, hint="(the weight of the distillation term)")
        if mixing not in MIXING_MODES:
            raise ValueError(f"model.mixing={mixing!r} must be one of {', '.join(map(repr, MIXING_MODES))}")
        if mixing != "none" and teacher_cache:
            raise ValueError(f"model.mixing={mixing!r} shows the teacher new (mixed) images at every step, which "
                             "model.teacher_cache cannot keep: set model.teacher_cache: false")
        if not isinstance(student, (str, nn.Module)):
            raise ValueError(f"model.student={student!r} must be a backbone name (e.g. 'mobilenet_v3_small') "
                             "or an nn.Module classifier")
        self.hint_pairs = parse_feature_pairs("model.feature_hints", feature_hints, default_weight=1.0)
        self.attention_pairs = parse_feature_pairs("model.attention_transfer", attention_transfer,
                                                   default_weight=DEFAULT_ATTENTION_WEIGHT)
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise ValueError(f"model.teacher={teacher!r} must be a trained nn.Module (your teacher network), or None to "
                             "read model.teacher_checkpoint")
        if teacher is not None and (teacher_checkpoint != TEACHER_DEFAULT_CHECKPOINT
                                    or any(v is not None for v in (teacher_backbone, teacher_head, teacher_head_hidden))):
            raise ValueError(f"model.teacher (a {type(teacher).__name__} network) and model.teacher_checkpoint="
                             f"{teacher_checkpoint!r} / model.teacher_backbone both name a teacher: give one of them")
        self.save_hyperparameters(ignore=["student", "teacher"] if isinstance(student, nn.Module) else ["teacher"])
        self._factories_as_config()
        if not isinstance(save_teacher, bool):
            raise ValueError(f"model.save_teacher={save_teacher!r} must be true or false")
        self.temperature, self.alpha, self.save_teacher = float(temperature), float(alpha), save_teacher
        self.mixing = mixing
        self._mixed: MixedBatch | None = None

        if isinstance(student, str):
            self.model = build_backbone(student, num_classes, in_channels, student_head, student_head_hidden,
                                        dropout, student_weights, bn_momentum, zero_init_residual,
                                        student_activation)
        else:
            self.model = student
        self._check_classifier(self.model, "model.student")

        if teacher is None:
            spec = load_teacher(teacher_checkpoint, teacher_backbone, teacher_head, teacher_head_hidden,
                                num_classes, in_channels)
            self._check_teacher_agrees(spec, teacher_checkpoint)
            self.teacher = FrozenTeacher(spec.network)
        else:
            # A copy: freezing must not change the caller's module (it may go on training, or be a student elsewhere).
            self.teacher = FrozenTeacher(copy.deepcopy(teacher))
        self._check_classifier(self.teacher.network, "model.teacher" if teacher is not None else "model.teacher_checkpoint")

        self.hint_adapters = nn.ModuleList(self._build_adapters())
        if teacher_cache and self.hint_pairs:
            warnings.warn("model.teacher_cache is not used with model.feature_hints: hints compare the teacher's "
                          "whole feature maps, which are too large to keep per image; the teacher runs every batch",
                          stacklevel=2)
        # One cache per set of attention pairs the student still produces (QAT may stop one): what is stored
        # per image depends on it.
        self._teacher_caches: dict[tuple[FeaturePair, ...], TeacherCache] | None = (
            {} if teacher_cache and not self.hint_pairs else None)
        self.teacher_acc = MulticlassAccuracy(num_classes, average="micro")
        self._teacher_acc_pending = {"val": True, "test": True}

    # ----------------------------------------------------------------------------------------- checks
    def _check_classifier(self, network: nn.Module, field: str) -> None:
        first_conv = next((m for m in network.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is not None and first_conv.in_channels != self.in_channels:
            raise ValueError(f"{field}: the network takes {first_conv.in_channels}-channel images but the data has "
                             f"in_channels={self.in_channels}; teacher and student must see the same input")
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad():
                logits = network(self.example_input_array.to(network_device(network)))
        except RuntimeError as err:
            dtypes = sorted({str(p.dtype) for p in network.parameters() if p.is_floating_point()} - {"torch.float32"})
            # Images arrive in float32 (Trainer(precision=...) sets mixed precision), so a half / double network
            # fails at its first layer with an error that names no field.
            hint = (f" (its parameters are {', '.join(dtypes)}: pass the network in float32, e.g. network.float(); "
                    "use Trainer(precision='bf16-mixed' / '16-mixed') for mixed precision)") if dtypes else ""
            raise ValueError(f"{field}: the network fails on a 1 × {self.in_channels} × {self.image_size} × "
                             f"{self.image_size} float32 input: {err}{hint}") from err
        finally:
            network.train(was_training)
        if not isinstance(logits, torch.Tensor) or logits.shape != (1, self.num_classes):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"{field}: the network outputs {shape} for one image but the data has "
                             f"num_classes={self.num_classes}; it must output (N, {self.num_classes}) logits")

    def _check_teacher_agrees(self, spec, teacher_checkpoint: str) -> None:
        where = f"model.teacher_checkpoint={teacher_checkpoint!r}"
        if spec.num_classes is not None and spec.num_classes != self.num_classes:
            raise ValueError(f"{where} was trained for {spec.num_classes} classes {spec.class_names} but the data "
                             f"has num_classes={self.num_classes} {self.class_names}: teacher and student must "
                             "predict the same classes in the same order")
        if spec.class_names is not None and self.hparams.get("class_names") is not None \
                and list(spec.class_names) != list(self.class_names):
            raise ValueError(f"{where} was trained for classes {spec.class_names} but the data has "
                             f"class_names={self.class_names}: teacher and student must predict the same classes "
                             "in the same order")
        if spec.in_channels is not None and spec.in_channels != self.in_channels:
            raise ValueError(f"{where} was trained on {spec.in_channels}-channel images but the data has "
                             f"in_channels={self.in_channels}: teacher and student must see the same input")

    def _build_adapters(self) -> list[HintAdapter]:
        pairs = self.hint_pairs + self.attention_pairs
        for pair in pairs:
            field = "model.feature_hints" if pair in self.hint_pairs else "model.attention_transfer"
            check_module_path(self.model, pair.student, f"{field} student")
            check_module_path(self.teacher.network, pair.teacher, f"{field} teacher")
        student_shapes = feature_shapes(self.model, [p.student for p in pairs], self.example_input_array,
                                        "feature pairs: the student module ")
        teacher_shapes = feature_shapes(self.teacher.network, [p.teacher for p in pairs], self.example_input_array,
                                        "feature pairs: the teacher module ")
        for pair in pairs:
            for role, path, shapes in (("student", pair.student, student_shapes),
                                       ("teacher", pair.teacher, teacher_shapes)):
                if len(shapes.get(path, ())) != 4:
                    raise ValueError(f"feature pair {pair}: the {role} module {path!r} outputs "
                                     f"{tuple(shapes[path]) if path in shapes else 'no tensor'}; hints and attention "
                                     "transfer need N × C × H × W feature maps (a conv block, not the classifier)")
        return [HintAdapter(student_shapes[p.student][1], teacher_shapes[p.teacher][1]) for p in self.hint_pairs]

    @property
    def fixed_width_layers(self) -> list[str]:
        """Student layers whose output channels must keep their count: the FitNets adapters read them.

        Channel pruning (:class:`~dms_lightning.callbacks.IterativePruning`) leaves these widths alone.
        Attention transfer sums over channels, so its layers may be pruned.
        """
        return [pair.student for pair in self.hint_pairs]

    @property
    def feature_layers(self) -> list[str]:
        """Student layers whose outputs the hint and attention-transfer terms read (kept observable under QAT)."""
        return list(dict.fromkeys(pair.student for pair in self.hint_pairs + self.attention_pairs))

    # ----------------------------------------------------------------------------------------- training
    @override
    def networks_in_memory_format(self) -> list[nn.Module]:
        return [self.model, self.teacher.network]

    @override
    def training_loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._mixed = mix_batch(images, self.mixing) if self.mixing != "none" else None
        if self._mixed is not None:
            images = self._mixed.images
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        pairs: list[FeaturePair] = self.hint_pairs + self.attention_pairs
        with capture_outputs(self.model, [p.student for p in pairs]) as student_features:
            logits = self(images)
        if self._teacher_caches is not None:
            teacher_logits, attention = self._cached_teacher(images, student_features)
            teacher_features: Mapping[str, torch.Tensor] = {}
        else:
            with capture_outputs(self.teacher.network, [p.teacher for p in pairs]) as teacher_features:
                teacher_logits = self.teacher(images)
            attention = None
        loss, ce, kd = distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha,
                                         self.label_smoothing, self.class_weights, self._mixed)
        self.log("train/loss_ce", ce)
        self.log("train/loss_kd", kd)
        hints = [(pair, adapter) for pair, adapter in zip(self.hint_pairs, self.hint_adapters)
                 if self._captured(pair, student_features, teacher_features)]
        if hints:
            hint = sum(pair.weight * adapter.loss(student_features[pair.student], teacher_features[pair.teacher])
                       for pair, adapter in hints)
            self.log("train/loss_hint", hint)
            loss = loss + hint
        if attention is None:
            attention_terms = [pair.weight * attention_transfer_loss(student_features[pair.student],
                                                                     teacher_features[pair.teacher])
                               for pair in self.attention_pairs
                               if self._captured(pair, student_features, teacher_features)]
        else:
            attention_terms = [pair.weight * attention_transfer_loss_to(student_features[pair.student], maps)
                               for pair, maps in attention.items()]
        if attention_terms:
            attention_loss = sum(attention_terms)
            self.log("train/loss_at", attention_loss)
            loss = loss + attention_loss
        return loss, logits

    @override
    def accuracy_targets(self, labels: torch.Tensor) -> torch.Tensor:
        # A mixed image counts as the image with the larger share.
        return labels if self._mixed is None else self._mixed.dominant_labels(labels)

    def _cached_teacher(self, images: torch.Tensor, student_features: Mapping[str, torch.Tensor]
                        ) -> tuple[torch.Tensor, dict[FeaturePair, torch.Tensor]]:
        """Teacher logits and attention maps for ``images``, the teacher run only on images not seen before."""
        teacher_paths = {p.teacher: images for p in self.attention_pairs}  # the teacher runs them all
        active = tuple(p for p in self.attention_pairs if self._captured(p, student_features, teacher_paths))
        cache = self._teacher_caches.setdefault(active, TeacherCache())

        def compute(subset: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with capture_outputs(self.teacher.network, [p.teacher for p in active]) as features:
                teacher_logits = self.teacher(subset)
            return (teacher_logits, *(teacher_attention_at(features[p.teacher],
                                                           tuple(student_features[p.student].shape[-2:]))
                                      for p in active))

        teacher_logits, *maps = cache.lookup(images, compute)
        return teacher_logits, dict(zip(active, maps))

    #: Epochs without one cached image served after which the cache is switched off (a data module that
    #: draws fresh augmentations; :class:`~dms_lightning.DMSDataModule` is recognised at once).
    CACHE_PATIENCE_EPOCHS = 4

    def _stop_teacher_cache(self, why: str) -> None:
        warnings.warn(f"model.teacher_cache: {why}, so keeping the teacher's outputs only costs memory; the cache is "
                      "switched off. Set data.augment_views (e.g. 4: each image gets 4 fixed augmented views) to "
                      "reuse them", stacklevel=2)
        self._teacher_caches = None

    #: Below this many training images, a run without ``mixing`` is told about function matching.
    SMALL_TRAINING_SET = 1000

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        images = _training_images(self.trainer)
        if self.mixing == "none" and images is not None and images < self.SMALL_TRAINING_SET:
            rank_zero_info(
                f"[DistillationModule] {images} training images: on so few, the teacher's answers on the training "
                "images themselves add little to their labels. Distilling on mixed images (model.mixing: mixup, "
                "model.teacher_cache: false) for a few hundred epochs lets the teacher teach between them "
                "(docs/distillation.md, 'A few hundred images')")
        hparams = getattr(getattr(self.trainer, "datamodule", None), "hparams", {})
        if (self._teacher_caches is not None and "augment_views" in hparams and hparams.get("augment")
                and not hparams.get("augment_views")):
            self._stop_teacher_cache("the data module draws fresh augmentations (data.augment_views is not set), "
                                     "so no training image comes back")

    @override
    def on_train_epoch_end(self) -> None:
        if not self._teacher_caches:
            return
        hits = sum(c.hits for c in self._teacher_caches.values())
        seen = hits + sum(c.misses for c in self._teacher_caches.values())
        self.log("train/teacher_cache_hit_rate", hits / max(1, seen))
        if hits == 0 and self.current_epoch + 1 >= self.CACHE_PATIENCE_EPOCHS:
            self._stop_teacher_cache(f"no training image came back in {self.current_epoch + 1} epochs")

    def _captured(self, pair: FeaturePair, student: Mapping[str, torch.Tensor],
                  teacher: Mapping[str, torch.Tensor]) -> bool:
        """Whether both ends of ``pair`` ran in this step.

        QuantizationAwareTraining rewrites the student into a flat torch.fx graph; it keeps the blocks listed in
        :attr:`feature_layers` observable, so hints and attention transfer go on under QAT. Should a rewrite
        still leave a block uncalled (another callback, a block the traced forward never runs), its output
        cannot be captured: the pair is skipped from then on (logit distillation goes on), with one warning.
        """
        if pair.student in student and pair.teacher in teacher:
            return True
        skipped = self.__dict__.setdefault("_skipped_pairs", set())
        if pair not in skipped:
            skipped.add(pair)
            warnings.warn(f"feature pair {pair.student} -> {pair.teacher}: the student module {pair.student!r} is no "
                          "longer called (the network was rewritten, e.g. by QuantizationAwareTraining); its hint / "
                          "attention-transfer term is skipped from here on and logit distillation continues",
                          stacklevel=2)
        return False

    @override
    def trainable_parameters(self) -> list[nn.Parameter]:
        teacher = {id(p) for p in self.teacher.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in teacher]

    @override
    def on_fit_start(self) -> None:
        # Lightning warns about modules in eval mode when training starts; the teacher's are so on purpose.
        # Only that exact count is silenced, so any other module left in eval mode is still reported.
        count = sum(1 for module in self.teacher.modules() if not module.training)
        warnings.filterwarnings("ignore", message=rf"Found {count} module\(s\) in eval mode",
                                category=PossibleUserWarning)

    # ----------------------------------------------------------------------------------------- teacher accuracy
    @override
    def setup(self, stage: str) -> None:
        # Once per fit / validate / test run: the teacher does not change, one number shows the gap.
        self._teacher_acc_pending = {"val": True, "test": True}

    def _update_teacher_acc(self, batch, stage: str) -> None:
        if self._teacher_acc_pending[stage] and not self.trainer.sanity_checking:
            images, labels = images_and_labels(batch, f"DistillationModule {stage}")
            self.teacher_acc.update(self.teacher(images), labels)

    def _log_teacher_acc(self, stage: str) -> None:
        if self._teacher_acc_pending[stage] and not self.trainer.sanity_checking and self.teacher_acc.update_called:
            self.log(f"{stage}/teacher_acc", self.teacher_acc.compute(), sync_dist=True)
            self.teacher_acc.reset()
            self._teacher_acc_pending[stage] = False

    @override
    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._update_teacher_acc(batch, "val")

    @override
    def test_step(self, batch, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._update_teacher_acc(batch, "test")

    @override
    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_teacher_acc("val")

    @override
    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_teacher_acc("test")

    # ----------------------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.save_teacher:
            # The teacher is re-read from teacher_checkpoint: a student checkpoint stays student-sized.
            for key in [k for k in state if k.startswith(prefix + "teacher.")]:
                del state[key]
        return state

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        if not any(key.startswith("teacher.") for key in state_dict):
            # A student-only checkpoint: keep the teacher just loaded from teacher_checkpoint.
            state_dict = {**state_dict, **{f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # The checkpoint holds the trained student: reloading must not need the original weights file.
        hparams = checkpoint.get("hyper_parameters", {})
        if "student_weights" in hparams:
            hparams["student_weights"] = None
