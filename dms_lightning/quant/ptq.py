"""Post-training quantization with ONNX Runtime: a function for any FP32 ONNX model, and a callback.

Calibration uses ONNX Runtime's own calibrators (min-max, percentile, entropy) on batches of real data;
static quantization writes the QDQ format ONNX Runtime fuses into ``QLinearConv`` / ``QLinearAdd`` /
``QGemm``; dynamic quantization (int8 weights, activations quantized at run time) suits MatMul-heavy
heads. Defaults follow the NPU conventions of the whole package: int8 per-channel symmetric weights,
uint8 per-tensor affine activations.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from dms_lightning.export import export_onnx
from dms_lightning.quant.onnx_qdq import materialize_constant_identities
from dms_lightning.utils.checkpoint import compression_target
from dms_lightning.utils.io import atomic_path, ensure_writable_dir

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
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(images, torch.Tensor):
                images = images.detach().cpu().numpy()
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


def check_calibration_batches(batches: Iterable, calibration_batches: int | None, field: str = "calibration_batches"
                              ) -> None:
    """Raise when the data has fewer batches than asked for (a silent short calibration skews ranges)."""
    available = len(batches) if hasattr(batches, "__len__") else None
    if calibration_batches is not None and available is not None and calibration_batches > available:
        raise ValueError(f"{field}={calibration_batches} but the calibration data has only {available} batches; "
                         f"use {field} <= {available} or more calibration data")


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


class PostTrainingQuantization(Callback):
    """Quantize the trained network to INT8 with ONNX Runtime at the end of ``fit``, calibrated on real batches.

    Writes ``<dirpath>/<filename>_fp32.onnx`` (the float source), ``<filename>.onnx`` (INT8) and, for static
    quantization, ``<filename>.encodings.json``; measures FP32 and INT8 accuracy in ONNX Runtime on the
    test split; registers the INT8 variant for the report. Runs on rank 0.

    Args:
        calibration_batches: batches of ``calibration_split`` used for calibration.
        calibration_split: ``"train"`` (without augmentation) or ``"val"``.
        calibration_method: ``"minmax"``, ``"percentile"`` or ``"entropy"``.
        percentile: the percentile of ``"percentile"`` calibration.
        mode: ``"static"`` (QDQ INT8) or ``"dynamic"`` (int8 weights, run-time activation ranges).
        per_channel: per-output-channel weight scales.
        symmetric_activations: int8 activations with zero point 0 instead of uint8 affine.
        reduce_range: 7-bit weights (x86 CPUs without VNNI can saturate int16 sums with full 8 bits).
        quantize_depthwise: also quantize depthwise convs.
        exclude_op_types: ONNX op types kept in float.
        exclude_nodes: ``fnmatch`` patterns of ONNX node names kept in float.
        include_nodes: if given, only ONNX nodes matching these ``fnmatch`` patterns are quantized.
        dirpath: output folder (default ``<trainer.log_dir>/quantization``).
        filename: file stem of the INT8 model.
        evaluate_batches: test batches for the accuracy report (``None``: all; 0: skip).

    Example:
        >>> from dms_lightning.callbacks import PostTrainingQuantization
        >>> ptq = PostTrainingQuantization(calibration_batches=8, calibration_method="percentile")
        >>> trainer = Trainer(callbacks=[ptq])  # doctest: +SKIP
    """

    def __init__(
        self,
        calibration_batches: int = 16,
        calibration_split: Literal["train", "val"] = "val",
        calibration_method: CalibrationMethod = "minmax",
        percentile: float = 99.999,
        mode: Literal["static", "dynamic"] = "static",
        per_channel: bool = True,
        symmetric_activations: bool = False,
        reduce_range: bool = False,
        quantize_depthwise: bool = True,
        exclude_op_types: list[str] | None = None,
        exclude_nodes: list[str] | None = None,
        include_nodes: list[str] | None = None,
        dirpath: str | None = None,
        filename: str = "ptq_int8",
        evaluate_batches: int | None = None,
    ) -> None:
        super().__init__()
        _validate(mode, calibration_method, percentile, calibration_batches)
        if calibration_split not in ("train", "val"):
            raise ValueError(f"calibration_split={calibration_split!r} must be 'train' or 'val'")
        if not filename or "/" in filename:
            raise ValueError(f"filename={filename!r} must be a non-empty file stem without '/'")
        if evaluate_batches is not None and (not isinstance(evaluate_batches, int) or evaluate_batches < 0):
            raise ValueError(f"evaluate_batches={evaluate_batches!r} must be an integer >= 0 or None (all)")
        self.calibration_batches, self.calibration_split = calibration_batches, calibration_split
        self.options = dict(mode=mode, calibration_method=calibration_method, percentile=percentile,
                            per_channel=per_channel, symmetric_activations=symmetric_activations,
                            reduce_range=reduce_range, quantize_depthwise=quantize_depthwise,
                            exclude_op_types=list(exclude_op_types or []), exclude_nodes=list(exclude_nodes or []),
                            include_nodes=list(include_nodes or []))
        self.dirpath, self.filename, self.evaluate_batches = dirpath, filename, evaluate_batches
        self.result: dict[str, Any] = {}

    def _calibration_loader(self, trainer: Trainer):
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            raise MisconfigurationException("PostTrainingQuantization needs a datamodule to draw calibration batches "
                                            "from; call trainer.fit(model, datamodule=...) or use quantize_onnx()")
        if self.calibration_split == "train" and hasattr(datamodule, "_loader"):
            return datamodule._loader("train")  # the training images without augmentation or shuffling
        return datamodule.train_dataloader() if self.calibration_split == "train" else datamodule.val_dataloader()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Fail before training, not after it: a calibration request the data cannot satisfy is a config error.
        if self.options["mode"] == "static":
            try:
                check_calibration_batches(self._calibration_loader(trainer), self.calibration_batches)
            except ValueError as err:
                raise MisconfigurationException(f"PostTrainingQuantization: {err} ({self.calibration_split} split)") \
                    from err

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from dms_lightning.quant.prepare import float_model, is_quantized

        network = compression_target(pl_module)
        if is_quantized(network):
            rank_zero_warn("PostTrainingQuantization: the network is fake-quantized (QAT); calibrating its float twin")
            network = float_model(network) or network
        example = getattr(trainer.datamodule, "example_input", None)
        example = example(1) if example else pl_module.example_input_array[:1]
        self.result = quantize_network(trainer, network, example, self._calibration_loader(trainer),
                                       self.calibration_batches, self.dirpath, self.filename, self.evaluate_batches,
                                       **self.options)


def quantize_network(trainer: Trainer, network: torch.nn.Module, example: torch.Tensor, calibration_loader,
                     calibration_batches: int, dirpath: str | None, filename: str, evaluate_batches: int | None,
                     **options) -> dict[str, Any]:
    """Export ``network`` to FP32 ONNX, quantize it, write encodings, measure accuracy, register the variant."""
    from dms_lightning.quant.encodings import write_encodings_for_onnx
    from dms_lightning.quant.evaluate import accuracy, ort_predictions, ort_session, top1_agreement
    from dms_lightning.quant.export import log_scalars, model_metadata, split_loader
    from dms_lightning.utils.artifacts import register_variant

    out = ensure_writable_dir(Path(dirpath) if dirpath else Path(trainer.log_dir or trainer.default_root_dir)
                              / "quantization", "dirpath")
    fp32 = export_onnx(network, example.cpu(), out / f"{filename}_fp32.onnx", metadata=model_metadata(trainer))
    int8 = quantize_onnx(fp32, out / f"{filename}.onnx", calibration_loader, calibration_batches=calibration_batches,
                         **options)
    result: dict[str, Any] = {"fp32_onnx": str(fp32), "onnx_path": str(int8), **options,
                              "calibration_batches": calibration_batches}
    if options["mode"] == "static":
        result["encodings_path"] = str(write_encodings_for_onnx(int8, out / f"{filename}.encodings.json"))
    loader = split_loader(trainer, "test")
    if loader is not None and evaluate_batches != 0:
        fp32_logits, labels = ort_predictions(ort_session(fp32), loader, evaluate_batches)
        int8_logits, _ = ort_predictions(ort_session(int8), loader, evaluate_batches)
        result.update({"fp32_accuracy": accuracy(fp32_logits, labels), "onnx_accuracy": accuracy(int8_logits, labels),
                       "agreement_with_fp32": top1_agreement(fp32_logits, int8_logits)})
        log_scalars(trainer, filename, {k: result[k] for k in ("fp32_accuracy", "onnx_accuracy", "agreement_with_fp32")})
        rank_zero_info(f"[PostTrainingQuantization] {int8.name}: test accuracy FP32 {result['fp32_accuracy']:.4f} -> "
                       f"INT8 {result['onnx_accuracy']:.4f} (ONNX Runtime)")
    precision = "int8" if options["mode"] == "static" else "int8_dynamic"
    register_variant(trainer, filename, int8, precision=precision, producer="PostTrainingQuantization",
                     **{k: v for k, v in result.items() if k != "onnx_path"})
    return result
