"""The package layout stays true: import-linter's layer contract holds, and every module imports on its own."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dms_lightning

REPO = Path(__file__).resolve().parents[1]

# Imports each module named on the command line as if it were the first module of the package imported: every
# dms_lightning module is dropped from sys.modules before the next one (third-party imports stay cached, so the
# modules share one interpreter's torch import). An import cycle or a missing import fails here whatever the order.
IMPORT_ALONE = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "dms_lightning" or m.startswith("dms_lightning.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    names = ["dms_lightning"]
    for info in pkgutil.walk_packages(dms_lightning.__path__, "dms_lightning."):
        names.append(info.name)
    return names


def test_layer_contract_of_the_design_holds():
    pytest.importorskip("importlinter")  # part of the dev extra, so CI runs this
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    run = subprocess.run([lint, "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def test_every_module_of_the_package_imports_alone():
    modules = _modules()
    assert len(modules) > 50 and "dms_lightning.export.qdq" in modules and "dms_lightning.quant.qat" in modules
    run = subprocess.run([sys.executable, "-c", IMPORT_ALONE, *modules], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]

