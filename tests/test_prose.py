"""The README and the notebooks read plainly: words of prose per notebook and words per sentence, as
`scripts/prose_stats.py` counts them. The figures are printed at the end of the test log."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("prose_stats", ROOT / "scripts" / "prose_stats.py")
prose_stats = sys.modules["prose_stats"] = importlib.util.module_from_spec(_spec)  # its dataclass looks it up
_spec.loader.exec_module(prose_stats)

README_WORDS, NOTEBOOK_WORDS, MEAN_SENTENCE = 1200, 1500, 22.0


def test_prose_leaves_out_code_tables_headings_and_generated_blocks():
    markdown = ("# A heading of many words here\n\nOne sentence here. `TTSSession` runs it.\n\n"
                "```python\nnot = prose(at, all)\n```\n\n| a | table |\n|---|---|\n\n"
                "<!-- steps:start -->\nGenerated words, many of them.\n<!-- steps:end -->\n\n"
                "- A list item, [linked](https://example.org/a/long/address) once.\n")
    stats = prose_stats.measure("sample", markdown)
    assert stats.sentence_lengths == (3, 3, 5)
    assert stats.words == 11 and stats.mean == pytest.approx(11 / 3)


def test_a_notebook_counts_only_its_markdown_cells(tmp_path):
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "source": ["Two sentences. ", "Of prose."]},
        {"cell_type": "code", "source": ["print('not prose at all')"]}]}))
    assert prose_stats.measure_file(notebook).sentence_lengths == (2, 2)
    with pytest.raises(ValueError, match="give a .md or .ipynb file"):
        prose_stats.measure_file(tmp_path / "notes.txt")


def test_readme_prose_is_short_and_plain(log_line):
    notebooks = [path for path in prose_stats.catalog_notebooks() if path.is_file()]
    stats = [prose_stats.measure_file(prose_stats.README), *map(prose_stats.measure_file, notebooks)]
    log_line("prose statistics (scripts/prose_stats.py): words, and words per sentence")
    for line in prose_stats.table(stats).splitlines():
        log_line("  " + line)
    readme = stats[0]
    assert readme.words <= README_WORDS, f"README has {readme.words} words of prose: move reference to docs/"
    assert readme.mean <= MEAN_SENTENCE, f"README's sentences average {readme.mean:.1f} words: split the long ones"


@pytest.mark.parametrize("notebook", prose_stats.catalog_notebooks(), ids=lambda path: path.name)
def test_a_notebook_stays_within_its_word_budget(notebook):
    stats = prose_stats.measure_file(notebook)
    assert stats.words <= NOTEBOOK_WORDS, f"{notebook.name}: {stats.words} words of markdown"


def test_all_notebook_and_readme_prose_averages_at_most_22_words_a_sentence():
    sources = [prose_stats.README, *prose_stats.catalog_notebooks()]
    every = prose_stats.combined([prose_stats.measure_file(path) for path in sources], "all")
    assert every.mean <= MEAN_SENTENCE, f"{every.mean:.1f} words per sentence over the README and notebooks"


def test_readme_first_screen_says_what_it_is_the_headline_and_where_to_start():
    first_screen = "\n".join(prose_stats.README.read_text().splitlines()[:40])
    for needed in ("<!-- headline:end -->", "Start here:", "notebooks/00_baseline.ipynb", "CUDA GPU",
                   "make test", "make bench", "jupyter lab", "Measured on an **"):
        assert needed in first_screen, f"README's first 40 lines lack {needed!r}"
