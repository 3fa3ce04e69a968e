"""TFLiteExport: the network as LiteRT / TFLite flatbuffers (FP32, FP16), parity-checked in the LiteRT interpreter.

Conversion goes straight from PyTorch with ``litert-torch`` (``torch.export`` → LiteRT, no TensorFlow);
the FP16 file stores its weights in float16 (``ai-edge-quantizer``'s float-casting recipe, the
weights dequantized to float32 by the runtime or kept in half precision by a GPU delegate). Input
layout is an option: ``NCHW`` like the ONNX files, or ``NHWC``, which NPU delegates want (the
permute sits in front of the first convolution, where the converter folds it away). The class names
and preprocessing go into the file's metadata under the same keys as the ONNX ``metadata_props``.

Both packages are heavy (jax, the LiteRT converter; about 1 GB) and live in the ``[tflite]`` extra:
``pip install "dms_lightning[tflite]"``.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from dms_lightning.export.fit_end import FitEndExporter
from dms_lightning.export.manifest import export_run, file_record, update_manifest
from dms_lightning.export.parity import ParityError, ParityResult, check_runtime_parity
from dms_lightning.export.qdq import fake_quant_disabled
from dms_lightning.export.metadata import onnx_metadata
from dms_lightning.export.source import CHECKPOINT_CHOICES, export_source, model_preprocessing, sample_images
from dms_lightning.utils.io import atomic_path, ensure_writable_dir

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
LAYOUTS = ("NCHW", "NHWC")
INSTALL_HINT = 'pip install "dms_lightning[tflite]" (litert-torch, ai-edge-litert)'


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

    model = schema.ModelT.InitFromPackedBuf(buffer, 0)
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


def export_tflite(model: nn.Module, example_input: torch.Tensor, path: str | Path, *, precision: str = "fp32",
                  layout: str = "NCHW", metadata: dict[str, str] | None = None) -> Path:
    """Convert ``model`` (float, eval) to a .tflite file at ``path`` atomically; batch size of ``example_input``.

    ``precision="fp16"`` stores the weights in float16; ``layout="NHWC"`` makes the input channels-last
    (``example_input`` stays NCHW). ``metadata`` goes into the file's named metadata.

    Example:
        >>> export_tflite(net, torch.zeros(1, 1, 96, 96), "student_fp32.tflite", layout="NHWC")  # doctest: +SKIP
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS}")
    _require_tflite()
    import litert_torch

    was_training = model.training
    network = model.cpu().float().eval()
    example = example_input.detach().cpu().float()
    if layout == "NHWC":
        network, example = _ChannelsLast(network).eval(), example.permute(0, 2, 3, 1).contiguous()
    path = Path(path)
    try:
        with atomic_path(path) as tmp, tempfile.TemporaryDirectory() as work, torch.no_grad():
            float_file = Path(work) / "float.tflite"
            litert_torch.convert(network, (example,)).export(str(float_file))
            if precision == "fp16":
                half_file = Path(work) / "half.tflite"
                _float16_weights(float_file, half_file)
                float_file = half_file
            props = {**(metadata or {}), "layout": layout, "precision": precision}
            tmp.write_bytes(add_tflite_metadata(float_file.read_bytes(), props))
    finally:
        model.train(was_training)
    return path


