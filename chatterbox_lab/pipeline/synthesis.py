"""Text to watermarked waveform through upstream's modules, with each stage timed.

Upstream's `ChatterboxTTS.generate` runs conditioning, T3, S3Gen's flow, HiFi-GAN
and the watermark in one call. This runs the same stages in the same order,
timing each one with a device sync at its end, and lets the T3 stage be either
upstream's `T3.inference` or a `T3Decoder` with ladder steps.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from chatterbox_lab.pipeline.batched_waveforms import vocode_all, watermark_all
from chatterbox_lab.decode.decoder import Cancelled, T3Decoder, sync_device, text_tokens_for
from chatterbox_lab.pipeline.padding import padding_zeroed
from chatterbox_lab.decode.turbo import turbo_text_tokens
from chatterbox_lab.sampling import SamplingParams, TurboSamplingParams
from chatterbox_lab.validation import MAX_LONG_TEXT_CHARS, check_flow_steps, check_text

TOKENS_PER_SECOND = 25  # S3 speech tokens: 640 samples at 16 kHz each
SAMPLES_PER_TOKEN = 24_000 // TOKENS_PER_SECOND  # of S3Gen's 24 kHz output
# Sentence chunks of long text: short enough that T3 keeps to the text (a long prompt
# is where it starts to skip or repeat) and well inside one utterance's text limit.
MAX_CHUNK_CHARS = 300


@dataclass
class Synthesis:
    wav: np.ndarray
    sample_rate: int
    speech_tokens: torch.Tensor
    seconds: dict = field(default_factory=dict)  # stage -> wall seconds
    t3_prefill_s: float = 0.0
    t3_decode_s: float = 0.0
    t3_steps: int = 0

    @property
    def audio_s(self) -> float:
        return len(self.wav) / self.sample_rate

    @property
    def e2e_s(self) -> float:
        return sum(self.seconds.values())


# The stages of one synthesis, in order: the keys of `Synthesis.seconds`.
STAGES = ("conditioning", "t3", "s3gen_flow", "hifigan", "watermark")


@contextlib.contextmanager
def timed_stage(device, seconds: dict, stage: str):
    """Wall time of the block added to seconds[stage], device work included: a stage that
    runs more than once (per batch, per flow run of a streamed piece) is counted in full."""
    sync_device(device)
    start = time.perf_counter()
    yield
    sync_device(device)
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def upstream_t3(tts, text_tokens, max_new_tokens, sampling, stop_on_eos=True):
    """Upstream `T3.inference` (Turbo's `T3.inference_turbo`, for `TurboSamplingParams`) with its
    prefill timed apart from its decode loop."""
    marks = []

    def after_forward(module, args, output):
        if not marks:
            sync_device(tts.device)
            marks.append(time.perf_counter())

    handle = tts.t3.tfmr.register_forward_hook(after_forward)
    verbosity = hf_logging.get_verbosity()
    # Upstream passes arguments newer transformers log a deprecation for on every call.
    hf_logging.set_verbosity_error()
    try:
        sync_device(tts.device)
        start = time.perf_counter()
        if isinstance(sampling, TurboSamplingParams):  # one token from the prefill, then one a loop turn
            tokens = tts.t3.inference_turbo(
                tts.conds.t3, text_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
                top_p=sampling.top_p, repetition_penalty=sampling.repetition_penalty,
                max_gen_len=max_new_tokens - 1)
        else:
            tokens = tts.t3.inference(
                t3_cond=tts.conds.t3, text_tokens=text_tokens, max_new_tokens=max_new_tokens,
                stop_on_eos=stop_on_eos, temperature=sampling.temperature, cfg_weight=sampling.cfg_weight,
                repetition_penalty=sampling.repetition_penalty, min_p=sampling.min_p, top_p=sampling.top_p,
            )
        sync_device(tts.device)
        end = time.perf_counter()
    finally:
        handle.remove()
        hf_logging.set_verbosity(verbosity)
    return tokens, marks[0] - start, end - marks[0], tokens.size(1)


def synthesize(tts, text: str, *, voice=None, decoder: T3Decoder | None = None, max_new_tokens: int = 1000,
               sampling: SamplingParams | None = None, exaggeration: float = 0.5,
               stop_on_eos: bool = True, watermark: bool = True, flow_steps: int | None = None,
               cancelled=None, on_stage=None, language: str | None = None) -> Synthesis:
    """One utterance. `voice`: a reference audio path (conditioning is then timed), or
    None to use the voice prepared last. `decoder=None` runs upstream's T3 loop.
    `flow_steps`: Euler steps of S3Gen's flow, None for upstream's (10); fewer is faster
    and changes the audio (`s3gen_steps.fewer_flow_steps_error` measures by how much).
    `cancelled`: a callable asked at each of the decoder's stop checks and before S3Gen; when it
    answers True, `Cancelled` is raised there (upstream's loop cannot be stopped). `on_stage`:
    called with each stage's name as the stage begins, for a progress bar.

    Turbo (`tts` a `ChatterboxTurboTTS`): `decoder` a `TurboDecoder`, `sampling` a
    `TurboSamplingParams`, and upstream's three silence tokens end the speech tokens.
    Multilingual: `language` is the language id whose tag leads the text. `sampling`: None for
    the model's defaults."""
    from chatterbox.models.s3gen.const import S3GEN_SR

    from chatterbox_lab.pipeline.voices import voice_or_prepared

    text = check_text(text)
    check_flow_steps(flow_steps)
    seconds = {}

    def clock(stage):
        if on_stage is not None:
            on_stage(stage)
        return timed_stage(tts.device, seconds, stage)
    with torch.inference_mode():
        with clock("conditioning"):
            voice_or_prepared(tts, voice, exaggeration)
        turbo = getattr(tts.t3, "is_gpt", False)
        if sampling is None:
            sampling = TurboSamplingParams() if turbo else SamplingParams()
        with clock("t3"):
            text_tokens = turbo_text_tokens(tts, text) if turbo else text_tokens_for(tts, text, language)
            if decoder is None:
                tokens, prefill_s, decode_s, steps = upstream_t3(tts, text_tokens, max_new_tokens, sampling, stop_on_eos)
            else:
                result = decoder.generate(tts.conds.t3, text_tokens, max_new_tokens, sampling, stop_on_eos,
                                          cancelled=cancelled)
                tokens, prefill_s, decode_s, steps = result.tokens, result.prefill_s, result.decode_s, result.steps_run
        if cancelled is not None and cancelled():  # asked once more before S3Gen, the longest stage left
            raise Cancelled("stopped after T3, before S3Gen")
        if turbo:
            from chatterbox.models.s3gen.const import S3GEN_SIL

            tokens = torch.cat([tokens, torch.full_like(tokens[:, :3], S3GEN_SIL)], dim=1)
        speech_tokens, wav = tokens_to_speech(tts, tokens, tts.conds.gen, clock, watermark, flow_steps)
    return Synthesis(wav=wav, sample_rate=S3GEN_SR, speech_tokens=speech_tokens, seconds=seconds,
                     t3_prefill_s=prefill_s, t3_decode_s=decode_s, t3_steps=steps)


def speech_tokens_of(tokens: torch.Tensor) -> torch.Tensor:
    """What S3Gen gets of T3's tokens (k,): speech ids only, without start, stop or specials."""
    from chatterbox.models.s3tokenizer import drop_invalid_tokens

    kept = drop_invalid_tokens(tokens)
    return kept[kept < 6561]


def tokens_to_speech(tts, tokens: torch.Tensor, gen_conds: dict, clock, watermark: bool = True,
                     flow_steps: int | None = None):
    """T3's tokens (1, k) for one utterance -> (speech tokens, watermarked waveform) through
    S3Gen's flow and HiFi-GAN with the voice's S3Gen conditionals; `clock(stage)` times each."""
    return tokens_to_speeches(tts, [tokens], gen_conds, clock, watermark, flow_steps)[0]


def tokens_to_speeches(tts, all_tokens: list, gen_conds: dict, clock, watermark: bool = True,
                       flow_steps: int | None = None) -> list:
    """T3's tokens for utterances of one voice ((1, k_i) each) -> (speech tokens, watermarked
    waveform) for each: one flow run for all of them (upstream's batched flow: tokens padded to
    the longest and masked by their lengths), then HiFi-GAN and the watermark once per group of
    equal lengths (`batched_waveforms`: neither masks padding). `clock(stage)` times each stage
    for all of them; `flow_steps` as in `synthesize`."""
    from chatterbox.models.s3gen.const import S3GEN_SR

    speech = [speech_tokens_of(tokens[0]).to(tts.device) for tokens in all_tokens]
    if any(s.numel() == 0 for s in speech):
        raise RuntimeError("T3 produced no valid speech tokens (it stopped at once); nothing to synthesize")
    s3gen = tts.s3gen
    lengths = torch.tensor([s.numel() for s in speech], device=tts.device)
    with clock("s3gen_flow"), padding_zeroed(s3gen.flow.encoder):
        mels = s3gen.flow_inference(torch.nn.utils.rnn.pad_sequence(speech, batch_first=True), ref_dict=gen_conds,
                                    speech_token_lens=lengths, finalize=True,
                                    n_cfm_timesteps=flow_steps)
    frames_per_token = s3gen.flow.token_mel_ratio
    with clock("hifigan"):
        made = vocode_all(s3gen, [mel[:, : n * frames_per_token] for mel, n in zip(mels, lengths.tolist())])
        wavs = [wav.float().cpu().numpy() for wav in made]
    if watermark:
        with clock("watermark"):
            wavs = watermark_all(tts.watermarker, wavs, S3GEN_SR)
    return list(zip(speech, wavs))


def synthesize_long(tts, text: str, *, max_chars: int = MAX_CHUNK_CHARS, voice=None, progress: bool = False,
                    cancelled=None, **options) -> Synthesis:
    """Text of any length: `synthesize` (same keywords) on each sentence chunk of at most
    `max_chars` characters (`long_text.split_text`), in order, with the voice prepared
    once; the audio joined with faded edges and short pauses (`long_text.join_speech`).
    Stage times, T3 figures and speech tokens are the chunks' totals. `cancelled`: a
    callable asked before each chunk; when it answers True, `Cancelled` is raised."""
    from tqdm.auto import tqdm

    from chatterbox_lab.pipeline.long_text import join_speech, split_text

    chunks = split_text(check_text(text, max_chars=MAX_LONG_TEXT_CHARS), max_chars)
    parts = []
    for i, chunk in enumerate(tqdm(chunks, desc="sentences", unit="chunk", disable=not progress)):
        if cancelled is not None and cancelled():
            raise Cancelled(f"stopped after {i} of {len(chunks)} sentence chunks")
        parts.append(synthesize(tts, chunk, voice=voice if i == 0 else None, cancelled=cancelled, **options))
    seconds = {stage: sum(p.seconds.get(stage, 0.0) for p in parts) for stage in parts[0].seconds}
    return Synthesis(wav=join_speech([p.wav for p in parts], parts[0].sample_rate),
                     sample_rate=parts[0].sample_rate,
                     speech_tokens=torch.cat([p.speech_tokens for p in parts]), seconds=seconds,
                     t3_prefill_s=sum(p.t3_prefill_s for p in parts), t3_decode_s=sum(p.t3_decode_s for p in parts),
                     t3_steps=sum(p.t3_steps for p in parts))


@dataclass
class BatchSynthesis:
    speeches: list  # Synthesis per text, in order (their stage times are the batch's, below)
    wall_s: float
    seconds: dict = field(default_factory=dict)  # stage -> wall seconds, all batches together

    @property
    def audio_s(self) -> float:
        return sum(s.audio_s for s in self.speeches)

    @property
    def x_realtime(self) -> float:
        """Seconds of audio made per second of wall time, all utterances together."""
        return self.audio_s / self.wall_s


def synthesize_many(tts, texts: list[str], voices, *, decoder: T3Decoder, max_new_tokens=1000,
                    sampling=SamplingParams(), exaggeration=0.5, watermark: bool = True,
                    progress: bool = False, flow_steps: int | None = None, voice_cache=None,
                    cancelled=None) -> BatchSynthesis:
    """Many utterances: T3 decodes `decoder.streams` of them at a time (`generate_batch`), each
    with its own voice (`voices`: one for all, or one per text), then S3Gen's flow runs once for
    each voice's utterances of the batch (`tokens_to_speeches`). A last batch that is not full is
    topped up with copies of its last utterance, whose output is dropped: the captured step has
    a fixed batch size. `max_new_tokens`, `sampling` and `exaggeration` are one for all, or one per
    text (utterances of different requests: a batch decodes to its longest, and each keeps its own
    first tokens). `flow_steps` as in `synthesize`. `voice_cache`: a `VoiceCache` kept between calls
    (a session's), so a voice is prepared once, not once per call. `cancelled`: as in `synthesize`,
    asked at each of the decoder's stop checks and before each batch's S3Gen."""
    from chatterbox.models.s3gen.const import S3GEN_SR
    from tqdm.auto import tqdm

    from chatterbox_lab.pipeline.voices import VoiceCache

    texts = [check_text(t) for t in texts]
    check_flow_steps(flow_steps)
    if isinstance(voices, (str, Path)):
        voices = [voices] * len(texts)
    if len(voices) != len(texts) or not texts:
        raise ValueError(f"give one voice for all texts or one per text: {len(texts)} texts, {len(voices)} voices")
    tokens_each, sampling_each, exaggeration_each = (
        _one_per_text(value, len(texts), name) for value, name in
        ((max_new_tokens, "max_new_tokens"), (sampling, "sampling"), (exaggeration, "exaggeration")))
    start = time.perf_counter()
    seconds = {}

    def clock(stage):
        return timed_stage(tts.device, seconds, stage)
    cache = voice_cache or VoiceCache(tts, capacity=len(set(map(str, voices))))
    conds = [cache.use(v, e) for v, e in zip(voices, exaggeration_each)]
    n = decoder.streams
    speeches = [None] * len(texts)
    with torch.inference_mode(), tqdm(total=len(texts), desc="utterances", disable=not progress) as bar:
        for first in range(0, len(texts), n):
            batch = list(range(first, min(first + n, len(texts))))
            padded = batch + [batch[-1]] * (n - len(batch))
            with clock("t3"):
                result = decoder.generate_batch([conds[i].t3 for i in padded],
                                                [text_tokens_for(tts, texts[i]) for i in padded],
                                                max(tokens_each[i] for i in batch),
                                                [sampling_each[i] for i in padded], cancelled=cancelled)
            if cancelled is not None and cancelled():
                raise Cancelled(f"stopped after T3, before S3Gen, with {first} of {len(texts)} utterances made")
            by_voice = {}
            for i, tokens in zip(batch, result.all_tokens):
                by_voice.setdefault(id(conds[i]), []).append((i, tokens[:, :tokens_each[i]]))
            for group in by_voice.values():
                made = tokens_to_speeches(tts, [tokens for _, tokens in group], conds[group[0][0]].gen, clock,
                                          watermark, flow_steps)
                for (i, tokens), (speech_tokens, wav) in zip(group, made):
                    speeches[i] = Synthesis(wav=wav, sample_rate=S3GEN_SR, speech_tokens=speech_tokens,
                                            t3_steps=tokens.size(1))
                bar.update(len(group))
    sync_device(tts.device)
    return BatchSynthesis(speeches, time.perf_counter() - start, seconds)


def _one_per_text(value, count: int, name: str) -> list:
    """`value` for each of `count` texts: a list of one per text as it is, else `value` repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"give one {name} for all texts or one per text: {count} texts, {len(value)} values")
        return list(value)
    return [value] * count
