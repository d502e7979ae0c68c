"""How long the workbook's prose is: words of markdown per notebook, and words per sentence.

    python scripts/prose_stats.py            # the README and every notebook in notebooks/catalog.json
    python scripts/prose_stats.py FILE ...   # any .md or .ipynb files

What counts as prose, in README.md and in a notebook's markdown cells:

- counted: paragraphs and list items, with inline code counted as one word per code span and a link
  counted by its text (not its address);
- left out: fenced code blocks, tables, headings, HTML comments, images, and the README's generated
  blocks (`<!-- name:start -->` to `<!-- name:end -->`), which the records write, not a person.

A sentence ends at `.`, `!` or `?` followed by a space and a capital, a digit, a backtick, a link or
emphasis, or at the end of a paragraph or list item. A word is a run of non-space characters holding a letter or a digit.
The mean sentence length is total words over total sentences, so a long source weighs more.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOTEBOOKS = ROOT / "notebooks"

_GENERATED = re.compile(r"<!-- (\w+):start -->.*?<!-- \1:end -->", re.S)
_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_CODE_SPAN = re.compile(r"`[^`\n]+`")
_LIST_MARK = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\d\"'(*\[])")
_WORD = re.compile(r"\S*[A-Za-z0-9]\S*")


@dataclass(frozen=True)
class ProseStats:
    source: str
    words: int
    sentence_lengths: tuple  # words per sentence, in order

    @property
    def sentences(self) -> int:
        return len(self.sentence_lengths)

    @property
    def mean(self) -> float:
        return self.words / self.sentences if self.sentences else 0.0

    @property
    def longest(self) -> int:
        return max(self.sentence_lengths, default=0)


def blocks(markdown: str) -> list[str]:
    """The prose blocks of `markdown`: each paragraph and each list item, its lines joined, with
    code, tables, headings, comments, images and generated blocks left out."""
    text = _GENERATED.sub("\n\n", markdown)
    text = _FENCE.sub("\n\n", text)
    text = _COMMENT.sub("", text)
    found, current = [], []

    def close():
        if current:
            found.append(" ".join(current))
            current.clear()

    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "|")):
            close()
            continue
        if _LIST_MARK.match(line):
            close()
            stripped = _LIST_MARK.sub("", line).strip()
        current.append(stripped.lstrip("> "))
    close()
    return found


def sentences(block: str) -> list[str]:
    """The sentences of a prose block, each with its links read as their text and each code span as
    the one word `code` (a name or a command reads as one word)."""
    found = []
    for part in _SENTENCE_END.split(_IMAGE.sub("", block)):
        part = _CODE_SPAN.sub("code", _LINK.sub(r"\1", part))
        if _WORD.search(part):
            found.append(part)
    return found


def measure(source: str, markdown: str) -> ProseStats:
    lengths = tuple(len(_WORD.findall(sentence)) for block in blocks(markdown) for sentence in sentences(block))
    return ProseStats(source, sum(lengths), lengths)


def notebook_markdown(path: Path) -> str:
    """The markdown cells of a notebook, one after the other."""
    cells = json.loads(Path(path).read_text())["cells"]
    return "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")


def measure_file(path: Path) -> ProseStats:
    path = Path(path)
    if path.suffix == ".ipynb":
        return measure(path.name, notebook_markdown(path))
    if path.suffix == ".md":
        return measure(path.name, path.read_text())
    raise ValueError(f"{path}: give a .md or .ipynb file")


def catalog_notebooks() -> list[Path]:
    """The notebooks `notebooks/catalog.json` lists, in its order."""
    catalog = json.loads((NOTEBOOKS / "catalog.json").read_text())
    return [NOTEBOOKS / entry["file"] for entry in catalog["notebooks"]]


def combined(stats: list[ProseStats], source: str) -> ProseStats:
    return ProseStats(source, sum(s.words for s in stats), tuple(n for s in stats for n in s.sentence_lengths))


def table(stats: list[ProseStats]) -> str:
    """A plain-text table: one row per source, then all of them together."""
    rows = [*stats, combined(stats, "all")]
    width = max(len(s.source) for s in rows)
    lines = [f"{'source':<{width}}  words  sentences  mean  median  longest"]
    for s in rows:
        median = statistics.median(s.sentence_lengths) if s.sentence_lengths else 0
        lines.append(f"{s.source:<{width}}  {s.words:>5}  {s.sentences:>9}  {s.mean:>4.1f}  {median:>6.1f}  "
                     f"{s.longest:>7}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [README, *catalog_notebooks()]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        print(f"no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        print(table([measure_file(p) for p in paths]))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