def tflite_outputs(path: str | Path, inputs: np.ndarray, threads: int = 1) -> np.ndarray:
    """Logits of the .tflite file for NCHW float ``inputs`` (transposed when the file takes NHWC)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    feed, fetch = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    inputs = np.asarray(inputs, dtype=np.float32)
    if read_tflite_metadata(path).get("layout") == "NHWC":
        inputs = inputs.transpose(0, 2, 3, 1)
    step = int(feed["shape"][0]) or 1
    outputs = []
    for start in range(0, len(inputs), step):
        chunk = np.ascontiguousarray(inputs[start:start + step])
        if len(chunk) < step:  # a static batch: pad the last chunk, keep its own rows
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
        interpreter.set_tensor(feed["index"], chunk.astype(feed["dtype"]))
        interpreter.invoke()
        outputs.append(np.array(interpreter.get_tensor(fetch["index"]), dtype=np.float32)[:len(inputs) - start])
    return np.concatenate(outputs)[:len(inputs)]


def check_tflite_parity(model: nn.Module, path: str | Path, inputs: torch.Tensor | np.ndarray, *,
                        atol: float | None, min_top1_agreement: float, raise_on_failure: bool = True
                        ) -> tuple[ParityResult, np.ndarray, np.ndarray]:
    """Compare the .tflite file (LiteRT interpreter) with the PyTorch ``model`` on NCHW ``inputs``."""
    return check_runtime_parity(model, tflite_outputs, path, inputs, atol=atol, min_top1_agreement=min_top1_agreement,
                                runtime="litert", label="TFLite export", raise_on_failure=raise_on_failure)


def _float_network(model: nn.Module) -> nn.Module:
    """The float network of a QAT model (its fake-quant wrappers hold data-dependent Python branches that
    ``torch.export`` cannot trace), else ``model``: these files are the float variants."""
    from dms_lightning.quant import float_model, is_quantized

    if not is_quantized(model):
        return model
    network = float_model(model)
    if network is None:
        raise RuntimeError("TFLiteExport: the quantized network does not reference its float network; "
                           "export it before quantization-aware training starts")
    return network


# FP32 must match PyTorch closely (the bar); FP16 weights move logits by a few half-precision steps.
DEFAULT_ATOL = {"fp32": 1e-4, "fp16": 5e-2}


class TFLiteExport(FitEndExporter):
    """Write LiteRT / TFLite files of the trained network when ``fit`` ends, each checked in the LiteRT interpreter.

    On rank zero, after ``fit``: the compression target with the ``checkpoint`` weights (fake
    quantization bypassed: these are float files) becomes ``<name>_<precision>.tflite`` for each of
    ``precisions`` (batch 1, ``layout`` input), with the class names and preprocessing in its metadata.
    Each file is compared with PyTorch on ``parity_images`` validation images: FP32 within ``atol``
    (default 1e-4), FP16 within 5e-2, top-1 agreement at least ``min_top1_agreement``; a file over
    tolerance raises :class:`~dms_lightning.export.parity.ParityError` and is not left behind. Entries
    go into ``manifest.json`` of ``dirpath``. Needs the ``[tflite]`` extra (checked in ``__init__``).

    Args:
        dirpath: output directory; default ``<log_dir>/export``.
        name: file prefix.
        checkpoint: ``"best"`` or ``"last"`` weights.
        precisions: ``fp32`` and / or ``fp16``.
        layout: ``NCHW`` or ``NHWC`` input.
        parity_images: validation images for the parity check.
        atol: FP32 tolerance (FP16 uses 5e-2).
        min_top1_agreement: minimum top-1 agreement with PyTorch.

    Example:
        >>> trainer = Trainer(callbacks=[TFLiteExport(name="student", layout="NHWC")])  # doctest: +SKIP
    """

    def __init__(self, dirpath: str | None = None, name: str = "model", checkpoint: str = "best",
                 precisions: tuple[str, ...] | list[str] = PRECISIONS, layout: str = "NCHW",
                 parity_images: int = 64, atol: float = DEFAULT_ATOL["fp32"],
                 min_top1_agreement: float = 0.99) -> None:
        super().__init__()
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise ValueError(f"TFLiteExport.name={name!r} must be a plain file-name prefix such as 'student'")
        if checkpoint not in CHECKPOINT_CHOICES:
            raise ValueError(f"TFLiteExport.checkpoint={checkpoint!r} must be one of {CHECKPOINT_CHOICES}")
        if isinstance(precisions, str) or not precisions or any(p not in PRECISIONS for p in precisions):
            raise ValueError(f"TFLiteExport.precisions={precisions!r} must be a non-empty list of {list(PRECISIONS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"TFLiteExport.layout={layout!r} must be one of {LAYOUTS}")
        if not isinstance(parity_images, int) or parity_images < 1:
            raise ValueError(f"TFLiteExport.parity_images={parity_images!r} must be a positive integer")
        if not atol > 0:
            raise ValueError(f"TFLiteExport.atol={atol!r} must be positive")
        if not 0.0 <= min_top1_agreement <= 1.0:
            raise ValueError(f"TFLiteExport.min_top1_agreement={min_top1_agreement!r} must be in [0, 1]")
        _require_tflite("TFLiteExport")
        self.dirpath, self.name, self.checkpoint = dirpath, name, checkpoint
        self.precisions, self.layout = tuple(precisions), layout
        self.parity_images, self.atol, self.min_top1_agreement = parity_images, atol, min_top1_agreement
        self.exported: dict[str, Path] = {}

    def export(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Path]:
        """Convert, check and record each precision; returns ``{variant: path}``."""
        from dms_lightning.export.callbacks import default_export_dir

        directory = ensure_writable_dir(self.dirpath or default_export_dir(trainer), "TFLiteExport.dirpath")
        source = export_source(trainer, pl_module, self.checkpoint)
        network = _float_network(source.model)
        images = sample_images(trainer, self.parity_images, "val")
        info = model_preprocessing(trainer, pl_module, images[:1])
        exported = {}
        for precision in self.precisions:
            variant = f"{self.name}_{precision}_tflite"
            path = directory / f"{self.name}_{precision}.tflite"
            atol = self.atol if precision == "fp32" else DEFAULT_ATOL["fp16"]
            with fake_quant_disabled(), atomic_path(path) as tmp:
                export_tflite(network, images[:1], tmp, precision=precision, layout=self.layout,
                              metadata=onnx_metadata(info, variant=variant, precision=precision,
                                                      source=source.origin))
                result, _, _ = check_tflite_parity(network, tmp, images, atol=atol,
                                                   min_top1_agreement=self.min_top1_agreement, raise_on_failure=False)
                if not result.passed:
                    raise ParityError(f"TFLiteExport: {variant} failed the parity check, not written: "
                                      f"{result.describe()}")
            update_manifest(directory, [{**file_record(path, directory), "name": variant, "format": "tflite",
                                         "precision": precision, "layout": self.layout, "producer": "TFLiteExport",
                                         "source": source.origin, "parity": result.to_dict(),
                                         "metadata": read_tflite_metadata(path)}], run=export_run(trainer))
            rank_zero_info(f"[dms_lightning] TFLiteExport: {variant}: {result.describe()}")
            exported[variant] = path
        self.exported = exported
        return exported
