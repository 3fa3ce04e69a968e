"""Automatic mixed precision: promote the fewest, most sensitive layers until the accuracy drop holds.

Uniform W8A8 loses accuracy on a few tensors (on MobileNets typically around the stem and the depthwise
convs). Hexagon HTP runs 16-bit activations beside 8-bit weights (W8A16) at a modest cost, so the usual fix is
to keep only those layers wider. :func:`select_mixed_precision` finds them:

1. uniform PTQ of the float network (:func:`~dms_lightning.quant.post_training_quantize`) and its accuracy on
   the evaluation data against the float network's;
2. each quantized layer's *recovery*: the accuracy (then the logits' SQNR against float) with that layer's
   activation quantizers passed through (for ``promote_to="float"`` its weight quantizer too) and every other
   one on. A 16-bit grid has 256 times finer steps than an 8-bit one, so passing through is a close stand-in
   for 16 bits, and it needs no re-calibration;
3. layers are promoted in order of recovery. The stand-in finds how many are needed; each candidate set is then
   quantized for real (a :class:`~dms_lightning.quant.QuantizationConfig` with ``precision`` overrides,
   calibrated again) and measured, adding layers until ``max_accuracy_drop_pt`` holds or ``max_promoted`` is
   reached.

The result names the promoted layers as ``precision`` overrides, usable in a config
(``PostTrainingQuantization(precision=...)``, ``QuantizationAwareTraining(precision=...)``) and as the
starting configuration of QAT. Selection data should be the validation split, never the test split.

Example:
    >>> import torchvision
    >>> net = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    >>> data = [(torch.randn(8, 3, 64, 64), torch.randint(0, 5, (8,)))]
    >>> result = select_mixed_precision(net, data, data, max_accuracy_drop_pt=100.0)
    >>> result.promoted, result.drop_pt <= 100.0
    ([], True)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import fx, nn

from dms_lightning.quant.calibration import calibration_inputs, post_training_quantize
from dms_lightning.quant.fake_quant import FakeQuantizer
from dms_lightning.quant.modules import QUANTIZED_LAYERS
from dms_lightning.quant.observers import CalibrationConfig
from dms_lightning.quant.prepare import ACTIVATION_QUANTIZERS, QuantizationConfig, fused_output
from dms_lightning.quant.sensitivity import _bypassed, _logits, _sqnr_db, labelled_batches
from dms_lightning.quant.spec import FLOAT

PROMOTIONS = ("w8a16", FLOAT)


@dataclass
class MixedPrecisionResult:
    """What :func:`select_mixed_precision` chose and measured (accuracies in ``[0, 1]``)."""

    promoted: list[str]
    promote_to: str
    quantized_layers: int
    float_accuracy: float
    uniform_accuracy: float
    accuracy: float
    max_accuracy_drop_pt: float
    #: Every layer's recovery, best first: ``{"layer", "accuracy", "sqnr_db"}`` with only it promoted.
    ranking: list[dict] = field(default_factory=list)
    #: Each real measurement: ``{"promoted": count, "accuracy"}``.
    trials: list[dict] = field(default_factory=list)
    images: int = 0
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def precision(self) -> dict[str, str]:
        """``precision`` overrides for a :class:`~dms_lightning.quant.QuantizationConfig`."""
        return {layer: self.promote_to for layer in self.promoted}

    @property
    def drop_pt(self) -> float:
        return 100.0 * (self.float_accuracy - self.accuracy)

    @property
    def met(self) -> bool:
        return self.drop_pt <= self.max_accuracy_drop_pt + 1e-9

    def to_dict(self) -> dict:
        return {"promoted": list(self.promoted), "promote_to": self.promote_to, "precision": self.precision,
                "quantized_layers": self.quantized_layers, "float_accuracy": self.float_accuracy,
                "uniform_accuracy": self.uniform_accuracy, "accuracy": self.accuracy, "drop_pt": self.drop_pt,
                "max_accuracy_drop_pt": self.max_accuracy_drop_pt, "met": self.met, "images": self.images,
                "ranking": self.ranking, "trials": self.trials}

    def to_markdown(self) -> str:
        share = len(self.promoted) / max(self.quantized_layers, 1)
        lines = [f"Float {100 * self.float_accuracy:.2f} %, uniform W8A8 {100 * self.uniform_accuracy:.2f} % "
                 f"({100 * (self.uniform_accuracy - self.float_accuracy):+.2f} pt), mixed "
                 f"{100 * self.accuracy:.2f} % ({-self.drop_pt:+.2f} pt; budget −{self.max_accuracy_drop_pt:g} pt, "
                 f"{'met' if self.met else '**not met**'}) with {len(self.promoted)} of {self.quantized_layers} "
                 f"layers ({100 * share:.0f} %) at {self.promote_to} ({self.images} images).\n"]
        if self.promoted:
            lines += ["| promoted layer | accuracy with only it promoted (%) | logit SQNR (dB) |", "|---|---:|---:|"]
            scores = {row["layer"]: row for row in self.ranking}
            for layer in self.promoted:
                row = scores.get(layer, {})
                lines.append(f"| `{layer}` | {100 * row.get('accuracy', float('nan')):.2f} | "
                             f"{row.get('sqnr_db', float('nan')):.1f} |")
        return "\n".join(lines) + "\n"


def check_selection_arguments(max_accuracy_drop_pt: float, promote_to: str) -> None:
    """Raise a ``ValueError`` naming the field for a budget that is not a number >= 0 or an unknown promotion."""
    if not isinstance(max_accuracy_drop_pt, (int, float)) or isinstance(max_accuracy_drop_pt, bool) \
            or max_accuracy_drop_pt < 0:
        raise ValueError(f"max_accuracy_drop_pt={max_accuracy_drop_pt!r} must be a number >= 0 (points of top-1)")
    if promote_to not in PROMOTIONS:
        raise ValueError(f"promote_to={promote_to!r} must be one of {list(PROMOTIONS)}")


def layer_quantizers(model: nn.Module, promote_to: str = "w8a16") -> dict[str, list[FakeQuantizer]]:
    """``{layer name: the quantizers promoting it changes}`` of a prepared network, in graph order.

    The activation quantizers on the layer's input and on its (fused) output; with ``promote_to="float"`` its
    weight quantizer too.
    """
    graphs = [m for m in model.modules() if isinstance(m, fx.GraphModule)]
    if not graphs:
        raise ValueError(f"{type(model).__name__} is not a prepared (fake-quantized) network")
    found: dict[str, list[FakeQuantizer]] = {}
    for graph_module in graphs:
        modules = dict(graph_module.named_modules())
        for node in graph_module.graph.nodes:
            if node.op != "call_module":
                continue
            layer = graph_module.get_submodule(str(node.target))
            if not isinstance(layer, QUANTIZED_LAYERS):
                continue
            quantizers = []
            neighbours = [a for a in node.args if isinstance(a, fx.Node)] + _output_quantizers(node, modules)
            for neighbour in neighbours:
                if neighbour.op == "call_module" and str(neighbour.target).startswith(f"{ACTIVATION_QUANTIZERS}."):
                    quantizers.append(graph_module.get_submodule(str(neighbour.target)))
            if promote_to == FLOAT:
                quantizers.append(layer.weight_quantizer)
            found[str(node.target)] = quantizers
    return found


def _output_quantizers(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The nodes reading the layer's output, after the ReLU the runtime fuses into it (where its quantizer sits)."""
    return list(fused_output(node, modules).users)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


