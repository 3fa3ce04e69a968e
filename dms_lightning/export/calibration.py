"""Calibration and test inputs for SNPE / QNN tools: float32 NHWC ``.raw`` files and ``input_list.txt``.

``snpe-dlc-quantize``, ``qnn-onnx-converter --input_list`` and ``snpe-net-run`` / ``qnn-net-run`` read
each input as the raw bytes of a float32 tensor in the converted network's layout, which for images is
NHWC (the converters move an ONNX NCHW graph to channel-last), one file per sample, listed one per line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dms_lightning.utils.io import atomic_path

INPUT_LIST = "input_list.txt"


def to_nhwc(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``N × C × H × W`` → contiguous float32 ``N × H × W × C``."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if array.ndim != 4:
        raise ValueError(f"calibration images must be N x C x H x W, got shape {tuple(array.shape)}")
    return np.ascontiguousarray(array.transpose(0, 2, 3, 1), dtype=np.float32)


def write_calibration_raws(images: torch.Tensor | np.ndarray, directory: str | Path, *,
                           subdir: str = "calibration", input_name: str | None = None) -> list[Path]:
    """Write each image as ``<directory>/<subdir>/sample_0000.raw`` (float32 NHWC) and ``input_list.txt``.

    Paths in ``input_list.txt`` are relative to ``directory`` (run the SDK tools from there, as
    ``convert.sh`` does). With ``input_name`` each line reads ``<input_name>:=<path>``, the form SNPE /
    QNN need when a network has several inputs. Each file is written atomically.

    Example:
        >>> import tempfile
        >>> files = write_calibration_raws(torch.zeros(2, 1, 8, 8), tempfile.mkdtemp())
        >>> [f.name for f in files], files[0].stat().st_size
        (['sample_0000.raw', 'sample_0001.raw'], 256)
    """
    directory = Path(directory)
    nhwc = to_nhwc(images)
    files = []
    for index, sample in enumerate(nhwc):
        path = directory / subdir / f"sample_{index:04d}.raw"
        with atomic_path(path) as tmp:
            sample.tofile(tmp)
        files.append(path)
    lines = [str(f.relative_to(directory)) for f in files]
    if input_name:
        lines = [f"{input_name}:={line}" for line in lines]
    with atomic_path(directory / INPUT_LIST) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return files


def read_raw(path: str | Path, shape_nhwc: Sequence[int]) -> np.ndarray:
    """Read one ``.raw`` file back as a float32 ``H × W × C`` (or any ``shape_nhwc``) array."""
    data = np.fromfile(path, dtype=np.float32)
    expected = int(np.prod(shape_nhwc))
    if data.size != expected:
        raise ValueError(f"{path} holds {data.size} float32 values, expected {expected} for shape {tuple(shape_nhwc)}")
    return data.reshape(tuple(shape_nhwc))
