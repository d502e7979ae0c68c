"""The optimization guide's published RTX 4090 figures, restated in this project's units.

The guide's "tokens/s" is audio seconds x 50 over total generation time. Speech
tokens are 25 per second of audio, and the time includes conditioning and S3Gen,
so a published figure X is X / 2 speech tokens per second *end to end* (and X / 50
times real time); the guide's T3 decode rate is its "iterations/s" row.
"""
from __future__ import annotations

import json
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[2] / "data" / "reference" / "optimization_guide.json"
GUIDE_TOKENS_PER_AUDIO_SECOND = 50
SPEECH_TOKENS_PER_AUDIO_SECOND = 25


def guide() -> dict:
    return json.loads(GUIDE.read_text())


def restate(published_tok_s: float) -> dict:
    """A published guide 'tokens/s' in honest units."""
    x_realtime = published_tok_s / GUIDE_TOKENS_PER_AUDIO_SECOND
    return dict(published_tok_s=published_tok_s, x_realtime=x_realtime, rtf=1 / x_realtime,
                speech_tok_s_end_to_end=x_realtime * SPEECH_TOKENS_PER_AUDIO_SECOND)


def _midpoint(value):
    return sum(value) / len(value) if isinstance(value, list) else value


def side_by_side(doc: dict) -> list[dict]:
    """Guide (RTX 4090) next to a committed run, baseline and optimized, in the same units."""
    g = {row["metric"]: row for row in guide()["rtx4090_results"]}
    base, best = doc["rungs"]["upstream_fp32"], doc["rungs"]["compiled"]
    card = doc["provenance"]["gpu"]
    rows = []
    for label, guide_key, ours_key, ours_unit in [
        ("T3 decode tokens/s", "t3_iterations_per_s", "t3_decode_tok_s", "tok/s"),
    ]:
        gb, go = _midpoint(g[guide_key]["baseline"]), _midpoint(g[guide_key]["optimized"])
        rows.append(dict(quantity=label, guide_baseline=gb, guide_optimized=go, guide_speedup=go / gb,
                         ours_baseline=base[ours_key], ours_optimized=best[ours_key],
                         ours_speedup=best[ours_key] / base[ours_key], card=card))
    tok = g["tokens_per_s_as_published"]
    gb, go = restate(tok["baseline"]), restate(tok["optimized"])
    rows.append(dict(quantity="end to end, x real time", guide_baseline=gb["x_realtime"],
                     guide_optimized=go["x_realtime"], guide_speedup=go["x_realtime"] / gb["x_realtime"],
                     ours_baseline=1 / base["rtf"], ours_optimized=1 / best["rtf"],
                     ours_speedup=base["rtf"] / best["rtf"], card=card))
    gen = g["generation_time_s"]
    rows.append(dict(quantity="generation time, s", guide_baseline=gen["baseline"], guide_optimized=gen["optimized"],
                     guide_speedup=gen["baseline"] / gen["optimized"], ours_baseline=base["e2e_s"],
                     ours_optimized=best["e2e_s"], ours_speedup=base["e2e_s"] / best["e2e_s"], card=card))
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| quantity | guide 4090 baseline | guide 4090 optimized | guide speed-up | "
            f"ours baseline | ours compiled | ours speed-up ({rows[0]['card']}) |")
    out = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['quantity']} | {r['guide_baseline']:.3g} | {r['guide_optimized']:.3g} | "
                   f"{r['guide_speedup']:.2f}x | {r['ours_baseline']:.3g} | {r['ours_optimized']:.3g} | "
                   f"{r['ours_speedup']:.2f}x |")
    return "\n".join(out)
