"""The family on one GPU, in one process: Turbo against upstream's Turbo loop, Multilingual against the
original at the original's recommended steps. Writes one results document and prints a short table last.

    python scripts/family_record.py OUT_DIR [TOKENS]

On a machine without a GPU it runs the tiny presets on the CPU: a check of the script, not a record.

Per rung of Turbo (upstream's `T3.inference_turbo`, then the Turbo ladder's step sets):
- `t3_decode_tok_s`: T3 tokens per second of decode at batch one (median of three runs of TOKENS);
- `fraction_of_floor`: that over Turbo's floor, the bytes a step reads (weights once, the filled KV
  cache of one row) over the measured copy bandwidth (`measure.roofline`);
- `rtf`: end-to-end seconds per second of audio with the voice already prepared (T3, S3Gen's two
  mean-flow steps, HiFi-GAN, the watermark);
- `first_chunk_audio_ms`: a request of FIRST_CHUNK tokens end to end, what a stream's first piece costs;
- kernels and host launches per token, from two profiled decodes.
fp32 token identity to upstream is checked for the exact step sets (Turbo) and in three languages
(Multilingual). Multilingual and the original then decode at the original's recommended steps.
"""
from __future__ import annotations

import gc
import statistics
import sys
from pathlib import Path

import torch

from chatterbox_lab import registry
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.decode.plan import device_kind
from chatterbox_lab.decode.turbo import TurboDecoder, turbo_text_tokens
from chatterbox_lab.kernels.picks import shipped_for
from chatterbox_lab.loading.models import load_tts
from chatterbox_lab.measure import equivalence, profiling, roofline
from chatterbox_lab.pipeline.synthesis import synthesize, upstream_t3
from chatterbox_lab.pipeline.voices import VoiceCache
from chatterbox_lab.records import results
from chatterbox_lab.sampling import SamplingParams, TurboSamplingParams

TEXT = ("Every step of this workbook is measured, profiled and checked against the upstream path, "
        "so a speed-up you read here is one you can reproduce.")
LANGUAGES = {"en": TEXT, "fr": "Chaque étape est mesurée, profilée et vérifiée face au chemin d'origine.",
             "el": "Κάθε βήμα μετριέται, καταγράφεται και ελέγχεται απέναντι στην αρχική διαδρομή."}
FIRST_CHUNK = 10  # tokens: 0.4 s of audio
PROFILED_TOKENS = 24  # the longer of `profiling.per_token_counts`' two decodes
EXACT_TURBO = [(), ("static_cache", "embed_cache"), ("static_cache", "embed_cache", "compiled", "sampling_in_graph")]
TURBO_RUNGS = {"turbo_upstream": None, "turbo_static": ("static_cache", "embed_cache"),
               "turbo_recommended": registry.preset("recommended", "hopper", model="turbo")}


def median_tok_s(generate, repeats: int = 3) -> float:
    """generate() -> (steps, decode seconds); tokens per second, median of `repeats` after one warm-up."""
    generate()
    return statistics.median(steps / seconds for steps, seconds in (generate() for _ in range(repeats)))


def turbo_rungs(device: str, tokens: int, bandwidth: float) -> tuple[dict, dict]:
    tts = load_tts(model="turbo", device=device)
    voices = VoiceCache(tts)
    voices.use("alto")
    text_tokens = turbo_text_tokens(tts, TEXT)
    checks = equivalence.turbo_token_identity(tts, text_tokens, EXACT_TURBO, n=64, seed=0)
    prompt_len = 1 + tts.conds.t3.cond_prompt_speech_tokens.size(1) + text_tokens.size(1) + 1
    rungs = {}
    for rung, steps in TURBO_RUNGS.items():  # the bf16 rung last: it casts T3 in place
        # Room for the profiled decodes' lengths too.
        decoder = None if steps is None else TurboDecoder(tts.t3, steps, max_new_tokens=max(tokens, PROFILED_TOKENS))

        def t3_only(n=tokens):
            torch.manual_seed(0)
            if decoder is None:
                _, _, decode_s, steps_run = upstream_t3(tts, text_tokens, n, TurboSamplingParams())
                return steps_run, decode_s
            result = decoder.generate(tts.conds.t3, text_tokens, n)
            return result.steps_run, result.decode_s

        tok_s = median_tok_s(t3_only)
        floor = roofline.floor(tts.t3, bandwidth, prompt_len, tokens)
        whole = [synthesize(tts, TEXT, decoder=decoder, max_new_tokens=tokens) for _ in range(3)]
        first = [synthesize(tts, TEXT, decoder=decoder, max_new_tokens=FIRST_CHUNK) for _ in range(3)]
        counts = profiling.per_token_counts(lambda n: t3_only(n))
        rungs[rung] = dict(
            steps=sorted(steps or ()), t3_decode_tok_s=tok_s, floor_tok_s=floor["floor_tok_s"],
            bytes_per_step=floor["bytes_per_step"], fraction_of_floor=tok_s / floor["floor_tok_s"],
            rtf=statistics.median(s.e2e_s / s.audio_s for s in whole),
            first_chunk_audio_ms=1e3 * statistics.median(s.e2e_s for s in first),
            gpu_kernels_per_token=counts["gpu_kernels"], host_launches_per_token=counts["host_launches"])
    return rungs, checks


