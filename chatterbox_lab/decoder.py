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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .embed_cache import SpeechEmbeddingCache, upstream_step_embedding
from .kv_cache import cache_len_for, check_fits
from .precision import t3_in_dtype
from .sampling import DeviceSampling, SamplingParams, next_token_probs
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
    timings: dict = field(default_factory=dict)

    @property
    def decode_tok_s(self) -> float:
        return self.steps_run / self.decode_s if self.decode_s > 0 else float("nan")


def _sync(device) -> None:
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
        self.device = self.t3.speech_head.weight.device
        self.dtype = self.t3.speech_head.weight.dtype
        self.sampling = DeviceSampling(self.device)
        self.embedding = SpeechEmbeddingCache(self.t3) if "embed_cache" in self.steps else None
        self.seen = torch.zeros(1, self.t3.hp.speech_tokens_dict_size, dtype=torch.bool, device=self.device)
        torch._dynamo.mark_static_address(self.seen)
        # Speech positions index the learned position table (upstream's speech_pos_emb).
        self.speech_positions = torch.arange(self.t3.speech_pos_emb.emb.num_embeddings, device=self.device)
        self.forward = None
        self.cache_positions = None
        if "static_cache" in self.steps:
            if max_cache_len is None:
                max_cache_len = cache_len_for(cond_len(self.t3) + max_text_tokens + 4, max_new_tokens)
            self.forward = StaticT3Forward(self.t3, max_cache_len)
            self.cache_positions = torch.arange(max_cache_len, device=self.device)
        self._active_forward = self.forward
        self.prompt_len = 0
        self.step_fn = self._step
        self.compiled = "compiled" in self.steps
        if self.compiled:
            from .compiled_step import compile_step

            self.step_fn = compile_step(self._step)

    @property
    def capacity(self) -> int | None:
        return self.forward.capacity if self.forward is not None else None

    def _embed(self, token: torch.Tensor, speech_position):
        if self.embedding is not None:
            return self.embedding(token, speech_position)
        return upstream_step_embedding(self.t3, token, speech_position)

    def _step(self, token: torch.Tensor, position, speech_position):
        """One token in, next-token probabilities out; with the caches on, all of it graph-safe."""
        self.seen.index_fill_(1, token[0], True)
        logits = self._active_forward(self._embed(token, speech_position), position)
        return next_token_probs(logits, self.seen, self.sampling)

    def _positions(self, i: int):
        """Cache position and speech position of the token sampled at step i."""
        cache = self.cache_positions
        position = None if cache is None else cache[self.prompt_len + i: self.prompt_len + i + 1]
        speech = self.speech_positions[i + 1: i + 2] if self.embedding is not None else i + 1
        return position, speech

    def prefill(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int, cfg_weight: float) -> torch.Tensor:
        """Run the prompt (conditioning, text, start token); returns its logits (2, V)."""
        limit = self.speech_positions.numel() - 1
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
        if self.forward is not None:
            check_fits(self.prompt_len, max_new_tokens, self.capacity)
        else:
            self._active_forward = DynamicT3Forward(t3)
        self.seen.zero_()
        self.seen[0, hp.start_speech_token] = True
        positions = None if self.cache_positions is None else self.cache_positions[: self.prompt_len]
        return self._active_forward(prompt, positions)

    def forward_step(self, token: torch.Tensor, i: int) -> torch.Tensor:
        """Logits (2, V) after feeding the token sampled at step i (eager; for checks)."""
        position, speech = self._positions(i)
        return self._active_forward(self._embed(token, speech), position)

    @torch.inference_mode()
    def generate(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), stop_on_eos: bool = True) -> DecodeResult:
        self.sampling.set(sampling)
        _sync(self.device)
        start = time.perf_counter()
        logits = self.prefill(t3_cond, text_tokens, max_new_tokens, sampling.cfg_weight)
        probs = next_token_probs(logits, self.seen, self.sampling)
        _sync(self.device)
        prefill_end = time.perf_counter()

        generated = []
        for i in range(max_new_tokens):
            token = torch.multinomial(probs, num_samples=1)
            generated.append(token)
            if stop_on_eos and (i + 1) % STOP_CHECK_INTERVAL == 0 and self._stopped(generated[-STOP_CHECK_INTERVAL:]):
                break
            if i + 1 == max_new_tokens:
                break  # upstream runs one more forward here and never uses its output
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            probs = self.step_fn(token, *self._positions(i))
        tokens = torch.cat(generated, dim=1)
        _sync(self.device)
        end = time.perf_counter()

        if stop_on_eos:
            hits = (tokens[0] == self.t3.hp.stop_speech_token).nonzero()
            if len(hits):
                tokens = tokens[:, : int(hits[0]) + 1]
        return DecodeResult(tokens=tokens, prefill_s=prefill_end - start, decode_s=end - prefill_end,
                            steps_run=len(generated))

    def _stopped(self, recent) -> bool:
        return bool((torch.cat(recent, dim=1) == self.t3.hp.stop_speech_token).any())
