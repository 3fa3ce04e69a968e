"""Run a classifier in ONNX Runtime or PyTorch over a dataloader: accuracy and top-1 agreement."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn


def ort_session(onnx_path: str | Path, threads: int | None = None, fuse_qdq: bool = True):
    """A CPU ONNX Runtime session with all graph optimisations enabled.

    ``fuse_qdq=False`` keeps QuantizeLinear/DequantizeLinear pairs as float ops (the QDQ graph's exact
    semantics, what an NPU converter reads) instead of ORT's fused integer kernels (QLinearConv ...),
    whose u8s8 arithmetic on x86 CPUs without VNNI can flip near-tied predictions.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not fuse_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_predictions(session, batches: Iterable, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of ``session`` over ``(images, labels, ...)`` batches (first ``limit`` batches)."""
    name = session.get_inputs()[0].name
    logits, labels = [], []
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        logits.append(session.run(None, {name: batch[0].numpy().astype(np.float32)})[0])
        labels.append(batch[1].numpy())
    return np.concatenate(logits), np.concatenate(labels)


@torch.no_grad()
def torch_predictions(model: nn.Module, batches: Iterable, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(logits, labels)`` of ``model`` in eval mode (its train/eval mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    try:
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            logits.append(model(batch[0].to(device)).float().cpu().numpy())
            labels.append(batch[1].numpy())
    finally:
        model.train(was_training)
    return np.concatenate(logits), np.concatenate(labels)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of samples on which two models predict the same class."""
    return float((a.argmax(axis=1) == b.argmax(axis=1)).mean())
