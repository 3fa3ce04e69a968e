"""export_onnx: one function that turns any classifier (FP32, pruned, fake-quant) into an ONNX file."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from dms_lightning.utils.io import atomic_path

DEFAULT_OPSET = 18


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
) -> Path:
    """Export ``model`` to ``path`` atomically and return the path.

    Fake-quantized layers (``torch.fake_quantize_per_*_affine``) become QuantizeLinear/DequantizeLinear
    pairs, so a QAT model exports as an INT8 QDQ graph. ``exporter="torchscript"`` (default) is the
    fast tracing exporter; ``"dynamo"`` uses ``torch.export``.

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
        raise ValueError(f"opset={opset} is too old: per-channel QuantizeLinear needs opset >= 13 (default {DEFAULT_OPSET})")
    path = Path(path)
    was_training = model.training
    model.eval()
    example_input = example_input.detach().to(next(model.parameters()).device)
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tmp_file = tmp.with_suffix(".onnx")
            if exporter == "dynamo":
                shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
                torch.onnx.export(model, (example_input,), str(tmp_file), dynamo=True, opset_version=opset,
                                  input_names=[input_name], output_names=[output_name], dynamic_shapes=shapes,
                                  verbose=False)
            else:
                axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(model, (example_input,), str(tmp_file), dynamo=False, opset_version=opset,
                                  input_names=[input_name], output_names=[output_name], dynamic_axes=axes)
            proto = onnx.load(str(tmp_file))
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = str(key), str(value)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
            tmp_file.unlink(missing_ok=True)
            for extra in tmp.parent.glob(tmp_file.name + "*"):
                extra.unlink()
    finally:
        model.train(was_training)
    return path
