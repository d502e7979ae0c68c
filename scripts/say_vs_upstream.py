"""One utterance from a fresh process: `python -m chatterbox_lab say` against upstream's loop.

Each side runs as its own process, as a user would start it, and is timed from start to exit:
model load, voice conditioning, compile or capture, and the synthesis itself. `say` runs first
once untimed, so the timed runs find the compile caches warm; upstream's loop has no caches to
warm. Writes one results document: python scripts/say_vs_upstream.py OUT.json [REPEATS]
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chatterbox_lab.records import results

TEXT = ("Every step of this workbook is measured, profiled and checked against the upstream path, "
        "so a speed-up you read here is one you can reproduce.")
TOKENS = 256  # 10.24 s of audio
UPSTREAM = """
import torch
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path
tts = load_tts()
torch.manual_seed(0)
synthesize(tts, {text!r}, voice=voice_path("alto"), decoder=None, max_new_tokens={tokens})
"""


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(out: Path, repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory() as folder:
        wav = str(Path(folder) / "say.wav")
        say = [sys.executable, "-m", "chatterbox_lab", "say", TEXT, "--out", wav, "--overwrite",
               "--max-new-tokens", str(TOKENS), "--seed", "0"]
        upstream = [sys.executable, "-c", UPSTREAM.format(text=TEXT, tokens=TOKENS)]
        cold_say = timed(say)  # fills the compile caches
        runs = {"say": [], "upstream": []}
        for _ in range(repeats):  # alternately, so drift on the card touches both alike
            runs["say"].append(timed(say))
            runs["upstream"].append(timed(upstream))
    figures = {name: dict(process_s=statistics.median(times), raw_s=times) for name, times in runs.items()}
    figures["say"]["first_process_s"] = cold_say
    doc = dict(schema=results.SCHEMA, rungs=figures, checks={},
               provenance=results.provenance(device="cuda", preset="full", text=TEXT, tokens=TOKENS,
                                             repeats=repeats, voice="alto",
                                             method="each side a fresh process, timed from start to exit; "
                                                    "say's first process untimed (warms its compile caches)"))
    results.write(results.validate(doc), out, overwrite=True)
    print({name: round(f["process_s"], 2) for name, f in figures.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(int(n) for n in sys.argv[2:3]))
