"""TFLiteExport: the network as LiteRT / TFLite flatbuffers (FP32, FP16, INT8), parity-checked in the LiteRT interpreter.

Conversion goes straight from PyTorch with ``litert-torch`` (``torch.export`` → LiteRT, no TensorFlow);
the FP16 file stores its weights in float16 (``ai-edge-quantizer``'s float-casting recipe, the
weights dequantized to float32 by the runtime or kept in half precision by a GPU delegate). The INT8
file is full-integer and carries the scales of the QAT / PTQ network (:mod:`dms_lightning.export.tflite_int8`),
with float32, int8 or uint8 input and output (``io``). Input
layout is an option: ``NCHW`` like the ONNX files, or ``NHWC``, which NPU delegates want (the
permute sits in front of the first convolution, where the converter folds it away). The class names
and preprocessing go into the file's metadata under the same keys as the ONNX ``metadata_props``.

Both packages are heavy (jax, the LiteRT converter; about 1 GB) and live in the ``[tflite]`` extra:
``pip install "dms_lightning[tflite]"``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import tempfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dms_lightning.export.fit_end import FitEndExporter
from dms_lightning.export.manifest import export_run, file_record, update_manifest
from dms_lightning.export.parity import ParityError, ParityResult, check_runtime_parity
from dms_lightning.export.qdq import fake_quant_disabled
from dms_lightning.export.metadata import onnx_metadata
from dms_lightning.export.source import (
    CHECKPOINT_CHOICES,
    export_source,
    model_preprocessing,
    sample_images,
    warn_if_best_is_float,
)
from dms_lightning.export.tflite_int8 import (
    IO_TYPES,
    XNNPACK_MAX_REQUANTIZATION,
    IntegerForm,
    integer_network,
    set_io_type,
    static_quant_config,
    unpack_tflite,
    xnnpack_refusals,
)
from dms_lightning.utils.io import atomic_path, ensure_writable_dir

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
LAYOUTS = ("NCHW", "NHWC")
INSTALL_HINT = 'pip install "dms_lightning[tflite]" (litert-torch, ai-edge-litert)'


#: Splits TFLiteExport can check parity on.
PARITY_SPLITS = ("val", "test")


def tflite_available() -> bool:
    """Whether the converter (``litert_torch``) and the interpreter (``ai_edge_litert``) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("litert_torch", "ai_edge_litert"))


def _require_tflite(field: str = "TFLite export") -> None:
    if not tflite_available():
        raise ModuleNotFoundError(f"{field} needs litert-torch and ai-edge-litert: {INSTALL_HINT}")


