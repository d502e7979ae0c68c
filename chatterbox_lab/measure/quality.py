"""What the 8-bit steps cost in quality, measured the same way for every format.

An 8-bit step (`int8_weights`, `fp8_weights`, `int8_kv_cache`) is compared with its baseline: the
same step set without it, a bf16 model. Four figures, each for one utterance of `tokens` tokens:

- `logit_error_vs_bf16` and `logit_error_vs_fp32`: teacher-forced logits (both sides fed the
  tokens upstream's fp32 loop drew) against the baseline's and against upstream's fp32 transformer,
  as `equivalence.relative_error` measures them (the largest over the steps);
- `same_draw_agreement`: along those tokens, the share of steps at which one random draw per step
  (the exponential race `torch.multinomial` runs) picks the same token from both sides' sampled
  distributions. Teacher forcing keeps one early difference from changing every later step;
- `mel_difference` and `waveform_difference`: both sides decode freely from the same seed, and
  S3Gen turns each side's tokens into a mel and a waveform with the same noise; relative L2 over
  the common length. Zero when the tokens agree; a token that differs shows how far the audio moves.

For the KV cache, the utterance fills the cache to the bench's longest: the prompt and every token.

Random weights do not predict real-weight quality. A synthetic checkpoint's logits have other
ranges and another spread of probabilities than the trained model's, so its figures check the
measurement, not the format. `check_quality` runs the same comparison on a real checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from chatterbox_lab import registry
from chatterbox_lab.decode.decoder import T3Decoder, prompt_len_for, text_tokens_for
from chatterbox_lab.decode.kv_cache import cache_len_for
from chatterbox_lab.measure import equivalence
from chatterbox_lab.pipeline.batched_waveforms import vocode_all
from chatterbox_lab.pipeline.synthesis import speech_tokens_of
from chatterbox_lab.s3gen.s3gen_steps import _flow_mels, _relative_difference
from chatterbox_lab.sampling import DeviceSampling, SamplingParams, next_token_probs

EIGHT_BIT_STEPS = ("int8_weights", "fp8_weights", "int8_kv_cache")

# Tolerances of each figure against the bf16 baseline, per step. bf16 itself is held to 5e-2 of
# logit error against fp32 (`equivalence.BF16_LOGIT_TOLERANCE`) for an rms rounding of about 0.2%
# a value. On a Gaussian row of 1,024 weights, int8's half step of max / 127 is an rms error of
# about 0.8% a weight, four times bf16's; e4m3's 3 mantissa bits give about 2.4%, twelve times. The
# logit tolerances scale bf16's by those ratios, capped at 0.25 (beyond it the top tokens reorder).
# The cache rounds one value per slot and head dimension as int8 weights do, but only attention
# reads it: half int8's weight tolerance.
LOGIT_TOLERANCE = {"int8_weights": 0.2, "fp8_weights": 0.25, "int8_kv_cache": 0.1}
# The same draw picks the same token at 95% of steps or more: at 25 tokens a second, at most one
# token in 20 (about a syllable a second) differs from the bf16 choice, each one a plausible draw.
AGREEMENT_TOLERANCE = 0.95
# Relative L2 of the mel: 0.1 is the order of the flow's own change between 10 and fewer Euler
# steps, which upstream ships as a speed setting.
MEL_TOLERANCE = 0.1


def baseline_steps(steps, step: str) -> frozenset:
    """What `step` is compared with: `steps` without it, in bf16."""
    return frozenset(steps) - {step} | {"bf16"}


def with_step(steps, step: str) -> frozenset:
    """`steps` with the 8-bit `step` and what it needs, in bf16."""
    return frozenset(steps) | {step, "bf16"} | registry.requirements(step)


def fp32_reference(tts, text_tokens: torch.Tensor, tokens: int, seed: int) -> dict:
    """Upstream's fp32 tokens for `seed` (what both sides are fed) and its fp32 teacher-forced
    logits. Needs T3 in fp32: run it before any bf16 decoder casts the model."""
    if tts.t3.speech_head.weight.dtype != torch.float32:
        raise ValueError("the fp32 reference needs T3 in fp32: compute it before a bf16 decoder casts the model")
    forced = equivalence.seeded_tokens(tts, text_tokens, tokens, seed)
    return dict(forced=forced, logits=equivalence.reference_logits(tts, text_tokens, forced))


def same_draw_agreement(candidate: torch.Tensor, baseline: torch.Tensor, forced: torch.Tensor, start_token: int,
                        sampling: SamplingParams, seed: int) -> float:
    """The share of steps at which one exponential race per step picks the same token from the
    candidate's and the baseline's teacher-forced logits (n, 2, V) along `forced` (1, n)."""
    device = candidate.device
    values = DeviceSampling(device)
    values.set(sampling)
    seen = torch.zeros(1, candidate.size(-1), dtype=torch.bool, device=device)
    seen[0, start_token] = True
    generator = torch.Generator(device).manual_seed(seed)
    same = 0
    for i in range(candidate.size(0)):
        race = torch.empty(1, candidate.size(-1), device=device).exponential_(1, generator=generator)
        picks = [torch.argmax(next_token_probs(logits[i], seen, values) / race) for logits in (candidate, baseline)]
        same += int(picks[0] == picks[1])
        seen[0, forced[0, i]] = True
    return same / candidate.size(0)


def _audio(tts, tokens: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mel and the unwatermarked waveform of T3's `tokens` (1, n), S3Gen's noise seeded."""
    mel = _flow_mels(tts, speech_tokens_of(tokens[0])[None].to(tts.device), seed)
    torch.manual_seed(seed)  # HiFi-GAN's source noise
    return mel, vocode_all(tts.s3gen, [mel[0]])[0].float().cpu()


