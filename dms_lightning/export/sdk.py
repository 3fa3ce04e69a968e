"""The Qualcomm SNPE / QNN (QAIRT) command lines of a deploy bundle: built once, written to ``convert.sh``, run.

One list of :class:`SDKStep` is the single source of truth: :func:`render_convert_script` writes it as
the bundle's ``convert.sh`` and :func:`run_steps` executes the same argv when an SDK is available, so the
script a deployment engineer reruns is exactly what was run here. Tools live in
``<sdk root>/bin/x86_64-linux-clang``; the roots come from ``SNPE_ROOT`` / ``QNN_SDK_ROOT`` (a QAIRT SDK
sets both to the same directory) or an explicit ``sdk_root``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

RUNTIMES = ("cpu", "gpu", "dsp", "htp")
TOOLCHAINS = ("snpe", "qnn")
HOST = "x86_64-linux-clang"
ROOT_VARIABLES = {"snpe": "SNPE_ROOT", "qnn": "QNN_SDK_ROOT"}
# QNN backend library of each runtime (what qnn-net-run / qnn-context-binary-generator load).
QNN_BACKENDS = {"cpu": "libQnnCpu.so", "gpu": "libQnnGpu.so", "dsp": "libQnnDsp.so", "htp": "libQnnHtp.so"}
# snpe-net-run flag selecting each runtime (CPU is its default). SNPE reaches the HTP through the DSP runtime.
SNPE_RUNTIME_FLAGS = {"cpu": [], "gpu": ["--use_gpu"], "dsp": ["--use_dsp"], "htp": ["--use_dsp"]}


# SoC names (``sm8550``, ``sm8650,sm8750``) and QNN library targets (``aarch64-android``, ``x86_64-linux-clang``)
# are plain identifiers. Anything else would reach ``convert.sh``, a script a deployment engineer runs.
_SCRIPT_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.,-]*")


def check_script_value(field: str, value: str | None) -> None:
    """Refuse a value that would reach ``convert.sh`` unless it is a plain identifier (no spaces, quotes,
    newlines or other control characters); raises ``ValueError`` naming ``field``."""
    if value is not None and (not isinstance(value, str) or not _SCRIPT_SAFE.fullmatch(value)):
        raise ValueError(f"{field}={value!r} must be a plain name of letters, digits and '_.,-' "
                         "(e.g. 'sm8550' or 'aarch64-android'): it is written into convert.sh")


def _comment(text: str) -> str:
    """``text`` as one script comment line: control characters (a newline would end the comment and start a
    command) become spaces."""
    return "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)


class SDKToolError(RuntimeError):
    """An SDK tool exited non-zero (or did not write its output); the message carries its stderr."""


@dataclass
class SDKStep:
    """One tool invocation, with paths relative to the bundle directory.

    ``tool`` is the executable name; ``args`` may reference ``${QNN_SDK_ROOT}``-style variables only
    through :attr:`sdk_paths` (arguments that are SDK-relative paths, resolved when run).
    """

    toolchain: str
    tool: str
    args: list[str]
    outputs: list[str]
    purpose: str
    sdk_paths: dict[int, str] = field(default_factory=dict)

    def argv(self, sdk_root: Path | None = None, *, shell: bool = False) -> list[str]:
        """The command line; SDK-relative arguments become ``<sdk_root>/...`` or ``"${VAR}/..."`` in a script."""
        args = list(self.args)
        for index, relative in self.sdk_paths.items():
            args[index] = (f"${{{ROOT_VARIABLES[self.toolchain]}}}/{relative}" if shell
                           else str(Path(sdk_root or ".") / relative))
        return [self.tool, *args]


def conversion_steps(*, runtime: str, toolchains: tuple[str, ...] = TOOLCHAINS, has_encodings: bool,
                     model: str = "model.onnx", encodings: str = "encodings.json",
                     input_list: str = "input_list.txt", htp_socs: str = "sm8550",
                     qnn_lib_target: str | None = None, qnn_htp_config: str | None = None,
                     activation_bits: int = 8) -> list[SDKStep]:
    """The SNPE and QNN steps that turn ``model`` (+ ``encodings``) into artifacts for ``runtime``.

    ``activation_bits=16`` (a W8A16 model: every activation encoding is 16-bit) adds ``--act_bitwidth 16`` /
    ``--act_bw 16``, so the tensors the SDK quantizes itself get 16 bits too; a mixed model keeps the 8-bit
    default and its 16-bit tensors come from the encodings.

    SNPE: ``snpe-onnx-to-dlc`` → ``snpe-dlc-quantize`` (``--override_params`` keeps the QAT/PTQ grid,
    ``--bias_bitwidth 32``) → for HTP ``snpe-dlc-graph-prepare`` (offline graph cache for ``htp_socs``).
    QNN: ``qnn-onnx-converter`` (quantized with the calibration list for DSP/HTP) →
    ``qnn-model-lib-generator`` → for HTP ``qnn-context-binary-generator`` with the HTP backend.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} must be one of {RUNTIMES}")
    check_script_value("htp_socs", htp_socs)
    check_script_value("qnn_lib_target", qnn_lib_target)
    unknown = [t for t in toolchains if t not in TOOLCHAINS]
    if unknown or not toolchains:
        raise ValueError(f"toolchains={list(toolchains)!r} must be a non-empty subset of {list(TOOLCHAINS)}")
    if activation_bits not in (8, 16):
        raise ValueError(f"activation_bits={activation_bits!r} must be 8 or 16")
    overrides = ["--quantization_overrides", encodings] if has_encodings else []
    wide = activation_bits != 8
    steps: list[SDKStep] = []
    if "snpe" in toolchains:
        steps.append(SDKStep("snpe", "snpe-onnx-to-dlc",
                             ["--input_network", model, "--output_path", "snpe/model.dlc", *overrides],
                             ["snpe/model.dlc"],
                             "ONNX → float DLC" + (" carrying the encodings" if has_encodings else "")))
        steps.append(SDKStep("snpe", "snpe-dlc-quantize",
                             ["--input_dlc", "snpe/model.dlc", "--input_list", input_list,
                              "--output_dlc", "snpe/model_quantized.dlc",
                              *(["--override_params"] if has_encodings else []), "--bias_bitwidth", "32",
                              *(["--act_bitwidth", str(activation_bits)] if wide else [])],
                             ["snpe/model_quantized.dlc"],
                             "INT8 DLC: " + ("the QAT/PTQ encodings, calibration raws for the rest" if has_encodings
                                             else "ranges calibrated from the raws")))
        if runtime == "htp":
            steps.append(SDKStep("snpe", "snpe-dlc-graph-prepare",
                                 ["--input_dlc", "snpe/model_quantized.dlc", "--output_dlc", "snpe/model_htp.dlc",
                                  "--htp_socs", htp_socs],
                                 ["snpe/model_htp.dlc"], f"offline HTP graph cache for {htp_socs}"))
    if "qnn" in toolchains:
        quantize = runtime in ("dsp", "htp")
        converter_args = ["--input_network", model, "--output_path", "qnn/model.cpp"]
        if quantize:
            converter_args += ["--input_list", input_list, *overrides, "--bias_bw", "32",
                               *(["--act_bw", str(activation_bits)] if wide else [])]
        steps.append(SDKStep("qnn", "qnn-onnx-converter", converter_args, ["qnn/model.cpp", "qnn/model.bin"],
                             "ONNX → QNN C++ graph + weights" + (" (INT8)" if quantize else " (float)")))
        target = qnn_lib_target or (HOST if runtime == "htp" else "aarch64-android")
        steps.append(SDKStep("qnn", "qnn-model-lib-generator",
                             ["-c", "qnn/model.cpp", "-b", "qnn/model.bin", "-o", "qnn/libs", "-t", target],
                             [f"qnn/libs/{target}/libmodel.so"], f"model library for {target}"))
        if runtime == "htp":
            args = ["--backend", f"lib/{HOST}/{QNN_BACKENDS['htp']}", "--model", f"qnn/libs/{target}/libmodel.so",
                    "--binary_file", "model_htp", "--output_dir", "qnn"]
            if qnn_htp_config:
                args += ["--config_file", qnn_htp_config]
            steps.append(SDKStep("qnn", "qnn-context-binary-generator", args, ["qnn/model_htp.bin"],
                                 "serialized HTP context binary", sdk_paths={1: f"lib/{HOST}/{QNN_BACKENDS['htp']}"}))
    return steps


