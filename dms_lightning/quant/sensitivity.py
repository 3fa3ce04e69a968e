"""Which quantizers cost accuracy: per-quantizer sensitivity of a fake-quantized network.

When an INT8 model loses accuracy, the first question is *where*. :func:`quantization_sensitivity` answers it
on a calibrated (or QAT-trained) fake-quant network by switching quantizers on and off
(:attr:`~dms_lightning.quant.fake_quant.FakeQuantizer.bypass`), the same analysis as AIMET's
``QuantAnalyzer`` per-layer "enable / disable" passes, here on our own simulation and inside a fit:

* ``only``: accuracy with only this quantizer active (everything else float): what this tensor alone costs;
* ``all_but``: accuracy with every quantizer active except this one: what keeping it in float would recover;
* ``sqnr_db``: signal-to-quantization-noise ratio of the logits with only this quantizer active against the
  float logits (``10 log10(Σ f² / Σ (f − q)²)``): a finer signal than accuracy on a small split.

A weight quantizer is named by its layer (``features.4.block.1.0``, kind ``weight``), an activation quantizer
by the graph point it follows (``features_4_block_1_0``, kind ``activation``). Two forward passes over the
data per quantizer: on a MobileNetV3-small (143 quantizers) and 256 images at 96 px, about two minutes on
two CPU cores. :class:`~dms_lightning.callbacks.QuantizationSensitivity` runs it at the end of a fit and
writes the table and chart.

Example:
    >>> import torchvision
    >>> from dms_lightning.quant import post_training_quantize
    >>> net = torchvision.models.resnet18(num_classes=5).eval()
    >>> images = torch.randn(8, 3, 32, 32)
    >>> int8 = post_training_quantize(net, [images])
    >>> report = quantization_sensitivity(int8, [(images, torch.zeros(8, dtype=torch.long))])
    >>> report.rows[0].kind in ("weight", "activation")
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.utils.predictions import batch_images, require_labels

WEIGHT_SUFFIX = ".weight_quantizer"


@dataclass(frozen=True)
class QuantizerSensitivity:
    """One quantizer's row: accuracies in ``[0, 1]``, SQNR in dB (``inf`` when the logits are unchanged)."""

    name: str
    kind: str
    only: float
    all_but: float
    sqnr_db: float


@dataclass
class SensitivityReport:
    """The float and fully quantized accuracies and one row per quantizer, most harmful first."""

    float_accuracy: float
    quantized_accuracy: float
    rows: list[QuantizerSensitivity] = field(default_factory=list)
    images: int = 0

    def worst(self, count: int = 10) -> list[QuantizerSensitivity]:
        """The ``count`` quantizers whose own quantization costs the most (lowest ``only``, then SQNR)."""
        return self.rows[:count]

    def to_dict(self) -> dict:
        return {"float_accuracy": self.float_accuracy, "quantized_accuracy": self.quantized_accuracy,
                "images": self.images, "rows": [asdict(row) for row in self.rows]}

    @classmethod
    def from_dict(cls, data: dict) -> SensitivityReport:
        return cls(data["float_accuracy"], data["quantized_accuracy"],
                   [QuantizerSensitivity(**row) for row in data["rows"]], data.get("images", 0))

    def to_markdown(self, count: int | None = 15) -> str:
        """A table of the worst ``count`` quantizers (``None``: all), accuracies in %."""
        lines = [f"Float {100 * self.float_accuracy:.2f} %, every quantizer on {100 * self.quantized_accuracy:.2f} % "
                 f"({self.images} images). Only: that quantizer alone on; all but: every other one on.\n",
                 "| quantizer | kind | only (%) | Δ only (pt) | all but (%) | Δ recovered (pt) | SQNR (dB) |",
                 "|---|---|---|---|---|---|---|"]
        for row in self.rows if count is None else self.rows[:count]:
            lines.append(f"| `{row.name}` | {row.kind} | {100 * row.only:.2f} | "
                         f"{100 * (row.only - self.float_accuracy):+.2f} | {100 * row.all_but:.2f} | "
                         f"{100 * (row.all_but - self.quantized_accuracy):+.2f} | {row.sqnr_db:.1f} |")
        return "\n".join(lines) + "\n"


def named_quantizers(model: nn.Module) -> dict[str, tuple[str, FakeQuantizer]]:
    """``{display name: (kind, quantizer)}`` for every fake quantizer of ``model`` (shared ones once)."""
    found: dict[str, tuple[str, FakeQuantizer]] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, FakeQuantizer) or id(module) in seen:
            continue
        seen.add(id(module))
        if module.is_weight:
            found[name.removesuffix(WEIGHT_SUFFIX)] = ("weight", module)
        else:
            found[name.rsplit(".", 1)[-1]] = ("activation", module)
    return found


