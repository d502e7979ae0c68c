"""Checks that a ladder rung computes what upstream computes.

- fp32: the same seed gives the same tokens as upstream `T3.inference`.
- bf16: tokens may differ, so logits are compared under teacher forcing: both
  sides are fed the same token sequence and their next-token logits compared
  against an fp32 full-sequence forward through upstream's transformer.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from chatterbox_lab.decode.decoder import T3Decoder
from chatterbox_lab.decode.embed_cache import upstream_step_embedding
from chatterbox_lab.pipeline.synthesis import upstream_t3
from chatterbox_lab.sampling import SamplingParams, TurboSamplingParams

# The text the bench, the quality checks and the lab bench speak unless told otherwise.
DEFAULT_TEXT = ("Every step of this workbook is measured, profiled and checked against the "
                "upstream path, so a speed-up you read here is one you can reproduce.")

# Relative L2 error of bf16 logits against fp32, max over steps. bf16 keeps 8 bits of
# mantissa (relative rounding 2^-9 ~ 2e-3 per value); through 30 layers errors grow.
BF16_LOGIT_TOLERANCE = 5e-2


def seeded_tokens(tts, text_tokens, n: int, seed: int, decoder: T3Decoder | None = None,
                  sampling: SamplingParams = SamplingParams()) -> torch.Tensor:
    torch.manual_seed(seed)
    if decoder is None:
        return upstream_t3(tts, text_tokens, n, sampling)[0]
    return decoder.generate(tts.conds.t3, text_tokens, n, sampling).tokens


def token_identity(tts, text_tokens, steps_list, n: int, seed: int = 0, max_cache_len: int | None = None,
                   reference: torch.Tensor | None = None, progress: bool = False) -> dict:
    """{"+".join(steps): tokens identical to upstream} for each set of steps (fp32 model).
    `reference`: upstream's tokens for this seed, if already computed. `progress`: a bar
    over the step sets (compiled ones take tens of seconds each on a GPU)."""
    if reference is None:
        reference = seeded_tokens(tts, text_tokens, n, seed)
    verdicts = {}
    for steps in tqdm(steps_list, desc="token identity checks", disable=not progress):
        decoder = T3Decoder(tts.t3, steps, max_cache_len=max_cache_len, max_new_tokens=n)
        tokens = seeded_tokens(tts, text_tokens, n, seed, decoder)
        verdicts["+".join(sorted(steps)) or "none"] = bool(torch.equal(tokens.cpu(), reference.cpu()))
    return verdicts


def turbo_token_identity(tts, text_tokens, steps_list, n: int, seed: int = 0,
                         sampling: TurboSamplingParams = TurboSamplingParams()) -> dict:
    """{"+".join(steps): tokens identical to upstream's `T3.inference_turbo`} for each set of the
    Turbo ladder's steps (fp32 model), `n` tokens from one seed."""
    from chatterbox_lab.decode.turbo import TurboDecoder

    torch.manual_seed(seed)
    with torch.inference_mode():
        # Upstream samples one token from the prefill, then one a loop turn.
        reference = tts.t3.inference_turbo(tts.conds.t3, text_tokens, temperature=sampling.temperature,
                                           top_k=sampling.top_k, top_p=sampling.top_p,
                                           repetition_penalty=sampling.repetition_penalty, max_gen_len=n - 1)
    verdicts = {}
    for steps in steps_list:
        decoder = TurboDecoder(tts.t3, steps, max_new_tokens=n)
        torch.manual_seed(seed)
        tokens = decoder.generate(tts.conds.t3, text_tokens, n, sampling).tokens
        verdicts["+".join(sorted(steps)) or "none"] = bool(torch.equal(tokens.cpu(), reference.cpu()))
    return verdicts


@torch.inference_mode()
def reference_logits(tts, text_tokens, forced: torch.Tensor) -> torch.Tensor:
    """fp32 upstream transformer over the whole forced sequence at once: (n, 2, V)."""
    t3 = tts.t3
    t3_cond = type(tts.conds.t3)(**vars(tts.conds.t3)).to(dtype=torch.float32)
    bos = torch.full((1, 1), t3.hp.start_speech_token, dtype=torch.long, device=text_tokens.device)
    embeds, _ = t3.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text_tokens,
                                        speech_tokens=bos.expand(text_tokens.size(0), 1), cfg_weight=0.5)
    parts = [embeds, upstream_step_embedding(t3, bos, 0)]
    parts += [upstream_step_embedding(t3, forced[:, i:i + 1], i + 1) for i in range(forced.size(1) - 1)]
    sequence = torch.cat(parts, dim=1)
    n = forced.size(1)
    hidden = t3.tfmr(inputs_embeds=sequence, use_cache=False).last_hidden_state
    return t3.speech_head(hidden[:, -n:]).transpose(0, 1).float()


@torch.inference_mode()
def forced_logits(decoder: T3Decoder, t3_cond, text_tokens, forced: torch.Tensor) -> torch.Tensor:
    """The decoder's own prefill and steps, fed `forced` instead of its samples: (n, 2, V)."""
    logits = [decoder.prefill(t3_cond, text_tokens, forced.size(1), cfg_weight=0.5)]
    for i in range(forced.size(1) - 1):
        logits.append(decoder.forward_step(forced[:, i:i + 1], i))
    return torch.stack(logits).float()


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """max over steps of ||candidate - reference|| / ||reference||."""
    diff = (candidate - reference).flatten(1).norm(dim=1)
    return float((diff / reference.flatten(1).norm(dim=1)).max())
