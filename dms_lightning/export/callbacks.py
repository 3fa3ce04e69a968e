"""ONNXExport: at the end of ``fit``, the run's network as parity-checked ONNX files and a manifest."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from typing_extensions import override

from dms_lightning.export.fit_end import FitEndExporter
from dms_lightning.export.coverage import coverage_before_conversion
from dms_lightning.export.encodings import DEFAULT_ENCODINGS_VERSION, check_encodings_version
from dms_lightning.export.fp16 import DEFAULT_FP16_ATOL, IO_DTYPES, check_fp16_parity, export_fp16_onnx
from dms_lightning.export.int8 import NotQuantizedError, export_int8
from dms_lightning.export.manifest import export_run, onnx_record, update_manifest
from dms_lightning.export.metadata import onnx_metadata
from dms_lightning.export.onnx_export import DEFAULT_OPSET, export_onnx
from dms_lightning.export.parity import ParityError, ParityResult, check_parity, compare_outputs, parity_figure
from dms_lightning.export.qdq import fake_quant_disabled, has_qdq
from dms_lightning.export.runtimes import openvino_available, openvino_outputs
from dms_lightning.export.source import (
    CHECKPOINT_CHOICES,
    detached_copy,
    export_source,
    model_preprocessing,
    parity_images,
    uses_fake_quant,
    warn_if_best_is_float,
)
from dms_lightning.utils.artifacts import (
    ParityRule,
    QuantizedNetwork,
    Variant,
    callbacks_after,
    has_role,
    quantized_networks,
    variants,
)
from dms_lightning.utils.io import atomic_path, ensure_writable_dir
from dms_lightning.utils.tensorboard import log_figure, log_text

log = logging.getLogger(__name__)


def default_export_dir(trainer: Trainer) -> Path:
    """``<log_dir>/export`` (the logger's version directory), else ``<default_root_dir>/export``."""
    return Path(trainer.log_dir or trainer.default_root_dir) / "export"


def log_parity(trainer: Trainer, variant: str, result: ParityResult) -> None:
    """Parity figures as scalars in every logger (``export/<variant>/...``)."""
    metrics = {f"export/{variant}/max_abs_diff": result.max_abs_diff,
               f"export/{variant}/top1_agreement": result.top1_agreement}
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


class ONNXExport(FitEndExporter):
    """Export the trained network to ONNX when ``fit`` ends, check it in ONNX Runtime, and write a manifest.

    On rank zero, after ``fit``: the compression target (``pl_module.compression_target``, e.g. the
    distilled student, pruned channels removed) with the weights of the best checkpoint of the monitored
    metric (or the last weights) is exported as

    * ``<name>_fp32.onnx``: FP32, dynamic batch axis, input ``input`` (N×C×H×W), output ``logits``;
    * ``<name>_int8.onnx`` and ``<name>_int8.encodings.json``: the INT8 QDQ graph and its AIMET encodings, when
      the network carries fake-quant modules (QAT). Its FP32 sibling is then the same network with fake
      quantization bypassed;
    * ``<name>_fp16.onnx`` (``export_fp16=True``): weights and activations in float16, float32 input and
      output unless ``fp16_io_dtype="float16"`` (:func:`~dms_lightning.export.fp16.export_fp16_onnx`).

    It also writes the fake-quantized networks that quantization callbacks placed before it hand down
    (``QuantizationAwareTraining(export=True)`` → ``<log_dir>/quantization/<filename>.onnx`` + encodings), each
    judged by that callback's parity rule. Every INT8 file goes through
    :func:`~dms_lightning.export.int8.export_int8`.

    Each file carries the class names and preprocessing in its ``metadata_props``
    (:mod:`dms_lightning.export.metadata`), passes ``onnx.checker``, and is compared with PyTorch on real
    validation images: max |logit difference| and top-1 agreement are logged, drawn (``<variant>_parity.png``
    and TensorBoard) and written to ``manifest.json`` with sha256, size, opset and input shape. A model over
    tolerance raises :class:`~dms_lightning.export.parity.ParityError` with the figures, and is not left
    in the directory. When OpenVINO is installed the files are also run there and compared with ONNX
    Runtime (``openvino=None``: when installed; ``True``: required). Each file's operators are checked
    against the published operator lists of QNN HTP, TFLite and TensorRT
    (:mod:`~dms_lightning.export.coverage`): what a target lacks is warned about and listed under
    ``coverage`` in the manifest. The files are listed in ``variants`` for
    :class:`~dms_lightning.callbacks.CompressionReport`.

    Args:
        dirpath: output directory; default ``<log_dir>/export``.
        name: file and variant prefix (``model`` → ``model_fp32.onnx``, variant ``model_fp32``).
        checkpoint: ``"best"`` (the ModelCheckpoint's best) or ``"last"`` (the final weights).
        opset: ONNX opset (>= 13).
        dynamic_batch: export the batch axis as dynamic.
        exporter: ``"torchscript"`` or ``"dynamo"``.
        simplify: run onnxslim / onnxsim when installed.
        parity_batches: validation batches used for the parity check.
        atol: FP32 tolerance on the max absolute logit difference.
        min_top1_agreement: FP32 minimum top-1 agreement.
        int8_atol: INT8 tolerance on the max absolute difference (``None``: reported, not judged).
        int8_min_top1_agreement: INT8 minimum top-1 agreement with the fake-quant PyTorch model.
        export_fp32 / export_int8 / export_fp16: which precisions of the network to write (FP16 is off by
            default; all ``False``: only the networks quantization callbacks hand down).
        fp16_io_dtype: ``"float32"`` (casts inside the FP16 graph) or ``"float16"`` input and output.
        fp16_atol: FP16 tolerance on the max absolute logit difference vs the float32 PyTorch model.
        encodings_version: AIMET encodings format of the ``*.encodings.json`` files, ``"1.0.0"`` (default,
            current AIMET / QNN) or ``"0.6.1"`` (legacy SDKs); see :mod:`~dms_lightning.export.encodings`.
        openvino: ``None`` (check when installed), ``True`` (must be installed), ``False`` (skip).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(max_epochs=1, callbacks=[ONNXExport(checkpoint="last", opset=18)])  # doctest: +SKIP
    """

    produces_variants: ClassVar[bool] = True
    writes_int8_networks: ClassVar[bool] = True

    def __init__(
        self,
        dirpath: str | None = None,
        name: str = "model",
        checkpoint: str = "best",
        opset: int = DEFAULT_OPSET,
        dynamic_batch: bool = True,
        exporter: str = "torchscript",
        simplify: bool = True,
        parity_batches: int = 1,
        atol: float = 1e-3,
        min_top1_agreement: float = 0.99,
        int8_atol: float | None = None,
        int8_min_top1_agreement: float = 0.95,
        export_fp32: bool = True,
        export_int8: bool = True,
        openvino: bool | None = None,
        export_fp16: bool = False,
        fp16_io_dtype: str = "float32",
        fp16_atol: float | None = DEFAULT_FP16_ATOL,
        encodings_version: str = DEFAULT_ENCODINGS_VERSION,
    ) -> None:
        super().__init__()
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise ValueError(f"ONNXExport.name={name!r} must be a plain file-name prefix such as 'student'")
        if checkpoint not in CHECKPOINT_CHOICES:
            raise ValueError(f"ONNXExport.checkpoint={checkpoint!r} must be one of {CHECKPOINT_CHOICES}")
        if not isinstance(opset, int) or opset < 13:
            raise ValueError(f"ONNXExport.opset={opset!r} must be an integer >= 13 (default {DEFAULT_OPSET})")
        if exporter not in ("torchscript", "dynamo"):
            raise ValueError(f"ONNXExport.exporter={exporter!r} must be 'torchscript' or 'dynamo'")
        if not isinstance(parity_batches, int) or parity_batches < 1:
            raise ValueError(f"ONNXExport.parity_batches={parity_batches!r} must be a positive integer")
        if fp16_io_dtype not in IO_DTYPES:
            raise ValueError(f"ONNXExport.fp16_io_dtype={fp16_io_dtype!r} must be one of {IO_DTYPES}")
        for field, value in (("atol", atol), ("int8_atol", int8_atol), ("fp16_atol", fp16_atol)):
            if value is not None and not value > 0:
                raise ValueError(f"ONNXExport.{field}={value!r} must be positive")
        for field, value in (("min_top1_agreement", min_top1_agreement),
                             ("int8_min_top1_agreement", int8_min_top1_agreement)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ONNXExport.{field}={value!r} must be in [0, 1]")
        check_encodings_version(encodings_version, "ONNXExport.encodings_version")
        if openvino is True and not openvino_available():
            raise ValueError("ONNXExport.openvino=True but openvino is not installed: "
                             "pip install 'dms_lightning[openvino]'")
        self.dirpath = dirpath
        self.name = name
        self.checkpoint = checkpoint
        self.opset = opset
        self.dynamic_batch = dynamic_batch
        self.exporter = exporter
        self.simplify = simplify
        self.parity_batches = parity_batches
        self.atol, self.min_top1_agreement = atol, min_top1_agreement
        self.int8_rule = ParityRule(split="val", batches=parity_batches, min_top1_agreement=int8_min_top1_agreement,
                                    atol=int8_atol, owner="ONNXExport")
        self.export_fp32, self.export_int8 = export_fp32, export_int8
        self.export_fp16, self.fp16_io_dtype, self.fp16_atol = export_fp16, fp16_io_dtype, fp16_atol
        self.openvino = openvino_available() if openvino is None else openvino
        self.encodings_version = encodings_version
        self.exported: dict[str, Path] = {}
        self.variants: list[Variant] = []
        self._log_dir: Path | None = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        late = callbacks_after(trainer, self, "hands_down_int8")
        if not (self.export_fp32 or self.export_int8 or self.export_fp16) and not any(
                has_role(cb, "hands_down_int8") for cb in trainer.callbacks):
            raise MisconfigurationException(
                "ONNXExport: export_fp32, export_int8 and export_fp16 all False leaves nothing to export: no "
                "quantization callback hands an INT8 network down in this run")
        if late:
            raise MisconfigurationException(
                f"ONNXExport is placed before {late} in trainer callbacks: their INT8 networks are handed down at "
                "the end of fit, after ONNXExport would have run. Put ONNXExport after them.")
        # Resolved on every rank: trainer.log_dir is a collective call under DDP, the export runs on rank 0 only.
        self._log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        super().setup(trainer, pl_module, stage)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Path]:
        """Export, check and record every precision and handed-down network; returns ``{variant name: path}``."""
        self.variants = []
        log_dir = self._log_dir or Path(trainer.log_dir or trainer.default_root_dir)
        directory = ensure_writable_dir(self.dirpath or log_dir / "export", "ONNXExport.dirpath")
        source = export_source(trainer, pl_module, self.checkpoint)
        images = parity_images(trainer, ParityRule(split="val", batches=self.parity_batches))
        example = images[:1]
        info = model_preprocessing(trainer, pl_module, example)
        # This eager forward also settles weight quantization ranges, which follow the weights on every
        # eager forward but are frozen while the exporter traces.
        quantized = uses_fake_quant(source.model, example)
        best_is_float = not quantized and self.export_int8 and warn_if_best_is_float("ONNXExport", trainer, pl_module,
                                                                                   source, example)
        if not quantized and self.export_int8 and not self.export_fp32 and not best_is_float:
            rank_zero_warn("[dms_lightning] ONNXExport: export_int8 only, but the exported network has no "
                           "fake-quant modules (QAT not active in the chosen checkpoint): nothing exported")
        entries, exported = [], {}
        float_exports = [(precision, write) for precision, wanted, write in (
            ("fp32", self.export_fp32, self._export_fp32), ("fp16", self.export_fp16, self._export_fp16)) if wanted]
        if quantized and self.export_int8:
            float_exports.insert(1, ("int8", None))
        for precision, write in float_exports:
            variant = f"{self.name}_{precision}"
            path = directory / f"{variant}.onnx"
            metadata = onnx_metadata(info, variant=variant, precision=precision, source=source.origin)
            try:
                if write is None:
                    figures = self._export_int8(trainer, source.model, example, images, path, variant, metadata,
                                                self.int8_rule, self.opset)
                else:  # the float precisions of a fake-quant network are its float twin
                    with fake_quant_disabled() if quantized else contextlib.nullcontext():
                        figures = write(trainer, source.model, example, images, path, variant, metadata)
            except NotQuantizedError as err:
                rank_zero_warn(f"[dms_lightning] {err}: skipped")
                continue
            if figures is None:
                continue
            entries.append(self._record(trainer, directory, path, variant, precision, "ONNXExport", source.origin,
                                        source.model, figures))
            exported[variant] = path
        for network in quantized_networks(trainer):
            path, figures, origin = self._export_handed_down(trainer, network, info, log_dir / "quantization")
            root = path.parent
            entries.append(self._record(trainer, root, path, network.name, "int8", network.producer, origin,
                                        network.network, {**figures, **network.info}, manifest_dir=directory))
            exported[network.name] = path
        others = self._other_producers(trainer, directory, exported)
        update_manifest(directory, others, run=export_run(trainer))
        entries += others
        log_text(trainer, "export/summary", "\n".join(
            f"{e['name']}: {e['bytes'] / 1e6:.2f} MB, parity {e.get('parity', {}).get('max_abs_diff', 'n/a')}"
            for e in entries))
        written = ", ".join(f"{k} → {v}" for k, v in exported.items())
        log.info("[dms_lightning] ONNXExport wrote %s (manifest %s)", written, directory / "manifest.json")
        self.exported = exported
        return exported

    def _record(self, trainer: Trainer, root: Path, path: Path, variant: str, precision: str, producer: str,
                origin: dict, model: nn.Module, figures: dict, manifest_dir: Path | None = None) -> dict:
        """Manifest entry and report variant of a written file (recorded at once, so they match the files)."""
        directory = manifest_dir or root
        entry = onnx_record(path, root, name=variant, precision=precision, producer=producer, source=origin,
                            parameters=_parameters(model), **figures)
        if root != directory:
            entry["path"] = str(path.resolve())
        # Recorded as soon as written: should a later export fail, the manifest still matches the files.
        update_manifest(directory, [entry], run=export_run(trainer))
        self.variants.append(Variant(variant, str(path), precision, producer, {**figures, "source": origin}))
        return entry

    def _export_fp32(self, trainer: Trainer, model: nn.Module, example: torch.Tensor, images: torch.Tensor,
                     path: Path, variant: str, metadata: dict[str, str]) -> dict | None:
        """Export to a temporary, check it, and rename it onto ``path`` only if every check passes."""
        with atomic_path(path) as tmp:
            export_onnx(model, example, tmp, opset=self.opset, dynamic_batch=self.dynamic_batch,
                        metadata=metadata, exporter=self.exporter, simplify=self.simplify)
            if has_qdq(onnx.load(str(tmp), load_external_data=False)):
                rank_zero_warn(f"[dms_lightning] ONNXExport: the fp32 export of {variant} still has "
                               "QuantizeLinear/DequantizeLinear nodes (the network quantizes with ops other than "
                               "torch's fake_quantize_*): skipped")
                return None
            result, reference, candidate = check_parity(
                model, tmp, images, atol=self.atol, min_top1_agreement=self.min_top1_agreement,
                raise_on_failure=False)
            self._record_parity(trainer, path, variant, result, reference, candidate)
            if not result.passed:
                raise ParityError(f"ONNXExport: {variant} failed the parity check, not written: {result.describe()}")
            figures = {"parity": result.to_dict(), "coverage": coverage_before_conversion(tmp, variant)}
            if self.openvino:
                figures["openvino"] = self._openvino_check(tmp, images, candidate, variant, False).to_dict()
        return figures

    def _export_fp16(self, trainer: Trainer, model: nn.Module, example: torch.Tensor, images: torch.Tensor,
                     path: Path, variant: str, metadata: dict[str, str]) -> dict:
        with atomic_path(path) as tmp:
            export_fp16_onnx(model, example, tmp, io_dtype=self.fp16_io_dtype, opset=self.opset,
                             dynamic_batch=self.dynamic_batch, metadata=metadata, exporter=self.exporter,
                             simplify=self.simplify)
            result, reference, candidate = check_fp16_parity(model, tmp, images, atol=self.fp16_atol,
                                                             min_top1_agreement=self.min_top1_agreement,
                                                             raise_on_failure=False)
            self._record_parity(trainer, path, variant, result, reference, candidate)
            if not result.passed:
                raise ParityError(f"ONNXExport: {variant} failed the parity check, not written: {result.describe()}")
            figures = {"parity": result.to_dict(), "io_dtype": self.fp16_io_dtype,
                       "coverage": coverage_before_conversion(tmp, variant)}
            if self.openvino and self.fp16_io_dtype == "float32":
                # Judged against ONNX Runtime with the FP16 tolerance: OpenVINO may compute in half precision.
                ov = compare_outputs(candidate, openvino_outputs(tmp, images.numpy()), atol=self.fp16_atol,
                                     min_top1_agreement=self.min_top1_agreement, reference_name="onnxruntime",
                                     runtime="openvino")
                if not ov.passed:
                    raise ParityError(f"ONNXExport: {variant} disagrees between OpenVINO and ONNX Runtime: "
                                      f"{ov.describe()}")
                figures["openvino"] = ov.to_dict()
        return figures

    def _export_int8(self, trainer: Trainer, model: nn.Module, example: torch.Tensor, images: torch.Tensor,
                     path: Path, variant: str, metadata: dict[str, str], rule: ParityRule, opset: int) -> dict:
        def record(result: ParityResult, reference: np.ndarray, candidate: np.ndarray) -> None:
            self._record_parity(trainer, path, variant, result, reference, candidate)

        written = export_int8(model, example, path, images, rule=rule, metadata=metadata, opset=opset,
                              exporter=self.exporter, label=f"ONNXExport: {variant}", on_checked=record,
                              encodings_version=self.encodings_version)
        figures = {"parity": written.parity.to_dict(), "coverage": coverage_before_conversion(path, variant),
                   "onnxruntime_int8_kernels": written.fused_kernels.to_dict(),
                   "encodings_path": str(written.encodings_path)}
        if self.openvino:
            figures["openvino"] = self._openvino_check(path, images, written.candidate, variant, True).to_dict()
        return figures

    def _export_handed_down(self, trainer: Trainer, network: QuantizedNetwork, info: dict,
                            default_dir: Path) -> tuple[Path, dict, dict]:
        """Write a network a quantization callback handed down: ``<dirpath>/<name>.onnx`` + encodings."""
        directory = ensure_writable_dir(network.dirpath or default_dir, f"{network.producer}.dirpath")
        model = detached_copy(network.network, trainer).cpu().float().eval()
        images = parity_images(trainer, network.parity)
        origin = {"checkpoint": "last", "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                  "producer": network.producer}
        path = directory / f"{network.name}.onnx"
        metadata = onnx_metadata(info, variant=network.name, precision="int8", source=origin)
        figures = self._export_int8(trainer, model, images[:1], images, path, network.name, metadata,
                                    network.parity, network.opset)
        return path, figures, origin

    def _record_parity(self, trainer: Trainer, path: Path, variant: str, result: ParityResult,
                       reference: np.ndarray, candidate: np.ndarray) -> None:
        log_parity(trainer, variant, result)
        figure = parity_figure(reference, candidate, result, f"{variant}: ONNX Runtime vs PyTorch")
        with atomic_path(path.with_name(f"{variant}_parity.png")) as tmp:
            figure.savefig(tmp, format="png", dpi=90)
        log_figure(trainer, f"export/{variant}_parity", figure)
        log.info("[dms_lightning] %s: %s", variant, result.describe())

    def _openvino_check(self, path: Path, images: torch.Tensor, ort_logits: np.ndarray, variant: str,
                        int8: bool) -> ParityResult:
        try:
            logits = openvino_outputs(path, images.numpy())
        except Exception as err:
            raise ParityError(f"ONNXExport: OpenVINO cannot load or run {variant}: {err}") from err
        result = compare_outputs(ort_logits, logits, atol=self.int8_rule.atol if int8 else self.atol,
                                 min_top1_agreement=self.int8_rule.min_top1_agreement if int8
                                 else self.min_top1_agreement,
                                 reference_name="onnxruntime", runtime="openvino")
        if not result.passed:
            message = f"ONNXExport: {variant} disagrees between OpenVINO and ONNX Runtime: {result.describe()}"
            if not int8:
                raise ParityError(message)
            # OpenVINO runs INT8 with its own low-precision kernels: a difference is reported, not fatal.
            rank_zero_warn(f"[dms_lightning] {message}")
        return result

    def _other_producers(self, trainer: Trainer, directory: Path, exported: dict) -> list[dict]:
        """Manifest entries for ONNX files other producers wrote (e.g. PTQ INT8), so one manifest lists all."""
        entries = []
        for variant in variants(trainer):
            path = Path(variant.onnx_path)
            if variant.name in exported or not path.is_file() or path.suffix != ".onnx":
                continue
            root = directory if path.resolve().is_relative_to(directory.resolve()) else path.parent
            entry = onnx_record(path, root, name=variant.name, precision=variant.precision, producer=variant.producer,
                                **{k: v for k, v in variant.info.items() if k != "name"})
            if root != directory:
                entry["path"] = str(path.resolve())
            entries.append(entry)
        return entries


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
