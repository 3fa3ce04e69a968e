"""The docs a user reads stay true: the generated API reference matches the code, links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_up_to_date_with_the_code():
    spec = importlib.util.spec_from_file_location("make_reference", ROOT / "docs" / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "reference.md").read_text() == module.render(), \
        "docs/reference.md is stale: run `python docs/make_reference.py`"


def test_relative_links_in_readme_and_docs_point_at_existing_files():
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken


def test_every_config_named_in_the_readme_exists():
    named = set(re.findall(r"configs/[\w.-]+\.yaml", (ROOT / "README.md").read_text()))
    assert named and all((ROOT / path).is_file() for path in named), named


def test_readme_results_section_matches_the_saved_benchmark_tables():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "benchmarks" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.current() == module.render(), \
        "README's results section is stale: run `python benchmarks/readme_results.py`"
