"""Command line: `python -m chatterbox_lab bench [--ladder] ...` (what `make bench` runs)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import signal
import sys
from pathlib import Path

from chatterbox_lab.records import results
from chatterbox_lab.loading.architecture import PRESETS
from chatterbox_lab.measure.bench import (EXPERIMENTAL_RUNGS, LADDER_RUNGS, RUNGS, BenchConfig, batch_table, run,
                                          summary_table)
from chatterbox_lab.registry import S3GEN_STEPS
from chatterbox_lab.sampling import SamplingParams, TurboSamplingParams
from chatterbox_lab.validation import TTS_MODELS

LOCAL_RESULTS = Path("bench-results")
BATCH_REQUESTS_HELP = ("decode up to N waiting requests together, each with its own values (requests with a seed "
                       "run alone); default: 1, one at a time, until a soak record shows batching faster")


def default_output(doc: dict) -> Path:
    prov = doc["provenance"]
    stamp = dt.datetime.fromisoformat(prov["date_utc"]).strftime("%Y%m%dT%H%M%SZ")
    if prov.get("gpu"):
        slug = re.sub(r"[^a-z0-9]+", "-", prov["gpu"].lower()).strip("-")
        return results.RESULTS_DIR / f"{slug}-{prov['preset']}-{stamp}.json"
    # CPU runs are for checking the harness, not for the committed record.
    return LOCAL_RESULTS / f"cpu-{prov['preset']}-{stamp}.json"


def check_checkpoint_tokenizer(checkpoint) -> None:
    """A checkpoint directory's tokenizer.json, checked before the model loads (upstream
    would stop there with a traceback); the synthetic and hub checkpoints are our own."""
    from chatterbox_lab.validation import check_tokenizer_file

    if checkpoint not in ("synthetic", "hub") and (Path(checkpoint) / "tokenizer.json").is_file():
        check_tokenizer_file(Path(checkpoint) / "tokenizer.json")


def say(args) -> Path:
    """One utterance into a WAV file; every cheap check runs before the model loads."""
    from chatterbox_lab.decode.plan import device_kind
    from chatterbox_lab.loading.models import resolve_device
    from chatterbox_lab.pipeline.voices import REFERENCE_RATE, read_reference
    from chatterbox_lab.registry import preset
    from chatterbox_lab.serving.session import TTSSession
    from chatterbox_lab.validation import (MAX_LONG_TEXT_CHARS, MAX_TEXT_CHARS, check_language, check_number,
                                           check_output_path, check_seed, check_text, check_token_count,
                                           check_turbo_voice)

    # Arguments that are not UTF-8 reach Python as surrogate escapes; encoding them back
    # gives check_text the original bytes to refuse.
    text = check_text(os.fsencode(args.text), max_chars=MAX_LONG_TEXT_CHARS if args.chunk else MAX_TEXT_CHARS)
    sampling = sampling_of(args)
    check_language(args.model, args.language)
    tokens = check_token_count(args.max_new_tokens)
    exaggeration, seed = check_number("exaggeration", args.exaggeration), check_seed(args.seed)
    check_output_path(args.out, args.overwrite)
    voice = read_reference(args.voice)
    if args.model == "turbo":
        check_turbo_voice(len(voice.samples) / REFERENCE_RATE)
    if args.model == "original":
        check_checkpoint_tokenizer(args.checkpoint)
    # T3's recommended steps capture their graphs in seconds; S3Gen's steps that start with a
    # torch.compile of their own take longer than one utterance gains, so they are left out.
    kind = device_kind(resolve_device(args.device))
    session = TTSSession(args.checkpoint, model=args.model, preset=args.preset, device=args.device, steps="recommended",
                         s3gen_steps=preset("recommended", kind, "s3gen", compiles=False), max_new_tokens=tokens,
                         progress=True)
    try:
        speech = session.synthesize(text, voice, sampling=sampling, max_new_tokens=tokens,
                                    exaggeration=exaggeration, seed=seed, chunk=args.chunk, language=args.language)
        path = speech.save(args.out, args.overwrite)
    finally:
        session.close()
    if args.timings:
        # The first request pays the decoder's captures and S3Gen's, so its stages are start-up too.
        print(json.dumps({"startup_s": session.startup_s, "first_request_s": speech.seconds}), file=sys.stderr)
    return path


def sampling_of(args):
    """The sampling values `say` was given, over the model's defaults (`sampling.sampling_for`)."""
    from chatterbox_lab.sampling import sampling_for
    from chatterbox_lab.validation import check_model

    names = [f.name for f in dataclasses.fields(SamplingParams)] + ["top_k"]
    return sampling_for(check_model(args.model), **{name: getattr(args, name) for name in names})


