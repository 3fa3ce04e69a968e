"""CompressionReport: at the end of ``fit``, measure every exported variant and write the results table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from dms_lightning.report.measure import MeasureSettings, Report, build_report, stage_progress
from dms_lightning.report.parity_matrix import write_parity_matrix
from dms_lightning.report.plots import confusion_figures, pareto_figure, save_confusion_matrices, save_pareto_plots
from dms_lightning.report.safety import SafetyGateError, SafetyPolicy, check_safety
from dms_lightning.report.tables import markdown_table, write_tables
from dms_lightning.utils.artifacts import Variant, callbacks_after, variants
from dms_lightning.utils.io import ensure_writable_dir
from dms_lightning.utils.plotting import plt
from dms_lightning.utils.tensorboard import tensorboard_writers

def parse_variant_specs(specs: Mapping[str, str] | Sequence[str] | None, field: str = "extra_variants") -> list[Variant]:
    """``{"teacher": "a.onnx"}`` or ``["teacher=a.onnx", "b.onnx"]`` → variants (name defaults to the file stem)."""
    if specs is None:
        return []
    if isinstance(specs, str):
        raise ValueError(f"{field}={specs!r} must be a list of 'name=path' strings or a mapping name -> path, "
                         "not a single string")
    pairs = list(specs.items()) if isinstance(specs, Mapping) else []
    if not isinstance(specs, Mapping):
        for spec in specs:
            if not isinstance(spec, str) or not spec:
                raise ValueError(f"{field} entry {spec!r} must be a 'name=path' string")
            name, sep, path = spec.partition("=")
            pairs.append((name, path) if sep else (Path(spec).stem, spec))
    result = []
    for name, path in pairs:
        if not name:
            raise ValueError(f"{field} entry {name}={path!r} has an empty name")
        result.append(Variant(name=str(name), onnx_path=str(path), precision="", producer="given"))
    return result


def log_report_to_tensorboard(writers: Sequence, report: Report, step: int = 0) -> None:
    """Log the table (text), both Pareto plots (images) and one hparams run per variant to each writer."""
    if not writers:
        return
    table = markdown_table(report)
    figures = {axis: pareto_figure(report, axis) for axis in ("size", "latency")}
    confusions = confusion_figures(report)
    for writer in writers:
        writer.add_text("compression/report", table, global_step=step)
        for axis, figure in figures.items():
            if figure is not None:
                writer.add_figure(f"compression/pareto_{axis}", figure, global_step=step, close=False)
        for name, figure in confusions.items():
            writer.add_figure(f"compression/confusion_matrix/{name}", figure, global_step=step, close=False)
        for row in report.rows:
            metrics = {
                "compression/accuracy": row.accuracy, "compression/macro_f1": row.macro_f1,
                "compression/size_mb": row.file_size_mb, "compression/parameters": row.parameters,
                "compression/macs": row.macs, "compression/latency_ms_p50": row.latency_ms_p50,
                "compression/latency_ms_p99": row.latency_ms_p99,
                "compression/throughput_images_per_s": row.throughput_images_per_s,
                "compression/size_ratio": row.size_ratio, "compression/speedup": row.speedup,
                "compression/accuracy_delta_pt": row.accuracy_delta_pt,
            }
            metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
            hparams = {"variant": row.name, "precision": row.precision, "producer": row.producer or "",
                       "baseline": report.baseline}
            # One hparams run per variant, so TensorBoard's HPARAMS tab compares them side by side.
            writer.add_hparams(hparams, metrics, run_name=f"compression_{row.name}", global_step=step)
            for key, value in metrics.items():
                writer.add_scalar(f"{key}/{row.name}", value, global_step=step)
            for cls, values in row.per_class.items():
                for metric in ("recall", "precision"):
                    if values.get(metric) is not None:
                        writer.add_scalar(f"compression/{metric}/{cls}/{row.name}", float(values[metric]),
                                          global_step=step)
        writer.flush()
    for figure in [*figures.values(), *confusions.values()]:
        if figure is not None:
            plt.close(figure)


def _data_input_shape(trainer: Trainer, pl_module: LightningModule) -> tuple[int, ...] | None:
    """``(C, H, W)`` of the images the report will feed: the data module's, else the module's example input."""
    datamodule = getattr(trainer, "datamodule", None)
    example = datamodule.example_input() if callable(getattr(datamodule, "example_input", None)) else None
    if example is None:
        example = getattr(pl_module, "example_input_array", None)
    shape = getattr(example, "shape", None)
    return tuple(int(d) for d in shape[1:]) if shape is not None and len(shape) == 4 else None


def _check_input_shape(variant: Variant, data_shape: tuple[int, ...]) -> None:
    import onnx

    try:
        graph = onnx.load(variant.onnx_path, load_external_data=False).graph
    except Exception as err:  # noqa: BLE001 - any reason the file is not a model is the user's to know now
        raise ValueError(f"extra_variants[{variant.name!r}]={variant.onnx_path!r} is not a readable ONNX model: "
                         f"{err}") from err
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if not inputs:
        return
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ValueError(f"extra_variants[{variant.name!r}]={variant.onnx_path!r} takes a {len(dims)}-d input "
                         f"{dims}; the report feeds N × C × H × W images")
    mismatch = [(axis, want, have) for axis, want, have in zip("CHW", dims[1:], data_shape)
                if want is not None and want != have]
    if mismatch:
        channels, size = data_shape[0], data_shape[1]
        raise ValueError(f"extra_variants[{variant.name!r}]={variant.onnx_path!r} takes input "
                         f"{['N' if d is None else d for d in dims]} but the data gives {channels} × {size} × "
                         f"{data_shape[2]} images (data.channels={channels}, data.image_size={size}): it would fail "
                         "in ONNX Runtime at the end of the run. Export it at the data's size, or set "
                         "data.image_size / data.channels to match it")


class CompressionReport(Callback):
    """Measure every model the run exported and write the size / latency / accuracy table.

    At the end of ``fit`` (on rank zero), every variant listed by the producing callbacks (those whose class
    sets ``produces_variants = True``: :class:`~dms_lightning.callbacks.ONNXExport`,
    :class:`~dms_lightning.callbacks.PostTrainingQuantization` ...; see :mod:`dms_lightning.utils.artifacts`) plus any ``extra_variants`` (e.g. the teacher's ONNX file) is measured in ONNX Runtime on the
    data module's test set: file size, parameters, MACs, batch-1 CPU latency p50/p90/p99 with a fixed
    thread count, throughput at a larger batch, accuracy and macro-F1, per-class recall and precision, and
    ratios / changes against ``baseline``. Written to ``output_dir``: ``report.md`` (with the per-class
    tables), ``report.csv``, ``report.json``, ``pareto_size.png``, ``pareto_latency.png``,
    ``confusion_<variant>.png`` per variant and ``parity_matrix.md`` / ``.json`` (every variant × runtime it
    was checked in: top-1 agreement, max abs diff, latency, size; :mod:`dms_lightning.report.parity_matrix`);
    logged to TensorBoard (text table, the plots, the confusion matrices, hparams with the metrics of each
    variant); the table is printed. Place it **after** the producing callbacks (checked in ``setup``): they
    list their variants in their own ``on_fit_end``.

    **Safety gate**: with ``safety_classes``, a variant whose recall on any of them is more than
    ``max_recall_drop_pt`` points below the baseline's is flagged in the report (even when its top-1
    holds) and, with ``on_safety_violation="fail"``, the run raises
    :class:`~dms_lightning.report.safety.SafetyGateError` once everything is written.

    Args:
        output_dir: where the report goes; default ``<log_dir>/compression_report`` (or
            ``<default_root_dir>/compression_report`` without a logger).
        baseline: name of the variant the ratios are against (e.g. ``"teacher"``); default: the first
            ``extra_variants`` entry, else the first registered variant.
        extra_variants: more ONNX files to measure, as ``{"teacher": "teacher.onnx"}`` or
            ``["teacher=teacher.onnx"]``.
        threads: ONNX Runtime intra-op threads for latency and throughput.
        warmup_runs: untimed runs before the latency runs.
        latency_runs: timed batch-1 runs per variant.
        throughput_batch: batch size of the throughput measurement.
        throughput_runs: timed runs at ``throughput_batch``.
        max_test_batches: evaluate on at most this many test batches (``None``: the whole test set).
        accuracy_threads: ONNX Runtime intra-op threads of the accuracy pass (``None``: one per physical core; the
            logits are the same for any count).
        log_to_tensorboard: log the table, plots and hparams to every TensorBoard logger of the run.
        print_table: print the markdown table at the end.
        progress_bar: show a progress bar while measuring.
        safety_classes: class names whose recall must hold, e.g. ``[eyes_closed, phone, looking_away]``
            (checked against the data module's classes before training).
        max_recall_drop_pt: allowed recall drop on a safety class against the baseline, in points.
        on_safety_violation: ``"fail"`` (raise at the end of ``fit``) or ``"warn"``.

    Example::

        trainer = Trainer(callbacks=[
            ONNXExport(dirpath="artifacts/student"),
            CompressionReport(baseline="teacher", extra_variants={"teacher": "artifacts/teacher.onnx"}),
        ])
    """

    def __init__(
        self,
        output_dir: str | None = None,
        baseline: str | None = None,
        extra_variants: Mapping[str, str] | Sequence[str] | None = None,
        threads: int = 1,
        warmup_runs: int = 20,
        latency_runs: int = 200,
        throughput_batch: int = 32,
        throughput_runs: int = 10,
        max_test_batches: int | None = None,
        accuracy_threads: int | None = None,
        log_to_tensorboard: bool = True,
        print_table: bool = True,
        progress_bar: bool = True,
        safety_classes: Sequence[str] | None = None,
        max_recall_drop_pt: float = 2.0,
        on_safety_violation: str = "fail",
    ) -> None:
        super().__init__()
        self.safety = SafetyPolicy(safety_classes if isinstance(safety_classes, str) else list(safety_classes or []),
                                   max_recall_drop_pt, on_safety_violation)
        self.settings = MeasureSettings(threads=threads, warmup_runs=warmup_runs, latency_runs=latency_runs,
                                        throughput_batch=throughput_batch, throughput_runs=throughput_runs,
                                        max_test_batches=max_test_batches, accuracy_threads=accuracy_threads)
        self.extra_variants = parse_variant_specs(extra_variants)
        for variant in self.extra_variants:
            if not variant.onnx_path.endswith(".onnx"):
                raise ValueError(f"extra_variants[{variant.name!r}]={variant.onnx_path!r} must be an .onnx file "
                                 "(export checkpoints first, or use `python -m dms_lightning.report --ckpt`)")
        names = [v.name for v in self.extra_variants]
        if len(set(names)) != len(names):
            raise ValueError(f"extra_variants has repeated names: {names}")
        if baseline is not None and (not isinstance(baseline, str) or not baseline):
            raise ValueError(f"baseline={baseline!r} must be a variant name such as 'teacher'")
        self.output_dir = output_dir
        self.baseline = baseline
        self.log_to_tensorboard = log_to_tensorboard
        self.print_table = print_table
        self.progress_bar = progress_bar
        self.report: Report | None = None
        self.written: dict[str, Path] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # Producers declare themselves with a class attribute (dms_lightning.utils.artifacts).
        late = callbacks_after(trainer, self, "produces_variants") + callbacks_after(trainer, self, "hands_down_int8")
        if late:
            raise MisconfigurationException(
                f"CompressionReport is placed before {late} in trainer callbacks: it would run before they export. "
                "Put CompressionReport last in the callbacks list.")
        # Fail now, not after hours of training, on a missing file the user named or one the data cannot feed.
        for variant in self.extra_variants:
            if not Path(variant.onnx_path).is_file():
                raise FileNotFoundError(f"extra_variants[{variant.name!r}]={variant.onnx_path!r} does not exist")
        data_shape = _data_input_shape(trainer, pl_module)
        if data_shape is not None:
            for variant in self.extra_variants:
                _check_input_shape(variant, data_shape)
        class_names = getattr(getattr(trainer, "datamodule", None), "class_names", None) \
            or getattr(pl_module, "class_names", None)
        if self.safety.safety_classes and class_names:
            try:
                self.safety.check_names(list(class_names), "the data module")
            except ValueError as err:
                raise MisconfigurationException(f"CompressionReport: {err}") from err
        if trainer.is_global_zero:
            ensure_writable_dir(self._output_dir(trainer), "output_dir")

    def _output_dir(self, trainer: Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        root = trainer.log_dir if trainer.loggers else None
        return Path(root or trainer.default_root_dir) / "compression_report"

    def _variants(self, trainer: Trainer) -> list[Variant]:
        given = {v.name for v in self.extra_variants}
        registered = [v for v in variants(trainer) if v.name not in given]
        return self.extra_variants + registered

    def _baseline(self, found: list[Variant]) -> str:
        names = [v.name for v in found]
        if self.baseline is None:
            return names[0]
        if self.baseline not in names:
            rank_zero_warn(f"CompressionReport: baseline={self.baseline!r} is not among the variants {names}; "
                           f"comparing with {names[0]!r} instead")
            return names[0]
        return self.baseline

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        found = self._variants(trainer)
        if not found:
            rank_zero_warn("CompressionReport: no variants to measure. Add an exporting callback (ONNXExport ...) "
                           "before CompressionReport, or pass extra_variants.")
            return
        datamodule = getattr(trainer, "datamodule", None)
        dataloader = datamodule.test_dataloader() if datamodule is not None and hasattr(datamodule,
                                                                                         "test_dataloader") else None
        if dataloader is None:
            rank_zero_warn("CompressionReport: the run has no data module with a test_dataloader; "
                           "accuracy is not measured")
        class_names = getattr(datamodule, "class_names", None) or getattr(pl_module, "class_names", None)
        self.report = self._measure(found, dataloader, class_names)
        self.report.sensitivity = {name: analysed.to_dict() for callback in trainer.callbacks
                                   for name, analysed in (getattr(callback, "sensitivity_reports", None) or {}).items()}
        violations = self._apply_safety_gate(self.report)
        output_dir = self._output_dir(trainer)
        self.written = dict(write_tables(self.report, output_dir))
        self.written.update({f"pareto_{k}": v for k, v in save_pareto_plots(self.report, output_dir).items()})
        self.written.update(write_parity_matrix(self.report, output_dir))
        self.written.update({f"confusion_{k}": v for k, v in save_confusion_matrices(self.report, output_dir).items()})
        if self.log_to_tensorboard:
            log_report_to_tensorboard(tensorboard_writers(trainer), self.report, trainer.global_step)
        if self.print_table:
            rank_zero_info(f"\nCompression report (baseline {self.report.baseline}), written to {output_dir}:\n"
                           + markdown_table(self.report))
        if violations:
            text = "; ".join(v.message(self.safety.max_recall_drop_pt) for v in violations)
            if self.safety.on_violation == "fail":
                raise SafetyGateError(f"CompressionReport safety gate: {text}. The report is in {output_dir}; set "
                                      "on_safety_violation='warn' to only flag it")
            rank_zero_warn(f"CompressionReport safety gate: {text}")

    def _apply_safety_gate(self, report: Report) -> list:
        if not self.safety.safety_classes:
            return []
        measured = next((row.class_names for row in report.rows if row.class_names), [])
        missing = [c for c in self.safety.safety_classes if measured and c not in measured]
        if missing:
            rank_zero_warn(f"CompressionReport: safety_classes {missing} are not among the measured classes {measured}")
        violations = check_safety(report, self.safety)
        report.safety = {"safety_classes": list(self.safety.safety_classes),
                         "max_recall_drop_pt": self.safety.max_recall_drop_pt,
                         "on_violation": self.safety.on_violation, "passed": not violations,
                         "violations": [v.to_dict() for v in violations]}
        return violations

    def _measure(self, found: list[Variant], dataloader, class_names=None) -> Report:
        with stage_progress(len(found), "CompressionReport", self.progress_bar) as progress:
            return build_report(found, dataloader, baseline=self._baseline(found), settings=self.settings,
                                progress=progress, class_names=list(class_names) if class_names else None)

    @override
    def state_dict(self) -> dict:
        # Nothing to resume: the report is recomputed from the artifacts at the end of every fit.
        return {}
