"""ONNXExport: at the end of ``fit``, the run's network as parity-checked ONNX files and a manifest."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from dms_lightning.export.coverage import coverage_before_conversion
from dms_lightning.export.fp16 import DEFAULT_FP16_ATOL, IO_DTYPES, check_fp16_parity, export_fp16_onnx
from dms_lightning.export.manifest import onnx_record, update_manifest
from dms_lightning.export.onnx_export import DEFAULT_OPSET, export_onnx, export_qdq
from dms_lightning.export.parity import ParityError, ParityResult, check_parity, compare_outputs, parity_figure
from dms_lightning.export.qdq import fake_quant_disabled, has_qdq
from dms_lightning.export.runtimes import onnxruntime_outputs, openvino_available, openvino_outputs
from dms_lightning.export.source import (
    CHECKPOINT_CHOICES,
    export_source,
    metadata_props,
    preprocessing,
    sample_images,
    uses_fake_quant,
)
from dms_lightning.utils.artifacts import register_variant, variants
from dms_lightning.utils.checkpoint import compression_target
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


class ONNXExport(Callback):
    """Export the trained network to ONNX when ``fit`` ends, check it in ONNX Runtime, and write a manifest.

    On rank zero, after ``fit``: the compression target (``pl_module.compression_target``, e.g. the
    distilled student, pruned channels removed) with the weights of the best checkpoint of the monitored
    metric (or the last weights) is exported as

    * ``<name>_fp32.onnx``: FP32, dynamic batch axis, input ``input`` (N×C×H×W), output ``logits``;
    * ``<name>_int8.onnx``: the INT8 QDQ graph, when the network carries fake-quant modules (QAT). Its
      FP32 sibling is then the same network with fake quantization bypassed;
    * ``<name>_fp16.onnx`` (``export_fp16=True``): weights and activations in float16, float32 input and
      output unless ``fp16_io_dtype="float16"`` (:func:`~dms_lightning.export.fp16.export_fp16_onnx`).

    Each file carries the class names and preprocessing (image size, channels, mean, std) in its
    ``metadata_props``, passes ``onnx.checker``, and is compared with PyTorch on real validation images:
    max |logit difference| and top-1 agreement are logged, drawn (``<variant>_parity.png`` and
    TensorBoard) and written to ``manifest.json`` with sha256, size, opset and input shape. A model over
    tolerance raises :class:`~dms_lightning.export.parity.ParityError` with the figures, and is not left
    in the directory. When OpenVINO is installed the files are also run there and compared with ONNX
    Runtime (``openvino=None``: when installed; ``True``: required). Each file's operators are checked
    against the published operator lists of QNN HTP, TFLite and TensorRT
    (:mod:`~dms_lightning.export.coverage`): what a target lacks is warned about and listed under
    ``coverage`` in the manifest. Files are registered as report variants (``dms_lightning.utils.artifacts``).

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
        export_fp32 / export_int8 / export_fp16: which precisions to write (FP16 is off by default).
        fp16_io_dtype: ``"float32"`` (casts inside the FP16 graph) or ``"float16"`` input and output.
        fp16_atol: FP16 tolerance on the max absolute logit difference vs the float32 PyTorch model.
        openvino: ``None`` (check when installed), ``True`` (must be installed), ``False`` (skip).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(max_epochs=1, callbacks=[ONNXExport(checkpoint="last", opset=18)])  # doctest: +SKIP
    """

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
        if not (export_fp32 or export_int8 or export_fp16):
            raise ValueError("ONNXExport: export_fp32, export_int8 and export_fp16 all False leaves nothing to export")
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
        self.int8_atol, self.int8_min_top1_agreement = int8_atol, int8_min_top1_agreement
        self.export_fp32, self.export_int8 = export_fp32, export_int8
        self.export_fp16, self.fp16_io_dtype, self.fp16_atol = export_fp16, fp16_io_dtype, fp16_atol
        self.openvino = openvino_available() if openvino is None else openvino
        self.exported: dict[str, Path] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Fail before training, not after it, when the directory cannot be written.
        if stage == "fit" and trainer.is_global_zero and self.dirpath is not None:
            ensure_writable_dir(self.dirpath, "ONNXExport.dirpath")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            self.export(trainer, pl_module)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Path]:
        """Export, check and record every precision; returns ``{variant name: path}``."""
        directory = ensure_writable_dir(self.dirpath or default_export_dir(trainer), "ONNXExport.dirpath")
        source = export_source(trainer, pl_module, self.checkpoint)
        images = self._parity_images(trainer)
        example = images[:1]
        info = preprocessing(trainer, pl_module, example)
        # This eager forward also settles weight quantization ranges, which follow the weights on every
        # eager forward but are frozen while the exporter traces.
        quantized = uses_fake_quant(source.model, example)
        if not quantized and self.export_int8 and source.origin["checkpoint"] == "best" \
                and uses_fake_quant(compression_target(pl_module), example.to(pl_module.device)):
            rank_zero_warn(f"[dms_lightning] ONNXExport: the best checkpoint ({source.origin['path']}) predates "
                           "quantization-aware training, so no INT8 model is exported from it; use "
                           "checkpoint='last' (or monitor a metric of the QAT epochs) for an INT8 export")
        elif not quantized and self.export_int8 and not self.export_fp32:
            rank_zero_warn("[dms_lightning] ONNXExport: export_int8 only, but the exported network has no "
                           "fake-quant modules (QAT not active in the chosen checkpoint): nothing exported")
        entries, exported = [], {}
        plan = []
        if self.export_fp32:
            plan.append(("fp32", fake_quant_disabled() if quantized else contextlib.nullcontext()))
        if quantized and self.export_int8:
            plan.append(("int8", contextlib.nullcontext()))
        if self.export_fp16:
            plan.append(("fp16", fake_quant_disabled() if quantized else contextlib.nullcontext()))
        for precision, mode in plan:
            variant = f"{self.name}_{precision}"
            path = directory / f"{variant}.onnx"
            with mode:
                figures = self._export_checked(trainer, source.model, example, images, path, variant, precision,
                                               metadata_props(info, precision=precision, variant=variant))
            if figures is None:
                continue
            entries.append(onnx_record(path, directory, name=variant, precision=precision, producer="ONNXExport",
                                       source=source.origin, parameters=_parameters(source.model), **figures))
            # Recorded as soon as written: should a later precision fail, the manifest still matches the files.
            update_manifest(directory, entries[-1:])
            register_variant(trainer, variant, path, precision, "ONNXExport", **figures, source=source.origin)
            exported[variant] = path
        others = self._other_producers(trainer, directory, exported)
        update_manifest(directory, others)
        entries += others
        log_text(trainer, "export/summary", "\n".join(
            f"{e['name']}: {e['bytes'] / 1e6:.2f} MB, parity {e.get('parity', {}).get('max_abs_diff', 'n/a')}"
            for e in entries))
        written = ", ".join(f"{k} → {v}" for k, v in exported.items())
        log.info("[dms_lightning] ONNXExport wrote %s (manifest %s)", written, directory / "manifest.json")
        self.exported = exported
        return exported

    def _parity_images(self, trainer: Trainer) -> torch.Tensor:
        datamodule = getattr(trainer, "datamodule", None)
        batch_size = getattr(datamodule, "batch_size", None) or 64
        return sample_images(trainer, self.parity_batches * batch_size, "val")

    def _export_checked(self, trainer: Trainer, model: nn.Module, example: torch.Tensor, images: torch.Tensor,
                        path: Path, variant: str, precision: str, metadata: dict[str, str]) -> dict | None:
        """Export to a temporary, check it, and rename it onto ``path`` only if every check passes."""
        int8 = precision == "int8"
        if precision == "fp16":
            return self._export_checked_fp16(trainer, model, example, images, path, variant, metadata)
        with atomic_path(path) as tmp:
            if int8:
                export_qdq(model, example, tmp, opset=self.opset, metadata=metadata, exporter=self.exporter)
            else:
                export_onnx(model, example, tmp, opset=self.opset, dynamic_batch=self.dynamic_batch,
                            metadata=metadata, exporter=self.exporter, simplify=self.simplify)
            if has_qdq(onnx.load(str(tmp), load_external_data=False)) != int8:
                rank_zero_warn(f"[dms_lightning] ONNXExport: the {precision} export of {variant} "
                               f"{'has no' if int8 else 'still has'} QuantizeLinear/DequantizeLinear nodes (the "
                               "network quantizes with ops other than torch's fake_quantize_*): skipped")
                return None
            # INT8: the graph's own semantics are judged (Q/DQ computed exactly); ORT's fused integer kernels
            # are a property of the runtime and CPU, reported below.
            result, reference, candidate = check_parity(
                model, tmp, images, atol=self.int8_atol if int8 else self.atol,
                min_top1_agreement=self.int8_min_top1_agreement if int8 else self.min_top1_agreement,
                raise_on_failure=False, fuse_qdq=not int8)
            self._record_parity(trainer, path, variant, result, reference, candidate)
            if not result.passed:
                raise ParityError(f"ONNXExport: {variant} failed the parity check, not written: {result.describe()}")
            figures = {"parity": result.to_dict(), "coverage": coverage_before_conversion(tmp, variant)}
            if int8:
                figures["onnxruntime_int8_kernels"] = self._runtime_kernels_check(tmp, images, reference, variant)
            if self.openvino:
                figures["openvino"] = self._openvino_check(tmp, images, candidate, variant, int8).to_dict()
        return figures

    def _export_checked_fp16(self, trainer: Trainer, model: nn.Module, example: torch.Tensor, images: torch.Tensor,
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

    def _runtime_kernels_check(self, path: Path, images: torch.Tensor, reference: np.ndarray, variant: str) -> dict:
        result = compare_outputs(reference, onnxruntime_outputs(path, images.numpy()), atol=None,
                                 min_top1_agreement=self.int8_min_top1_agreement,
                                 runtime="onnxruntime (fused INT8 kernels)")
        if not result.passed:
            rank_zero_warn(f"[dms_lightning] ONNXExport: {variant}: the graph matches PyTorch, but ONNX Runtime's "
                           f"fused INT8 kernels on this CPU do not: {result.describe()}. On x86 CPUs without VNNI "
                           "the u8s8 kernels can saturate (ONNX Runtime recommends reduce_range or symmetric "
                           "activations); "
                           "an NPU runs the graph's semantics")
        return result.to_dict()

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
        result = compare_outputs(ort_logits, logits, atol=self.int8_atol if int8 else self.atol,
                                 min_top1_agreement=self.int8_min_top1_agreement if int8 else self.min_top1_agreement,
                                 reference_name="onnxruntime", runtime="openvino")
        if not result.passed:
            message = f"ONNXExport: {variant} disagrees between OpenVINO and ONNX Runtime: {result.describe()}"
            if not int8:
                raise ParityError(message)
            # OpenVINO runs INT8 with its own low-precision kernels: a difference is reported, not fatal.
            rank_zero_warn(f"[dms_lightning] {message}")
        return result

    @staticmethod
    def _other_producers(trainer: Trainer, directory: Path, exported: dict) -> list[dict]:
        """Manifest entries for ONNX files other callbacks registered (PTQ / QAT INT8), so one manifest lists all."""
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