def select_mixed_precision(
    model: nn.Module,
    calibration_data: Iterable,
    evaluation_data: Iterable,
    *,
    max_accuracy_drop_pt: float,
    config: QuantizationConfig | None = None,
    calibration: CalibrationConfig | None = None,
    promote_to: str = "w8a16",
    max_promoted: int | float | None = 0.2,
    calibration_batches: int | None = None,
    evaluation_batches: int | None = None,
) -> MixedPrecisionResult:
    """Quantize the float ``model`` with the fewest layers promoted to ``promote_to`` that keep the drop in budget.

    Args:
        model: a float, ``torch.fx``-traceable network (not modified).
        calibration_data: calibration batches (a DataLoader or tensors), as for ``post_training_quantize``.
        evaluation_data: labelled ``(images, labels, ...)`` batches the accuracy is measured on (validation).
        max_accuracy_drop_pt: allowed top-1 drop against the float network, in points.
        config: the uniform configuration (default W8A8); its own ``precision`` overrides are kept under the
            promotions.
        calibration: the range estimator (default ``minmax``).
        promote_to: ``"w8a16"`` (16-bit activations around the layer) or ``"float"``.
        max_promoted: most layers promoted, a count or a fraction of the quantized layers (``None``: all).
        calibration_batches, evaluation_batches: use only the first batches (``None``: all).

    Returns:
        A :class:`MixedPrecisionResult` whose ``model`` is the chosen fake-quant network (calibrated, eval
        mode). When the budget cannot be met within ``max_promoted``, the best set measured is returned
        with ``met`` false.
    """
    check_selection_arguments(max_accuracy_drop_pt, promote_to)
    config = config or QuantizationConfig()
    batches = calibration_inputs(calibration_data, calibration_batches)
    kept = labelled_batches(evaluation_data, evaluation_batches, "select_mixed_precision()")
    labels = torch.cat([label for _, label in kept])
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")

    uniform = post_training_quantize(model, batches, config, calibration)
    everything = [m for m in uniform.modules() if isinstance(m, FakeQuantizer)]
    with _bypassed(everything, set()):
        reference = _logits(uniform, kept, device)
    float_accuracy = _accuracy(reference, labels)
    uniform_logits = _logits(uniform, kept, device)
    uniform_accuracy = _accuracy(uniform_logits, labels)
    layers = layer_quantizers(uniform, promote_to)
    limit = len(layers) if max_promoted is None else (
        int(max_promoted * len(layers)) if isinstance(max_promoted, float) else int(max_promoted))

    def result(promoted: list[str], accuracy: float, network: nn.Module, ranking=(), trials=()):
        return MixedPrecisionResult(list(promoted), promote_to, len(layers), float_accuracy, uniform_accuracy,
                                    accuracy, float(max_accuracy_drop_pt), list(ranking), list(trials),
                                    images=len(labels), model=network)

    def within(accuracy: float) -> bool:
        return 100.0 * (float_accuracy - accuracy) <= max_accuracy_drop_pt + 1e-9

    if within(uniform_accuracy) or limit < 1:
        return result([], uniform_accuracy, uniform)

    all_ids = {id(q) for q in everything}
    ranking = []
    for layer, quantizers in layers.items():
        with _bypassed(everything, all_ids - {id(q) for q in quantizers}):
            logits = _logits(uniform, kept, device)
        ranking.append({"layer": layer, "accuracy": _accuracy(logits, labels), "sqnr_db": _sqnr_db(reference, logits)})
    ranking.sort(key=lambda row: (-row["accuracy"], -row["sqnr_db"]))
    order = [row["layer"] for row in ranking]

    # The stand-in (promoted quantizers passed through), cumulatively: how many layers it takes.
    needed, off = limit, set()
    for count, layer in enumerate(order[:limit], start=1):
        off |= {id(q) for q in layers[layer]}
        with _bypassed(everything, all_ids - off):
            if within(_accuracy(_logits(uniform, kept, device), labels)):
                needed = count
                break

    trials, best = [], None
    for count in range(needed, limit + 1):
        promoted = order[:count]
        overrides = replace(config, precision=tuple(config.precision) + tuple((name, promote_to) for name in promoted))
        network = post_training_quantize(model, batches, overrides, calibration)
        accuracy = _accuracy(_logits(network, kept, device), labels)
        trials.append({"promoted": count, "accuracy": accuracy})
        if best is None or accuracy > best[1]:
            best = (promoted, accuracy, network)
        if within(accuracy):
            best = (promoted, accuracy, network)
            break
    return result(best[0], best[1], best[2], ranking, trials)
