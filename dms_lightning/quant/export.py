"""The fit-end step QAT shares with PTQ: INT8 ONNX + encodings, ONNX Runtime parity, variant registration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from dms_lightning.quant.encodings import write_encodings_for_onnx
from dms_lightning.quant.evaluate import accuracy, ort_predictions, ort_session, top1_agreement, torch_predictions
from dms_lightning.quant.onnx_qdq import export_qdq_onnx
from dms_lightning.utils.artifacts import register_variant
from dms_lightning.utils.io import ensure_writable_dir


def split_loader(trainer, split: str):
    """The ``split`` dataloader of ``trainer.datamodule`` (``None`` without a data module)."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        return None
    return datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()


def model_metadata(trainer) -> dict[str, str]:
    datamodule = getattr(trainer, "datamodule", None)
    preprocessing = getattr(datamodule, "preprocessing", None)
    return {"dms_lightning.preprocessing": json.dumps(preprocessing)} if preprocessing else {}


def log_scalars(trainer, name: str, values: dict[str, float]) -> None:
    """``quant/<name>/<key>`` scalars to every logger (TensorBoard), at the current global step."""
    if not values or not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        logger.log_metrics({f"quant/{name}/{key}": float(value) for key, value in values.items()},
                           step=trainer.global_step)


def export_quantized_variant(trainer, model: nn.Module, example: torch.Tensor, dirpath: Path, filename: str,
                             producer: str, parity_split: str = "test", parity_batches: int | None = None,
                             min_agreement: float = 0.99, opset: int = 18, info: dict | None = None
                             ) -> dict[str, Any]:
    """Export a fake-quantized ``model``, write its encodings, check ORT parity, register the variant."""
    dirpath = ensure_writable_dir(dirpath, "dirpath")
    onnx_path = export_qdq_onnx(model, example, dirpath / f"{filename}.onnx", metadata=model_metadata(trainer),
                                opset=opset)
    encodings_path = write_encodings_for_onnx(onnx_path, dirpath / f"{filename}.encodings.json")
    result: dict[str, Any] = {"onnx_path": str(onnx_path), "encodings_path": str(encodings_path)}
    loader = split_loader(trainer, parity_split)
    if loader is not None:
        reference, labels = torch_predictions(model, loader, parity_batches)
        graph, _ = ort_predictions(ort_session(onnx_path, fuse_qdq=False), loader, parity_batches)
        fused, _ = ort_predictions(ort_session(onnx_path), loader, parity_batches)
        # Parity is judged on the QDQ graph's semantics (the file an NPU converter reads); ORT's fused CPU
        # integer kernels are reported beside it (their u8s8 arithmetic rounds differently on AVX2).
        result.update({"agreement": top1_agreement(reference, graph),
                       "agreement_fused_kernels": top1_agreement(reference, fused),
                       "onnx_accuracy": accuracy(fused, labels), "torch_accuracy": accuracy(reference, labels),
                       "parity_split": parity_split, "parity_samples": int(len(labels))})
        rank_zero_info(f"[{producer}] {onnx_path.name}: ONNX Runtime top-1 agreement with the fake-quant model "
                       f"{result['agreement']:.4f} (fused CPU kernels {result['agreement_fused_kernels']:.4f}), "
                       f"{parity_split} accuracy {result['onnx_accuracy']:.4f}")
        if result["agreement"] < min_agreement:
            rank_zero_warn(f"{producer}: ONNX Runtime agrees with the fake-quant model on only "
                           f"{result['agreement']:.2%} of the {parity_split} split (< min_agreement={min_agreement})")
    log_scalars(trainer, filename, {k: result[k] for k in ("agreement", "agreement_fused_kernels", "onnx_accuracy", "torch_accuracy")
                                    if k in result})
    register_variant(trainer, filename, onnx_path, precision="int8", producer=producer,
                     **{k: v for k, v in result.items() if k != "onnx_path"},
                     **(info or {}))
    return result
