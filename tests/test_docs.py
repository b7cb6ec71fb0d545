"""The docs' Python examples and file names are the code's: what a code block imports exists, and every config and
script a page names is in the repository."""

import importlib
import re

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FROM_IMPORT = re.compile(r"^\s*from ([\w.]+) import \(?([\w, ]+)\)?\s*$", re.M)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_what_the_examples_import_exists(page):
    missing = []
    for block in python_blocks(page.read_text()):
        for module_name, names in FROM_IMPORT.findall(block):
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                missing.append(f"{module_name} ({err})")
                continue
            missing += [f"{module_name}.{n}" for n in map(str.strip, names.split(",")) if n and not hasattr(module, n)]
    assert not missing, f"{page.name} imports what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_configs_and_scripts_a_page_names_exist(page):
    text = page.read_text()
    configs = set(re.findall(r"models/([\w.-]+\.yaml)", text))
    scripts = set(re.findall(r"python (?:\./)?((?:[\w]+/)*[\w]+\.py)", text))
    absent = sorted(f"models/{c}" for c in configs if not (ROOT / "models" / c).is_file())
    absent += sorted(s for s in scripts if not (ROOT / s).is_file())
    assert not absent, f"{page.name} names files that do not exist: {absent}"
