"""TritonExport: a Triton Inference Server model repository: ``<repo>/<model>/1/model.onnx`` and ``config.pbtxt`` per variant.

The configuration is read off the ONNX graph itself (input / output names, element types, dimensions,
whether the batch axis is dynamic) so it cannot drift from the file it serves, and is written in the
protobuf text format of Triton's ``ModelConfig`` (``model_config.proto``): the ``onnxruntime_onnx``
platform, ``max_batch_size``, ``dynamic_batching`` (preferred batch sizes, maximum queue delay) and
``instance_group``. The class names become ``labels.txt`` (Triton's classification extension returns
them with ``class_count``), the preprocessing of the ONNX metadata a ``parameters`` entry.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import onnx
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dms_lightning.export.fit_end import FitEndExporter
from dms_lightning.export.manifest import directory_record, export_run, update_manifest
from dms_lightning.utils.artifacts import variants
from dms_lightning.utils.io import atomic_path

PLATFORM = "onnxruntime_onnx"
INSTANCE_KINDS = ("KIND_AUTO", "KIND_CPU", "KIND_GPU")
CONFIG = "config.pbtxt"
LABELS = "labels.txt"
# ONNX element type -> Triton DataType (model_config.proto).
TRITON_DTYPES = {
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.UINT8: "TYPE_UINT8", onnx.TensorProto.UINT16: "TYPE_UINT16",
    onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64", onnx.TensorProto.INT8: "TYPE_INT8",
    onnx.TensorProto.INT16: "TYPE_INT16", onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.STRING: "TYPE_STRING",
}
# Triton model names are directory names in the repository and appear in request URLs.
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class TritonSettings:
    """How Triton serves each model of the repository.

    Attributes:
        max_batch_size: largest batch the server forms (requests are batched along a dynamic first axis);
            0 disables batching (the model's own shapes are served as they are).
        dynamic_batching: let the server merge concurrent requests into one batch.
        preferred_batch_sizes: batch sizes the scheduler tries to form first (each ≤ ``max_batch_size``).
        max_queue_delay_microseconds: how long a request may wait for others to join its batch.
        instance_count: model instances (parallel executions) per device.
        instance_kind: ``KIND_CPU``, ``KIND_GPU`` or ``KIND_AUTO`` (GPU when the server has one).
    """

    max_batch_size: int = 32
    dynamic_batching: bool = True
    preferred_batch_sizes: Sequence[int] = field(default_factory=lambda: (4, 8, 16))
    max_queue_delay_microseconds: int = 500
    instance_count: int = 1
    instance_kind: str = "KIND_AUTO"

    def __post_init__(self) -> None:
        prefix = type(self).__name__
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 0:
            raise ValueError(f"{prefix}.max_batch_size={self.max_batch_size!r} must be an integer >= 0")
        sizes = list(self.preferred_batch_sizes)
        if any(not isinstance(s, int) or s < 1 or s > max(self.max_batch_size, 1) for s in sizes):
            raise ValueError(f"{prefix}.preferred_batch_sizes={sizes!r} must be positive integers <= "
                             f"max_batch_size={self.max_batch_size}")
        self.preferred_batch_sizes = tuple(sorted(set(sizes)))
        if not isinstance(self.max_queue_delay_microseconds, int) or self.max_queue_delay_microseconds < 0:
            raise ValueError(f"{prefix}.max_queue_delay_microseconds={self.max_queue_delay_microseconds!r} must be "
                             "an integer >= 0")
        if not isinstance(self.instance_count, int) or self.instance_count < 1:
            raise ValueError(f"{prefix}.instance_count={self.instance_count!r} must be a positive integer")
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"{prefix}.instance_kind={self.instance_kind!r} must be one of {INSTANCE_KINDS}")


def check_model_name(field_name: str, name: str) -> None:
    """Refuse a Triton model name that is not a plain directory name."""
    if not isinstance(name, str) or not _MODEL_NAME.fullmatch(name):
        raise ValueError(f"{field_name}={name!r} must be a plain model name of letters, digits and '_.-' "
                         "(it is a directory of the model repository)")


def _tensor_spec(value: onnx.ValueInfoProto, batched: bool) -> tuple[str, list[int]]:
    tensor = value.type.tensor_type
    if tensor.elem_type not in TRITON_DTYPES:
        raise ValueError(f"ONNX tensor {value.name!r} has element type "
                         f"{onnx.TensorProto.DataType.Name(tensor.elem_type)}, which Triton cannot serve")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return TRITON_DTYPES[tensor.elem_type], dims[1:] if batched else dims


def _batch_is_dynamic(model: onnx.ModelProto) -> bool:
    values = [*model.graph.input, *model.graph.output]
    return all(v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
               for v in values)


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [v for v in model.graph.input if v.name not in initializers]


def _quote(text: str) -> str:
    return json.dumps(text)  # a protobuf text-format string literal: double quotes, backslash escapes


def triton_config_text(model: str | Path | onnx.ModelProto, name: str, settings: TritonSettings | None = None, *,
                       labels: bool = False) -> str:
    """The ``config.pbtxt`` of ``model`` served as ``name`` (protobuf text format of Triton's ModelConfig).

    A model whose batch axis is static is served with ``max_batch_size: 0`` and its full shapes (no
    dynamic batching), whatever ``settings`` ask. ``labels=True`` points the first output at ``labels.txt``.

    Example:
        >>> import torch, tempfile, os
        >>> from dms_lightning.export import export_onnx
        >>> path = export_onnx(torch.nn.Linear(4, 2), torch.zeros(1, 4), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> print(triton_config_text(path, "m").splitlines()[2])
        max_batch_size: 32
    """
    check_model_name("name", name)
    settings = settings or TritonSettings()
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    batched = settings.max_batch_size > 0 and _batch_is_dynamic(proto)
    lines = [f"name: {_quote(name)}", f"platform: {_quote(PLATFORM)}",
             f"max_batch_size: {settings.max_batch_size if batched else 0}"]
    layout = {p.key: p.value for p in proto.metadata_props}.get("layout", "")
    for section, values in (("input", _graph_inputs(proto)), ("output", list(proto.graph.output))):
        lines.append(f"{section} [")
        for index, value in enumerate(values):
            dtype, dims = _tensor_spec(value, batched)
            lines += ["  {", f"    name: {_quote(value.name)}", f"    data_type: {dtype}"]
            if section == "input" and layout in ("NCHW", "NHWC") and len(dims) == 3:
                lines.append(f"    format: FORMAT_{layout}")
            lines.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
            if section == "output" and labels and index == 0:
                lines.append(f"    label_filename: {_quote(LABELS)}")
            lines.append("  }" + ("," if index < len(values) - 1 else ""))
        lines.append("]")
    if batched and settings.dynamic_batching:
        lines += ["dynamic_batching {",
                  f"  preferred_batch_size: [ {', '.join(str(s) for s in settings.preferred_batch_sizes)} ]",
                  f"  max_queue_delay_microseconds: {settings.max_queue_delay_microseconds}", "}"]
    lines += ["instance_group [", "  {", f"    count: {settings.instance_count}", f"    kind: {settings.instance_kind}",
              "  }", "]"]
    metadata = {p.key: p.value for p in proto.metadata_props}
    for key in ("preprocessing", "precision"):
        if key in metadata:
            lines += ["parameters {", f"  key: {_quote(key)}", f"  value: {{ string_value: {_quote(metadata[key])} }}",
                      "}"]
    return "\n".join(lines) + "\n"


def _class_names(model: onnx.ModelProto) -> list[str]:
    raw = {p.key: p.value for p in model.metadata_props}.get("class_names")
    try:
        names = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        names = raw.split(",")
    return [str(n) for n in names] if isinstance(names, list) else []


def write_triton_model(onnx_path: str | Path, repository: str | Path, name: str,
                       settings: TritonSettings | None = None, version: int = 1) -> Path:
    """Write ``<repository>/<name>/{<version>/model.onnx, config.pbtxt, labels.txt}`` atomically; return the folder."""
    check_model_name("name", name)
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"version={version!r} must be a positive integer (Triton's version folders start at 1)")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"onnx_path={str(onnx_path)!r} does not exist")
    proto = onnx.load(str(onnx_path), load_external_data=False)
    classes = _class_names(proto)
    target = Path(repository) / name
    with atomic_path(target) as tmp:
        (tmp / str(version)).mkdir(parents=True)
        shutil.copyfile(onnx_path, tmp / str(version) / "model.onnx")
        (tmp / CONFIG).write_text(triton_config_text(proto, name, settings, labels=bool(classes)))
        if classes:
            (tmp / LABELS).write_text("\n".join(classes) + "\n")
    return target


def write_triton_repository(models: Mapping[str, str | Path], repository: str | Path,
                            settings: TritonSettings | None = None) -> dict[str, Path]:
    """One Triton model per ``{model name: ONNX path}`` under ``repository``; returns ``{name: model folder}``.

    Example:
        >>> write_triton_repository({"student_fp32": "export/student_fp32.onnx"}, "triton")  # doctest: +SKIP
    """
    if not models:
        raise ValueError("models={} is empty: give at least one {model name: ONNX path}")
    Path(repository).mkdir(parents=True, exist_ok=True)
    return {name: write_triton_model(path, repository, name, settings) for name, path in models.items()}


def parse_triton_config(path: str | Path):
    """``config.pbtxt`` parsed with Triton's own ``ModelConfig`` protobuf (needs ``tritonclient``)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


class TritonExport(FitEndExporter):
    """Serve the run's exported variants with Triton: a model repository written when ``fit`` ends.

    On rank zero, after ``fit``, every ONNX variant registered by the exporters before it
    (:class:`~dms_lightning.callbacks.ONNXExport`'s FP32 / FP16 / INT8 files, PTQ's INT8 model) whose
    precision is in ``precisions`` becomes ``<dirpath>/<variant>/1/model.onnx`` with its
    ``config.pbtxt`` (read off the ONNX graph: names, dtypes, dims, ``max_batch_size``,
    ``dynamic_batching``, ``instance_group``) and ``labels.txt``. The repository is written beside its
    final place and renamed when complete, and recorded in the ``manifest.json`` of its parent folder.
    Start a server with ``tritonserver --model-repository=<dirpath>``. Put it after the exporters in the
    callback list.

    Args:
        dirpath: repository directory; default ``<log_dir>/export/triton``.
        precisions: precisions of the registered variants to serve.
        max_batch_size / dynamic_batching / preferred_batch_sizes / max_queue_delay_microseconds /
            instance_count / instance_kind: the serving settings (:class:`TritonSettings`).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from dms_lightning.callbacks import ONNXExport
        >>> trainer = Trainer(callbacks=[ONNXExport(export_fp16=True), TritonExport(max_batch_size=16)])  # doctest: +SKIP
    """

    traces_network: ClassVar[bool] = False  # it reads the ONNX files ONNXExport wrote

    #: ``dirpath`` is the folder written (it appears complete); its parent must be writable.
    dirpath_is_artifact: ClassVar[bool] = True

    def __init__(
        self,
        dirpath: str | None = None,
        precisions: Sequence[str] = ("fp32", "fp16", "int8"),
        max_batch_size: int = 32,
        dynamic_batching: bool = True,
        preferred_batch_sizes: Sequence[int] = (4, 8, 16),
        max_queue_delay_microseconds: int = 500,
        instance_count: int = 1,
        instance_kind: str = "KIND_AUTO",
    ) -> None:
        super().__init__()
        if isinstance(precisions, str) or not precisions or not all(isinstance(p, str) and p for p in precisions):
            raise ValueError(f"TritonExport.precisions={precisions!r} must be a non-empty list such as "
                             "['fp32', 'fp16', 'int8']")
        try:
            self.settings = TritonSettings(max_batch_size, dynamic_batching, tuple(preferred_batch_sizes),
                                           max_queue_delay_microseconds, instance_count, instance_kind)
        except ValueError as err:
            raise ValueError(str(err).replace("TritonSettings.", "TritonExport.")) from None
        self.dirpath = dirpath
        self.precisions = tuple(precisions)
        self.written: dict[str, Path] = {}

    def export(self, trainer: Trainer, pl_module: LightningModule | None = None) -> dict[str, Path]:
        """Write the repository from the variants registered on ``trainer``; returns ``{model: folder}``."""
        from dms_lightning.export.callbacks import default_export_dir

        models = {v.name: Path(v.onnx_path) for v in variants(trainer)
                  if v.precision in self.precisions and Path(v.onnx_path).suffix == ".onnx"
                  and Path(v.onnx_path).is_file()}
        if not models:
            rank_zero_warn(f"[dms_lightning] TritonExport: no exported ONNX variant with a precision in "
                           f"{list(self.precisions)} was registered (put ONNXExport before TritonExport): "
                           "no repository written")
            return {}
        repository = Path(self.dirpath) if self.dirpath else default_export_dir(trainer) / "triton"
        with atomic_path(repository) as tmp:
            written = write_triton_repository(models, tmp, self.settings)
        self.written = {name: repository / folder.name for name, folder in written.items()}
        update_manifest(repository.parent, [directory_record(
            repository, repository.parent, name="triton_repository", producer="TritonExport",
            models=sorted(self.written), settings={k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in vars(self.settings).items()})], run=export_run(trainer))
        rank_zero_info(f"[dms_lightning] TritonExport wrote {len(self.written)} models to {repository} "
                       f"(tritonserver --model-repository={repository})")
        return self.written