def _common_difference(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 over the length both have (along the last dimension)."""
    n = min(candidate.size(-1), reference.size(-1))
    return _relative_difference(candidate[..., :n].float(), reference[..., :n].float())


def format_quality(tts, steps, step: str, reference: dict, text: str, tokens: int, seed: int = 0,
                   sampling: SamplingParams = SamplingParams(), capacity: int | None = None,
                   audio: bool = True) -> dict:
    """Every figure of the module's docstring for `step` within `steps`, against `baseline_steps`;
    `reference`: `fp32_reference` for the same text, token count and seed. `capacity`: the caches'
    slots (by default what the utterance needs). Uses the voice prepared last."""
    if step not in EIGHT_BIT_STEPS:
        raise ValueError(f"{step!r} is not an 8-bit step: choose from {', '.join(EIGHT_BIT_STEPS)}")
    text_tokens = text_tokens_for(tts, text)
    prompt = prompt_len_for(tts.t3, text_tokens)
    capacity = capacity or cache_len_for(prompt, tokens)
    sides = {}
    for side, chosen in (("candidate", with_step(steps, step)), ("baseline", baseline_steps(steps, step))):
        decoder = T3Decoder(tts.t3, chosen, max_cache_len=capacity, max_new_tokens=tokens)
        logits = equivalence.forced_logits(decoder, tts.conds.t3, text_tokens, reference["forced"])
        torch.manual_seed(seed)
        free = decoder.generate(tts.conds.t3, text_tokens, tokens, sampling, stop_on_eos=False).tokens
        sides[side] = dict(logits=logits, tokens=free)
        del decoder
    candidate, baseline = sides["candidate"], sides["baseline"]
    figures = dict(
        step=step, tokens=tokens, cache_slots=prompt + tokens, capacity=capacity,
        logit_error_vs_bf16=equivalence.relative_error(candidate["logits"], baseline["logits"]),
        logit_error_vs_fp32=equivalence.relative_error(candidate["logits"], reference["logits"]),
        bf16_logit_error_vs_fp32=equivalence.relative_error(baseline["logits"], reference["logits"]),
        same_draw_agreement=same_draw_agreement(candidate["logits"], baseline["logits"], reference["forced"],
                                                tts.t3.hp.start_speech_token, sampling, seed),
        free_tokens_identical=int((candidate["tokens"] == baseline["tokens"]).cumprod(dim=1).sum()),
    )
    if audio:
        (mel, wav), (base_mel, base_wav) = (_audio(tts, side["tokens"], seed) for side in (candidate, baseline))
        figures.update(mel_difference=_common_difference(mel, base_mel),
                       waveform_difference=_common_difference(wav, base_wav))
    figures["tolerances"] = dict(logit_error_vs_bf16=LOGIT_TOLERANCE[step], same_draw_agreement=AGREEMENT_TOLERANCE,
                                 **({"mel_difference": MEL_TOLERANCE} if audio else {}))
    figures["within_tolerance"] = (figures["logit_error_vs_bf16"] <= LOGIT_TOLERANCE[step]
                                   and figures["same_draw_agreement"] >= AGREEMENT_TOLERANCE
                                   and (not audio or figures["mel_difference"] <= MEL_TOLERANCE))
    return figures


def check_quality(checkpoint, formats=EIGHT_BIT_STEPS, text: str | None = None, tokens: int = 256,
                  voice: str = "alto", device: str | None = None, seed: int = 0, preset: str | None = None) -> dict:
    """The 8-bit steps' quality on a checkpoint, in one call: {step: `format_quality` figures}, or
    {step: {"skipped": why}} for a step this device cannot run. `checkpoint`: a directory in
    upstream's layout, "hub", or "synthetic" (random weights: a check of the measurement only).
    Each step is measured on the device's recommended set, in bf16. Loads the model in fp32 first
    (the reference), so it takes the memory of a second model while it runs."""
    from chatterbox_lab.decode.plan import device_kind, unsupported_steps
    from chatterbox_lab.loading.models import load_tts, resolve_device
    from chatterbox_lab.pipeline.voices import prepare_voice, voice_path

    device = resolve_device(device)
    if checkpoint not in ("synthetic", "hub") and not Path(checkpoint).is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {checkpoint}: give a directory in upstream's layout, "
                                f"'hub' or 'synthetic'")
    unknown = sorted(set(formats) - set(EIGHT_BIT_STEPS))
    if unknown:
        raise ValueError(f"unknown 8-bit steps {unknown}: choose from {', '.join(EIGHT_BIT_STEPS)}")
    tts = load_tts(checkpoint, preset=preset, device=device)
    prepare_voice(tts, voice_path(voice))
    text = text or equivalence.DEFAULT_TEXT
    reference = fp32_reference(tts, text_tokens_for(tts, text), tokens, seed)
    recommended = frozenset(registry.preset("recommended", device_kind(device)))
    found = {}
    for step in formats:
        if step in unsupported_steps(device):
            found[step] = dict(skipped=f"{step} needs a Hopper or later GPU")
            continue
        found[step] = format_quality(tts, recommended, step, reference, text, tokens, seed)
    return found
