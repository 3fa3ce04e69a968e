"""INT8 quantization of an FP32 ONNX file with ONNX Runtime's ``quantize_static`` / ``quantize_dynamic``.

An ONNX-file-level alternative to the torch-side post-training quantization of
:class:`~dms_lightning.callbacks.PostTrainingQuantization` / :func:`dms_lightning.quant.post_training_quantize`
(which calibrate our fake-quant network, so the QDQ export and encodings are those of QAT). Use this one
for an ONNX model that did not come from PyTorch, for ONNX Runtime's dynamic quantization, or to compare
with ONNX Runtime's own calibrators (min-max, percentile, entropy); ``benchmarks/bench_quant.py`` runs both
on the same calibration images. Defaults follow the NPU conventions of the whole package: int8
per-channel symmetric weights, uint8 per-tensor affine activations, QDQ format.

Moved here from ``dms_lightning.quant.ptq`` (``quant`` does not import ``export``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from lightning.pytorch.utilities import rank_zero_warn

from dms_lightning.quant.calibration import check_calibration_batches
from dms_lightning.export.qdq import materialize_constant_identities
from dms_lightning.utils.io import atomic_path
from dms_lightning.utils.predictions import batch_images

CalibrationMethod = Literal["minmax", "percentile", "entropy"]
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
MODES = ("static", "dynamic")


class BatchCalibrationReader:
    """An ONNX Runtime ``CalibrationDataReader`` over the first ``calibration_batches`` image batches.

    Args:
        batches: an iterable of ``(images, ...)`` tuples (a DataLoader) or of image tensors / arrays.
        input_name: the ONNX model's input name.
        calibration_batches: how many batches to feed (``None``: all).
    """

    def __init__(self, batches: Iterable, input_name: str, calibration_batches: int | None = None) -> None:
        self.batches, self.input_name, self.calibration_batches = batches, input_name, calibration_batches
        self._iterator: Iterator | None = None
        self.seen = 0

    def _feeds(self) -> Iterator[dict[str, np.ndarray]]:
        for i, batch in enumerate(self.batches):
            if self.calibration_batches is not None and i >= self.calibration_batches:
                return
            images = batch_images(batch).detach().cpu().numpy()
            self.seen += 1
            yield {self.input_name: np.asarray(images, dtype=np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iterator is None:
            self._iterator = self._feeds()
        return next(self._iterator, None)

    def rewind(self) -> None:
        self._iterator = None


def _validate(mode: str, calibration_method: str, percentile: float, calibration_batches: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration_method={calibration_method!r} must be one of {list(CALIBRATION_METHODS)}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile={percentile!r} must be in (50, 100]")
    if calibration_batches is not None and (not isinstance(calibration_batches, int) or calibration_batches < 1):
        raise ValueError(f"calibration_batches={calibration_batches!r} must be a positive integer")


def excluded_nodes(model: onnx.ModelProto, exclude_nodes: Iterable[str] = (), quantize_depthwise: bool = True
                   ) -> list[str]:
    """Node names matching ``exclude_nodes`` (``fnmatch`` patterns), plus depthwise convs if not quantized."""
    patterns = list(exclude_nodes)
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if any(fnmatch.fnmatchcase(node.name, p) for p in patterns):
            names.append(node.name)
        elif not quantize_depthwise and node.op_type == "Conv":
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
            if group > 1 and weight is not None and weight[1] == 1:
                names.append(node.name)
    return names


def quantize_onnx(
    fp32_onnx: str | Path,
    output_path: str | Path,
    calibration_data: Iterable | None = None,
    *,
    mode: Literal["static", "dynamic"] = "static",
    calibration_method: CalibrationMethod = "minmax",
    calibration_batches: int | None = None,
    percentile: float = 99.999,
    per_channel: bool = True,
    symmetric_activations: bool = False,
    reduce_range: bool = False,
    quantize_depthwise: bool = True,
    exclude_op_types: Iterable[str] = (),
    exclude_nodes: Iterable[str] = (),
    include_nodes: Iterable[str] = (),
) -> Path:
    """Quantize an FP32 ONNX classifier to INT8 with ONNX Runtime, without a Trainer.

    Args:
        fp32_onnx: the float model (e.g. from :func:`dms_lightning.export.export_onnx`).
        output_path: where the INT8 model is written (atomically).
        calibration_data: batches for static calibration (a DataLoader of ``(images, labels)`` or arrays).
        mode: ``"static"`` (QDQ, calibrated activation ranges) or ``"dynamic"`` (int8 weights only).
        calibration_method: ``"minmax"``, ``"percentile"`` or ``"entropy"``.
        calibration_batches: number of batches to calibrate on (``None``: all of ``calibration_data``).
        percentile: the percentile of ``"percentile"`` calibration.
        per_channel: one weight scale per output channel.
        symmetric_activations: int8 activations with zero point 0 (default uint8 affine).
        reduce_range: 7-bit weights, against int16 saturation on x86 CPUs without VNNI.
        quantize_depthwise: quantize depthwise convs too.
        exclude_op_types: ONNX op types kept in float, e.g. ``["Gemm", "Mul"]``.
        exclude_nodes: ``fnmatch`` patterns of ONNX node names kept in float.
        include_nodes: if given, only nodes matching these ``fnmatch`` patterns are quantized.

    Example:
        >>> quantize_onnx("model.onnx", "model_int8.onnx", datamodule.val_dataloader(),  # doctest: +SKIP
        ...               calibration_method="percentile", calibration_batches=8)
    """
    _validate(mode, calibration_method, percentile, calibration_batches)
    fp32_onnx, output_path = Path(fp32_onnx), Path(output_path)
    if not fp32_onnx.is_file():
        raise FileNotFoundError(f"fp32_onnx={str(fp32_onnx)!r} does not exist")
    model = onnx.load(str(fp32_onnx))
    op_types = {node.op_type for node in model.graph.node}
    excluded_types = set(exclude_op_types)
    unknown = excluded_types - op_types
    if unknown:
        rank_zero_warn(f"exclude_op_types {sorted(unknown)} do not occur in {fp32_onnx.name} (ops: {sorted(op_types)})")
    nodes = excluded_nodes(model, exclude_nodes, quantize_depthwise)
    include = list(include_nodes)
    selected = [n.name for n in model.graph.node if any(fnmatch.fnmatchcase(n.name, p) for p in include)] or None
    if include and not selected:
        raise ValueError(f"include_nodes={include} match no node of {fp32_onnx.name}")
    quantizable = sorted(op_types - excluded_types)
    with atomic_path(output_path) as tmp:
        source = tmp.with_name(tmp.name + ".fp32.onnx")
        onnx.save(materialize_constant_identities(model), str(source))
        try:
            _quantize(source, tmp, mode, calibration_data, calibration_method, calibration_batches, percentile,
                      per_channel, symmetric_activations, reduce_range, quantizable, nodes, model.graph.input[0].name,
                      selected)
        finally:
            source.unlink(missing_ok=True)
    return output_path


def _quantize(source: Path, target: Path, mode: str, calibration_data, calibration_method: str,
              calibration_batches: int | None, percentile: float, per_channel: bool, symmetric_activations: bool,
              reduce_range: bool, quantizable: list[str], nodes: list[str], input_name: str,
              selected: list[str] | None) -> None:
    from onnxruntime.quantization import CalibrationMethod as OrtCalibration
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode == "dynamic":
        quantize_dynamic(source, target, op_types_to_quantize=quantizable, per_channel=per_channel,
                         reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=nodes,
                         nodes_to_quantize=selected)
        return
    if calibration_data is None:
        raise ValueError("calibration_data is required for mode='static' (batches of model inputs)")
    check_calibration_batches(calibration_data, calibration_batches)
    reader = BatchCalibrationReader(calibration_data, input_name, calibration_batches)
    method = {"minmax": OrtCalibration.MinMax, "percentile": OrtCalibration.Percentile,
              "entropy": OrtCalibration.Entropy}[calibration_method]
    quantize_static(source, target, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=quantizable,
                    per_channel=per_channel, reduce_range=reduce_range,
                    activation_type=QuantType.QInt8 if symmetric_activations else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=nodes, nodes_to_quantize=selected,
                    calibrate_method=method,
                    extra_options={"ActivationSymmetric": symmetric_activations, "WeightSymmetric": True,
                                   "CalibPercentile": percentile})
    if reader.seen == 0:
        raise ValueError("calibration_data yielded no batch")