def device_commands(runtime: str, toolchains: tuple[str, ...] = TOOLCHAINS) -> list[str]:
    """How to run the converted model on the board (``adb shell``, from the pushed bundle directory)."""
    commands = []
    if "snpe" in toolchains:
        dlc = {"htp": "snpe/model_htp.dlc", "dsp": "snpe/model_quantized.dlc"}.get(runtime, "snpe/model.dlc")
        commands.append(shlex.join(["snpe-net-run", "--container", dlc, "--input_list", "input_list.txt",
                                    *SNPE_RUNTIME_FLAGS[runtime]]))
    if "qnn" in toolchains:
        backend = QNN_BACKENDS[runtime]
        if runtime == "htp":
            commands.append(shlex.join(["qnn-net-run", "--backend", backend, "--retrieve_context",
                                        "qnn/model_htp.bin", "--input_list", "input_list.txt"]))
        else:
            commands.append(shlex.join(["qnn-net-run", "--backend", backend, "--model",
                                        "qnn/libs/aarch64-android/libmodel.so", "--input_list", "input_list.txt"]))
    return commands


def render_convert_script(steps: list[SDKStep], *, runtime: str, header: str = "") -> str:
    """``convert.sh``: the steps as a bash script run from the bundle directory, failing on the first error."""
    toolchains = sorted({step.toolchain for step in steps}, key=TOOLCHAINS.index)
    lines = [
        "#!/usr/bin/env bash",
        _comment(f"# SNPE / QNN conversion of this bundle for the {runtime.upper()} runtime. {header}".rstrip()),
        "# Usage: SNPE_ROOT=/path/to/sdk QNN_SDK_ROOT=/path/to/sdk bash convert.sh [snpe|qnn|all]",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'which_toolchain="${1:-all}"',
        "",
        "sdk_env() {  # put one SDK's host tools, libraries and Python modules on the search paths",
        f'  export PATH="$1/bin/{HOST}:$PATH"',
        f'  export LD_LIBRARY_PATH="$1/lib/{HOST}:${{LD_LIBRARY_PATH:-}}"',
        '  export PYTHONPATH="$1/lib/python:${PYTHONPATH:-}"',
        "}",
        "",
    ]
    for toolchain in toolchains:
        variable = ROOT_VARIABLES[toolchain]
        lines += [f'if [[ "$which_toolchain" == all || "$which_toolchain" == {toolchain} ]]; then',
                  f'  : "${{{variable}:?set {variable} to the SDK root (the directory holding bin/{HOST})}}"',
                  f'  sdk_env "${variable}"',
                  f"  mkdir -p {toolchain}"]
        for step in (s for s in steps if s.toolchain == toolchain):
            lines.append(_comment(f"  # {step.purpose}"))
            argv = step.argv(shell=True)
            # SDK-relative paths keep their ${VAR} expansion: quote them with double quotes instead.
            quoted = [f'"{a}"' if a.startswith("${") else shlex.quote(a) for a in argv]
            lines.append("  " + " ".join(quoted))
        lines += ["fi", ""]
    lines.append('echo "conversion finished; see docs/deployment.md for running it on the board"')
    return "\n".join(lines) + "\n"


