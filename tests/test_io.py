"""Atomic writes and run folders: a finished artifact is complete or absent, an earlier run is never lost silently."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from dms_lightning.utils import io
from dms_lightning.utils.io import atomic_path, clean_stale, clean_stale_in, make_room_for_run


def _bundle(path, text):
    with atomic_path(path) as tmp:
        tmp.mkdir()
        (tmp / "model.onnx").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "raw").write_text(text)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".old")))


def test_a_directory_is_replaced_with_the_old_version_kept_until_the_new_one_is_in(tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    _bundle(target, "old")
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        # At every rename, one complete version exists: at the target or renamed aside.
        complete = [p for p in (target, *tmp_path.glob(".bundle.*.old/bundle")) if (p / "model.onnx").is_file()]
        seen.append(len(complete))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", spy)
    _bundle(target, "new")
    assert (target / "model.onnx").read_text() == "new" and (target / "sub" / "raw").read_text() == "new"
    assert seen and min(seen) >= 1
    assert _leftovers(tmp_path) == []


def test_a_failed_rename_in_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "bundle"
    _bundle(target, "old")
    real_replace = os.replace

    def fail_rename_in(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", fail_rename_in)
    with pytest.raises(OSError, match="disk full"):
        _bundle(target, "new")
    assert (target / "model.onnx").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_leftovers_of_a_killed_write_are_cleaned_and_a_lost_old_version_restored(tmp_path):
    target = tmp_path / "bundle"
    # Killed between "rename old aside" and "rename new in": only the aside copy exists.
    aside = tmp_path / ".bundle.abcd1234.old"
    (aside / "bundle").mkdir(parents=True)
    (aside / "bundle" / "model.onnx").write_text("old")
    partial = tmp_path / ".bundle.zz99yy88.partial"
    partial.mkdir()
    (partial / "model.onnx").write_text("half")
    unrelated = tmp_path / ".bundle_other.abcd1234.partial"
    unrelated.write_text("another artifact's temporary")

    cleaned = clean_stale(target)
    assert sorted(p.name for p in cleaned) == [aside.name, partial.name]
    assert (target / "model.onnx").read_text() == "old"
    assert _leftovers(tmp_path) == [unrelated.name]


def test_the_next_write_cleans_partial_files_of_a_killed_run(tmp_path):
    (tmp_path / ".model.onnx.k1ll3d00.partial").write_bytes(b"half an onnx")
    nested = tmp_path / "report"
    nested.mkdir()
    (nested / ".report.md.k1ll3d00.partial").write_text("half a table")
    with atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"onnx")
    assert _leftovers(tmp_path) == []
    assert [p.name for p in clean_stale_in(tmp_path)] == [".report.md.k1ll3d00.partial"]
    assert list(nested.iterdir()) == []


def test_a_read_only_earlier_directory_is_replaced_without_an_error(tmp_path):
    target = tmp_path / "bundle"
    _bundle(target, "old")
    for path in [*target.rglob("*"), target]:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR if path.is_dir() else stat.S_IRUSR)
    _bundle(target, "new")
    assert (target / "model.onnx").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_an_old_version_that_cannot_be_deleted_only_warns_after_the_new_one_is_in(tmp_path, monkeypatch, caplog):
    target = tmp_path / "bundle"
    _bundle(target, "old")

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io.shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING, logger="dms_lightning.utils.io"):
        _bundle(target, "new")
    assert (target / "model.onnx").read_text() == "new"
    assert "could not delete" in caplog.text and ".bundle." in caplog.text


def test_an_earlier_run_is_moved_to_a_numbered_version_not_deleted(tmp_path):
    folder = tmp_path / "distill"
    for run in ("first", "second"):
        folder.mkdir()
        (folder / "best.ckpt").write_text(run)
        make_room_for_run(folder)
    assert not folder.exists()
    assert (tmp_path / "distill-v1" / "best.ckpt").read_text() == "first"
    assert (tmp_path / "distill-v2" / "best.ckpt").read_text() == "second"


def test_overwrite_deletes_the_earlier_run_and_leftovers_alone_are_no_run(tmp_path):
    folder = tmp_path / "distill"
    folder.mkdir()
    (folder / ".model.onnx.k1ll3d00.partial").write_text("half")
    assert make_room_for_run(folder) is None and list(folder.iterdir()) == []
    (folder / "student_int8.onnx").write_text("earlier run")
    assert make_room_for_run(folder, overwrite=True) is None
    assert not folder.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_file_where_a_run_folder_should_be_is_refused_naming_the_field(tmp_path):
    (tmp_path / "distill").write_text("not a folder")
    with pytest.raises(FileExistsError, match="ONNXExport.dirpath="):
        make_room_for_run(tmp_path / "distill", field="ONNXExport.dirpath")


# utils/io.py needs only the standard library: loaded from its file, the writer starts in milliseconds.
_WRITER = """
import importlib.util, sys, time
from pathlib import Path

spec = importlib.util.spec_from_file_location("io_under_test", sys.argv[3])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
atomic_path = module.atomic_path
target, version = Path(sys.argv[1]), sys.argv[2]
for round in range(1000):
    with atomic_path(target) as tmp:
        tmp.mkdir()
        for i in range(20):
            (tmp / f"part{i}.bin").write_text(version * 1000)
            time.sleep(0.002)
    print("swapped", flush=True)
"""


@pytest.mark.parametrize("delay", [0.15, 0.4])
def test_kill_9_while_a_directory_is_rewritten_leaves_one_complete_version(tmp_path, delay):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    target = tmp_path / "bundle"
    _bundle(target, "old")
    root = Path(__file__).resolve().parents[1]
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), "n", io.__file__], cwd=root,
                              stdout=subprocess.PIPE)
    assert writer.stdout.readline().strip() == b"swapped"  # imports done, swapping in a loop now
    time.sleep(delay)
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    clean_stale(target)  # what the next write of the bundle does first
    files = sorted(p.name for p in target.iterdir())
    assert files == sorted(f"part{i}.bin" for i in range(20)), "a complete new version"
    assert {p.read_text() for p in target.iterdir()} == {"n" * 1000}
    assert _leftovers(tmp_path) == []
