"""Speech while it is decoded: audio for the first tokens is ready before T3 has written the rest.

T3 and S3Gen take turns on one thread: a chunk of tokens, its audio, the next chunk.
The listener hears the first piece while the later ones are made; running T3 on its
own CUDA stream alongside S3Gen would overlap the two as well, and is not done here.

T3 hands over its tokens in chunks (`T3Decoder.generate_stream`). For each chunk S3Gen's
flow runs over every token so far, since its encoder and estimator look at the whole
sequence, and the mel frames not yet turned into sound go through HiFi-GAN, with some
frames of left context so the vocoder starts mid-utterance as it would have run through.
The last frames of a chunk wait for the next one: they belong to the last few tokens,
whose sound upstream's streaming mode also holds back until it sees what follows
(`pre_lookahead_len`). Two pieces meet in a short cross-fade over samples both computed,
and the seams are measured against the waveform made from all the tokens at once.

Upstream 0.1.7's own streaming flag (`flow_inference(finalize=False)`) fails on a mask
shape, so each flow run here is a finished one and the hold-back is done on its output.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.pipeline.synthesis import TOKENS_PER_SECOND, speech_tokens_of, timed_stage
from chatterbox_lab.sampling import SamplingParams
from chatterbox_lab.validation import check_text

MEL_FRAMES_PER_SECOND = 50
CONTEXT_FRAMES = 16   # HiFi-GAN's left context for a piece that starts mid-utterance
CROSSFADE_SAMPLES = 480
# The first piece waits for its tokens: a short first chunk is heard soonest, and later,
# longer chunks mean fewer flow runs over the growing sequence. The first piece only has
# to last until the second is ready: 8 tokens make about 0.2 s of sound once the held-back
# frames and the cross-fade are taken off, against some 0.1 s to make the next piece on an
# H100 (`playback_waits` measures it: bench --stream records `wait_s`).
FIRST_CHUNK_TOKENS = 8


@dataclass
class AudioPiece:
    wav: np.ndarray     # float32 at `sample_rate`
    sample_rate: int
    ready_s: float      # seconds from the request to this piece being ready
    last: bool
    seconds: dict = field(default_factory=dict)  # stage -> wall seconds spent on this piece


def stream_speech(tts, text: str, *, decoder: T3Decoder, voice=None, max_new_tokens: int = 1000,
                  sampling: SamplingParams = SamplingParams(), chunk_tokens: int = 32,
                  first_chunk_tokens: int | None = FIRST_CHUNK_TOKENS, exaggeration: float = 0.5,
                  watermark: bool = True):
    """Yields `AudioPiece`s whose concatenation is the utterance; the first comes after
    `first_chunk_tokens` tokens (plus the flow and vocoder for them), not after the whole text,
    the later ones every `chunk_tokens`. Each piece is watermarked on its own, as upstream
    watermarks a whole utterance."""
    from chatterbox.models.s3gen.const import S3GEN_SR

    from chatterbox_lab.pipeline.voices import voice_or_prepared

    start = time.perf_counter()
    text = check_text(text)
    s3gen = tts.s3gen
    hop = S3GEN_SR // MEL_FRAMES_PER_SECOND
    frames_per_token = MEL_FRAMES_PER_SECOND // TOKENS_PER_SECOND
    held_frames = s3gen.flow.pre_lookahead_len * frames_per_token
    with torch.inference_mode():
        conds = voice_or_prepared(tts, voice, exaggeration)
        tokens = torch.zeros(0, dtype=torch.long, device=tts.device)
        done_frames, tail = 0, np.zeros(0, dtype=np.float32)
        chunks = decoder.generate_stream(conds.t3, text_tokens_for(tts, text), max_new_tokens, sampling, chunk_tokens,
                                         first_chunk_tokens)
        # Stage times of the piece being made; T3's run from the last piece's hand-over.
        seconds, resumed = {}, time.perf_counter()
        for new, last in chunks:
            seconds["t3"] = seconds.get("t3", 0.0) + time.perf_counter() - resumed
            tokens = torch.cat([tokens, speech_tokens_of(new[0]).to(tts.device)])
            if tokens.numel() == 0:
                resumed = time.perf_counter()
                continue
            with timed_stage(tts.device, seconds, "s3gen_flow"):
                mels = s3gen.flow_inference(tokens, ref_dict=conds.gen, finalize=True)
            ready_frames = mels.size(-1) if last else mels.size(-1) - held_frames
            if ready_frames <= done_frames and not last:
                resumed = time.perf_counter()
                continue
            context = min(done_frames, CONTEXT_FRAMES)
            with timed_stage(tts.device, seconds, "hifigan"):
                wav, _ = s3gen.hift_inference(mels[:, :, done_frames - context:ready_frames].to(dtype=s3gen.dtype),
                                              None)
                wav = wav.squeeze(0).float()
                if done_frames == 0:
                    wav[: len(s3gen.trim_fade)] *= s3gen.trim_fade  # upstream's fade-in of an utterance
                wav = wav.cpu().numpy()
            # New samples from where the held tail starts: the tail is cross-faded into them.
            fresh = wav[context * hop - len(tail):]
            piece = _crossfade(tail, fresh)
            done_frames = ready_frames
            tail = np.zeros(0, dtype=np.float32) if last else piece[len(piece) - CROSSFADE_SAMPLES:]
            out = piece if last else piece[: len(piece) - CROSSFADE_SAMPLES]
            if watermark:
                with timed_stage(tts.device, seconds, "watermark"):
                    out = tts.watermarker.apply_watermark(out, sample_rate=S3GEN_SR)
            yield AudioPiece(out, S3GEN_SR, time.perf_counter() - start, last, seconds)
            if last:
                return
            seconds, resumed = {}, time.perf_counter()
    if tokens.numel() == 0:
        raise RuntimeError("T3 produced no valid speech tokens (it stopped at once); nothing to synthesize")


def _crossfade(tail: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """`fresh` with its first len(tail) samples faded in over `tail` faded out."""
    n = len(tail)
    if n == 0:
        return fresh.astype(np.float32, copy=True)
    ramp = np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
    out = fresh.astype(np.float32, copy=True)
    out[:n] = tail * (1 - ramp) + fresh[:n] * ramp
    return out


def playback_waits(pieces: list[AudioPiece]) -> list[float]:
    """For each piece after the first, how long a listener who starts playing as soon as the
    first piece is ready, and plays every piece as soon as it can, waits for it: zero when it was
    ready before the pieces before it had finished playing."""
    clock = pieces[0].ready_s
    waits = []
    for before, piece in zip(pieces, pieces[1:]):
        clock += len(before.wav) / before.sample_rate
        waits.append(max(0.0, piece.ready_s - clock))
        clock += waits[-1]
    return waits


def seam_error(streamed: np.ndarray, whole: np.ndarray) -> float:
    """RMS of the difference from the waveform made from all tokens at once, relative to its RMS."""
    if len(streamed) != len(whole):
        raise ValueError(f"streamed audio has {len(streamed)} samples, the whole utterance {len(whole)}")
    return float(np.sqrt(np.mean((streamed - whole) ** 2)) / max(np.sqrt(np.mean(whole ** 2)), 1e-12))
