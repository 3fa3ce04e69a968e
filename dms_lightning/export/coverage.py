"""Operator coverage per deployment target: which ops of an exported graph a target cannot run, before converting.

Each target's published operator list is data in ``op_support/<target>.json`` (source, version, the
supported ONNX operators with their restrictions, what happens to an unsupported one). A converter
that meets an operator it lacks either stops (TensorRT, qnn-onnx-converter) or leaves it on the CPU
(ONNX Runtime's QNN execution provider, LiteRT delegates); this check says which, per operator and
node, for the file actually exported, and also checks the integer types and zero points of the
Q/DQ nodes against what the target quantizes to (TensorRT: signed INT8, zero point 0).

Example:
    >>> report = check_coverage("student_int8.onnx")  # doctest: +SKIP
    >>> report["tensorrt"].describe()  # doctest: +SKIP
    'TensorRT 10.0 (ONNX parser): every operator supported; ...'
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

TARGETS = ("qnn_htp", "tflite", "tensorrt")
# Graph plumbing that every converter folds away rather than maps to a kernel.
_STRUCTURAL = {"Constant", "Identity"}
_QDQ = ("QuantizeLinear", "DequantizeLinear")


@lru_cache(maxsize=None)
def op_support(target: str) -> dict:
    """The published operator list of ``target`` (``qnn_htp``, ``tflite`` or ``tensorrt``) as stored in the package."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r} must be one of {TARGETS}")
    text = resources.files("dms_lightning.export").joinpath("op_support", f"{target}.json").read_text()
    return json.loads(text)


@dataclass
class Coverage:
    """What ``target`` cannot run of one graph.

    Attributes:
        unsupported: ONNX operator -> names of the nodes using it.
        restrictions: the target's documented restrictions for operators the graph uses (not checked).
        quantization: problems of the Q/DQ nodes for this target (integer type, non-zero zero points).
        lowering: the target operators each ONNX operator becomes, where the data says (TFLite builtins).
    """

    target: str
    title: str
    version: str
    source: str
    fallback: str
    operators: dict[str, int]
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    restrictions: dict[str, str] = field(default_factory=dict)
    quantization: list[str] = field(default_factory=list)
    lowering: dict[str, str] = field(default_factory=dict)

    @property
    def supported(self) -> bool:
        return not self.unsupported and not self.quantization

    def describe(self) -> str:
        if self.supported:
            return f"{self.title}: every operator supported ({', '.join(sorted(self.operators))})"
        parts = [f"{op} ({len(nodes)} node{'s' * (len(nodes) > 1)}: {', '.join(nodes[:3])}"
                 f"{', ...' if len(nodes) > 3 else ''})" for op, nodes in sorted(self.unsupported.items())]
        problems = (["unsupported operators: " + "; ".join(parts)] if parts else []) + self.quantization
        return f"{self.title}: " + " | ".join(problems) + f". Then: {self.fallback}"

    def to_dict(self) -> dict:
        return {**asdict(self), "supported": self.supported}


def _graph_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _graph_nodes(sub)


def _quantization_problems(model: onnx.ModelProto, rules: dict) -> list[str]:
    """Q/DQ nodes whose integer type or zero point the target does not quantize with."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    wrong_type: Counter = Counter()
    nonzero: list[str] = []
    for node in model.graph.node:
        if node.op_type not in _QDQ:
            continue
        zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if zero_point is not None:
            dtype = zero_point.dtype.name
        elif node.op_type == "QuantizeLinear":
            dtype = "uint8"  # ONNX: without a zero point QuantizeLinear produces uint8 with zero point 0
        elif node.input[0] in constants:
            dtype = constants[node.input[0]].dtype.name
        else:
            continue
        if dtype not in rules["types"]:
            wrong_type[dtype] += 1
        if rules.get("zero_point_zero") and zero_point is not None and np.any(zero_point != 0):
            nonzero.append(node.name or node.output[0])
    facts = [f"{count} Q/DQ nodes quantize to {dtype}" for dtype, count in sorted(wrong_type.items())]
    if nonzero:
        facts.append(f"{len(nonzero)} have a non-zero zero point ({', '.join(nonzero[:3])}"
                     f"{', ...' if len(nonzero) > 3 else ''})")
    problems = [f"{', '.join(facts)}: {rules['why']}"] if facts else []
    return problems


def check_target(model: str | Path | onnx.ModelProto, target: str) -> Coverage:
    """The operators of ``model`` that ``target`` does not support, and its Q/DQ problems there."""
    data = op_support(target)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    counts: Counter = Counter()
    unsupported: dict[str, list[str]] = {}
    for node in _graph_nodes(proto.graph):
        if node.domain not in ("", "ai.onnx"):
            unsupported.setdefault(f"{node.domain}:{node.op_type}", []).append(node.name or node.output[0])
            continue
        counts[node.op_type] += 1
        if node.op_type not in data["supported"] and node.op_type not in _STRUCTURAL:
            unsupported.setdefault(node.op_type, []).append(node.name or node.output[0])
    restrictions = {op: data["supported"][op] for op in sorted(counts) if data["supported"].get(op)}
    quantization = _quantization_problems(proto, data["qdq"]) if counts.keys() & set(_QDQ) else []
    lowering = {op: data.get("lowering", {})[op] for op in sorted(counts) if op in data.get("lowering", {})}
    return Coverage(target, data["title"], data["version"], data["source"], data["fallback"], dict(counts),
                    unsupported, restrictions, quantization, lowering)


def coverage_summary(coverage: dict[str, Coverage]) -> dict:
    """A manifest-sized view: per target, whether it runs everything, else what not and what happens then."""
    summary = {}
    for target, result in coverage.items():
        entry: dict = {"supported": result.supported, "version": result.version}
        if not result.supported:
            entry.update(unsupported=result.unsupported, quantization=result.quantization, fallback=result.fallback)
        summary[target] = entry
    return summary


def check_coverage(model: str | Path | onnx.ModelProto, targets: tuple[str, ...] | list[str] = TARGETS
                   ) -> dict[str, Coverage]:
    """:func:`check_target` for every target in ``targets``: ``{target: Coverage}``."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False)
    return {target: check_target(proto, target) for target in targets}


def coverage_before_conversion(model: str | Path | onnx.ModelProto, label: str,
                               targets: tuple[str, ...] | list[str] = TARGETS) -> dict:
    """:func:`check_coverage` of ``model``, one warning per target that cannot run all of it, the summary back."""
    from lightning.pytorch.utilities import rank_zero_warn

    coverage = check_coverage(model, targets)
    for result in coverage.values():
        if not result.supported:
            rank_zero_warn(f"[dms_lightning] {label}: {result.describe()}")
    return coverage_summary(coverage)