def corpus(args, parser) -> int:
    """The corpus job. It exits 0 once its share is through, failed lines included (the manifest
    says why): under torchrun a non-zero exit of one process stops the others."""
    from chatterbox_lab.serving.corpus import check_job, run_corpus

    try:
        check_job(args.texts, args.out, args.batch, args.max_new_tokens)
        check_checkpoint_tokenizer(args.checkpoint)
        with sigterm_as_interrupt():
            summary = run_corpus(args.texts, args.out, batch=args.batch, max_new_tokens=args.max_new_tokens,
                                 progress=not args.no_progress, source=args.checkpoint, preset=args.preset,
                                 device=args.device, s3gen_steps=_s3gen_steps(args))
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    except KeyboardInterrupt:
        print("interrupted: the finished lines are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(f"{summary.written} written, {summary.skipped} done before, {summary.failed} failed "
          f"(reasons in {summary.manifest}); {summary.audio_s:.1f} s of audio in {summary.wall_s:.1f} s "
          f"({summary.audio_s_per_s:.1f} audio s/s)")
    return 0


@contextlib.contextmanager
def sigterm_as_interrupt():
    """A kill (SIGTERM) ends the block as Ctrl-C does, through its clean-up: no temporary file is left."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _s3gen_steps(args, default="recommended"):
    """`--s3gen STEP...` those steps; `--s3gen` alone all of S3Gen's steps; without it, `default`."""
    return default if args.s3gen is None else tuple(args.s3gen or S3GEN_STEPS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chatterbox_lab")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="measure rungs of the ladder; prints a table, writes one JSON file")
    b.add_argument("--ladder", action="store_true",
                   help="the ladder: " + ", ".join(LADDER_RUNGS) + ", then S3Gen's recommended steps as --s3gen")
    b.add_argument("--experimental", action="store_true",
                   help="also the experimental rungs, each the recommended set with one step measured slower: "
                        + ", ".join(EXPERIMENTAL_RUNGS))
    b.add_argument("--rungs", nargs="+", choices=RUNGS, help="rungs to run (default with neither --ladder nor --experimental: upstream_fp32)")
    b.add_argument("--preset", choices=PRESETS, help="synthetic model size (default: full on GPU, tiny on CPU)")
    b.add_argument("--checkpoint", default="synthetic", help="'synthetic', 'hub' or a checkpoint directory")
    b.add_argument("--device", help="cuda, cpu, mps or cuda:N (default: cuda when available)")
    b.add_argument("--tokens", type=int, help="speech tokens per utterance (default: 256 GPU, 32 CPU)")
    b.add_argument("--repeats", type=int, help="timed repeats per rung (default: 3 GPU, 2 CPU)")
    b.add_argument("--voice", default="alto", help="bundled voice name or audio path")
    b.add_argument("--checks", action="store_true", help="also check fp32 token identity and bf16 logits")
    b.add_argument("--no-profile", action="store_true", help="skip the per-token launch counts")
    b.add_argument("--tune", action="store_true",
                   help="tune the kernels on this card first (their sweeps, then the chain tuning inside the "
                        "captured step: minutes); without it the rungs run with the picks shipped for this "
                        "card model, else the kernels' defaults")
    b.add_argument("--tune-from", metavar="RECORD",
                   help="run with the picks of this bench record (JSON) of the same card instead, and start "
                        "--tune from them")
    b.add_argument("--trace-dir", help="write a short trace per rung under this directory")
    b.add_argument("--batch", type=int, nargs="+", default=(), metavar="N",
                   help="also decode N utterances at once with the last rung's steps (e.g. 1 8 32 64)")
    b.add_argument("--stream", action="store_true",
                   help="also stream one utterance with the last rung's steps: time to first audio, seam error")
    b.add_argument("--many", type=int, default=0, metavar="N",
                   help="also synthesize N utterances together with the last rung's steps: x_realtime")
    b.add_argument("--many-flow-steps", type=int, metavar="K",
                   help="and the N utterances again with K Euler steps of S3Gen's flow instead of upstream's 10 "
                        "(faster, different audio: the mel difference is recorded)")
    b.add_argument("--s3gen", nargs="*", choices=S3GEN_STEPS, metavar="STEP",
                   help="then S3Gen's steps one by one, each a rung, with the last rung's T3 steps "
                        f"(no STEP: all of {', '.join(S3GEN_STEPS)})")
    b.add_argument("--out", type=Path, help="results JSON path (default: data/results/ on a GPU)")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    sub.add_parser("readme", help="regenerate the generated tables of README.md and docs/ from data/results/ "
                                  "and the step registry")
    p = sub.add_parser("ship-picks", help="ship a bench record's tuned kernel picks for its card model "
                                          "(chatterbox_lab/kernels/shipped/), so a fresh process starts with them")
    p.add_argument("record", type=Path, help="a bench record (JSON) made with --tune")
    s = sub.add_parser("serve", help="HTTP example: POST /synthesize, POST /v1/audio/speech (OpenAI's), "
                                     "PUT and DELETE /voices/{id}, GET /health; limits in docs/serving.md")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", choices=TTS_MODELS, default="original", help="which Chatterbox; default: %(default)s")
    s.add_argument("--preset", choices=PRESETS)
    s.add_argument("--checkpoint", default="synthetic")
    s.add_argument("--device")
    s.add_argument("--s3gen", nargs="*", choices=S3GEN_STEPS, metavar="STEP",
                   help=f"S3Gen's steps (no STEP: all of {', '.join(S3GEN_STEPS)}); default: the recommended ones")
    s.add_argument("--batch-requests", type=int, default=1, metavar="N", help=BATCH_REQUESTS_HELP)
    k = sub.add_parser("soak", help="serve on 127.0.0.1 and soak it with concurrent clients; writes one JSON")
    k.add_argument("--requests", type=int, default=500)
    k.add_argument("--clients", type=int, default=4)
    k.add_argument("--tokens", type=int, nargs=2, default=(4, 12), metavar=("LOW", "HIGH"),
                   help="speech tokens per request, drawn from LOW..HIGH (256: about 10 s of audio)")
    k.add_argument("--lone", type=int, default=0, metavar="N",
                   help="first N requests from one client at HIGH tokens with a cached voice: the lone latency")
    k.add_argument("--time-limit", type=float, default=600,
                   help="seconds; requests not started by then are counted as not_started")
    k.add_argument("--batch-requests", type=int, default=1, metavar="N",
                   help="N > 1: send the requests without seeds, first to the session serving one at a time, then "
                        "decoding up to N waiting requests together (both recorded)")
    k.add_argument("--startup", action="store_true",
                   help="first time two fresh processes' start-up to their first request: from empty compile "
                        "caches, then warm")
    k.add_argument("--preset", choices=PRESETS)
    k.add_argument("--device")
    k.add_argument("--s3gen", nargs="*", choices=S3GEN_STEPS, metavar="STEP",
                   help=f"S3Gen's steps for the session (no STEP: all of {', '.join(S3GEN_STEPS)}); "
                        "default: the recommended ones")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--overwrite", action="store_true")
    y = sub.add_parser("say", help="speak TEXT into a 16-bit WAV file (no compile, no warm-up)")
    y.add_argument("text")
    y.add_argument("--out", type=Path, required=True, help="WAV file to write")
    y.add_argument("--voice", default="alto", help="bundled voice name or audio path")
    y.add_argument("--checkpoint", default="synthetic", help="'synthetic', 'hub' or a checkpoint directory")
    y.add_argument("--preset", choices=PRESETS, help="synthetic model size (default: full on GPU, tiny on CPU)")
    y.add_argument("--device", help="cuda, cpu, mps or cuda:N (default: cuda when available)")
    y.add_argument("--max-new-tokens", type=int, default=1000, help="speech tokens at most, 25 per second")
    y.add_argument("--model", choices=TTS_MODELS, default="original", help="which Chatterbox; default: %(default)s")
    y.add_argument("--language", help="the multilingual model's language id (en, fr, el, ...)")
    for f in dataclasses.fields(SamplingParams):
        y.add_argument(f"--{f.name.replace('_', '-')}", type=float,
                       help=f"default: {f.default} (turbo: {getattr(TurboSamplingParams, f.name, 'refused')})")
    y.add_argument("--top-k", type=int, help="turbo only; default: 1000, 0 keeps every token")
    y.add_argument("--exaggeration", type=float, default=0.5, help="emotion intensity, 0 to 2; default: %(default)s")
    y.add_argument("--seed", type=int)
    y.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    y.add_argument("--timings", action="store_true",
                   help="print the seconds of each start-up stage and of the request's stages, as JSON, to stderr")
    y.add_argument("--chunk", action="store_true",
                   help="text of any length, spoken sentence chunk by chunk (--max-new-tokens bounds each)")
    c = sub.add_parser("corpus", help="speak a JSON-lines file of texts into one WAV per line and a manifest; "
                                      "resumes where a stopped run left off; shards by rank under torchrun "
                                      "(docs/corpus.md)")
    c.add_argument("texts", type=Path, help="one JSON object per line: id, text, voice (a bundled name or an audio "
                                            "path relative to this file), optional sampling values "
                                            f"({', '.join(f.name for f in dataclasses.fields(SamplingParams))}), "
                                            "seed (the line then runs alone, reproducibly) and model ('original')")
    c.add_argument("--out", type=Path, required=True,
                   help="folder for <id>.wav and the manifest (manifest.jsonl; manifest.rank<R>.jsonl under torchrun)")
    c.add_argument("--batch", type=int, default=32,
                   help="utterances T3 decodes at once; the KV cache grows with it (default: %(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=1000, help="speech tokens per line at most, 25 per second")
    c.add_argument("--checkpoint", default="synthetic", help="'synthetic', 'hub' or a checkpoint directory")
    c.add_argument("--preset", choices=PRESETS, help="synthetic model size (default: full on GPU, tiny on CPU)")
    c.add_argument("--device", help="cuda, cpu or cuda:N (default: cuda:LOCAL_RANK when a GPU is present)")
    c.add_argument("--s3gen", nargs="*", choices=S3GEN_STEPS, metavar="STEP",
                   help=f"S3Gen's steps (no STEP: all of {', '.join(S3GEN_STEPS)}); default: the recommended ones")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "corpus":
        return corpus(args, c)
    if args.command == "say":
        try:
            with sigterm_as_interrupt():
                out = say(args)
        except (ValueError, OSError) as exc:
            y.error(str(exc))
        except KeyboardInterrupt:
            print("interrupted: stopped at the next stop check; nothing was written", file=sys.stderr)
            return 130
        print(f"wrote {out}")
        return 0
    if args.command == "soak":
        from chatterbox_lab.measure.soak import soak_document

        doc = soak_document(requests=args.requests, clients=args.clients, tokens=tuple(args.tokens),
                            lone_requests=args.lone, preset=args.preset, device=args.device,
                            time_limit_s=args.time_limit, s3gen_steps=_s3gen_steps(args), startup=args.startup,
                            batch_requests=args.batch_requests)
        out = results.write(doc, args.out, overwrite=args.overwrite)
        print({k: v for k, v in doc["rungs"]["soak"].items() if not k.endswith("_every_50")})
        print(f"wrote {out}")
        report = doc["rungs"]["soak"]
        return 0 if report["errors"] == 0 and report["not_started"] == 0 else 1
    if args.command == "serve":
        import uvicorn

        from chatterbox_lab.serving.server import API_KEY_VARIABLE, create_app, unprotected_exposure
        from chatterbox_lab.serving.session import TTSSession, check_batch_requests

        try:
            if args.model == "original":
                check_checkpoint_tokenizer(args.checkpoint)
            check_batch_requests(args.batch_requests, args.model)
        except ValueError as exc:
            s.error(str(exc))
        warning = unprotected_exposure(args.host, os.environ.get(API_KEY_VARIABLE))
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        session = TTSSession(args.checkpoint, model=args.model, preset=args.preset, device=args.device,
                             s3gen_steps=_s3gen_steps(args), batch_requests=args.batch_requests, progress=True)
        session.warmup()
        print(f"ready after {sum(session.startup_s.values()):.1f} s of start-up")
        uvicorn.run(create_app(session), host=args.host, port=args.port)
        return 0
    if args.command == "ship-picks":
        from dataclasses import replace

        from chatterbox_lab.kernels.picks import ship
        from chatterbox_lab.tuning.chain_tuning import picks_from

        try:
            doc = results.load(args.record)
            picks = picks_from(doc, doc["provenance"].get("gpu"))
        except (ValueError, OSError, KeyError) as exc:
            p.error(str(exc))
        print(f"wrote {ship(replace(picks, source=str(args.record)))}")
        return 0
    if args.command == "readme":
        from chatterbox_lab.records.report import ROOT, update_pages

        changed = update_pages()
        print("updated: " + ", ".join(str(p.relative_to(ROOT)) for p in changed) if changed else "already up to date")
        return 0

    rungs = tuple(args.rungs or ()) + (LADDER_RUNGS if args.ladder else ()) + \
        (EXPERIMENTAL_RUNGS if args.experimental else ())
    try:
        from chatterbox_lab.decode.plan import device_kind
        from chatterbox_lab.loading.models import resolve_device
        from chatterbox_lab.registry import preset

        recommended_s3gen = preset("recommended", device_kind(resolve_device(args.device)), "s3gen")
        config = BenchConfig(source=args.checkpoint, preset=args.preset, device=args.device, tokens=args.tokens,
                             repeats=args.repeats, rungs=rungs, voice=args.voice, checks=args.checks,
                             profile=not args.no_profile, tune=args.tune, trace_dir=args.trace_dir,
                             batch_sizes=tuple(args.batch), stream=args.stream, many=args.many,
                             many_flow_steps=args.many_flow_steps, tune_from=args.tune_from,
                             s3gen_steps=_s3gen_steps(args, recommended_s3gen if args.ladder else ()))
        config.resolved()
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    # Rewritten after every rung, so a run cut short keeps what it measured.
    partial = args.out.with_suffix(".partial.json") if args.out else None
    doc = run(config, partial=partial)
    out = results.write(doc, args.out or default_output(doc), overwrite=args.overwrite)
    if partial:
        partial.unlink(missing_ok=True)
    from chatterbox_lab.records.report import write_companions

    companions = write_companions(doc, out)
    print(summary_table(doc))
    if "batch" in doc:
        print(batch_table(doc))
    for kind, figures in doc.get("end_to_end", {}).items():
        print(kind, {k: v for k, v in figures.items() if k != "raw"})
    if "roofline" in doc:
        print(f"copy bandwidth {doc['roofline']['copy_bandwidth_gb_s']:,.0f} GB/s")
    if doc["checks"]:
        print("checks:", {k: v for k, v in doc["checks"].items()})
    print(f"wrote {out} ({', '.join(p.suffix for p in companions)} beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
