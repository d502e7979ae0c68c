"""Floating-point operations of one utterance, stage by stage, and the fastest a card could go.

Decode is bound by memory, but a batch of many utterances is bound by arithmetic: S3Gen's
flow runs its estimator twenty times (ten Euler steps, CFG pair) over every mel frame of
the voice's prompt and the new speech, with attention across all of them. Counting the
operations of one utterance on upstream's eager path (`torch.utils.flop_counter`, which
sees matmuls, convolutions and attention, not element-wise work or FFTs) and dividing by
the card's own large-matmul rate gives a ceiling on how many seconds of audio per second a
batch could make: no schedule of these operations beats it.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from chatterbox_lab.sampling import SamplingParams

# PyTorch's own attention as plain matmuls while counting: the counter has a formula for the
# GPU's fused attention kernels but not for the CPU's, which it would count as nothing.
_COUNTED_ATTENTION = SDPBackend.MATH


def utterance_flops(tts, text: str, tokens: int, sampling: SamplingParams = SamplingParams()) -> dict:
    """FLOPs per stage ("t3", "s3gen_flow", "hifigan", "watermark") of one utterance of exactly
    `tokens` speech tokens with the voice prepared last, counted on upstream's eager modules:
    call it before any step that replays graphs or compiles (the counter sees neither)."""
    from torch.utils.flop_counter import FlopCounterMode

    from chatterbox_lab.decode.decoder import text_tokens_for
    from chatterbox_lab.pipeline.synthesis import tokens_to_speech, upstream_t3

    _check_upstream(tts)
    counts = {}

    @contextlib.contextmanager
    def counted(stage):
        with FlopCounterMode(display=False) as counter:
            yield
        counts[stage] = counts.get(stage, 0) + counter.get_total_flops()
    with torch.inference_mode(), _frozen(tts.t3, tts.s3gen, tts.watermarker.perth_net), sdpa_kernel(_COUNTED_ATTENTION):
        with counted("t3"):
            speech, *_ = upstream_t3(tts, text_tokens_for(tts, text), tokens, sampling, stop_on_eos=False)
        tokens_to_speech(tts, speech, tts.conds.gen, counted)
    return counts


def flow_flops(tts, tokens: int, flow_steps: int | None = None) -> int:
    """FLOPs of S3Gen's flow alone for `tokens` speech tokens with `flow_steps` Euler steps
    (None: upstream's 10) and the voice prepared last; the count depends on the number of
    tokens, not their values. Upstream's modules only, as `utterance_flops`."""
    from torch.utils.flop_counter import FlopCounterMode

    from chatterbox_lab.validation import check_flow_steps

    check_flow_steps(flow_steps)
    _check_upstream(tts)
    speech = torch.zeros(1, tokens, dtype=torch.long, device=tts.device)
    with (torch.inference_mode(), _frozen(tts.s3gen), sdpa_kernel(_COUNTED_ATTENTION),
          FlopCounterMode(display=False) as counter):
        tts.s3gen.flow_inference(speech, ref_dict=tts.conds.gen, finalize=True, n_cfm_timesteps=flow_steps)
    return counter.get_total_flops()


def _check_upstream(tts) -> None:
    from chatterbox_lab.s3gen.s3gen_steps import s3gen_steps_of

    if s3gen_steps_of(tts):
        raise ValueError("count FLOPs on upstream's modules, before any S3Gen step is applied")


@contextlib.contextmanager
def _frozen(*modules):
    """Parameters without requires_grad for the duration: the counter's module tracker hooks
    the gradient of every input that wants one, which fails under inference mode."""
    wanting = [p for module in modules for p in module.parameters() if p.requires_grad]
    for parameter in wanting:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in wanting:
            parameter.requires_grad_(True)


def t3_cache_ceiling_x_realtime(t3, prompt_len: int, tokens: int, bandwidth: float) -> float:
    """Seconds of audio per second if T3 did nothing but read its KV cache at `bandwidth`
    (bytes/s). However large the batch, each new token's CFG pair reads the cache of every
    position before it, at the mean position of `tokens` new ones after `prompt_len`; the
    weights, read once per step for the whole batch, vanish at large batches, the cache does
    not. A ceiling on T3's batched rate set by memory, beside the arithmetic one."""
    from chatterbox_lab.pipeline.synthesis import TOKENS_PER_SECOND
    from chatterbox_lab.measure.roofline import kv_bytes_per_step

    return bandwidth / kv_bytes_per_step(t3, prompt_len + tokens / 2) / TOKENS_PER_SECOND


def x_realtime_ceiling(flops: dict, audio_s: float, flop_rate: float) -> float:
    """Seconds of audio per second of wall time if every counted operation ran at `flop_rate`
    (FLOP/s) and nothing else took time: `audio_s` of audio costs sum(flops) operations."""
    return audio_s * flop_rate / sum(flops.values())