def llama_rung(model: str, device: str, tokens: int, language: str | None) -> tuple[dict, dict]:
    """The original's recommended T3 steps on `model` (original or multilingual); fp32 identity first."""
    tts = load_tts(model=model, device=device)
    VoiceCache(tts).use("alto")
    checks = {}
    exact = ("static_cache", "embed_cache", "fused_projections")
    for code in ([language] if model == "original" else LANGUAGES):
        text_tokens = text_tokens_for(tts, LANGUAGES[code], None if model == "original" else code)
        checks[code] = equivalence.token_identity(tts, text_tokens, [exact], n=64, seed=0)
    text_tokens = text_tokens_for(tts, LANGUAGES[language], None if model == "original" else language)
    steps = registry.preset("recommended", device_kind(device))
    picks = shipped_for(torch.cuda.get_device_name(device)) if device == "cuda" else None
    decoder = T3Decoder(tts.t3, steps, max_new_tokens=tokens, picks=picks)

    def t3_only():
        torch.manual_seed(0)
        result = decoder.generate(tts.conds.t3, text_tokens, tokens, SamplingParams())
        return result.steps_run, result.decode_s

    figures = dict(steps=sorted(steps), t3_decode_tok_s=median_tok_s(t3_only), language=language)
    return figures, checks


def free_memory() -> None:
    """The model before is gone: its memory back to the card before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(out_dir: str, tokens: int = 256) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bandwidth = roofline.copy_bandwidth(device)
    turbo, turbo_checks = turbo_rungs(device, tokens, bandwidth)
    free_memory()
    original, original_checks = llama_rung("original", device, tokens, "en")
    free_memory()
    multilingual, multilingual_checks = llama_rung("multilingual", device, tokens, "fr")
    multilingual["ratio_to_original"] = multilingual["t3_decode_tok_s"] / original["t3_decode_tok_s"]
    doc = dict(schema=results.SCHEMA,
               provenance=results.provenance(device=device, preset="full" if device == "cuda" else "tiny",
                                             text=TEXT, tokens=tokens),
               roofline=dict(copy_bandwidth_gb_s=bandwidth / 1e9),
               rungs={**turbo, "original_recommended": original, "multilingual_recommended": multilingual},
               checks=dict(turbo=turbo_checks, original=original_checks, multilingual=multilingual_checks))
    gpu = (doc["provenance"]["gpu"] or "cpu").lower().replace(" ", "-")
    path = results.write(doc, Path(out_dir) / f"family-{gpu}-{doc['provenance']['date_utc'][:16].replace(':', '')}.json")
    print(f"wrote {path}")
    print(f"{'rung':<26}{'tok/s':>8}{'floor':>8}{'share':>7}{'RTF':>8}{'1st ms':>8}{'kern/tok':>9}{'launch/tok':>11}")
    for name, r in doc["rungs"].items():
        cells = [r.get(k) for k in ("t3_decode_tok_s", "floor_tok_s", "fraction_of_floor", "rtf",
                                     "first_chunk_audio_ms", "gpu_kernels_per_token", "host_launches_per_token")]
        print(f"{name:<26}" + "".join(f"{'-' if v is None else format(v, fmt):>{w}}" for v, fmt, w in
                                      zip(cells, (".0f", ".0f", ".2f", ".4f", ".0f", ".0f", ".1f"),
                                          (8, 8, 7, 8, 8, 9, 11))))
    print(f"multilingual / original tok/s: {multilingual['ratio_to_original']:.3f}; fp32 identity: "
          f"turbo {all(turbo_checks.values())}, original {all(all(v.values()) for v in original_checks.values())}, "
          f"multilingual {all(all(v.values()) for v in multilingual_checks.values())}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
