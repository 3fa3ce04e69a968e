"""TensorRTExport: a bundle that builds TensorRT engines from the run's ONNX files on an NVIDIA machine.

TensorRT cannot be installed without NVIDIA's package index and a GPU, so the bundle carries what a
deployment engineer runs there, built from one list of :class:`EngineBuild` so that the ``trtexec``
command lines and the Python build script describe the same engines:

* the FP32 ONNX built as FP32 and with ``--fp16`` (TensorRT picks float16 kernels where faster);
* the INT8 QDQ ONNX built with **explicit quantization**: the Q/DQ scales of QAT / PTQ are the
  engine's scales (``--int8``, no calibrator, no calibration cache), with ``--fp16`` as the fallback
  precision for the layers TensorRT does not run in INT8;
* an optimization profile for the dynamic batch axis (``--minShapes / --optShapes / --maxShapes``).

``build_engine.py`` does the same with the TensorRT Python API (``OnnxParser``,
``BuilderFlag.INT8`` / ``FP16``, ``create_optimization_profile``). Every value written into a script
is a plain identifier or an integer (``check_script_value``), so a script cannot be made to run a
command nobody wrote.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import onnx
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from dms_lightning.export.fit_end import FitEndExporter
from dms_lightning.export.coverage import coverage_before_conversion
from dms_lightning.export.manifest import directory_record, export_run, update_manifest
from dms_lightning.export.sdk import check_script_value
from dms_lightning.utils.artifacts import variants
from dms_lightning.utils.io import atomic_path

BUILD_SCRIPT = "build_engine.py"
TRTEXEC_SCRIPT = "build_engines.sh"
# Engine precision -> (trtexec flags, ONNX precision it is built from). "int8" needs the QDQ graph.
ENGINE_PRECISIONS = {
    "fp32": ([], "fp32"),
    "fp16": (["--fp16"], "fp32"),
    "int8": (["--int8", "--fp16"], "int8"),
}


@dataclass(frozen=True)
class EngineBuild:
    """One engine: which ONNX file, which precision flags, the batch profile of its input."""

    onnx: str
    engine: str
    precision: str
    input_name: str
    sample_shape: tuple[int, ...]  # the input shape without the batch axis, e.g. (3, 96, 96)
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_mib: int

    def shape(self, batch: int) -> str:
        return f"{self.input_name}:" + "x".join(str(d) for d in (batch, *self.sample_shape))

    def trtexec_argv(self) -> list[str]:
        return ["trtexec", f"--onnx={self.onnx}", f"--saveEngine={self.engine}",
                *ENGINE_PRECISIONS[self.precision][0],
                f"--minShapes={self.shape(self.min_batch)}", f"--optShapes={self.shape(self.opt_batch)}",
                f"--maxShapes={self.shape(self.max_batch)}", f"--memPoolSize=workspace:{self.workspace_mib}M"]

    def script_argv(self) -> list[str]:
        return ["python3", BUILD_SCRIPT, "--onnx", self.onnx, "--engine", self.engine, "--precision",
                self.precision, "--input", self.input_name, "--sample-shape", "x".join(map(str, self.sample_shape)),
                "--batch", f"{self.min_batch},{self.opt_batch},{self.max_batch}",
                "--workspace-mib", str(self.workspace_mib)]


def _input_spec(model: onnx.ModelProto) -> tuple[str, tuple[int, ...], bool]:
    initializers = {t.name for t in model.graph.initializer}
    value = next(v for v in model.graph.input if v.name not in initializers)
    dims = value.type.tensor_type.shape.dim
    sample = tuple(d.dim_value for d in dims[1:])
    if any(d <= 0 for d in sample):
        raise ValueError(f"ONNX input {value.name!r} has a dynamic non-batch dimension {list(sample)}: "
                         "a TensorRT profile here varies the batch only")
    return value.name, sample, not dims[0].HasField("dim_value")


def _check_script_value(field: str, value: str) -> None:
    try:
        check_script_value(field, value)
    except ValueError as err:
        raise ValueError(str(err).replace("convert.sh", f"{TRTEXEC_SCRIPT} and {BUILD_SCRIPT}")) from None


def engine_builds(onnx_files: Mapping[str, str], models: Mapping[str, onnx.ModelProto], *,
                  precisions: Sequence[str] = ("fp32", "fp16", "int8"), batch: tuple[int, int, int] = (1, 8, 32),
                  workspace_mib: int = 1024) -> list[EngineBuild]:
    """The engines to build: ``onnx_files`` maps an ONNX precision (``fp32`` / ``int8``) to its file name
    in the bundle, ``models`` to the loaded graph. An engine whose source ONNX is missing is left out."""
    min_batch, opt_batch, max_batch = batch
    if not all(isinstance(b, int) for b in batch) or not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch={batch!r} must be integers min <= opt <= max, min >= 1")
    if not isinstance(workspace_mib, int) or workspace_mib < 1:
        raise ValueError(f"workspace_mib={workspace_mib!r} must be a positive integer")
    builds = []
    for precision in precisions:
        if precision not in ENGINE_PRECISIONS:
            raise ValueError(f"precision={precision!r} must be one of {list(ENGINE_PRECISIONS)}")
        source = ENGINE_PRECISIONS[precision][1]
        if source not in onnx_files:
            continue
        name, sample, dynamic = _input_spec(models[source])
        _check_script_value("input name", name)
        _check_script_value("onnx file", onnx_files[source])
        low, opt, high = (min_batch, opt_batch, max_batch) if dynamic else (1, 1, 1)
        builds.append(EngineBuild(onnx_files[source], f"model_{precision}.plan", precision, name, sample,
                                  low, opt, high, workspace_mib))
    return builds


def render_trtexec_script(builds: Sequence[EngineBuild]) -> str:
    """``build_engines.sh``: one ``trtexec`` line per engine, run from the bundle directory."""
    lines = ["#!/usr/bin/env bash",
             "# TensorRT engines of this bundle (needs trtexec of TensorRT >= 8.6 and an NVIDIA GPU).",
             "# INT8: explicit quantization, the scales are the Q/DQ nodes' (no calibrator); --fp16 is the fallback.",
             "# Usage: bash build_engines.sh   (or: python3 build_engine.py --help, the same with the Python API)",
             "set -euo pipefail", 'cd "$(dirname "$0")"', ""]
    for build in builds:
        lines += [f"# {build.precision.upper()} engine from {build.onnx}", shlex.join(build.trtexec_argv())]
        lines.append(shlex.join(["trtexec", f"--loadEngine={build.engine}", f"--shapes={build.shape(build.opt_batch)}"])
                     + "  # latency / throughput at the optimal batch")
    lines.append('echo "engines built: ' + " ".join(b.engine for b in builds) + '"')
    return "\n".join(lines) + "\n"


BUILD_ENGINE_PY = '''#!/usr/bin/env python3
"""Build one TensorRT engine from an ONNX file with the TensorRT Python API (TensorRT >= 8.6).

