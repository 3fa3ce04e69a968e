"""SNPEExport: at the end of ``fit``, a deploy bundle for Qualcomm NPUs (SNPE and QNN / QAIRT)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import ClassVar

import onnx
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dms_lightning.export.fit_end import FitEndExporter
from dms_lightning.export.calibration import INPUT_LIST, write_calibration_raws
from dms_lightning.export.callbacks import default_export_dir, log_parity
from dms_lightning.export.encodings import (
    DEFAULT_ENCODINGS_VERSION,
    check_encodings_coverage,
    check_encodings_version,
    write_encodings,
)
from dms_lightning.export.int8 import export_int8
from dms_lightning.export.manifest import directory_record, export_run, file_record, update_manifest
from dms_lightning.export.metadata import onnx_metadata
from dms_lightning.export.onnx_export import DEFAULT_OPSET, export_onnx
from dms_lightning.export.parity import ParityError, check_parity, compare_outputs
from dms_lightning.export.qdq import has_qdq, make_static_batch, strip_qdq
from dms_lightning.export.runtimes import onnxruntime_outputs
from dms_lightning.export.sdk import (
    RUNTIMES,
    TOOLCHAINS,
    SDKToolError,
    conversion_steps,
    device_commands,
    check_script_value,
    render_convert_script,
    run_steps,
    sdk_roots,
)
from dms_lightning.export.source import (
    CHECKPOINT_CHOICES,
    export_source,
    model_preprocessing,
    sample_images,
    uses_fake_quant,
)
from dms_lightning.utils.artifacts import ParityRule, variants
from dms_lightning.utils.io import atomic_path, ensure_writable_dir, write_json_atomic

log = logging.getLogger(__name__)

MODEL = "model.onnx"
QDQ_MODEL = "model_qdq.onnx"
ENCODINGS = "encodings.json"
SCRIPT = "convert.sh"


class EncodingsCoverageError(ValueError):
    """Quantized tensors of the INT8 model have no usable encoding in the bundle."""


class SNPEExport(FitEndExporter):
    """Write a Qualcomm deploy bundle when ``fit`` ends (SNPE DLC and QNN context-binary paths).

    On rank zero, after ``fit``, ``<dirpath>/<bundle_name>/`` receives:

    * ``model.onnx``: the network (best or last checkpoint) with batch 1 and static shapes, as the
      converters need. For a QAT network (fake-quant modules) or a registered INT8 QDQ variant (PTQ), it
      is the float twin of the INT8 graph and ``encodings.json`` holds the learned / calibrated ranges,
      keyed by its tensor names (AIMET format, ``--quantization_overrides``); ``model_qdq.onnx`` is the
      INT8 reference itself. Every quantized tensor must have an encoding (listed otherwise).
    * ``calibration/sample_*.raw``: ``calibration_images`` images from the datamodule, float32 NHWC,
      preprocessed exactly like the model input, listed in ``input_list.txt``.
    * ``convert.sh``: the exact ``snpe-onnx-to-dlc`` / ``snpe-dlc-quantize`` (/ ``snpe-dlc-graph-prepare``)
      and ``qnn-onnx-converter`` / ``qnn-model-lib-generator`` (/ ``qnn-context-binary-generator``)
      commands for ``runtime``; ``manifest.json`` with hashes, input layout and on-device run commands.

    When ``sdk_root`` or ``SNPE_ROOT`` / ``QNN_SDK_ROOT`` is set the tools are run and their exit codes
    checked (a failing tool raises :class:`~dms_lightning.export.sdk.SDKToolError` with its stderr; the
    unfinished bundle is moved to ``<bundle_name>.failed``). Otherwise one line says the conversion was
    skipped and how to run it. The bundle directory appears only once complete.

    Args:
        dirpath: export directory; default ``<log_dir>/export`` (shared with :class:`ONNXExport`).
        bundle_name: sub-directory of the bundle.
        runtime: target runtime, one of ``cpu``, ``gpu``, ``dsp``, ``htp``.
        toolchains: ``snpe``, ``qnn`` or both.
        checkpoint: ``"best"`` or ``"last"`` weights.
        calibration_images: number of calibration images written as raws.
        calibration_split: datamodule split they come from (``val`` is deterministic, un-augmented).
        opset: ONNX opset of the bundle's model.
        sdk_root: SDK root overriding ``SNPE_ROOT`` / ``QNN_SDK_ROOT``.
        htp_socs: SoC for SNPE's offline HTP graph preparation (``sm8550`` = Snapdragon 8 Gen 2).
        qnn_lib_target: QNN model library target (default: host for HTP context binaries, else
            ``aarch64-android``).
        int8_variant: name of a registered INT8 variant to take encodings from (default: the network's own
            fake-quant if any, else the latest registered INT8 QDQ variant, else FP32 without encodings).
        require_full_coverage: also fail when weighted layers have no encoding (see ``check_encodings_coverage``).
        encodings_version: AIMET encodings format of ``encodings.json``: ``"1.0.0"`` (default; aimet-onnx 2.x
            and current QNN / QAIRT converters) or ``"0.6.1"`` (legacy SNPE 1.x / early QNN).
        atol / min_top1_agreement / int8_min_top1_agreement: parity tolerances of the bundle's model.

    Example:
        >>> callbacks = [ONNXExport(), SNPEExport(runtime="htp", calibration_images=64)]
        >>> trainer = Trainer(callbacks=callbacks)  # doctest: +SKIP
    """

    #: Writes a deployable artifact (the bundle; it lists no report variant): CompressionReport comes after it.
    produces_variants: ClassVar[bool] = True

    def __init__(
        self,
        dirpath: str | None = None,
        bundle_name: str = "snpe_bundle",
        runtime: str = "htp",
        toolchains: list[str] | tuple[str, ...] = TOOLCHAINS,
        checkpoint: str = "best",
        calibration_images: int = 32,
        calibration_split: str = "val",
        opset: int = DEFAULT_OPSET,
        sdk_root: str | None = None,
        htp_socs: str = "sm8550",
        qnn_lib_target: str | None = None,
        int8_variant: str | None = None,
        require_full_coverage: bool = False,
        atol: float = 1e-3,
        min_top1_agreement: float = 0.99,
        int8_min_top1_agreement: float = 0.95,
        encodings_version: str = DEFAULT_ENCODINGS_VERSION,
    ) -> None:
        super().__init__()
        if not bundle_name or any(c in bundle_name for c in "/\\") or bundle_name.startswith("."):
            raise ValueError(f"SNPEExport.bundle_name={bundle_name!r} must be a plain directory name")
        if runtime not in RUNTIMES:
            raise ValueError(f"SNPEExport.runtime={runtime!r} must be one of {RUNTIMES}")
        toolchains = (toolchains,) if isinstance(toolchains, str) else tuple(toolchains)
        if not toolchains or any(t not in TOOLCHAINS for t in toolchains):
            raise ValueError(f"SNPEExport.toolchains={list(toolchains)!r} must be a non-empty subset of "
                             f"{list(TOOLCHAINS)}")
        if checkpoint not in CHECKPOINT_CHOICES:
            raise ValueError(f"SNPEExport.checkpoint={checkpoint!r} must be one of {CHECKPOINT_CHOICES}")
        if not isinstance(calibration_images, int) or calibration_images < 1:
            raise ValueError(f"SNPEExport.calibration_images={calibration_images!r} must be a positive integer")
        if calibration_split not in ("train", "val", "test"):
            raise ValueError(f"SNPEExport.calibration_split={calibration_split!r} must be 'train', 'val' or 'test'")
        if not isinstance(opset, int) or opset < 13:
            raise ValueError(f"SNPEExport.opset={opset!r} must be an integer >= 13")
        check_script_value("SNPEExport.htp_socs", htp_socs)
        check_script_value("SNPEExport.qnn_lib_target", qnn_lib_target)
        if sdk_root is not None and not Path(sdk_root).expanduser().is_dir():
            raise FileNotFoundError(f"SNPEExport.sdk_root={sdk_root!r} is not a directory")
        if not atol > 0:
            raise ValueError(f"SNPEExport.atol={atol!r} must be positive")
        for field, value in (("min_top1_agreement", min_top1_agreement),
                             ("int8_min_top1_agreement", int8_min_top1_agreement)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SNPEExport.{field}={value!r} must be in [0, 1]")
        self.dirpath, self.bundle_name, self.runtime, self.toolchains = dirpath, bundle_name, runtime, toolchains
        self.checkpoint, self.opset, self.sdk_root = checkpoint, opset, sdk_root
        self.calibration_images, self.calibration_split = calibration_images, calibration_split
        self.htp_socs, self.qnn_lib_target, self.int8_variant = htp_socs, qnn_lib_target, int8_variant
        self.require_full_coverage = require_full_coverage
        self.encodings_version = check_encodings_version(encodings_version, "SNPEExport.encodings_version")
        self.atol, self.min_top1_agreement = atol, min_top1_agreement
        self.int8_min_top1_agreement = int8_min_top1_agreement
        self.bundle: Path | None = None
        self.variants: list = []

    def export(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        """Write (and, with an SDK, convert) the bundle; returns its directory."""
        export_dir = ensure_writable_dir(self.dirpath or default_export_dir(trainer), "SNPEExport.dirpath")
        bundle = export_dir / self.bundle_name
        source = export_source(trainer, pl_module, self.checkpoint)
        images = sample_images(trainer, self.calibration_images, self.calibration_split)
        info = model_preprocessing(trainer, pl_module, images[:1])
        roots = {t: r for t, r in sdk_roots(self.sdk_root).items() if t in self.toolchains}
        with atomic_path(bundle) as staging:
            staging.mkdir()
            model_info = self._write_model(trainer, source, images, staging, info)
            write_calibration_raws(images, staging)
            steps = conversion_steps(runtime=self.runtime, toolchains=self.toolchains,
                                     has_encodings=model_info["encodings"] is not None, htp_socs=self.htp_socs,
                                     qnn_lib_target=self.qnn_lib_target,
                                     activation_bits=model_info.get("activation_bits") or 8)
            script = staging / SCRIPT
            header = f"Written by dms_lightning SNPEExport ({model_info['precision']})."
            script.write_text(render_convert_script(steps, runtime=self.runtime, header=header))
            script.chmod(0o755)
            conversion = self._convert(steps, roots, staging, bundle)
            write_json_atomic(staging / "manifest.json", self._bundle_manifest(
                staging, model_info, info, images, source.origin, conversion))
        update_manifest(export_dir, [directory_record(
            bundle, export_dir, name=self.bundle_name, kind="snpe_qnn_bundle", producer="SNPEExport",
            runtime=self.runtime, toolchains=list(self.toolchains), precision=model_info["precision"],
            conversion=conversion["status"], parity=model_info["parity"], encodings_coverage=model_info["coverage"],
            source=source.origin)], run=export_run(trainer))
        self.bundle = bundle
        return bundle

    def _write_model(self, trainer: Trainer, source, images: torch.Tensor, staging: Path, info: dict) -> dict:
        """``model.onnx`` (batch 1, static), and for INT8 ``model_qdq.onnx`` + ``encodings.json``; parity-checked."""
        example = images[:1]
        # Also settles weight quantization ranges (they follow the weights on every eager forward).
        quantized = uses_fake_quant(source.model, example)
        qdq_proto, origin, parity, stripped = None, None, None, None
        if quantized:
            metadata = onnx_metadata(info, variant=f"{self.bundle_name}_qdq", precision="int8", source=source.origin)
            rule = ParityRule(split=self.calibration_split, batches=None, owner="SNPEExport",
                              min_top1_agreement=self.int8_min_top1_agreement)
            written = export_int8(source.model, example, staging / QDQ_MODEL, images, rule=rule, metadata=metadata,
                                  encodings_path=staging / ENCODINGS, opset=self.opset, dynamic_batch=False,
                                  label=f"{self.bundle_name}/{QDQ_MODEL}", encodings_version=self.encodings_version)
            qdq_proto, parity, stripped = onnx.load(str(staging / QDQ_MODEL)), written.parity, written.stripped
            origin = "network fake-quant (QAT)"
        else:
            variant = self._registered_int8(trainer)
            if variant is not None:
                qdq_proto = make_static_batch(onnx.load(variant.onnx_path))
                onnx.save(qdq_proto, str(staging / QDQ_MODEL))
                reference = onnxruntime_outputs(variant.onnx_path, images.numpy())
                parity = compare_outputs(reference, onnxruntime_outputs(staging / QDQ_MODEL, images.numpy()),
                                         atol=self.atol, min_top1_agreement=self.min_top1_agreement,
                                         reference_name=f"{variant.name} (dynamic batch)")
                if not parity.passed:
                    raise ParityError(f"{self.bundle_name}/{QDQ_MODEL}: static-batch copy of {variant.name} "
                                      f"differs from it: {parity.describe()}")
                origin = f"registered variant {variant.name} ({variant.producer})"
        if qdq_proto is None:
            metadata = onnx_metadata(info, variant=f"{self.bundle_name}_fp32", precision="fp32", source=source.origin)
            export_onnx(source.model, example, staging / MODEL, opset=self.opset, dynamic_batch=False,
                        metadata=metadata)
            parity, _, _ = check_parity(source.model, staging / MODEL, images, atol=self.atol,
                                        min_top1_agreement=self.min_top1_agreement, label=f"{self.bundle_name}/{MODEL}")
            log_parity(trainer, f"{self.bundle_name}_fp32", parity)
            return {"precision": "fp32", "encodings": None, "encodings_version": None, "encodings_source": None,
                    "parity": parity.to_dict(), "coverage": None}
        log_parity(trainer, f"{self.bundle_name}_int8", parity)
        if stripped is None:
            stripped = strip_qdq(qdq_proto)
            write_encodings(stripped.encodings, staging / ENCODINGS, self.encodings_version)
        onnx.save(stripped.model, str(staging / MODEL))
        coverage = check_encodings_coverage(stripped.model, stripped.encodings, stripped.quantized_tensors)
        self._report_coverage(coverage)
        widths = {entries[0]["bitwidth"] for entries in stripped.activation_encodings.values() if entries}
        return {"precision": "int8", "encodings": ENCODINGS, "encodings_version": self.encodings_version,
                "encodings_source": origin, "activation_bits": 16 if widths == {16} else 8,
                "activation_bitwidths": sorted(widths),
                "parity": parity.to_dict(), "coverage": coverage.to_dict()}

    def _registered_int8(self, trainer: Trainer):
        candidates = [v for v in variants(trainer) if v.precision == "int8" and Path(v.onnx_path).is_file()]
        if self.int8_variant is not None:
            chosen = [v for v in variants(trainer) if v.name == self.int8_variant]
            if not chosen:
                raise ValueError(f"SNPEExport.int8_variant={self.int8_variant!r} is not a registered variant; "
                                 f"registered: {[v.name for v in variants(trainer)]} (callbacks run in list order: "
                                 "put SNPEExport after the callback that produces it)")
            candidates = chosen
        for variant in reversed(candidates):
            if has_qdq(onnx.load(variant.onnx_path, load_external_data=False)):
                return variant
        if self.int8_variant is not None:
            raise ValueError(f"SNPEExport.int8_variant={self.int8_variant!r} is not a QDQ ONNX model "
                             "(QuantizeLinear/DequantizeLinear); SNPE/QNN encodings need one")
        return None

    def _report_coverage(self, coverage) -> None:
        if coverage.missing:
            raise EncodingsCoverageError(f"{len(coverage.missing)} quantized tensors have no usable encoding or "
                                         f"name no tensor of {MODEL}: {coverage.missing}")
        if coverage.not_overridden:
            message = (f"{len(coverage.not_overridden)} weighted-layer tensors have no encoding and will be "
                       f"calibrated from the raws on conversion: {coverage.not_overridden}")
            if self.require_full_coverage:
                raise EncodingsCoverageError(message)
            rank_zero_warn(f"[dms_lightning] SNPEExport: {message}")

    def _convert(self, steps, roots: dict, staging: Path, bundle: Path) -> dict:
        if not roots:
            rank_zero_info(f"[dms_lightning] SNPEExport: SNPE/QNN conversion skipped (no SNPE_ROOT, QNN_SDK_ROOT or "
                           f"sdk_root); run it with: SNPE_ROOT=<sdk> QNN_SDK_ROOT=<sdk> bash {bundle / SCRIPT}")
            return {"status": "skipped", "steps": []}
        try:
            ran = run_steps(steps, roots, staging, staging / "logs")
        except SDKToolError as err:
            failed = bundle.with_name(bundle.name + ".failed")
            if failed.exists():
                shutil.rmtree(failed)
            os.replace(staging, failed)
            raise SDKToolError(f"{err}\nThe unfinished bundle (with convert.sh and tool logs) is at {failed}; "
                               f"{bundle} was not written.") from err
        skipped = sorted(set(self.toolchains) - set(roots))
        if skipped:
            rank_zero_info(f"[dms_lightning] SNPEExport: {', '.join(skipped)} conversion skipped (no SDK root set)")
        return {"status": "converted" if not skipped else "partial", "steps": ran, "skipped": skipped}

    def _bundle_manifest(self, staging: Path, model_info: dict, info: dict, images: torch.Tensor, origin: dict,
                         conversion: dict) -> dict:
        _, channels, height, width = images.shape
        return {
            "format": "dms_lightning.snpe_bundle/1",
            "runtime": self.runtime,
            "toolchains": list(self.toolchains),
            "model": MODEL,
            "precision": model_info["precision"],
            "encodings": model_info["encodings"],
            "encodings_version": model_info["encodings_version"],
            "encodings_source": model_info["encodings_source"],
            "encodings_coverage": model_info["coverage"],
            "activation_bitwidths": model_info.get("activation_bitwidths", []),
            "input": {"name": "input", "onnx_shape": [1, channels, height, width],
                      "device_layout": "NHWC", "device_shape": [1, height, width, channels], "dtype": "float32"},
            "calibration": {"images": len(images), "split": self.calibration_split, "input_list": INPUT_LIST},
            "preprocessing": info,
            "parity": model_info["parity"],
            "source": origin,
            "conversion": conversion,
            "device_commands": device_commands(self.runtime, self.toolchains),
            "files": [file_record(f, staging) for f in sorted(staging.rglob("*")) if f.is_file()],
        }
