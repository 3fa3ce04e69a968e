"""``python -m dms_lightning.report``: the compression report for given ONNX files and checkpoints.

Example::

    python -m dms_lightning.report --onnx teacher=artifacts/teacher.onnx student=artifacts/student_int8.onnx \\
        --ckpt pruned=artifacts/pruned.ckpt --baseline teacher --data.image_size 96 --data.test_size 1000 \\
        --output_dir reports/compression

``.ckpt`` inputs are loaded with ``--model_class`` (default :class:`~dms_lightning.DMSClassifier`; pruned
and quantized architectures are rebuilt from the checkpoint) and exported to
``<output_dir>/onnx/<name>.onnx`` before measuring: FP32 with :func:`dms_lightning.export.export_onnx`, a
fake-quantized (QAT / PTQ) network as its INT8 QDQ file (:func:`dms_lightning.export.qdq.export_qdq_onnx`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser

from dms_lightning.data.datamodule import DMSDataModule
from dms_lightning.report.callback import log_report_to_tensorboard, parse_variant_specs
from dms_lightning.report.measure import MeasureSettings, Report, build_report, stage_progress
from dms_lightning.report.plots import save_pareto_plots
from dms_lightning.report.tables import markdown_table, write_tables
from dms_lightning.utils.artifacts import Variant


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m dms_lightning.report",
                            description="Measure ONNX models / checkpoints in ONNX Runtime and write the "
                                        "compression report (markdown, CSV, JSON, Pareto plots).")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options")
    parser.add_argument("--onnx", type=str, default=[], nargs="*",
                        help="ONNX files as NAME=PATH (or PATH: the name is the file stem)")
    parser.add_argument("--ckpt", type=str, default=[], nargs="*",
                        help="Lightning checkpoints as NAME=PATH, exported to ONNX first")
    parser.add_argument("--model_class", type=str, default="dms_lightning.DMSClassifier",
                        help="LightningModule class that loads the checkpoints")
    parser.add_argument("--baseline", type=str | None, default=None,
                        help="variant the ratios are computed against (default: the first one)")
    parser.add_argument("--output_dir", type=str, default="reports/compression")
    parser.add_argument("--title", type=str, default="Compression report")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset for exported checkpoints")
    parser.add_argument("--skip_accuracy", type=bool, default=False, help="measure size and speed only")
    parser.add_argument("--tensorboard_dir", type=str | None, default=None,
                        help="also log the table, plots and hparams to a TensorBoard run here")
    parser.add_argument("--progress_bar", type=bool, default=True)
    parser.add_class_arguments(MeasureSettings, "measure")
    parser.add_class_arguments(DMSDataModule, "data")
    return parser


def _import_class(path: str):
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"model_class={path!r} must be a dotted path such as 'dms_lightning.DMSClassifier'")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"model_class={path!r} cannot be imported: {err}") from err


def export_checkpoint(ckpt: str | Path, onnx_path: str | Path, model_class: str = "dms_lightning.DMSClassifier",
                      opset: int = 18, image_size: int | None = None, channels: int | None = None,
                      datamodule=None) -> Path:
    """Load a Lightning checkpoint and export its deployable network (``compression_target``) to ONNX.

    A fake-quantized network (a QAT or PTQ checkpoint) becomes the INT8 QDQ file the run's ``ONNXExport`` writes
    (integer weights, ``precision`` ``int8`` in the metadata), so its size is the INT8 file's; else FP32.
    """
    import torch

    from dms_lightning.export import export_onnx, onnx_metadata, preprocessing_info
    from dms_lightning.export.qdq import export_qdq_onnx
    from dms_lightning.quant import is_quantized
    from dms_lightning.utils.checkpoint import compression_target, load_checkpoint

    ckpt = Path(ckpt)
    load_checkpoint(ckpt, "--ckpt")  # refuses pickle payloads and names the file if it is unreadable
    module = _import_class(model_class).load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    module.eval()
    example = getattr(module, "example_input_array", None)
    if not isinstance(example, torch.Tensor):
        if image_size is None or channels is None:
            raise ValueError(f"{model_class} has no example_input_array: give --data.image_size and --data.channels")
        example = torch.zeros(1, channels, image_size, image_size)
    info = preprocessing_info(datamodule, module, example)
    network = compression_target(module)
    quantized = is_quantized(network)
    metadata = onnx_metadata(info, variant=Path(onnx_path).stem, precision="int8" if quantized else "fp32",
                             source={"checkpoint": ckpt.name})
    export = export_qdq_onnx if quantized else export_onnx
    return export(network, example[:1], onnx_path, opset=opset, metadata=metadata)


def _check_input_matches_data(variant: Variant, channels: int, image_size: int) -> None:
    """Refuse an ONNX file whose static input is not the ``--data`` images (ONNX Runtime would only say
    "invalid dimensions" once measuring starts), naming the ``--data`` settings that match it."""
    import onnx

    graph = onnx.load(variant.onnx_path, load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    if not inputs:
        return
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    expected = [channels, image_size, image_size]
    if len(dims) != 4 or None in dims[1:] or dims[1:] == expected:
        return
    hint = (f": set --data.channels {dims[1]} --data.image_size {dims[2]}" if dims[2] == dims[3]
            else " (this report feeds square N × C × H × W images)")
    raise ValueError(f"--onnx {variant.name}={variant.onnx_path!r} takes {' × '.join(map(str, dims))} input but "
                     f"--data gives {channels} × {image_size} × {image_size} images (data.channels={channels}, "
                     f"data.image_size={image_size}){hint}")


def run(config) -> Report:
    """Measure, write and print the report described by a parsed ``config``."""
    variants = parse_variant_specs(config.onnx, "--onnx")
    for variant in variants:
        if not Path(variant.onnx_path).is_file():
            raise FileNotFoundError(f"--onnx {variant.name}={variant.onnx_path!r} does not exist")
    data_args = {k: v for k, v in vars(config.data).items() if not k.startswith("__")}
    datamodule = DMSDataModule(**data_args)
    for variant in variants:
        _check_input_matches_data(variant, datamodule.channels, datamodule.image_size)
    output_dir = Path(config.output_dir)
    for spec in parse_variant_specs(config.ckpt, "--ckpt"):
        target = output_dir / "onnx" / f"{spec.name}.onnx"
        export_checkpoint(spec.onnx_path, target, config.model_class, config.opset, datamodule.image_size,
                          datamodule.channels, datamodule)
        variants.append(Variant(spec.name, str(target), precision="", producer=f"export of {spec.onnx_path}"))
    if not variants:
        raise ValueError("nothing to measure: give --onnx NAME=PATH ... and/or --ckpt NAME=PATH ...")
    settings = MeasureSettings(**{k: v for k, v in vars(config.measure).items() if not k.startswith("__")})
    dataloader = None if config.skip_accuracy else datamodule.test_dataloader()

    with stage_progress(len(variants), "measuring", config.progress_bar) as progress:
        report = build_report(variants, dataloader, baseline=config.baseline, settings=settings,
                              input_shape=(datamodule.channels, datamodule.image_size, datamodule.image_size),
                              progress=progress)
    written = write_tables(report, output_dir, title=config.title)
    written.update(save_pareto_plots(report, output_dir))
    if config.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(config.tensorboard_dir)
        log_report_to_tensorboard([writer], report, step=0)
        writer.close()
    print(markdown_table(report))
    print("written: " + ", ".join(str(p) for p in written.values()))
    return report


def main(args: list[str] | None = None) -> Report:
    parser = build_parser()
    config = parser.parse_args(args)
    return run(config)


if __name__ == "__main__":
    main(sys.argv[1:])
