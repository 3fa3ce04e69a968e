"""``manifest.json``: what an export directory holds, so a deployment needs nothing but the directory.

Each artifact (an ONNX model, a deploy bundle) is an entry with its relative path, sha256, size, and
what a runtime needs to feed it (opset, input name and shape) plus how it was checked (parity figures).
Several callbacks write to one directory, so entries are upserted by ``name`` and the file is rewritten
atomically each time. The manifest belongs to one run: entries carry the run that wrote them and an
entry of an earlier run into the same directory is dropped as soon as this run writes there (a rerun
without QAT no longer lists the previous ``student_int8``).
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
import weakref
from pathlib import Path

import onnx

from dms_lightning.utils.io import sha256_file, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "dms_lightning.export/1"

# One id per Trainer, shared by every exporter of its run, without adding state to the Trainer itself.
_RUN_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def export_run(trainer) -> str:
    """The id of ``trainer``'s run, the same for every callback that writes a manifest during it."""
    if trainer not in _RUN_IDS:
        _RUN_IDS[trainer] = uuid.uuid4().hex
    return _RUN_IDS[trainer]


def file_record(path: str | Path, root: str | Path) -> dict:
    """``{"path", "sha256", "bytes"}`` of ``path`` relative to ``root``."""
    path = Path(path)
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def onnx_record(path: str | Path, root: str | Path, **extra) -> dict:
    """A manifest entry for an ONNX file: file record plus opset, input/output names and shapes, metadata."""
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)

    def shape(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return {
        **file_record(path, root),
        "format": "onnx",
        "opset": opset,
        "input_name": model.graph.input[0].name,
        "input_shape": shape(model.graph.input[0]),
        "output_name": model.graph.output[0].name,
        "output_shape": shape(model.graph.output[0]),
        "metadata": {p.key: p.value for p in model.metadata_props},
        **extra,
    }


def directory_record(path: str | Path, root: str | Path, **extra) -> dict:
    """A manifest entry for a directory (a deploy bundle): every file with its sha256 and size."""
    path = Path(path)
    files = [file_record(f, root) for f in sorted(path.rglob("*")) if f.is_file()]
    return {"path": path.relative_to(root).as_posix(), "format": "directory",
            "bytes": sum(f["bytes"] for f in files), "files": files, **extra}


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {"format": FORMAT, "artifacts": []}
    return json.loads(path.read_text())


def update_manifest(directory: str | Path, entries: list[dict], run: str | None = None) -> Path:
    """Upsert ``entries`` (each with a unique ``name``) into ``directory/manifest.json``, atomically.

    With ``run`` (see :func:`export_run`), a manifest written by another run is started afresh.
    """
    manifest = read_manifest(directory)
    if run is not None and manifest.get("run") != run:
        manifest = {"format": FORMAT, "run": run, "artifacts": []}
    artifacts = {entry["name"]: entry for entry in manifest.get("artifacts", [])}
    for entry in entries:
        if "name" not in entry:
            raise ValueError(f"manifest entry without a name: {entry}")
        artifacts[entry["name"]] = {"name": entry["name"], **entry}
    manifest.update({"format": FORMAT, "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "artifacts": list(artifacts.values())})
    return write_json_atomic(Path(directory) / MANIFEST, manifest)
