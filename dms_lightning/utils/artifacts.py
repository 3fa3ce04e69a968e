"""What a run hands from stage to stage: quantized networks going down to export, variants going to the report.

Two explicit roles, declared by callbacks with class attributes (read from ``type(callback)``, checked in
``setup`` by the callbacks that depend on them):

* ``hands_down_int8 = True``: a quantization callback (``dms_lightning.quant``) that writes no file itself.
  At the end of ``fit`` it lists the fake-quantized torch networks to deploy in its ``int8_networks``
  attribute (:class:`QuantizedNetwork`); a callback with ``writes_int8_networks = True``
  (:class:`~dms_lightning.callbacks.ONNXExport`), placed after it, exports each one through the one INT8
  routine (QDQ ONNX + encodings, parity-checked with the network's :class:`ParityRule`).
* ``produces_variants = True``: a callback that writes deployable files and lists them in its ``variants``
  attribute (:class:`Variant`). :func:`variants` reads every producer's list in callback order, which is
  what :class:`~dms_lightning.callbacks.CompressionReport` (placed after all producers) measures.

Both lists live on the callback objects of one Trainer, so two runs in one process never mix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

PARITY_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ParityRule:
    """How an exported INT8 model is judged against its fake-quant PyTorch network (one rule, set per callback).

    The QDQ graph's own semantics (ONNX Runtime with Q/DQ computed exactly) must agree with PyTorch on
    ``min_top1_agreement`` of the images and, when ``atol`` is set, stay within it; otherwise the export
    raises ``ParityError`` and nothing is written. ONNX Runtime's fused CPU integer kernels are reported beside.

    Attributes:
        split: dataloader split of the images (``"train"``, ``"val"``, ``"test"``).
        batches: batches of that split (``None``: all).
        min_top1_agreement: required top-1 agreement, in [0, 1].
        atol: tolerance on the max absolute logit difference (``None``: reported, not judged).
        owner: prefix of the field names in error messages, e.g. ``"ONNXExport"``.
    """

    split: str = "val"
    batches: int | None = 1
    min_top1_agreement: float = 0.95
    atol: float | None = None
    owner: str = "parity"

    def __post_init__(self) -> None:
        if self.split not in PARITY_SPLITS:
            raise ValueError(f"{self.owner}: parity split={self.split!r} must be one of {PARITY_SPLITS}")
        if self.batches is not None and (not isinstance(self.batches, int) or isinstance(self.batches, bool)
                                         or self.batches < 1):
            raise ValueError(f"{self.owner}: parity batches={self.batches!r} must be a positive integer or None (all)")
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ValueError(f"{self.owner}: min_top1_agreement={self.min_top1_agreement!r} must be in [0, 1]")
        if self.atol is not None and not self.atol > 0:
            raise ValueError(f"{self.owner}: atol={self.atol!r} must be positive or None")


@dataclass
class QuantizedNetwork:
    """A fake-quantized torch network a quantization callback hands down to export, to be written as INT8.

    Attributes:
        name: variant name and file stem (``<dirpath>/<name>.onnx`` and ``<name>.encodings.json``).
        network: the fake-quantized network (exported as it is at the end of ``fit``).
        producer: the callback class that quantized it, shown in the report.
        dirpath: output folder; ``None``: ``<log_dir>/quantization``.
        parity: how the export is judged.
        opset: ONNX opset of the export.
        info: anything else for the report and manifest (quantization config ...).
    """

    name: str
    network: nn.Module
    producer: str
    dirpath: str | None = None
    parity: ParityRule = field(default_factory=ParityRule)
    opset: int = 18
    info: dict = field(default_factory=dict)


@dataclass
class Variant:
    """One deployable model of a run.

    Attributes:
        name: unique short label shown in tables, e.g. ``"student_fp32"``, ``"student_qat_int8"``.
        onnx_path: the ONNX file measured by the report.
        precision: ``"fp32"``, ``"int8"`` (QDQ static), ``"int8_dynamic"`` ...
        producer: the callback that made it (``"ONNXExport"``, ``"QuantizationAwareTraining"`` ...).
        info: anything else worth showing (parity figures, sparsity, calibration method).
    """

    name: str
    onnx_path: str
    precision: str = "fp32"
    producer: str = ""
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def has_role(callback, role: str) -> bool:
    """Whether ``callback``'s class declares ``role`` (``"produces_variants"``, ``"hands_down_int8"``, ...)."""
    return bool(getattr(type(callback), role, False))


def callbacks_after(trainer, callback, role: str) -> list[str]:
    """Class names of the callbacks with ``role`` placed after ``callback`` in ``trainer.callbacks``."""
    position = next(i for i, cb in enumerate(trainer.callbacks) if cb is callback)
    return [type(cb).__name__ for cb in trainer.callbacks[position + 1:] if has_role(cb, role)]


def warn_without_int8_writer(trainer, callback) -> None:
    """Warn when ``callback`` hands INT8 networks down but no callback after it writes them."""
    if callbacks_after(trainer, callback, "writes_int8_networks"):
        return
    from lightning.pytorch.utilities import rank_zero_warn

    name = type(callback).__name__
    rank_zero_warn(f"{name}(export=True): no callback after it writes INT8 networks, so no INT8 model will be written "
                   f"at the end of fit; add dms_lightning.callbacks.ONNXExport after it (or set export=False)")


def variants(trainer) -> list[Variant]:
    """Every variant the producers of ``trainer`` list, in callback order (a later name replaces an earlier)."""
    found: dict[str, Variant] = {}
    for callback in trainer.callbacks:
        if has_role(callback, "produces_variants"):
            for variant in getattr(callback, "variants", None) or ():
                found[variant.name] = variant
    return list(found.values())


def quantized_networks(trainer) -> list[QuantizedNetwork]:
    """The networks every ``hands_down_int8`` callback of ``trainer`` lists, in callback order."""
    return [network for callback in trainer.callbacks if has_role(callback, "hands_down_int8")
            for network in getattr(callback, "int8_networks", None) or ()]

