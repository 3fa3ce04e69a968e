"""Measuring deployable ONNX models: size, parameters, MACs, ONNX Runtime latency, throughput and accuracy.

Every number is recomputed from the ONNX file itself and measured in ONNX Runtime on the CPU, the way a
deployment engineer would check it, never taken from the PyTorch model that produced the file:

* **size**: bytes on disk (with any external-data files);
* **parameters / MACs**: from the graph (see :mod:`dms_lightning.report.graph`);
* **latency**: batch 1, after warm-up, with a fixed intra-op thread count; p50 / p90 / p99 in ms;
* **throughput**: images per second at a larger batch (a graph with a static batch of 1 is measured at
  batch 1, and the row says so);
* **accuracy / macro-F1**: ONNX Runtime outputs on a test dataloader.

:func:`build_report` measures several variants and expresses each against a baseline (× smaller,
× faster, accuracy delta in points).

Example:
    >>> from dms_lightning.report import MeasureSettings, measure_onnx  # doctest: +SKIP
    >>> row = measure_onnx("student_int8.onnx", dm.test_dataloader(), settings=MeasureSettings(threads=1))
    >>> row.latency_ms_p50, row.accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from dms_lightning.export.runtimes import EXACT_INT8_PRODUCTS, exact_int8_products_needed, ort_session_options
from dms_lightning.report.graph import count_onnx_macs, count_parameters, detect_precision, quantized_weight_fraction
from dms_lightning.report.machine import machine_info
from dms_lightning.utils.artifacts import Variant
from dms_lightning.utils.predictions import batch_images, batch_labels

#: Stages of measuring one variant, in order; a progress callback is called once after each.
STAGES: tuple[str, ...] = ("graph", "latency", "throughput", "accuracy")


@contextlib.contextmanager
def stage_progress(variant_count: int, description: str, enabled: bool = True):
    """A ``progress(name, stage)`` callback for :func:`build_report` that drives a tqdm bar (or nothing)."""
    bar = None
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=variant_count * len(STAGES), desc=description, unit="step", leave=False)

    def progress(name: str, stage: str) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{name}: {stage} done")
            bar.update(1)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


@dataclass(frozen=True)
class MeasureSettings:
    """How latency, throughput and accuracy are measured.

    Args:
        threads: ONNX Runtime intra-op threads (fixed, so runs are comparable; 1 = one core, like a
            small edge CPU, and stable on a shared machine).
        warmup_runs: untimed batch-1 runs before timing (allocations, caches, lazy kernel selection).
        latency_runs: timed batch-1 runs; p50 / p90 / p99 are taken over them.
        throughput_batch: batch size of the throughput measurement (ignored for a static-batch graph).
        throughput_runs: timed runs at ``throughput_batch``; images/s uses their median.
        max_test_batches: evaluate accuracy on at most this many dataloader batches (``None``: all).
        accuracy_threads: ONNX Runtime intra-op threads of the accuracy pass (``None``: ONNX Runtime's default, one
            per physical core). The logits do not depend on it (ONNX Runtime splits the work, not the sums:
            checked bit-equal for the FP32, FP16 and INT8 files of the main job), only the time does: the
            teacher's 1000 test images take half as long on two cores as on one.
        seed: seeds the random input used when no dataloader gives a real one.
    """

    threads: int = 1
    warmup_runs: int = 20
    latency_runs: int = 200
    throughput_batch: int = 32
    throughput_runs: int = 10
    max_test_batches: int | None = None
    accuracy_threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("threads", 1), ("warmup_runs", 0), ("latency_runs", 1), ("throughput_batch", 1),
                              ("throughput_runs", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
        if self.max_test_batches is not None and (not isinstance(self.max_test_batches, int)
                                                  or self.max_test_batches < 1):
            raise ValueError(f"max_test_batches={self.max_test_batches!r} must be None (all) or an integer >= 1")
        if self.accuracy_threads is not None and (not isinstance(self.accuracy_threads, int)
                                                  or isinstance(self.accuracy_threads, bool) or self.accuracy_threads < 1):
            raise ValueError(f"accuracy_threads={self.accuracy_threads!r} must be None (ONNX Runtime's default) or an "
                             "integer >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VariantMetrics:
    """One row of the compression report: what a single ONNX file costs and how well it classifies.

    Ratios are filled in by :func:`compare_to_baseline` (``None`` until then): ``size_ratio`` and
    ``speedup`` read "× smaller" and "× faster" than the baseline; ``accuracy_delta_pt`` is in
    percentage points (negative: worse than the baseline).
    """

    name: str
    onnx_path: str
    precision: str
    producer: str = ""
    file_size_bytes: int = 0
    parameters: int = 0
    macs: int = 0
    quantized_weight_fraction: float = 0.0
    latency_batch: int = 1
    latency_ms_p50: float = math.nan
    latency_ms_p90: float = math.nan
    latency_ms_p99: float = math.nan
    latency_ms_mean: float = math.nan
    latency_runs: int = 0
    throughput_batch: int = 1
    throughput_images_per_s: float = math.nan
    static_batch: bool = False
    accuracy: float | None = None
    macro_f1: float | None = None
    test_samples: int = 0
    baseline: str | None = None
    size_ratio: float | None = None
    speedup: float | None = None
    params_ratio: float | None = None
    macs_ratio: float | None = None
    throughput_ratio: float | None = None
    accuracy_delta_pt: float | None = None
    macro_f1_delta_pt: float | None = None
    class_names: list[str] = field(default_factory=list)
    per_class: dict[str, dict[str, float | int | None]] = field(default_factory=dict)
    per_class_delta_pt: dict[str, dict[str, float | None]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def file_size_mb(self) -> float:
        return self.file_size_bytes / 1e6

    def to_dict(self) -> dict:
        row = asdict(self)
        row["file_size_mb"] = self.file_size_mb
        return row


@dataclass
class Report:
    """Rows of every measured variant, the baseline they are compared with, the machine and the settings."""

    rows: list[VariantMetrics]
    baseline: str
    machine: dict
    settings: dict
    #: The safety gate's policy and verdict (``report.safety``), filled in by the caller that applies it.
    safety: dict | None = None
    #: Per-quantizer sensitivity of the run's fake-quant networks (``{name: SensitivityReport.to_dict()}``).
    sensitivity: dict | None = None

    def row(self, name: str) -> VariantMetrics:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no variant named {name!r} in the report; variants: {[r.name for r in self.rows]}")

    def to_dict(self) -> dict:
        result = {"baseline": self.baseline, "machine": self.machine, "settings": self.settings,
                  "variants": [row.to_dict() for row in self.rows]}
        if self.safety is not None:
            result["safety"] = self.safety
        if self.sensitivity:
            result["sensitivity"] = self.sensitivity
        return result


def onnx_file_size(path: str | Path) -> int:
    """Bytes of the ONNX file plus any external-data files its initializers point to."""
    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    external = {entry.value for init in model.graph.initializer
                if init.data_location == onnx.TensorProto.EXTERNAL
                for entry in init.external_data if entry.key == "location"}
    return total + sum((path.parent / name).stat().st_size for name in external)


def open_session(path: str | Path, threads: int | None = 1, fuse_qdq: bool = True):
    """An ONNX Runtime CPU session with a fixed intra-op thread count (``None``: ONNX Runtime's default) and full
    graph optimization.

    ``fuse_qdq=False`` runs Q/DQ pairs as float ops: the QDQ graph's exact semantics instead of ORT's fused
    integer kernels. On an x86 CPU without VNNI an INT8 model with 8-bit weights runs with exact integer
    products (:func:`~dms_lightning.export.runtimes.ort_session`, ``exact_int8``): the report measures the
    arithmetic the model is meant to have, at the speed that arithmetic costs there.
    """
    import onnxruntime as ort

    options = ort_session_options(path, threads, fuse_qdq)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _split_batch(batch) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images, labels)`` from a dataloader batch: a tuple/list ``(images, labels, ...)``, a dict or images."""
    try:
        images = batch_images(batch)
    except TypeError as err:
        raise ValueError(str(err)) from err
    labels = batch_labels(batch)
    return _to_numpy(images), None if labels is None else _to_numpy(labels).astype(np.int64).reshape(-1)


class _Runner:
    """Runs one ONNX Runtime session on numpy batches, whatever its batch dimension (dynamic or static)."""

    def __init__(self, path: str | Path, threads: int | None, fuse_qdq: bool = True) -> None:
        self.session = open_session(path, threads, fuse_qdq)
        spec = self.session.get_inputs()[0]
        self.input_name = spec.name
        self.dtype = _ORT_TYPES.get(spec.type, np.float32)
        self.shape = list(spec.shape)
        leading = self.shape[0] if self.shape else None
        self.static_batch = leading if isinstance(leading, int) and leading > 0 else None

    def sample_shape(self, fallback: Sequence[int] | None) -> list[int]:
        """The per-sample input shape (without batch): the graph's static dims, else ``fallback``."""
        dims = self.shape[1:]
        if all(isinstance(d, int) and d > 0 for d in dims):
            return [int(d) for d in dims]
        if fallback is None:
            raise ValueError(f"the model input {self.input_name!r} has dynamic dims {self.shape}; give input_shape "
                             "(C, H, W) or a dataloader so a real input can be used")
        return list(fallback)

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: images.astype(self.dtype, copy=False)})[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits for any number of images; a static-batch graph is fed in padded chunks of its batch."""
        if self.static_batch is None:
            return self.run(images)
        outputs = []
        for start in range(0, len(images), self.static_batch):
            chunk = images[start:start + self.static_batch]
            real = len(chunk)
            if real < self.static_batch:
                pad = np.zeros((self.static_batch - real, *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, pad])
            outputs.append(self.run(chunk)[:real])
        return np.concatenate(outputs)


def _time_runs(run: Callable[[], object], warmup: int, runs: int) -> np.ndarray:
    """Wall-clock milliseconds of ``runs`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter_ns()
        run()
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return times


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true, predicted]``."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def macro_f1(matrix: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur (as a label or a prediction), as torchmetrics does."""
    tp = np.diag(matrix).astype(np.float64)
    fp = matrix.sum(axis=0) - tp
    fn = matrix.sum(axis=1) - tp
    present = (tp + fp + fn) > 0
    if not present.any():
        return 0.0
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0)
    return float(f1[present].mean())


def per_class_metrics(matrix: np.ndarray | Sequence[Sequence[int]], class_names: Sequence[str] | None = None
                      ) -> dict[str, dict[str, float | int | None]]:
    """Recall, precision and support of each class from a ``[true, predicted]`` confusion matrix.

    Recall is ``None`` for a class without test images, precision ``None`` for a class never predicted.

    Example:
        >>> per_class_metrics([[8, 2], [1, 9]], ["alert", "phone"])["phone"]
        {'recall': 0.9, 'precision': 0.8181818181818182, 'support': 10}
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    names = list(class_names) if class_names is not None else []
    names += [f"class_{i}" for i in range(len(names), matrix.shape[0])]
    result = {}
    for index in range(matrix.shape[0]):
        support, predicted = int(matrix[index].sum()), int(matrix[:, index].sum())
        hits = int(matrix[index, index])
        result[names[index]] = {"recall": hits / support if support else None,
                                "precision": hits / predicted if predicted else None, "support": support}
    return result


def onnx_class_names(model: onnx.ModelProto) -> list[str] | None:
    """The ``class_names`` an exporter wrote into ``metadata_props`` (a JSON list or comma-separated)."""
    value = next((p.value for p in model.metadata_props if p.key == "class_names"), None)
    if not value:
        return None
    try:
        names = json.loads(value)
    except ValueError:
        names = value.split(",")
    return [str(n).strip() for n in names] if isinstance(names, list) else None


def evaluate_onnx(runner: _Runner, dataloader: Iterable, max_batches: int | None = None) -> dict:
    """Accuracy, macro-F1 and the confusion matrix of the model's argmax on ``dataloader``."""
    labels_all, predictions_all, num_outputs = [], [], 0
    for index, batch in enumerate(dataloader):
        if max_batches is not None and index >= max_batches:
            break
        images, labels = _split_batch(batch)
        if labels is None:
            raise ValueError("the test dataloader yields no labels: accuracy needs (images, labels) batches")
        logits = runner.predict(images)
        num_outputs = logits.shape[1]
        predictions_all.append(logits.reshape(len(images), -1).argmax(axis=1))
        labels_all.append(labels)
    if not labels_all:
        raise ValueError("the test dataloader is empty: no accuracy can be measured")
    labels, predictions = np.concatenate(labels_all), np.concatenate(predictions_all)
    num_classes = int(max(num_outputs, labels.max() + 1))
    matrix = confusion_matrix(labels, predictions, num_classes)
    return {"accuracy": float((labels == predictions).mean()), "macro_f1": macro_f1(matrix),
            "samples": int(len(labels)), "confusion_matrix": matrix.tolist()}


class CachedBatches:
    """Iterates a dataloader once and replays its batches as numpy arrays for every later variant.

    Rendering / decoding the test set once instead of once per variant; a test set larger than
    ``max_bytes`` is not kept, and every pass reads the dataloader again.
    """

    def __init__(self, dataloader: Iterable, max_batches: int | None = None, max_bytes: int = 512 * 2**20) -> None:
        self.dataloader, self.max_batches, self.max_bytes = dataloader, max_batches, max_bytes
        self._cache: list[tuple[np.ndarray, np.ndarray | None]] | None = None

    def __iter__(self):
        if self._cache is not None:
            yield from self._cache
            return
        cache: list | None = []
        size = 0
        for index, batch in enumerate(self.dataloader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            images, labels = _split_batch(batch)
            if cache is not None:
                size += images.nbytes
                cache = cache if size <= self.max_bytes else None
                if cache is not None:
                    cache.append((images, labels))
            yield images, labels
        self._cache = cache


def _first_images(dataloader: Iterable | None) -> np.ndarray | None:
    if dataloader is None:
        return None
    for batch in dataloader:
        return _split_batch(batch)[0]
    return None


class _LiteRTRunner:
    """The :class:`_Runner` interface over a .tflite file in the LiteRT interpreter (``[tflite]`` extra)."""

    def __init__(self, path: Path, threads: int) -> None:
        from dms_lightning.export.tflite import LiteRTModel

        self.model = LiteRTModel(path, threads)
        self.dtype = np.float32
        self.static_batch = self.model.batch

    def sample_shape(self, fallback: Sequence[int] | None) -> list[int]:
        return self.model.sample_shape

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(images)

    predict = run


def _litert_row(path: Path, name: str | None, precision: str | None, producer: str, info: dict | None,
                class_names: Sequence[str] | None, threads: int) -> tuple[VariantMetrics, _LiteRTRunner, list | None]:
    from dms_lightning.export.tflite import read_tflite_metadata

    metadata = read_tflite_metadata(path)
    row = VariantMetrics(name=name or path.stem, onnx_path=str(path), precision=precision or metadata.get("precision", ""),
                         producer=producer, info={**(info or {}), "runtime": "litert"})
    row.file_size_bytes = path.stat().st_size
    row.notes.append("measured in the LiteRT interpreter (XNNPACK on this CPU), not ONNX Runtime")
    names = list(class_names) if class_names is not None else (
        json.loads(metadata["class_names"]) if "class_names" in metadata else None)
    return row, _LiteRTRunner(path, threads), names


def measure_onnx(
    path: str | Path,
    dataloader: Iterable | None = None,
    *,
    name: str | None = None,
    precision: str | None = None,
    producer: str = "",
    settings: MeasureSettings | None = None,
    input_shape: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
    info: dict | None = None,
    class_names: Sequence[str] | None = None,
) -> VariantMetrics:
    """Measure one ONNX file; see the module docstring for what each field means.

    Args:
        path: the ONNX model.
        dataloader: test batches ``(images, labels, ...)`` for accuracy (and a real latency input);
            ``None`` skips accuracy.
        name: label of the row (default: the file stem).
        precision: shown as is; detected from the graph when ``None``.
        producer: the callback or tool that wrote the file.
        settings: thread count, runs and batch sizes.
        input_shape: per-sample ``(C, H, W)`` when the graph has dynamic spatial dims and no dataloader.
        progress: called with each finished stage name of :data:`STAGES`.
        info: extra facts copied into the row.
        class_names: names of the model's outputs, for the per-class table (default: the ``class_names``
            in the file's metadata, else ``class_0``, ``class_1`` ...).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"onnx_path={str(path)!r} does not exist")
    settings = settings or MeasureSettings()
    notify = progress or (lambda stage: None)
    if path.suffix == ".tflite":
        row, runner, names = _litert_row(path, name, precision, producer, info, class_names, settings.threads)
        qdq = False
    else:
        model = onnx.load(str(path))
        row = VariantMetrics(name=name or path.stem, onnx_path=str(path),
                             precision=precision or detect_precision(model), producer=producer, info=dict(info or {}))
        row.file_size_bytes = onnx_file_size(path)
        row.parameters = count_parameters(model)
        row.macs = count_onnx_macs(model, batch_size=1)
        row.quantized_weight_fraction = quantized_weight_fraction(model)
        qdq = any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node)
        names = list(class_names) if class_names is not None else onnx_class_names(model)
        del model
        runner = _Runner(path, settings.threads)
    notify("graph")

    real = _first_images(dataloader)
    sample_shape = runner.sample_shape(None if real is None else real.shape[1:] if input_shape is None else input_shape)
    if real is not None:
        sample = real[:1].astype(runner.dtype)
    else:
        sample = np.random.default_rng(settings.seed).standard_normal((1, *sample_shape)).astype(runner.dtype)

    row.static_batch = runner.static_batch is not None
    row.latency_batch = runner.static_batch or 1
    if row.latency_batch != 1:
        row.notes.append(f"static batch {row.latency_batch}: latency measured at batch {row.latency_batch}")
    latency_input = np.repeat(sample, row.latency_batch, axis=0)
    times = _time_runs(lambda: runner.run(latency_input), settings.warmup_runs, settings.latency_runs)
    row.latency_ms_p50, row.latency_ms_p90, row.latency_ms_p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
    row.latency_ms_mean = float(times.mean())
    row.latency_runs = settings.latency_runs
    notify("latency")

    if runner.static_batch is None:
        row.throughput_batch = settings.throughput_batch
    else:
        row.throughput_batch = runner.static_batch
        row.notes.append(f"static batch {runner.static_batch}: throughput measured at batch {runner.static_batch} only")
    batch_input = np.repeat(sample, row.throughput_batch, axis=0)
    batch_times = _time_runs(lambda: runner.run(batch_input), min(2, settings.warmup_runs), settings.throughput_runs)
    row.throughput_images_per_s = float(row.throughput_batch / (np.median(batch_times) / 1e3))
    notify("throughput")

    if row.info.get("target_summary"):
        row.notes.append(f"quantized for {row.info['target_summary']}")
    if qdq and exact_int8_products_needed(path):
        row.info["exact_int8_products"] = True
        row.notes.append(f"run with exact integer products ({EXACT_INT8_PRODUCTS}=1): this x86 CPU has no VNNI, "
                         "where ONNX Runtime's default uint8 x int8 kernels add pairs of products in saturating int16 "
                         "and the model would compute something else; set the same option to deploy on such a CPU")
    if dataloader is not None:
        if not isinstance(runner, _Runner) or settings.accuracy_threads == settings.threads:
            evaluator = runner
        else:
            evaluator = _Runner(path, settings.accuracy_threads)
        result = evaluate_onnx(evaluator, dataloader, settings.max_test_batches)
        row.accuracy, row.macro_f1, row.test_samples = result["accuracy"], result["macro_f1"], result["samples"]
        row.info.setdefault("confusion_matrix", result["confusion_matrix"])
        row.per_class = per_class_metrics(result["confusion_matrix"], names)
        row.class_names = list(row.per_class)
        if qdq:
            # ORT's fused integer kernels round differently from the graph's float Q/DQ arithmetic; the QDQ
            # graph itself is what an NPU converter reads.
            graph = evaluate_onnx(_Runner(path, settings.accuracy_threads, fuse_qdq=False), dataloader,
                                  settings.max_test_batches)
            row.info["accuracy_qdq_graph"] = graph["accuracy"]
            row.notes.append(f"accuracy {100 * row.accuracy:.2f} % with ONNX Runtime's fused CPU integer kernels; "
                             f"{100 * graph['accuracy']:.2f} % with the QDQ graph's own arithmetic (Q/DQ unfused, "
                             "what an NPU converter reads)")
    else:
        row.notes.append("no test data: accuracy not measured")
    notify("accuracy")
    return row


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or not math.isfinite(numerator) or not math.isfinite(denominator) \
            or denominator <= 0:
        return None
    return float(numerator / denominator)


def compare_to_baseline(rows: Sequence[VariantMetrics], baseline: str) -> list[VariantMetrics]:
    """Fill each row's ratios against the row named ``baseline`` (× smaller, × faster, accuracy delta)."""
    names = [row.name for row in rows]
    if baseline not in names:
        raise ValueError(f"baseline={baseline!r} is not one of the measured variants {names}")
    base = rows[names.index(baseline)]
    for row in rows:
        row.baseline = baseline
        row.size_ratio = _ratio(base.file_size_bytes, row.file_size_bytes)
        row.params_ratio = _ratio(base.parameters, row.parameters)
        row.macs_ratio = _ratio(base.macs, row.macs)
        row.speedup = _ratio(base.latency_ms_p50 * row.latency_batch, row.latency_ms_p50 * base.latency_batch)
        row.throughput_ratio = _ratio(row.throughput_images_per_s, base.throughput_images_per_s)
        if row.accuracy is not None and base.accuracy is not None:
            row.accuracy_delta_pt = 100.0 * (row.accuracy - base.accuracy)
        if row.macro_f1 is not None and base.macro_f1 is not None:
            row.macro_f1_delta_pt = 100.0 * (row.macro_f1 - base.macro_f1)
        row.per_class_delta_pt = {
            name: {metric: _delta_pt(values.get(metric), base.per_class.get(name, {}).get(metric))
                   for metric in ("recall", "precision")}
            for name, values in row.per_class.items()}
    return list(rows)


def _delta_pt(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else 100.0 * (value - reference)


def build_report(
    variants: Sequence[Variant],
    dataloader: Iterable | None = None,
    *,
    baseline: str | None = None,
    settings: MeasureSettings | None = None,
    input_shape: Sequence[int] | None = None,
    progress: Callable[[str, str], None] | None = None,
    class_names: Sequence[str] | None = None,
) -> Report:
    """Measure every variant and compare it with ``baseline`` (default: the first variant).

    ``progress(variant_name, stage)`` is called after each stage of each variant; ``class_names`` label
    the per-class table (default: each file's metadata).
    """
    if not variants:
        raise ValueError("no variants to measure: register some (ONNXExport does) or pass ONNX paths")
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"variant names must be unique; repeated: {duplicates}")
    baseline = names[0] if baseline is None else baseline
    if baseline not in names:
        raise ValueError(f"baseline={baseline!r} is not one of the variants {names}")
    settings = settings or MeasureSettings()
    if dataloader is not None and not isinstance(dataloader, CachedBatches):
        dataloader = CachedBatches(dataloader, settings.max_test_batches)
    rows = []
    for variant in variants:
        notify = (lambda stage, _name=variant.name: progress(_name, stage)) if progress else None
        rows.append(measure_onnx(variant.onnx_path, dataloader, name=variant.name,
                                 precision=variant.precision if variant.precision else None,
                                 producer=variant.producer, settings=settings, input_shape=input_shape,
                                 progress=notify, info=variant.info, class_names=class_names))
    compare_to_baseline(rows, baseline)
    return Report(rows=rows, baseline=baseline, machine=machine_info(settings.threads), settings=settings.to_dict())