INT8 is explicit quantization: the QuantizeLinear/DequantizeLinear nodes of the ONNX file carry the
scales learned in QAT (or computed by PTQ), so no calibrator is set; FP16 is enabled as the fallback
precision of layers TensorRT keeps in floating point. The batch axis gets one optimization profile.

    python3 build_engine.py --onnx model_int8.onnx --engine model_int8.plan --precision int8 \\\\
        --input input --sample-shape 3x96x96 --batch 1,8,32
"""

import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--engine", required=True)
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), required=True)
    parser.add_argument("--input", required=True, help="name of the network input")
    parser.add_argument("--sample-shape", required=True, help="input shape without the batch axis, e.g. 3x96x96")
    parser.add_argument("--batch", default="1,8,32", help="min,opt,max batch of the optimization profile")
    parser.add_argument("--workspace-mib", type=int, default=1024)
    return parser.parse_args(argv)


def build(args):
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if flag is None or int(trt.__version__.split(".")[0]) >= 10 else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(args.onnx):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        sys.exit("TensorRT could not parse " + args.onnx + ":\\n" + "\\n".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace_mib << 20)
    if args.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if args.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales from the Q/DQ nodes
    sample = tuple(int(d) for d in args.sample_shape.split("x"))
    low, opt, high = (int(b) for b in args.batch.split(","))
    profile = builder.create_optimization_profile()
    profile.set_shape(args.input, (low, *sample), (opt, *sample), (high, *sample))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        sys.exit("TensorRT failed to build " + args.engine + " (see the log above)")
    with open(args.engine, "wb") as handle:
        handle.write(engine)
    print("wrote", args.engine, len(engine), "bytes")


if __name__ == "__main__":
    build(parse_args())
'''


def write_tensorrt_bundle(onnx_paths: Mapping[str, str | Path], directory: str | Path, *,
                          precisions: Sequence[str] = ("fp32", "fp16", "int8"), batch: tuple[int, int, int] = (1, 8, 32),
                          workspace_mib: int = 1024) -> Path:
    """Write ``directory`` (atomically): the ONNX files, ``build_engines.sh`` (trtexec) and ``build_engine.py``.

    ``onnx_paths`` maps ``"fp32"`` and/or ``"int8"`` (a QDQ graph) to ONNX files. Their operators and
    Q/DQ types are checked against TensorRT's published operator list first: ``coverage.json`` lists
    what a build would stop at (and a warning says it), e.g. uint8 activations with a non-zero zero
    point, which TensorRT's explicit quantization does not take.

    Example:
        >>> write_tensorrt_bundle({"fp32": "student_fp32.onnx", "int8": "student_int8.onnx"}, "tensorrt")  # doctest: +SKIP
    """
    unknown = [k for k in onnx_paths if k not in ("fp32", "int8")]
    if unknown or not onnx_paths:
        raise ValueError(f"onnx_paths keys {list(onnx_paths)!r} must be 'fp32' and/or 'int8'")
    for precision, path in onnx_paths.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"onnx_paths[{precision!r}]={str(path)!r} does not exist")
    files = {precision: f"model_{precision}.onnx" for precision in onnx_paths}
    models = {precision: onnx.load(str(path), load_external_data=False) for precision, path in onnx_paths.items()}
    coverage = {files[precision]: coverage_before_conversion(model, f"TensorRT bundle, {files[precision]}",
                                                             ("tensorrt",))["tensorrt"]
                for precision, model in models.items()}
    builds = engine_builds(files, models, precisions=precisions, batch=batch, workspace_mib=workspace_mib)
    if not builds:
        raise ValueError(f"no engine of precisions {list(precisions)} can be built from {list(onnx_paths)}")
    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir(parents=True)
        for precision, path in onnx_paths.items():
            shutil.copyfile(path, tmp / files[precision])
        (tmp / TRTEXEC_SCRIPT).write_text(render_trtexec_script(builds))
        (tmp / "build_engines_python.sh").write_text(
            "#!/usr/bin/env bash\nset -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
            + "".join(shlex.join(b.script_argv()) + "\n" for b in builds))
        (tmp / BUILD_SCRIPT).write_text(BUILD_ENGINE_PY)
        (tmp / "coverage.json").write_text(json.dumps(coverage, indent=2) + "\n")
        for script in (TRTEXEC_SCRIPT, "build_engines_python.sh", BUILD_SCRIPT):
            (tmp / script).chmod(0o755)
    return directory


class TensorRTExport(FitEndExporter):
    """Write a TensorRT bundle when ``fit`` ends, from the FP32 and INT8 QDQ ONNX files registered before it.

    ``<dirpath>`` receives ``model_fp32.onnx`` / ``model_int8.onnx``, ``build_engines.sh`` (``trtexec``:
    FP32, FP16 and INT8 explicit-quantization engines with a dynamic-batch profile), and
    ``build_engine.py`` (the same with the TensorRT Python API), and is recorded in the parent folder's
    ``manifest.json``. Put it after :class:`~dms_lightning.callbacks.ONNXExport`.

    Args:
        dirpath: bundle directory; default ``<log_dir>/export/tensorrt``.
        precisions: engines to build (``fp32``, ``fp16``, ``int8``).
        min_batch / opt_batch / max_batch: the optimization profile of the batch axis.
        workspace_mib: TensorRT builder workspace.

    Example:
        >>> trainer = Trainer(callbacks=[ONNXExport(), TensorRTExport(max_batch=16)])  # doctest: +SKIP
    """

    traces_network: ClassVar[bool] = False  # it reads the ONNX files ONNXExport wrote

    #: ``dirpath`` is the folder written (it appears complete); its parent must be writable.
    dirpath_is_artifact: ClassVar[bool] = True

    def __init__(self, dirpath: str | None = None, precisions: Sequence[str] = ("fp32", "fp16", "int8"),
                 min_batch: int = 1, opt_batch: int = 8, max_batch: int = 32, workspace_mib: int = 1024) -> None:
        super().__init__()
        if isinstance(precisions, str) or not precisions or any(p not in ENGINE_PRECISIONS for p in precisions):
            raise ValueError(f"TensorRTExport.precisions={precisions!r} must be a non-empty list of "
                             f"{list(ENGINE_PRECISIONS)}")
        batch = (min_batch, opt_batch, max_batch)
        if not all(isinstance(b, int) for b in batch) or not 1 <= min_batch <= opt_batch <= max_batch:
            raise ValueError(f"TensorRTExport: min_batch={min_batch!r}, opt_batch={opt_batch!r}, max_batch="
                             f"{max_batch!r} must be integers with 1 <= min_batch <= opt_batch <= max_batch")
        if not isinstance(workspace_mib, int) or workspace_mib < 1:
            raise ValueError(f"TensorRTExport.workspace_mib={workspace_mib!r} must be a positive integer")
        self.dirpath, self.precisions, self.batch, self.workspace_mib = dirpath, tuple(precisions), batch, workspace_mib
        self.written: Path | None = None

    def export(self, trainer: Trainer, pl_module: LightningModule | None = None) -> Path | None:
        """Write the bundle from the latest registered FP32 and INT8 ONNX variants; returns its directory."""
        from dms_lightning.export.callbacks import default_export_dir

        sources: dict[str, Path] = {}
        for variant in variants(trainer):  # a later registration of a precision wins
            path = Path(variant.onnx_path)
            if variant.precision in ("fp32", "int8") and path.suffix == ".onnx" and path.is_file():
                sources[variant.precision] = path
        wanted = {ENGINE_PRECISIONS[p][1] for p in self.precisions}
        sources = {k: v for k, v in sources.items() if k in wanted}
        if not sources:
            rank_zero_warn("[dms_lightning] TensorRTExport: no FP32 or INT8 ONNX variant was registered (put "
                           "ONNXExport before TensorRTExport): no bundle written")
            return None
        directory = Path(self.dirpath) if self.dirpath else default_export_dir(trainer) / "tensorrt"
        write_tensorrt_bundle(sources, directory, precisions=self.precisions, batch=self.batch,
                              workspace_mib=self.workspace_mib)
        update_manifest(directory.parent, [directory_record(
            directory, directory.parent, name="tensorrt_bundle", producer="TensorRTExport",
            sources={k: str(v) for k, v in sources.items()}, batch_profile=list(self.batch))],
            run=export_run(trainer))
        rank_zero_info(f"[dms_lightning] TensorRTExport wrote {directory} (run build_engines.sh on an NVIDIA GPU)")
        self.written = directory
        return directory
