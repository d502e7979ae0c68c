"""The corpus job on one GPU, measured: audio seconds per second over the example corpus.

    python scripts/corpus_record.py OUT [--batch N ...] [--tokens N] [--texts FILE]
    python scripts/corpus_record.py OUT --gpus 1 2 4 8 [--batch N] ...

One process, one session with every recommended step. For each batch size the job runs twice
over the texts, each time into a fresh folder under OUT: the first run pays the batched
decoder's capture and S3Gen's compiles for new lengths, the second is the steady rate.

With --gpus, the job instead runs under torchrun with each number of processes, one per GPU,
each time as fresh processes into a fresh folder, timed from launch to exit: model loads,
captures and compiles included, as a user would see them. The first batch size is used.

Writes OUT/corpus.json (a results document) and prints a table last. The job itself imports
no measurement code, so the record is made here.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from chatterbox_lab.records import results
from chatterbox_lab.serving.corpus import read_manifest, run_corpus
from chatterbox_lab.serving.session import TTSSession

EXAMPLE = Path(__file__).resolve().parent.parent / "data" / "corpus" / "example.jsonl"
# The synthetic checkpoint never stops early, so each line is exactly this many speech tokens:
# 10.24 s of audio, as in the bench's many-utterance runs.
TOKENS = 256


def measure(session, texts: Path, out: Path, batch: int, tokens: int) -> dict:
    summary = run_corpus(texts, out, batch=batch, max_new_tokens=tokens, session=session)
    rows = read_manifest(out)
    return dict(batch=batch, lines=summary.lines, written=summary.written, failed=summary.failed,
                audio_s=summary.audio_s, wall_s=summary.wall_s, audio_s_per_s=summary.audio_s_per_s,
                lines_per_s=summary.written / summary.wall_s if summary.wall_s else None,
                failures=sorted({row["reason"] for row in rows.values() if row["status"] != "ok"})[:5])


def measure_processes(texts: Path, out: Path, gpus: int, batch: int, tokens: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "chatterbox_lab", "corpus", str(texts), "--out", str(out), "--batch", str(batch),
               "--max-new-tokens", str(tokens), "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall_s = time.perf_counter() - start
    rows = read_manifest(out).values()
    audio_s = sum(row["audio_s"] for row in rows if row["status"] == "ok")
    return dict(gpus=gpus, batch=batch, lines=len(rows), failed=sum(row["status"] != "ok" for row in rows),
                audio_s=audio_s, wall_s=wall_s, audio_s_per_s=audio_s / wall_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the WAVs of every run and corpus.json")
    parser.add_argument("--texts", type=Path, default=EXAMPLE)
    parser.add_argument("--batch", type=int, nargs="+", default=(32, 64))
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--preset", help="synthetic model size (default: full on a GPU)")
    parser.add_argument("--gpus", type=int, nargs="+", metavar="N",
                        help="run under torchrun with N processes, one per GPU, for each N (fresh processes)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty: give a fresh folder, so no run resumes an earlier one")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = args.preset or ("full" if device == "cuda" else "tiny")
    runs, extra = {}, {}
    if args.gpus:
        for gpus in args.gpus:
            runs[f"corpus_{gpus}gpu"] = measure_processes(args.texts, args.out / f"{gpus}gpu", gpus, args.batch[0],
                                                          args.tokens)
        extra = dict(method="torchrun, one process per GPU, fresh processes per run, each into a fresh folder; "
                            "timed from launch to exit (model loads, captures and compiles included)")
    else:
        start = time.perf_counter()
        session = TTSSession(preset=args.preset, device=device, max_new_tokens=args.tokens)
        load_s = time.perf_counter() - start
        try:
            for batch in args.batch:
                for kind in ("first", "steady"):
                    runs[f"corpus_batch{batch}_{kind}"] = measure(session, args.texts,
                                                                  args.out / f"batch{batch}-{kind}", batch, args.tokens)
        finally:
            session.close()
        extra = dict(load_s=load_s, steps=sorted(session.decoder.steps),
                     method="one process, one session; per batch size a first run (captures and compiles "
                            "included) and a steady run, each into a fresh folder; model load excluded")
    doc = dict(schema=results.SCHEMA, rungs=runs, checks={},
               provenance=results.provenance(device=device, preset=preset, text=str(args.texts), tokens=args.tokens,
                                             **extra))
    path = results.write(doc, args.out / "corpus.json", overwrite=True)
    print(f"wrote {path}")
    print("| run | lines | failed | audio s | wall s | audio s/s |\n|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['lines']} | {run['failed']} | {run['audio_s']:.0f} | {run['wall_s']:.1f} "
              f"| {run['audio_s_per_s']:.0f} |")
    return 0 if all(run["failed"] == 0 for run in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
