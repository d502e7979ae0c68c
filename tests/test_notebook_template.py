"""Every notebook of the catalog follows the one template: the same second-level headings in the same
order, and the code of its change rendered from the package's source by `show_code`, never pasted."""
import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
TEMPLATE = ("What you will learn", "Why", "The change", "Proof", "Summary", "Exercises")
# What show_code's caption says under every block it renders: "<name> · <file>, lines <first>–<last>".
CAPTION = re.compile(r"\.py, lines \d+–\d+")


def _catalog() -> list:
    return [entry["file"] for entry in json.loads((NOTEBOOKS / "catalog.json").read_text())["notebooks"]]


def _sections(notebook) -> dict:
    """{second-level heading: the cells under it}; cells before the first such heading go under ""."""
    sections, current = {"": []}, ""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("## "):
                    current = line[3:].strip()
                    sections[current] = []
        sections[current].append(cell)
    return sections


def _outputs_text(cell) -> str:
    return "".join(json.dumps(output.get("data", {}), ensure_ascii=False) + output.get("text", "") for output in cell.get("outputs", []))


@pytest.mark.parametrize("name", _catalog())
def test_a_notebook_has_the_template_headings_in_order(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    headings = [heading for heading in _sections(notebook) if heading]
    assert tuple(headings) == TEMPLATE, (
        f"{name}: its '## ' headings are {headings}; the template's are {list(TEMPLATE)} in that order "
        "(use '###' inside a section)")


@pytest.mark.parametrize("name", _catalog())
def test_the_change_is_shown_from_the_package_source(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    change = _sections(notebook).get("The change", [])
    shown = [cell for cell in change if cell.cell_type == "code" and "show_code(" in cell.source]
    assert shown, f"{name}: no cell under '## The change' calls show_code(...)"
    assert any(CAPTION.search(_outputs_text(cell)) for cell in shown), (
        f"{name}: the show_code cell has no rendered source in its outputs: rebuild the notebook with "
        "scripts/build_notebooks.py")


def test_the_section_reader_splits_at_second_level_headings_only():
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# 00 · Title\n\n## What you will learn\n\n### A part"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_markdown_cell("## Why")])
    sections = _sections(notebook)
    assert list(sections) == ["", "What you will learn", "Why"]
    assert [cell.cell_type for cell in sections["What you will learn"]] == ["markdown", "code"]
