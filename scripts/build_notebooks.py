"""Build notebooks/NN_*.ipynb from their plain-text sources in notebooks/src/ and execute them.

    python scripts/build_notebooks.py [NAME ...]
    python scripts/build_notebooks.py --out DIR [NAME ...]

The .py sources (jupytext percent format) are what reviewers read and edit; the
.ipynb files carry the executed outputs that readers see and nbval re-checks.
Execution runs in notebooks/ with the current Python's kernel. A NAME is a source's
stem or its number (`04`); none builds them all.

`--out DIR` leaves the committed notebooks alone: the executed copies go to DIR, with
`notebook_seconds.json` (seconds per notebook and the device it ran on), and a table of
the times is printed last. That is how a notebook's runtime on a GPU is measured.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def build(source: Path, out: Path = NOTEBOOKS) -> float:
    """Execute `source` into `out`/<stem>.ipynb; returns the seconds it took."""
    target = out / (source.stem + ".ipynb")
    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    # Progress bars would be committed as frozen widgets ("0%| 0/2"), which read as a hang.
    os.environ.setdefault("TQDM_DISABLE", "1")
    start = time.perf_counter()
    NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, target)
    print(f"{target.name}: executed in {seconds:.0f} s", flush=True)
    return seconds


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="sources to build (stem or number); none: all")
    parser.add_argument("--out", type=Path, help="write executed copies and their times here, not to notebooks/")
    args = parser.parse_args(argv)
    sources = [src for src in sorted((NOTEBOOKS / "src").glob("*.py"))
               if not args.names or src.stem in args.names or src.stem.split("_")[0] in args.names]
    if not sources:
        parser.error(f"no source in {NOTEBOOKS / 'src'} matches {args.names}")
    out = args.out or NOTEBOOKS
    out.mkdir(parents=True, exist_ok=True)
    seconds = {src.stem: build(src, out) for src in sources}
    if args.out:
        device = _device()
        (out / "notebook_seconds.json").write_text(json.dumps({"device": device, "seconds": seconds}, indent=2))
        print(f"\n| notebook | seconds on {device} |\n|---|---|")
        print("\n".join(f"| {name} | {s:.0f} |" for name, s in seconds.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
