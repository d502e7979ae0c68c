"""One utterance from a fresh process: `python -m chatterbox_lab say` against upstream's loop.

Each side runs as its own process, as a user would start it, and is timed from start to exit:
imports, model load, voice conditioning, compile or capture, and the synthesis itself. `say` runs
first once untimed, so the timed runs find the compile caches warm; upstream's loop has no caches
to warm. Upstream's side runs the stages of `ChatterboxTTS.generate` (`T3.inference`, S3Gen, the
watermark) through `synthesize(decoder=None)`, because `generate` cannot bound the token count,
on a model built as `from_local` builds it (`load_tts(skip_init=False)`).
Each process also reports its own stages (`say --timings`), so the record shows where the time
goes. Writes one results document: python scripts/say_vs_upstream.py OUT.json [REPEATS]
"""
from __future__ import annotations

import json
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
import json, sys, time
start = time.perf_counter()
import torch
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import voice_path
imported = time.perf_counter()
tts = load_tts(skip_init=False)  # built as upstream builds it
loaded = time.perf_counter()
torch.manual_seed(0)
result = synthesize(tts, {text!r}, voice=voice_path("alto"), decoder=None, max_new_tokens={tokens})
print(json.dumps(dict(import_s=imported - start, load_s=loaded - imported, first_request_s=result.seconds)),
      file=sys.stderr)
"""


def timed(command: list[str]) -> tuple[float, dict]:
    """A process's wall seconds from launch to exit, and the stage times it printed last on stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stderr.strip().splitlines()[-1])


def main(out: Path, repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory() as folder:
        wav = str(Path(folder) / "say.wav")
        say = [sys.executable, "-m", "chatterbox_lab", "say", TEXT, "--out", wav, "--overwrite",
               "--max-new-tokens", str(TOKENS), "--seed", "0", "--timings"]
        upstream = [sys.executable, "-c", UPSTREAM.format(text=TEXT, tokens=TOKENS)]
        cold_say, cold_stages = timed(say)  # fills the compile caches
        runs = {"say": [], "upstream": []}
        for _ in range(repeats):  # alternately, so drift on the card touches both alike
            runs["say"].append(timed(say))
            runs["upstream"].append(timed(upstream))
    figures = {name: dict(process_s=statistics.median(t for t, _ in timings), raw_s=[t for t, _ in timings],
                          stages_of_each=[stages for _, stages in timings])
               for name, timings in runs.items()}
    figures["say"].update(first_process_s=cold_say, first_process_stages=cold_stages)
    doc = dict(schema=results.SCHEMA, rungs=figures, checks={},
               provenance=results.provenance(device="cuda", preset="full", text=TEXT, tokens=TOKENS,
                                             repeats=repeats, voice="alto",
                                             method="each side a fresh process, timed from start to exit; "
                                                    "say's first process untimed (warms its compile caches)"))
    results.write(results.validate(doc), out, overwrite=True)
    print({name: round(f["process_s"], 2) for name, f in figures.items()})


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(int(n) for n in sys.argv[2:3]))
