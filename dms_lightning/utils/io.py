"""Atomic file and directory writes: a finished artifact is either complete or absent."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


PARTIAL_SUFFIX = ".partial"
ASIDE_SUFFIX = ".old"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Works for files and directories. On error the temporary is removed and ``path`` is untouched, so a
    crash mid-export never leaves a half-written model where a finished one is expected. A file replaces
    the old one in a single ``os.replace``. A directory cannot be replaced in one step, so the old one is
    renamed aside (``.<name>.<random>.old``), the new one renamed in, and only then is the old one deleted:
    at every instant one complete version exists. Leftovers of a process killed in between (a
    ``.partial`` temporary, an ``.old`` version) are cleaned the next time ``path`` is written: an
    ``.old`` whose ``path`` is missing is renamed back first. An old version that cannot be deleted
    (read-only files of someone else) is left beside the new one with a warning, never an error after
    the new version is in place.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "model.onnx"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_bytes(b"onnx")
        >>> target.read_bytes()
        b'onnx'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=ASIDE_SUFFIX, dir=path.parent))
            os.replace(path, aside / path.name)  # aside/<name>: the rename of a directory onto a new name
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside / path.name, path)
                remove_tree(aside)
                raise
            remove_tree(aside)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _leftovers(path: Path, suffix: str) -> list[Path]:
    # tempfile names: ".<name>." + 8 random characters + suffix; nothing else is ever matched.
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}{re.escape(suffix)}")
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


def clean_stale(path: str | Path) -> list[Path]:
    """Remove what killed writes of ``path`` left beside it; restore an ``.old`` version if ``path`` is missing.

    Returns the leftovers removed or restored.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    cleaned = []
    for aside in _leftovers(path, ASIDE_SUFFIX):
        old = aside / path.name
        if old.exists() and not path.exists():
            os.replace(old, path)  # killed between the two renames: the old version is the finished one
        remove_tree(aside)
        cleaned.append(aside)
    for partial in _leftovers(path, PARTIAL_SUFFIX):
        remove_tree(partial)
        cleaned.append(partial)
    return cleaned


def clean_stale_in(directory: str | Path) -> list[Path]:
    """:func:`clean_stale` for every artifact of ``directory`` (and its sub-folders) that has leftovers."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    leftovers = [p for p in directory.rglob(".*") if p.name.endswith((PARTIAL_SUFFIX, ASIDE_SUFFIX))]
    cleaned = []
    for leftover in sorted(leftovers, key=lambda p: len(p.parts)):
        if not leftover.exists() and not leftover.is_symlink():
            continue  # inside a leftover cleaned already
        suffix = PARTIAL_SUFFIX if leftover.name.endswith(PARTIAL_SUFFIX) else ASIDE_SUFFIX
        target = leftover.name[1:-len(suffix)].rsplit(".", 1)[0]
        cleaned += clean_stale(leftover.parent / target)
    return cleaned


def remove_tree(path: str | Path) -> bool:
    """Delete a file or directory tree, making read-only entries we own writable first.

    Returns False (with a warning naming the path) when it cannot be deleted, instead of raising: it is
    only ever called on a previous version or a leftover, after the new version is safely in place.
    """
    path = Path(path)

    def make_writable_and_retry(function, target, _exc_info) -> None:
        os.chmod(os.path.dirname(target) or ".", stat.S_IRWXU)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, stat.S_IRWXU)
        function(target)

    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, onerror=make_writable_and_retry)
        elif path.exists() or path.is_symlink():
            path.unlink()
        return True
    except OSError as err:
        log.warning("[dms_lightning] could not delete %s (%s); the new version is in place, delete the old one "
                    "by hand", path, err)
        return False


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def ensure_writable_dir(path: str | Path, field: str) -> Path:
    """Create ``path`` if needed and check it is writable; raise naming ``field`` otherwise."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"{field}={str(path)!r} cannot be created: {err}") from err
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{field}={str(path)!r} is not writable")
    return path


def make_room_for_run(folder: str | Path, overwrite: bool = False, field: str = "dirpath") -> Path | None:
    """Keep a new run from mixing with, or silently destroying, what an earlier run left in ``folder``.

    A folder that holds files of an earlier run is renamed to ``<folder>-v<N>`` (the first free N, so
    higher numbers are more recent runs) and the new run starts in an empty ``folder``: fixed paths such
    as ``artifacts/distill/student_int8.onnx`` always hold the latest run, and nothing is deleted.
    With ``overwrite=True`` the earlier run's files are deleted instead. Leftovers of killed writes
    (``.partial`` / ``.old``) are cleaned first and do not count as a run. Returns where the earlier run
    went (None: nothing to keep).

    Raises:
        PermissionError: the folder cannot be moved or deleted (the message names ``field`` and the path).
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise FileExistsError(f"{field}={str(folder)!r} is a file; it must be a folder (or not exist yet)")
    try:
        clean_stale_in(folder)
    except OSError as err:
        raise PermissionError(f"{field}={str(folder)!r}: cannot clean leftovers of an earlier run: {err}") from err
    if not any(folder.iterdir()):
        return None
    if overwrite:
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=ASIDE_SUFFIX, dir=folder.parent))
        try:
            os.replace(folder, aside / folder.name)
        except OSError as err:
            remove_tree(aside)
            raise PermissionError(f"{field}={str(folder)!r} holds an earlier run that cannot be replaced "
                                  f"(overwrite: true): {err}. Make it writable or choose another folder") from err
        if not remove_tree(aside):
            raise PermissionError(f"{field}={str(folder)!r}: the earlier run (now at {aside}) cannot be deleted "
                                  "(overwrite: true). Make it writable, or drop `overwrite` to keep it as a version")
        return None
    version = 1
    while (folder.parent / f"{folder.name}-v{version}").exists():
        version += 1
    target = folder.parent / f"{folder.name}-v{version}"
    try:
        os.replace(folder, target)
    except OSError as err:
        raise PermissionError(f"{field}={str(folder)!r} holds an earlier run that cannot be moved to {target}: "
                              f"{err}. Make the parent folder writable, choose another folder, or set "
                              "`overwrite: true`") from err
    return target
