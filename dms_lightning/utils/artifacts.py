"""The variants a run produced (FP32 ONNX, pruned, PTQ INT8, QAT INT8 ...), for the report to measure.

Exporting callbacks call :func:`register_variant`; :class:`~dms_lightning.callbacks.CompressionReport`
reads :func:`variants`. The registry lives on the Trainer object, so two runs in one process never mix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

_ATTR = "_dms_lightning_variants"


@dataclass
class Variant:
    """One deployable model of a run.

    Attributes:
        name: unique short label shown in tables, e.g. ``"student_fp32"``, ``"student_qat_int8"``.
        onnx_path: the ONNX file measured by the report.
        precision: ``"fp32"``, ``"int8"`` (QDQ static), ``"int8_dynamic"`` ...
        producer: the callback that wrote it (``"ONNXExport"``, ``"PostTrainingQuantization"`` ...).
        info: anything else worth showing (parity figures, sparsity, calibration method).
    """

    name: str
    onnx_path: str
    precision: str = "fp32"
    producer: str = ""
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def register_variant(trainer, name: str, onnx_path: str | Path, precision: str = "fp32", producer: str = "",
                     **info) -> Variant:
    """Record a produced model on ``trainer`` (a later registration of the same name replaces it)."""
    registry: dict[str, Variant] = trainer.__dict__.setdefault(_ATTR, {})
    variant = Variant(name, str(onnx_path), precision, producer, info)
    registry[name] = variant
    return variant


def variants(trainer) -> list[Variant]:
    """Variants registered on ``trainer`` in registration order."""
    return list(trainer.__dict__.get(_ATTR, {}).values())
