"""T3 speech-token decoding with the optimization ladder's steps switched on one by one.

Same semantics as upstream `T3.inference` (CFG pair, repetition penalty,
temperature, min-p, top-p, stop token, one `torch.multinomial` per token), so
the tokens plug into upstream's S3Gen. Steps, each in its own module:

- "bf16":         T3 weights in bfloat16 (`precision.py`)
- "static_cache": fixed KV buffers and our attention (`kv_cache.py`, `t3_forward.py`)
- "embed_cache":  the step's input embedding as two device lookups (`embed_cache.py`)
- "compiled":     the one-token step under torch.compile with CUDA graphs (`compiled_step.py`)
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .embed_cache import SpeechEmbeddingCache, upstream_step_embedding
from .kv_cache import cache_len_for, check_fits
from .precision import t3_in_dtype
from .sampling import DeviceSampling, SamplingParams, next_token_probs, sample_token
from .t3_forward import DynamicT3Forward, StaticT3Forward

LADDER = ("bf16", "static_cache", "embed_cache", "compiled")
REQUIRES = {"compiled": ("static_cache", "embed_cache")}

# How often the host looks for the stop token: each look is a device sync that
# stops the CPU from queueing further steps ahead of the GPU.
STOP_CHECK_INTERVAL = 16


def check_steps(steps) -> frozenset:
    steps = frozenset(steps)
    unknown = steps - set(LADDER)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}: choose from {', '.join(LADDER)}")
    for step, needs in REQUIRES.items():
        missing = [n for n in needs if step in steps and n not in steps]
        if missing:
            raise ValueError(f"step {step!r} needs {', '.join(missing)} as well")
    return steps


def ladder_prefix(rung: str) -> frozenset:
    """The steps switched on at `rung`: it and every step before it."""
    return frozenset(LADDER[: LADDER.index(rung) + 1])


def text_tokens_for(tts, text: str) -> torch.Tensor:
    """Upstream's text preparation: punctuation clean-up, tokens, CFG pair, start/stop ids."""
    from chatterbox.tts import punc_norm

    tokens = tts.tokenizer.text_to_tokens(punc_norm(text)).to(tts.device)
    tokens = torch.cat([tokens, tokens], dim=0)
    tokens = F.pad(tokens, (1, 0), value=tts.t3.hp.start_text_token)
    return F.pad(tokens, (0, 1), value=tts.t3.hp.stop_text_token)


def cond_len(t3) -> int:
    """Length of the conditioning prefix: speaker, perceiver queries (or prompt tokens), emotion."""
    perceiver = t3.cond_enc.perceiver
    prompt = perceiver.pre_attention_query.shape[1] if perceiver is not None else t3.hp.speech_cond_prompt_len
    return 1 + prompt + int(t3.hp.emotion_adv)


