"""Optional graph simplification with onnxslim or onnxsim, whichever is installed (neither is required)."""

from __future__ import annotations

import importlib.util
import logging

import onnx

log = logging.getLogger(__name__)


def available_simplifier() -> str | None:
    """``"onnxslim"``, ``"onnxsim"`` or ``None``: the first simplifier that can be imported."""
    for name in ("onnxslim", "onnxsim"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def simplify_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold and clean ``model`` with onnxslim / onnxsim; return it unchanged when neither is installed.

    The simplified graph is kept only when it has no more nodes than the original: the TorchScript
    exporter already folds constants, so on our classifiers this mostly removes leftover Identity and
    shape-arithmetic nodes that some NPU converters reject. A simplifier crash is logged and ignored: the
    unsimplified graph is valid and the parity check runs on whatever is kept.
    """
    tool = available_simplifier()
    if tool is None:
        log.info("[dms_lightning] graph simplification skipped: neither onnxslim nor onnxsim is installed")
        return model
    try:
        if tool == "onnxslim":
            import onnxslim

            simplified = onnxslim.slim(model)
        else:
            import onnxsim

            simplified, ok = onnxsim.simplify(model)
            if not ok:
                raise RuntimeError("onnxsim could not validate the simplified model")
    except Exception as err:  # noqa: BLE001 - optional step; the original graph is kept
        log.warning("[dms_lightning] %s failed (%s); keeping the unsimplified graph", tool, err)
        return model
    if len(simplified.graph.node) > len(model.graph.node):
        return model
    del simplified.metadata_props[:]
    simplified.metadata_props.extend(model.metadata_props)
    return simplified