def sdk_roots(sdk_root: str | Path | None, environ: dict | None = None) -> dict[str, Path]:
    """``{toolchain: root}`` for every toolchain whose SDK is configured (``sdk_root`` serves both)."""
    environ = os.environ if environ is None else environ
    if sdk_root:
        return {toolchain: Path(sdk_root).expanduser() for toolchain in TOOLCHAINS}
    return {toolchain: Path(environ[variable]).expanduser() for toolchain, variable in ROOT_VARIABLES.items()
            if environ.get(variable)}


def tool_path(root: Path, tool: str) -> Path:
    return root / "bin" / HOST / tool


def run_steps(steps: list[SDKStep], roots: dict[str, Path], workdir: Path, log_dir: Path) -> list[dict]:
    """Run each step whose toolchain has a root, in ``workdir``; raise :class:`SDKToolError` on the first failure.

    Each tool's stdout and stderr go to ``log_dir/NN_<tool>.log``. Returns what ran (command, seconds).
    """
    import time

    log_dir.mkdir(parents=True, exist_ok=True)
    ran = []
    for number, step in enumerate((s for s in steps if s.toolchain in roots), start=1):
        root = roots[step.toolchain]
        executable = tool_path(root, step.tool)
        if not executable.is_file():
            raise SDKToolError(f"{step.tool} not found at {executable}: {ROOT_VARIABLES[step.toolchain]} / sdk_root "
                               f"must point at an SDK holding bin/{HOST}/{step.tool}")
        argv = step.argv(root)
        argv[0] = str(executable)
        env = dict(os.environ, **{ROOT_VARIABLES[step.toolchain]: str(root)})
        env["PATH"] = f"{executable.parent}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = f"{root / 'lib' / HOST}{os.pathsep}{env.get('LD_LIBRARY_PATH', '')}"
        env["PYTHONPATH"] = f"{root / 'lib' / 'python'}{os.pathsep}{env.get('PYTHONPATH', '')}"
        for output in step.outputs:
            (workdir / output).parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        completed = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        (log_dir / f"{number:02d}_{step.tool}.log").write_text(
            f"$ {shlex.join(argv)}\n--- stdout ---\n{completed.stdout}\n--- stderr ---\n{completed.stderr}")
        if completed.returncode != 0:
            tail = "\n".join((completed.stderr or completed.stdout).strip().splitlines()[-20:])
            raise SDKToolError(f"{step.tool} failed with exit code {completed.returncode} ({step.purpose}).\n"
                               f"command: {shlex.join(argv)}\nstderr:\n{tail}")
        missing = [o for o in step.outputs if not (workdir / o).exists()]
        if missing:
            raise SDKToolError(f"{step.tool} exited 0 but did not write {missing}; command: {shlex.join(argv)}")
        ran.append({"tool": step.tool, "command": shlex.join(argv), "seconds": round(seconds, 3)})
    return ran