def prompt_len_for(t3, text_tokens: torch.Tensor) -> int:
    """Prefill length: conditioning, text with its start/stop ids, and upstream's two start tokens."""
    return cond_len(t3) + text_tokens.size(-1) + 2


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # (1, n) as upstream returns them, stop token included if sampled
    prefill_s: float
    decode_s: float
    steps_run: int = 0

    @property
    def decode_tok_s(self) -> float:
        return self.steps_run / self.decode_s if self.decode_s > 0 else float("nan")


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class T3Decoder:
    """Decode speech tokens from a T3 with a chosen set of ladder steps.

    `max_cache_len` fixes the static cache's capacity for the whole job; requests
    that would not fit raise `CacheOverflowError`. Changing speaker, text or
    sampling values never recompiles: they change data, not the captured step.
    """

    def __init__(self, t3, steps=(), *, max_cache_len: int | None = None, max_new_tokens: int = 1000,
                 max_text_tokens: int = 300):
        self.steps = check_steps(steps)
        self.t3 = t3_in_dtype(t3, torch.bfloat16) if "bf16" in self.steps else t3
        self.device = device = self.t3.speech_head.weight.device
        self.dtype = self.t3.speech_head.weight.dtype
        self.sampling = DeviceSampling(device)
        self.embedding = SpeechEmbeddingCache(self.t3) if "embed_cache" in self.steps else None
        # Decode state lives on the device at fixed addresses, so a captured step reads
        # and advances it without any host data: the tokens sampled so far, a mask of
        # them for the repetition penalty, the step counter, and a non-finite flag.
        n_speech_positions = self.t3.speech_pos_emb.emb.num_embeddings
        self.tokens = torch.zeros(1, n_speech_positions, dtype=torch.long, device=device)
        self.seen = torch.zeros(1, self.t3.hp.speech_tokens_dict_size, dtype=torch.bool, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.prompt_len_t = torch.zeros(1, dtype=torch.long, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        for t in (self.tokens, self.seen, self.step_index, self.prompt_len_t, self.nonfinite):
            torch._dynamo.mark_static_address(t)
        self.forward = None
        if "static_cache" in self.steps:
            if max_cache_len is None:
                max_cache_len = cache_len_for(cond_len(self.t3) + max_text_tokens + 4, max_new_tokens)
            self.forward = StaticT3Forward(self.t3, max_cache_len)
        self._active_forward = self.forward
        self.prompt_len = 0
        self.compiled = "compiled" in self.steps
        self.step_fn = self._step
        if self.compiled:
            from .compiled_step import compile_step

            self.step_fn = compile_step(self._step)

    @property
    def capacity(self) -> int | None:
        return self.forward.capacity if self.forward is not None else None

    def _embed(self, token: torch.Tensor, step: int | None):
        """Input embedding of the token sampled at `step` (device counter when step is None)."""
        if self.embedding is not None:
            return self.embedding(token, self.step_index + 1)
        return upstream_step_embedding(self.t3, token, step + 1)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = next_token_probs(logits, self.seen, self.sampling)
        self.nonfinite.logical_or_(~torch.isfinite(probs).all())
        return probs

    def _feed(self, token: torch.Tensor, step: int | None) -> torch.Tensor:
        """Logits (2, V) after feeding `token`, the one sampled at the current step."""
        position = None if self.forward is None else self.prompt_len_t + self.step_index
        return self._active_forward(self._embed(token, step), position)

    def _step(self, step: int | None = None) -> torch.Tensor:
        """Feed the last sampled token, return next-token probabilities. With the caches on
        (step=None) it reads only device state, so one captured graph serves every step."""
        token = self.tokens.index_select(1, self.step_index)
        self.seen.index_fill_(1, token[0], True)
        logits = self._feed(token, step)
        self.step_index.add_(1)
        return self._probs(logits)

    def prefill(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int, cfg_weight: float) -> torch.Tensor:
        """Run the prompt (conditioning, text, start token); returns its logits (2, V)."""
        limit = self.tokens.size(1) - 1
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be between 1 and {limit} (T3's speech position table), "
                             f"got {max_new_tokens}")
        t3, hp, device = self.t3, self.t3.hp, self.device
        if t3_cond.speaker_emb.dtype != self.dtype:
            t3_cond = type(t3_cond)(**vars(t3_cond)).to(dtype=self.dtype)
        text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=device)
        bos = torch.full((1, 1), hp.start_speech_token, dtype=torch.long, device=device)
        embeds, _ = t3.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text_tokens,
                                            speech_tokens=bos.expand(text_tokens.size(0), 1),
                                            cfg_weight=cfg_weight)
        # Upstream appends a second start token after the one prepare_input_embeds adds.
        prompt = torch.cat([embeds, upstream_step_embedding(t3, bos, 0)], dim=1)
        self.prompt_len = prompt.size(1)
        positions = None
        if self.forward is not None:
            check_fits(self.prompt_len, max_new_tokens, self.capacity)
            positions = torch.arange(self.prompt_len, device=device)
        else:
            self._active_forward = DynamicT3Forward(t3)
        self.prompt_len_t.fill_(self.prompt_len)
        self.step_index.zero_()
        self.nonfinite.zero_()
        self.seen.zero_()
        self.seen[0, hp.start_speech_token] = True
        return self._active_forward(prompt, positions)

    def forward_step(self, token: torch.Tensor, step: int) -> torch.Tensor:
        """Logits (2, V) after feeding `token` as the one sampled at `step` (eager; for checks)."""
        self.step_index.fill_(step)
        self.tokens[:, step] = token.view(-1)
        return self._feed(token, step)

    @torch.inference_mode()
    def generate(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), stop_on_eos: bool = True) -> DecodeResult:
        self.sampling.set(sampling)
        sync_device(self.device)
        start = time.perf_counter()
        probs = self._probs(self.prefill(t3_cond, text_tokens, max_new_tokens, sampling.cfg_weight))
        sync_device(self.device)
        prefill_end = time.perf_counter()

        steps = max_new_tokens
        for i in range(max_new_tokens):
            sample_token(probs, out=self.tokens[:, i:i + 1])
            if (i + 1) % STOP_CHECK_INTERVAL == 0 or i + 1 == max_new_tokens:
                if self._should_stop(i + 1, stop_on_eos):
                    steps = i + 1
                    break
            if i + 1 == max_new_tokens:
                break  # upstream runs one more forward here and never uses its output
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
                probs = self.step_fn()
            else:
                probs = self.step_fn(None if self.embedding is not None else i)
        tokens = self.tokens[:, :steps].clone()
        sync_device(self.device)
        end = time.perf_counter()

        if stop_on_eos:
            hits = (tokens[0] == self.t3.hp.stop_speech_token).nonzero()
            if len(hits):
                tokens = tokens[:, : int(hits[0]) + 1]
        return DecodeResult(tokens=tokens, prefill_s=prefill_end - start, decode_s=end - prefill_end,
                            steps_run=steps)

    def _should_stop(self, steps_done: int, stop_on_eos: bool) -> bool:
        """The one host sync every STOP_CHECK_INTERVAL tokens: stop token seen, or bad numbers."""
        recent = self.tokens[:, max(0, steps_done - STOP_CHECK_INTERVAL): steps_done]
        stopped = (recent == self.t3.hp.stop_speech_token).any() & stop_on_eos
        stopped, nonfinite = torch.stack([stopped, self.nonfinite]).tolist()
        if nonfinite:
            raise FloatingPointError(
                f"T3 produced NaN or infinite probabilities within its first {steps_done} tokens; "
                f"the model or its dtype is broken (try the fp32 path without 'bf16'). Nothing was returned.")
        return stopped

