"""The docs a user reads stay true: the generated API reference matches the code, links resolve."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_up_to_date_with_the_code():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "reference.md").read_text() == module.render(), \
        "docs/reference.md is stale: run `python docs/make_reference.py`"


def _relative_links():
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            yield page, page.parent / target


def test_relative_links_in_readme_and_docs_point_at_existing_files():
    broken = [f"{page.name} -> {target.relative_to(page.parent)}"
              for page, target in _relative_links() if not target.exists()]
    assert not broken


def test_no_linked_file_is_git_ignored():
    """A linked file that exists here but is ignored by git is missing from every clone."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    targets = [str(target.resolve().relative_to(ROOT)) for _, target in _relative_links() if target.exists()]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *targets], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    assert not ignored, f"linked from the docs but ignored by .gitignore: {ignored}"


def test_every_config_named_in_the_readme_exists():
    named = set(re.findall(r"configs/[\w.-]+\.yaml", (ROOT / "README.md").read_text()))
    assert named and all((ROOT / path).is_file() for path in named), named


def test_readme_results_section_matches_the_saved_benchmark_tables():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "benchmarks" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.current() == module.render(), \
        "README's results section is stale: run `python benchmarks/readme_results.py`"