class _ChannelsLast(nn.Module):
    """Take NHWC input and feed the NCHW network (the converter folds the permute into the first op)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.permute(0, 3, 1, 2))


def _float16_weights(source: Path, target: Path) -> None:
    from ai_edge_quantizer import algorithm_manager, quantizer, recipe_manager
    from ai_edge_quantizer.qtyping import TFLOperationName

    manager = recipe_manager.RecipeManager()
    manager.add_weight_only_config(regex=".*", operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=16,
                                   algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    tool = quantizer.Quantizer(str(source))
    tool.load_quantization_recipe(manager.get_quantization_recipe())
    result = tool.quantize(enable_progress_report=False)
    target.write_bytes(bytes(result.quantized_model))


def add_tflite_metadata(buffer: bytes, metadata: dict[str, str]) -> bytes:
    """``buffer`` (a .tflite flatbuffer) with ``metadata`` added as named metadata entries (UTF-8 values)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = unpack_tflite(buffer)
    model.metadata = list(model.metadata or [])
    model.buffers = list(model.buffers or [])
    replaced = set(metadata)
    model.metadata = [m for m in model.metadata if (m.name.decode() if isinstance(m.name, bytes) else m.name)
                      not in replaced]
    for key, value in metadata.items():
        data = schema.BufferT()
        data.data = np.frombuffer(str(value).encode(), dtype=np.uint8)
        model.buffers.append(data)
        entry = schema.MetadataT()
        entry.name, entry.buffer = key, len(model.buffers) - 1
        model.metadata.append(entry)
    builder = flatbuffers.Builder(len(buffer) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def read_tflite_metadata(path: str | Path) -> dict[str, str]:
    """The named metadata entries of a .tflite file that hold text (ours: class names, preprocessing ...)."""
    from ai_edge_litert import schema_py_generated as schema

    buffer = Path(path).read_bytes()
    model = schema.Model.GetRootAs(buffer, 0)
    entries = {}
    for index in range(model.MetadataLength()):
        item = model.Metadata(index)
        data = model.Buffers(item.Buffer())
        raw = data.DataAsNumpy() if data.DataLength() else np.zeros(0, np.uint8)
        try:
            entries[item.Name().decode()] = bytes(raw).decode()
        except UnicodeDecodeError:
            continue  # the converter's own binary entries (min_runtime_version is text; others may not be)
    return entries


def _input_qdq(network: nn.Module) -> nn.Module:
    """The integer form's quantize-dequantize of the network input (it must come before an NHWC permute)."""
    from torch import fx

    from dms_lightning.export.tflite_int8 import IntegerQDQ

    for module in network.modules():
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_module" and node.args and getattr(node.args[0], "op", None) == "placeholder":
                    found = module.get_submodule(str(node.target))
                    if isinstance(found, IntegerQDQ):
                        return found
    raise ValueError("the INT8 network's input is not quantized; quantize its first layer for an INT8 TFLite file")


def export_tflite(model: nn.Module, example_input: torch.Tensor, path: str | Path, *, precision: str = "fp32",
                  layout: str = "NCHW", metadata: dict[str, str] | None = None, io: str = "float",
                  calibration: torch.Tensor | None = None) -> Path:
    """Convert ``model`` (eval) to a .tflite file at ``path`` atomically; batch size of ``example_input``.

    ``precision="fp16"`` stores the weights in float16. ``precision="int8"`` takes a fake-quantized
    ``model`` (after QAT or PTQ) and writes the full-integer file with *its* scales; the tensors it keeps in
    float get min/max ranges over ``calibration`` images and are named in the file's ``int8_scales``
    metadata; ``io`` is then the input / output type (``float``, ``int8``, ``uint8``). ``layout="NHWC"``
    makes the input channels-last (``example_input`` stays NCHW). ``metadata`` goes into the file's named
    metadata.

    Example:
        >>> export_tflite(net, torch.zeros(1, 1, 96, 96), "student_fp32.tflite", layout="NHWC")  # doctest: +SKIP
        >>> export_tflite(qat_net, x[:1], "student_int8.tflite", precision="int8", calibration=x)  # doctest: +SKIP
    """
    return export_tflite_model(model, example_input, path, precision=precision, layout=layout, metadata=metadata,
                               io=io, calibration=calibration)[0]


def export_tflite_model(model: nn.Module, example_input: torch.Tensor, path: str | Path, *, precision: str = "fp32",
                        layout: str = "NCHW", metadata: dict[str, str] | None = None, io: str = "float",
                        calibration: torch.Tensor | None = None, float_file: str | Path | None = None
                        ) -> tuple[Path, IntegerForm | None]:
    """:func:`export_tflite`, also returning the INT8 integer form (which tensors carry our scales), else ``None``.

    ``float_file``: for ``precision="fp16"``, an FP32 .tflite of the same ``model`` and ``layout`` already
    written; its weights are cast instead of converting ``model`` again (the converter's run is most of the cost).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    if io not in IO_TYPES:
        raise ValueError(f"io={io!r} must be one of {IO_TYPES}")
    if io != "float" and precision != "int8":
        raise ValueError(f"io={io!r} needs precision='int8' (a {precision} file has float32 input and output)")
    _require_tflite()
    import litert_torch

    was_training = model.training
    example = example_input.detach().cpu().float()
    form = None
    if precision == "int8":
        form = integer_network(model, calibration if calibration is not None else example)
        network = form.network
    else:
        network = model.cpu().float().eval()
    if layout == "NHWC":
        channels_last = _ChannelsLast(network)
        network = (nn.Sequential(_input_qdq(network), channels_last) if form is not None else channels_last).eval()
        example = example.permute(0, 2, 3, 1).contiguous()
    path = Path(path)
    try:
        with atomic_path(path) as tmp, tempfile.TemporaryDirectory() as work, torch.no_grad():
            converted = Path(work) / "converted.tflite"
            if precision == "fp16" and float_file is not None:
                converted = Path(float_file)
            else:
                litert_torch.convert(network, (example,),
                                     quant_config=static_quant_config() if form is not None else None
                                     ).export(str(converted))
            if precision == "fp16":
                half_file = Path(work) / "half.tflite"
                _float16_weights(converted, half_file)
                converted = half_file
            buffer = converted.read_bytes()
            props = {**(metadata or {}), "layout": layout, "precision": precision}
            if form is not None:
                buffer = set_io_type(buffer, io)
                props["io"] = io
                props["int8_scales"] = json.dumps(form.summary())
            tmp.write_bytes(add_tflite_metadata(buffer, props))
    finally:
        model.train(was_training)
    return path, form


class LiteRTModel:
    """One LiteRT interpreter of a .tflite file, fed NCHW float images whatever the file takes.

    The file's NHWC layout (its metadata) and integer input / output (its tensors' scale and zero point)
    are applied here, and a static batch is fed in padded chunks, so callers always see float logits.
    """

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        refused = xnnpack_refusals(path)
        if refused:  # LiteRT 2.3 would crash the process (double free) instead of falling back
            raise ValueError(f"{self.path.name}: XNNPACK, LiteRT's default CPU delegate, refuses {len(refused)} "
                             f"integer convolution(s) whose input scale x weight scale / output scale reaches "
                             f"{XNNPACK_MAX_REQUANTIZATION:g}: {'; '.join(refused[:3])}. An output that narrow is "
                             "(nearly) constant: quantize it over a wider range (FakeQuantizer keeps activations "
                             "to at least MIN_ACTIVATION_RANGE) or leave it in float")
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self.interpreter.allocate_tensors()
        self.feed, self.fetch = self.interpreter.get_input_details()[0], self.interpreter.get_output_details()[0]
        self.nhwc = read_tflite_metadata(path).get("layout") == "NHWC"
        self.batch = int(self.feed["shape"][0]) or 1

    @property
    def sample_shape(self) -> list[int]:
        """Per-sample NCHW input shape."""
        dims = [int(d) for d in self.feed["shape"][1:]]
        return [dims[2], dims[0], dims[1]] if self.nhwc else dims

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """NCHW float ``images`` as the file's input tensor wants them (layout, dtype, quantization)."""
        value = np.asarray(images, dtype=np.float32)
        if self.nhwc:
            value = value.transpose(0, 2, 3, 1)
        if self.feed["dtype"] != np.float32:  # integer input: quantize with the file's own input scale
            scale, zero_point = self.feed["quantization"]
            limits = np.iinfo(self.feed["dtype"])
            value = np.clip(np.round(value / scale) + zero_point, limits.min, limits.max)
        return np.ascontiguousarray(value, dtype=self.feed["dtype"])

    def invoke(self, prepared: np.ndarray) -> np.ndarray:
        """Run one batch-sized chunk already :meth:`prepare`-d; float logits."""
        self.interpreter.set_tensor(self.feed["index"], prepared)
        self.interpreter.invoke()
        logits = np.array(self.interpreter.get_tensor(self.fetch["index"]), dtype=np.float32)
        if self.fetch["dtype"] != np.float32:  # integer output: dequantize with the file's own output scale
            scale, zero_point = self.fetch["quantization"]
            logits = (logits - zero_point) * scale
        return logits

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Float logits of NCHW float ``images`` (any count)."""
        prepared = self.prepare(images)
        outputs = []
        for start in range(0, len(prepared), self.batch):
            chunk = prepared[start:start + self.batch]
            real = len(chunk)
            if real < self.batch:  # a static batch: pad the last chunk, keep its own rows
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - real, axis=0)])
            outputs.append(self.invoke(chunk)[:real])
        return np.concatenate(outputs)


def tflite_outputs(path: str | Path, inputs: np.ndarray, threads: int = 1) -> np.ndarray:
    """Logits of the .tflite file for NCHW float ``inputs`` (transposed / quantized as the file takes them)."""
    return LiteRTModel(path, threads).predict(inputs)


def tflite_latency(path: str | Path, image: np.ndarray, runs: int = 100, warmup: int = 10, threads: int = 1
                   ) -> tuple[float, float]:
    """Batch-1 latency ``(p50, p99)`` in ms of the .tflite file in the LiteRT interpreter on ``threads`` threads,
    for one NCHW float ``image`` (``1 × C × H × W``)."""
    import time

    model = LiteRTModel(path, threads)
    prepared = model.prepare(np.repeat(np.asarray(image)[:1], model.batch, axis=0))
    for _ in range(warmup):
        model.invoke(prepared)
    times = np.empty(runs)
    for index in range(runs):
        start = time.perf_counter()
        model.invoke(prepared)
        times[index] = (time.perf_counter() - start) * 1e3
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def check_tflite_parity(model: nn.Module, path: str | Path, inputs: torch.Tensor | np.ndarray, *,
                        atol: float | None, min_top1_agreement: float, raise_on_failure: bool = True,
                        split: str = "val") -> tuple[ParityResult, np.ndarray, np.ndarray]:
    """Compare the .tflite file (LiteRT interpreter) with the PyTorch ``model`` on NCHW ``inputs`` of ``split``."""
    return check_runtime_parity(model, tflite_outputs, path, inputs, atol=atol, min_top1_agreement=min_top1_agreement,
                                runtime="litert", label="TFLite export", raise_on_failure=raise_on_failure,
                                split=split)


def _float_network(model: nn.Module) -> nn.Module:
    """The float network of a QAT model (its fake-quant wrappers hold data-dependent Python branches that
    ``torch.export`` cannot trace), else ``model``: these files are the float variants.

    A model that holds fake-quantized networks as sub-modules (a LightningModule without ``compression_target``,
    whose children QAT wrapped one by one) becomes a shallow copy with each of them swapped for its float network;
    ``model`` itself is left as it is (the INT8 file is made from it next)."""
    from dms_lightning.quant import float_model, is_quantized

    def unwrap(module: nn.Module) -> nn.Module:
        if not is_quantized(module):
            return module
        original = float_model(module)
        if original is not None:
            return original
        twin = copy.copy(module)
        twin._modules = {name: None if child is None else unwrap(child) for name, child in module._modules.items()}
        return twin

    network = unwrap(model)
    if is_quantized(network):
        raise RuntimeError("TFLiteExport: the quantized network does not reference its float network; "
                           "export it before quantization-aware training starts")
    return network


# FP32 must match PyTorch closely (the bar); FP16 weights move logits by a few half-precision steps.
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 5e-2}


class TFLiteExport(FitEndExporter):
    """Write LiteRT / TFLite files of the trained network when ``fit`` ends, each checked in the LiteRT interpreter.

    On rank zero, after ``fit``: the compression target with the ``checkpoint`` weights becomes
    ``<name>_<precision>.tflite`` for each of ``precisions`` (batch 1, ``layout`` input), with the class
    names and preprocessing in its metadata:

    * ``fp32`` / ``fp16``: the float network (fake quantization bypassed), compared with PyTorch within
      ``atol`` (FP16: 5e-2);
    * ``int8`` (default when the network is fake-quantized by QAT or PTQ): full-integer, carrying the
      network's own scales and zero points; tensors it keeps in float get min/max ranges over
      ``calibration_images`` images and are listed (tensor, reason) in the log and the manifest. Its input
      and output are ``io`` (``float``, ``int8`` or ``uint8``). It is compared with the fake-quant network
      (top-1 agreement), and its scales with the encodings of the network's INT8 QDQ export (the ones the
      Qualcomm bundle carries): the manifest records every encoding the file does not carry.

    Top-1 agreement must reach ``min_top1_agreement`` (INT8: ``int8_min_top1_agreement``) on ``parity_images``
    images of the ``parity_split``; a file below it
    raises :class:`~dms_lightning.export.parity.ParityError` and is not left behind. Entries go into
    ``manifest.json`` of ``dirpath``. Needs the ``[tflite]`` extra (checked in ``__init__``).

    Args:
        dirpath: output directory; default ``<log_dir>/export``.
        name: file prefix.
        checkpoint: ``"best"`` or ``"last"`` weights.
        precisions: any of ``fp32``, ``fp16``, ``int8``; default ``fp32``, ``fp16`` and, for a fake-quantized
            network, ``int8``.
        layout: ``NCHW`` or ``NHWC`` input.
        io: input / output type of the INT8 file: ``float``, ``int8`` or ``uint8`` (NPU delegates want integer).
        parity_images: images of ``parity_split`` for the parity check.
        parity_split: ``"val"`` (default) or ``"test"``: the split those images come from. A bar of 99 % on a few
            hundred images moves by a whole image's worth between runs; the larger split measures it closer.
        calibration_images: validation images that set the ranges of the tensors the INT8 network keeps in float.
        atol: FP32 tolerance (FP16 uses 5e-2).
        min_top1_agreement: minimum top-1 agreement of the FP32 / FP16 files with PyTorch.
        int8_min_top1_agreement: minimum top-1 agreement of the INT8 file with the fake-quant network (LiteRT's
            integer kernels round where the simulation rounds in float, so a model with small margins flips a
            few images; measure on enough ``parity_images`` for the bar to mean something).
        latency_runs: timed batch-1 runs in the LiteRT interpreter (one thread) for the manifest and the
            report's parity matrix; 0 skips timing.
        skip_if_unavailable: without the ``[tflite]`` extra, warn and write nothing instead of refusing to
            start (for a shared config such as ``configs/distill.yaml``).

    Example:
        >>> trainer = Trainer(callbacks=[TFLiteExport(name="student", layout="NHWC", io="int8")])  # doctest: +SKIP
    """

    produces_variants: ClassVar[bool] = True

    def __init__(self, dirpath: str | None = None, name: str = "model", checkpoint: str = "best",
                 precisions: tuple[str, ...] | list[str] | None = None, layout: str = "NCHW", io: str = "float",
                 parity_images: int = 64, calibration_images: int = 128, atol: float = DEFAULT_ATOL["fp32"],
                 min_top1_agreement: float = 0.99, int8_min_top1_agreement: float = 0.99, latency_runs: int = 100,
                 skip_if_unavailable: bool = False, parity_split: str = "val") -> None:
        super().__init__()
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise ValueError(f"TFLiteExport.name={name!r} must be a plain file-name prefix such as 'student'")
        if checkpoint not in CHECKPOINT_CHOICES:
            raise ValueError(f"TFLiteExport.checkpoint={checkpoint!r} must be one of {CHECKPOINT_CHOICES}")
        if precisions is not None and (isinstance(precisions, str) or not precisions
                                       or any(p not in PRECISIONS for p in precisions)):
            raise ValueError(f"TFLiteExport.precisions={precisions!r} must be a non-empty list of {list(PRECISIONS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"TFLiteExport.layout={layout!r} must be one of {LAYOUTS}")
        if io not in IO_TYPES:
            raise ValueError(f"TFLiteExport.io={io!r} must be one of {list(IO_TYPES)}")
        for field_name, value, least in (("parity_images", parity_images, 1),
                                         ("calibration_images", calibration_images, 1), ("latency_runs", latency_runs, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"TFLiteExport.{field_name}={value!r} must be an integer >= {least}")
        if not atol > 0:
            raise ValueError(f"TFLiteExport.atol={atol!r} must be positive")
        if parity_split not in PARITY_SPLITS:
            raise ValueError(f"TFLiteExport.parity_split={parity_split!r} must be one of {list(PARITY_SPLITS)}")
        for field_name, value in (("min_top1_agreement", min_top1_agreement),
                                  ("int8_min_top1_agreement", int8_min_top1_agreement)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"TFLiteExport.{field_name}={value!r} must be in [0, 1]")
        self.unavailable = not tflite_available()
        if self.unavailable and skip_if_unavailable:
            rank_zero_warn(f"[dms_lightning] TFLiteExport: litert-torch / ai-edge-litert are not installed, so no "
                           f".tflite file will be written ({INSTALL_HINT})")
        else:
            _require_tflite("TFLiteExport")
        self.dirpath, self.name, self.checkpoint = dirpath, name, checkpoint
        self.precisions = None if precisions is None else tuple(precisions)
        self.layout, self.io = layout, io
        self.parity_images, self.calibration_images = parity_images, calibration_images
        self.parity_split = parity_split
        self.atol, self.min_top1_agreement, self.latency_runs = atol, min_top1_agreement, latency_runs
        self.int8_min_top1_agreement = int8_min_top1_agreement
        self.exported: dict[str, Path] = {}
        self.variants: list = []  # one per file, measured by CompressionReport (in the LiteRT interpreter)

    def _precisions(self, network: nn.Module) -> tuple[str, ...]:
        from dms_lightning.quant import is_quantized

        quantized = is_quantized(network)
        if self.precisions is None:
            return ("fp32", "fp16", "int8") if quantized else ("fp32", "fp16")
        if "int8" in self.precisions and not quantized:
            raise ValueError("TFLiteExport.precisions includes 'int8' but the network is not fake-quantized: add "
                             "QuantizationAwareTraining or PostTrainingQuantization to the run, or drop 'int8'")
        return self.precisions

    def export(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Path]:
        """Convert, check and record each precision; returns ``{variant: path}``."""
        from dms_lightning.export.callbacks import default_export_dir

        from dms_lightning.utils.artifacts import Variant

        self.variants = []
        if self.unavailable:
            return {}
        directory = ensure_writable_dir(self.dirpath or default_export_dir(trainer), "TFLiteExport.dirpath")
        source = export_source(trainer, pl_module, self.checkpoint)
        images = sample_images(trainer, self.parity_images, self.parity_split)
        if self.precisions is None or "int8" in self.precisions:
            warn_if_best_is_float("TFLiteExport", trainer, pl_module, source, images[:1])
        precisions = self._precisions(source.model)
        info = model_preprocessing(trainer, pl_module, images[:1])
        exported = {}
        float_file = None  # the FP32 file, whose weights the FP16 one casts (one conversion for both)
        for precision in precisions:
            variant = f"{self.name}_{precision}_tflite"
            path = directory / f"{self.name}_{precision}.tflite"
            record: dict = {"name": variant, "format": "tflite", "precision": precision, "layout": self.layout,
                            "producer": "TFLiteExport", "source": source.origin}
            if precision == "int8":
                result, extra = self._export_int8(trainer, source.model, images, info, variant, source.origin, path)
                record.update(extra)
            else:
                network = _float_network(source.model)
                atol = self.atol if precision == "fp32" else DEFAULT_ATOL["fp16"]
                with fake_quant_disabled(), atomic_path(path) as tmp:
                    export_tflite_model(network, images[:1], tmp, precision=precision, layout=self.layout,
                                        metadata=onnx_metadata(info, variant=variant, precision=precision,
                                                               source=source.origin),
                                        float_file=float_file if precision == "fp16" else None)
                    result, _, _ = check_tflite_parity(network, tmp, images, atol=atol,
                                                       min_top1_agreement=self.min_top1_agreement,
                                                       raise_on_failure=False, split=self.parity_split)
                    _raise_unless_passed(result, variant)
            if self.latency_runs:
                record["latency_ms_p50"], record["latency_ms_p99"] = tflite_latency(path, images[:1].numpy(),
                                                                                    self.latency_runs)
            update_manifest(directory, [{**file_record(path, directory), **record, "parity": result.to_dict(),
                                         "metadata": read_tflite_metadata(path)}], run=export_run(trainer))
            rank_zero_info(f"[dms_lightning] TFLiteExport: {variant}: {result.describe()}")
            exported[variant] = path
            float_file = path if precision == "fp32" else float_file
            self.variants.append(Variant(variant, str(path), precision, "TFLiteExport",
                                         {"parity": result.to_dict(), "source": source.origin}))
        self.exported = exported
        return exported

    def _export_int8(self, trainer: Trainer, network: nn.Module, images: torch.Tensor, info: dict, variant: str,
                     origin: dict, path: Path) -> tuple[ParityResult, dict]:
        calibration = sample_images(trainer, self.calibration_images, "val")
        with atomic_path(path) as tmp:
            _, form = export_tflite_model(network, images[:1], tmp, precision="int8", layout=self.layout, io=self.io,
                                          calibration=calibration,
                                          metadata=onnx_metadata(info, variant=variant, precision="int8",
                                                                 source=origin))
            result, _, _ = check_tflite_parity(network, tmp, images, atol=None,
                                               min_top1_agreement=self.int8_min_top1_agreement, raise_on_failure=False,
                                               split=self.parity_split)
            result.reference = "pytorch fake-quant"
            _raise_unless_passed(result, variant)
            scales = _scales_against_encodings(network, images[:1], tmp, form.exceptions)
        for entry in form.exceptions:
            log.info("TFLiteExport: %s: %s has no scale of the QAT/PTQ network (%s): %s", variant, entry["tensor"],
                     entry["source"], entry["reason"])
        missing = scales["activation_encodings_missing"] + scales["weight_encodings_missing"]
        if scales["tflite_activations_unexplained"]:
            log.warning("TFLiteExport: %s: int8 tensors whose scale is neither an encoding nor a listed exception: %s",
                        variant, scales["tflite_activations_unexplained"])
        rank_zero_info(f"[dms_lightning] TFLiteExport: {variant}: {form.carried} activation scales carried from the "
                       f"fake-quant network, {len(form.exceptions)} tensors without one (listed in the manifest); "
                       f"{scales['activation_encodings'] + scales['weight_encodings'] - len(missing)} of "
                       f"{scales['activation_encodings'] + scales['weight_encodings']} encodings carried")
        if missing:
            log.warning("TFLiteExport: %s does not carry these encodings of the INT8 QDQ export: %s", variant, missing)
        return result, {"io": self.io, "int8_scales": {**form.to_dict(), "encodings": scales},
                        "calibration": {"images": len(calibration), "split": "val"}}


def _raise_unless_passed(result: ParityResult, variant: str) -> None:
    if not result.passed:
        raise ParityError(f"TFLiteExport: {variant} failed the parity check, not written: {result.describe()}")


def _scales_against_encodings(network: nn.Module, example: torch.Tensor, path: Path, exceptions: list[dict]) -> dict:
    """Compare the file's scales with the encodings of ``network``'s INT8 QDQ export (what the bundle carries)."""
    from dms_lightning.export.encodings import encodings_from_qdq_onnx
    from dms_lightning.export.qdq import export_qdq_onnx
    from dms_lightning.export.tflite_int8 import compare_with_encodings

    with tempfile.TemporaryDirectory() as work:
        onnx_path = export_qdq_onnx(network, example, Path(work) / "int8.onnx", dynamic_batch=False)
        encodings = encodings_from_qdq_onnx(onnx_path)
    return compare_with_encodings(path, encodings, exceptions)
