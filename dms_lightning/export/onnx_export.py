"""export_onnx: one function that turns any classifier (FP32, pruned, fake-quant) into an ONNX file."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from dms_lightning.utils.io import atomic_path

DEFAULT_OPSET = 18


class UnsupportedOperatorError(ValueError):
    """A layer of the model uses an operator the ONNX exporter cannot express at the chosen opset."""


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    input_name: str = "input",
    output_name: str = "logits",
    metadata: dict[str, str] | None = None,
    exporter: str = "torchscript",
    simplify: bool = False,
    distinct_initializers: bool = False,
) -> Path:
    """Export ``model`` to ``path`` atomically and return the path.

    Fake-quantized layers (``torch.fake_quantize_per_*_affine``) become QuantizeLinear/DequantizeLinear
    pairs (``dms_lightning.export.qdq.export_qdq_onnx`` also stores their weights as integers). ``exporter="torchscript"`` (default) is the
    fast tracing exporter; ``"dynamo"`` uses ``torch.export``. ``metadata`` lands in the model's
    ``metadata_props``; ``simplify=True`` runs onnxslim / onnxsim when one is installed (else nothing).
    ``distinct_initializers=True`` (TorchScript exporter) keeps every parameter and buffer as its own
    initializer named by its module path, even when two hold equal values (the exporter otherwise merges
    them): the QDQ export traces each weight to its layer through these names.
    The graph passes ``onnx.checker`` before it is renamed onto ``path``; an operator the exporter cannot
    express at ``opset`` raises :class:`UnsupportedOperatorError` naming the operator and the layer.

    Example:
        >>> import torchvision, tempfile, os
        >>> net = torchvision.models.mobilenet_v3_small(num_classes=5)
        >>> out = export_onnx(net, torch.zeros(1, 3, 64, 64), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> out.name
        'm.onnx'
    """
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter={exporter!r} must be 'torchscript' or 'dynamo'")
    if opset < 13:
        raise ValueError(f"opset={opset} is too old: per-channel QuantizeLinear needs opset >= 13 "
                         f"(default {DEFAULT_OPSET})")
    path = Path(path)
    was_training = model.training
    model.eval()
    example_input = example_input.detach().to(next(model.parameters()).device)
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tmp_file = tmp.with_suffix(".onnx")
            try:
                _export(model, example_input, tmp_file, exporter, opset, dynamic_batch, input_name, output_name,
                        distinct_initializers)
                proto = onnx.load(str(tmp_file))
                if distinct_initializers:
                    _drop_initializer_inputs(proto)
            finally:
                # The exporter writes beside the temporary (plus external-data files): never leave them.
                tmp_file.unlink(missing_ok=True)
                for extra in tmp.parent.glob(tmp_file.name + "*"):
                    extra.unlink()
            if simplify:
                from dms_lightning.export.simplify import simplify_model

                proto = simplify_model(proto)
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(key), str(value)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    finally:
        model.train(was_training)
    return path


def _drop_initializer_inputs(proto: onnx.ModelProto) -> None:
    """Remove the graph inputs that only expose initializers (what ``keep_initializers_as_inputs`` adds)."""
    initializers = {init.name for init in proto.graph.initializer}
    kept = [value for value in proto.graph.input if value.name not in initializers]
    del proto.graph.input[:]
    proto.graph.input.extend(kept)


def _export(model: nn.Module, example_input: torch.Tensor, file: Path, exporter: str, opset: int,
            dynamic_batch: bool, input_name: str, output_name: str, distinct_initializers: bool = False) -> None:
    try:
        if exporter == "dynamo":
            shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
            torch.onnx.export(model, (example_input,), str(file), dynamo=True, opset_version=opset,
                              input_names=[input_name], output_names=[output_name], dynamic_shapes=shapes,
                              verbose=False)
        else:
            axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
            # keep_initializers_as_inputs skips the exporter's merging of equal initializers (the extra inputs
            # are dropped again by the caller).
            torch.onnx.export(model, (example_input,), str(file), dynamo=False, opset_version=opset,
                              input_names=[input_name], output_names=[output_name], dynamic_axes=axes,
                              keep_initializers_as_inputs=distinct_initializers)
    except torch.onnx.errors.UnsupportedOperatorError as err:
        raise _explain_unsupported(model, example_input, opset, err) from err


def _explain_unsupported(model: nn.Module, example_input: torch.Tensor, opset: int,
                         err: Exception) -> UnsupportedOperatorError:
    """Name the operator and the layer (module path and class) that the exporter refused."""
    message = str(err)
    match = re.search(r"operator '([\w:.]+)'", message)
    operator = match.group(1) if match else "unknown operator"
    layers = _layers_using(model, example_input, operator) if match else []
    where = ", ".join(f"{name} ({type(model.get_submodule(name)).__name__})" if name else
                      f"the top-level forward of {type(model).__name__}" for name in layers) or "an unknown layer"
    hint = re.search(r"added in version (\d+)", message)
    advice = (f"export with opset >= {hint.group(1)}" if hint else
              "replace the layer with ONNX-exportable operations or register a custom symbolic")
    return UnsupportedOperatorError(
        f"{operator} used by {where} cannot be exported to ONNX opset {opset}: {advice}. "
        f"(exporter said: {message.splitlines()[0]})")


def _layers_using(model: nn.Module, example_input: torch.Tensor, operator: str) -> list[str]:
    """Module paths whose forward calls ``operator`` (an ``aten::`` name), from a TorchScript trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, (example_input,), check_trace=False)
    except Exception:  # noqa: BLE001 - locating the layer is best effort; the export error is what matters
        return []
    names: list[str] = []
    for node in traced.inlined_graph.nodes():
        if node.kind() != operator:
            continue
        # scopeName is "__module.a/__module.a.b": the innermost module comes last.
        scope = node.scopeName().split("/")[-1].removeprefix("__module").lstrip(".")
        if scope not in names:
            names.append(scope)
    return names

