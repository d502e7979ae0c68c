"""Build notebooks/NN_*.ipynb from their plain-text sources in notebooks/src/ and execute them.

    python scripts/build_notebooks.py [NAME ...]

The .py sources (jupytext percent format) are what reviewers read and edit; the
.ipynb files carry the executed outputs that readers see and nbval re-checks.
Execution runs in notebooks/ with the current Python's kernel.
"""
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def build(source: Path) -> Path:
    target = NOTEBOOKS / (source.stem + ".ipynb")
    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    os.environ.setdefault("TQDM_DISABLE", "1")
    start = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    nbformat.write(nb, target)
    print(f"{target.name}: executed in {time.perf_counter() - start:.0f} s")
    return target


if __name__ == "__main__":
    names = sys.argv[1:]
    for src in sorted((NOTEBOOKS / "src").glob("*.py")):
        if not names or src.stem in names or src.stem.split("_")[0] in names:
            build(src)