@contextmanager
def _bypassed(quantizers: Iterable[FakeQuantizer], active: set[int] | None):
    """Every quantizer passes its input through, except those whose ``id`` is in ``active`` (``None``: all on)."""
    quantizers = list(quantizers)
    saved = [q.bypass for q in quantizers]
    try:
        for q in quantizers:
            q.bypass = active is not None and id(q) not in active
        yield
    finally:
        for q, before in zip(quantizers, saved):
            q.bypass = before


def _split(batch) -> tuple[torch.Tensor, torch.Tensor]:
    return batch_images(batch), require_labels(batch, "quantization_sensitivity()")


def labelled_batches(data: Iterable, batches: int | None, owner: str, images: int | None = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``batches`` ``(images, labels)`` of ``data``, at most ``images`` images (``None``: all), kept."""
    kept, count = [], 0
    for index, batch in enumerate(data):
        if (batches is not None and index >= batches) or (images is not None and count >= images):
            break
        inputs, labels = _split(batch)
        labels = torch.as_tensor(labels).reshape(-1).cpu()
        if images is not None and count + len(labels) > images:
            inputs, labels = inputs[:images - count], labels[:images - count]
        kept.append((inputs, labels))
        count += len(labels)
    if not kept:
        raise ValueError(f"{owner} got no batch")
    return kept


@torch.no_grad()
def _logits(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], device) -> torch.Tensor:
    return torch.cat([model(images.to(device)).float().cpu() for images, _ in batches])


def _sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    noise = float(((reference - candidate) ** 2).sum())
    signal = float((reference ** 2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-30) / noise)


def quantization_sensitivity(model: nn.Module, data: Iterable, *, batches: int | None = None,
                             kinds: Sequence[str] = ("weight", "activation"), images: int | None = None
                             ) -> SensitivityReport:
    """Per-quantizer sensitivity of the fake-quantized ``model`` on labelled ``data``.

    Args:
        model: a calibrated or QAT-trained fake-quant network (ranges should be frozen: the analysis runs in
            eval mode and never changes them), or a LightningModule holding one.
        data: a DataLoader (or any iterable) of ``(images, labels, ...)`` batches, e.g. the validation split.
        batches: use only the first ``batches`` batches (``None``: all).
        images: use at most this many images (``None``: all of those batches). The cost is two forward passes
            of them per quantizer; the SQNR column stays informative on a few dozen images.
        kinds: which quantizers to analyse: ``"weight"``, ``"activation"`` or both.

    Returns:
        A :class:`SensitivityReport`, rows sorted by ``only`` accuracy then SQNR (most harmful first). The
        model's quantizers, train / eval mode and parameters are as before.
    """
    unknown = set(kinds) - {"weight", "activation"}
    if unknown or not kinds:
        raise ValueError(f"kinds={list(kinds)!r}: choose from 'weight' and 'activation'")
    quantizers = named_quantizers(model)
    if not quantizers:
        raise ValueError(f"{type(model).__name__} has no fake quantizer: prepare and calibrate it first "
                         "(dms_lightning.quant.post_training_quantize, or QuantizationAwareTraining)")
    kept = labelled_batches(data, batches, "quantization_sensitivity()", images)
    labels = torch.cat([label for _, label in kept])
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    everything = [q for _, q in quantizers.values()]

    def accuracy(logits: torch.Tensor) -> float:
        return float((logits.argmax(dim=1) == labels).float().mean())

    was_training = model.training
    model.eval()
    try:
        with _bypassed(everything, set()):
            reference = _logits(model, kept, device)
        with _bypassed(everything, None):
            quantized = _logits(model, kept, device)
        rows = []
        all_ids = {id(q) for q in everything}
        for name, (kind, quantizer) in quantizers.items():
            if kind not in kinds:
                continue
            with _bypassed(everything, {id(quantizer)}):
                only = _logits(model, kept, device)
            with _bypassed(everything, all_ids - {id(quantizer)}):
                all_but = _logits(model, kept, device)
            rows.append(QuantizerSensitivity(name, kind, accuracy(only), accuracy(all_but), _sqnr_db(reference, only)))
    finally:
        model.train(was_training)
    rows.sort(key=lambda row: (row.only, row.sqnr_db))
    return SensitivityReport(accuracy(reference), accuracy(quantized), rows, images=len(labels))
