"""Turbo's speech-token loop on our structure: GPT-2 T3, one row per step, upstream's sampling.

`ChatterboxTurboTTS` decodes with `T3.inference_turbo`: a GPT-2 medium (24 layers, width 1024,
learned positions, LayerNorm, GELU, q/k/v as one `c_attn`) with no classifier-free guidance, so
each step computes one row, not a pair. Its sampling runs transformers' processors in the order
temperature, top-k (1000), top-p, repetition penalty, then `torch.multinomial`.

`TurboDecoder` runs that loop with the steps of the registry's Turbo ladder
(`registry.TURBO_STEPS`), resolved once into a `DecodePlan`:

- `bf16`: the weights in bfloat16;
- `static_cache`: fixed KV buffers (`kv_cache.StaticKVCache`) and a forward over them written here,
  reusing upstream's own GPT-2 modules for everything but attention;
- `embed_cache`: the step's input (speech embedding) and position read at device indices, so the
  step takes no host data;
- `compiled`: the one-token step under torch.compile with CUDA graphs;
- `sampling_in_graph`: the processors and the draw inside that step (`sampling.turbo_token_probs`),
  top-k, top-p and the penalty held as device tensors, so changing them never recaptures.

The original's other T3 steps are Llama-shaped kernels and do not apply (the registry says so).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from chatterbox_lab.decode.decoder import STOP_CHECK_INTERVAL, Cancelled, DecodeResult, sync_device
from chatterbox_lab.decode.kv_cache import StaticKVCache, cache_len_for, check_fits
from chatterbox_lab.decode.plan import DecodePlan
from chatterbox_lab.decode.precision import t3_in_dtype
from chatterbox_lab.decode.t3_forward import DynamicT3Forward
from chatterbox_lab.sampling import DeviceSampling, TurboSamplingParams, sample_token, turbo_token_probs


def turbo_text_tokens(tts, text: str) -> torch.Tensor:
    """Upstream Turbo's text preparation: its punctuation clean-up, then GPT-2 tokens (1, T); no
    start or stop ids and no CFG pair."""
    from chatterbox.tts_turbo import punc_norm

    return tts.tokenizer(punc_norm(text), return_tensors="pt").input_ids.to(tts.device)


class StaticTurboForward:
    """GPT-2 over a static KV cache: upstream's blocks, norms and MLPs, our attention (it must write
    the fixed buffers and read positions as device tensors)."""

    def __init__(self, t3, capacity: int):
        self.t3 = t3
        self.gpt = t3.tfmr
        self.n_heads = t3.cfg.n_head
        self.head_dim = t3.cfg.hidden_size // self.n_heads
        weight = t3.speech_head.weight
        self.cache = StaticKVCache(len(self.gpt.h), 1, self.n_heads, capacity, self.head_dim,
                                   weight.dtype, weight.device)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """embeds (1, T, dim) at positions (T,) -> speech logits of the last position (1, V)."""
        x = embeds + self.gpt.wpe(positions)
        mask = self.cache.mask(positions)
        T = x.size(1)
        for i, block in enumerate(self.gpt.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(x.size(-1), dim=-1)
            q, k, v = (t.view(1, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
            keys, values = self.cache.update(i, positions, k, v)
            attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + block.attn.c_proj(attended.transpose(1, 2).reshape(1, T, -1))
            x = x + block.mlp(block.ln_2(x))
        return self.t3.speech_head(self.gpt.ln_f(x[:, -1]))


class TurboDecoder:
    """Decode Turbo's speech tokens with a set of the Turbo ladder's steps.

    `max_new_tokens` fixes the token buffer (and, with `static_cache`, the cache with
    `max_text_tokens`); a request beyond either is refused with a message, never truncated.
    Changing voice, text or sampling values never recompiles: they change data, not the step.
    """

    def __init__(self, t3, steps=(), *, max_cache_len: int | None = None, max_new_tokens: int = 1000,
                 max_text_tokens: int = 300):
        if not getattr(t3, "is_gpt", False):
            raise ValueError("TurboDecoder decodes Turbo's GPT-2 T3; for the original or multilingual "
                             "model's Llama T3 use T3Decoder")
        device = t3.speech_head.weight.device
        self.plan = plan = DecodePlan.resolve(steps, device, model="turbo")
        self.steps = plan.steps
        self.t3 = t3_in_dtype(t3, torch.bfloat16) if plan.weights == "bf16" else t3
        self.device = device
        self.dtype = self.t3.speech_head.weight.dtype
        self.sampling = DeviceSampling(device, turbo=True)
        hp = self.t3.hp
        # Decode state at fixed device addresses, so a captured step reads and advances it with no
        # host data: the tokens so far, the mask of them the penalty reads, the step counter and
        # the prompt's length (the position of the step's input is their sum).
        self.tokens = torch.zeros(1, max_new_tokens, dtype=torch.long, device=device)
        self.seen = torch.zeros(1, hp.speech_tokens_dict_size, dtype=torch.bool, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.prompt_len = torch.zeros(1, dtype=torch.long, device=device)
        for t in (self.tokens, self.seen, self.step_index, self.prompt_len):
            torch._dynamo.mark_static_address(t)
        self.prompt_length = 0  # the same, on the host, for the steps below embed_cache
        self.forward = None
        if plan.cache == "static":
            if max_cache_len is None:
                max_cache_len = cache_len_for(2 + hp.speech_cond_prompt_len + max_text_tokens, max_new_tokens)
            self.forward = StaticTurboForward(self.t3, max_cache_len)
        self._active_forward = self.forward
        self.step_fn = self._step_and_sample if plan.sampling != "host" else self._step
        if plan.graph != "none":
            from chatterbox_lab.decode.compiled_step import compile_step

            self.step_fn = compile_step(self.step_fn, random_in_graph=plan.sampling != "host")

    @property
    def capacity(self) -> int | None:
        return self.forward.capacity if self.forward is not None else None

    def _feed_last(self, step: int | None) -> torch.Tensor:
        """Logits (1, V) after feeding the token sampled last (at `step`; the device counter when
        `step` is None, as under `embed_cache`)."""
        if self.plan.embedding == "cached":
            token = self.tokens.index_select(1, self.step_index)
            position = self.prompt_len + self.step_index
        else:
            token = self.tokens[:, step:step + 1]
            position = torch.tensor([self.prompt_length + step], device=self.device)
        embeds = self.t3.speech_emb(token)
        logits = self._active_forward(embeds, position)
        self.step_index.add_(1)
        return logits

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        return turbo_token_probs(logits, self.seen, self.sampling)

    def _step(self, step: int | None = None) -> torch.Tensor:
        return self._probs(self._feed_last(step))

    def _step_and_sample(self) -> None:
        """`_feed_last`, then draw the next token into its slot and its bit of the mask, on the device."""
        token = sample_token(self._step(None))
        self.tokens.index_copy_(1, self.step_index, token)
        self.seen.scatter_(1, token, True)

    def prompt(self, t3_cond, text_tokens: torch.Tensor) -> torch.Tensor:
        """The prompt's embeddings (1, L, dim) as upstream builds them: speaker, prompt speech tokens,
        text, the start-of-speech token."""
        if t3_cond.speaker_emb.dtype != self.dtype:
            t3_cond = type(t3_cond)(**vars(t3_cond)).to(dtype=self.dtype)
        text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=self.device)
        start = torch.full((1, 1), self.t3.hp.start_speech_token, dtype=torch.long, device=self.device)
        embeds, _ = self.t3.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text_tokens, speech_tokens=start,
                                                 cfg_weight=0.0)
        return embeds

    def _begin(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int,
               sampling: TurboSamplingParams) -> None:
        """Prefill and sample the first token. Upstream penalises the start token at this first
        draw only: its later draws read the sampled tokens alone."""
        limit = self.tokens.size(1)
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be between 1 and {limit} (this decoder's max_new_tokens), "
                             f"got {max_new_tokens}")
        self.sampling.set(sampling)
        embeds = self.prompt(t3_cond, text_tokens)
        length = embeds.size(1)
        self.prompt_len.fill_(length)
        self.prompt_length = length
        self.step_index.zero_()
        self.seen.zero_()
        self.seen[0, self.t3.hp.start_speech_token] = True
        if self.forward is None:
            self._active_forward = DynamicT3Forward(self.t3)  # upstream's cache; any transformers model
        else:
            check_fits(length, max_new_tokens, self.capacity)
        logits = self._active_forward(embeds, torch.arange(length, device=self.device))
        probs = self._probs(logits)
        sample_token(probs, out=self.tokens[:, :1])
        self.seen.zero_()
        self.seen.scatter_(1, self.tokens[:, :1], True)

    @torch.inference_mode()
    def generate(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int,
                 sampling: TurboSamplingParams = TurboSamplingParams(), stop_on_eos: bool = True,
                 cancelled=None) -> DecodeResult:
        """Up to `max_new_tokens` tokens, as upstream returns them: (1, n), its stop token removed.
        `cancelled`: a callable asked at each stop check; when it answers True, `Cancelled` is raised."""
        if not isinstance(sampling, TurboSamplingParams):
            raise TypeError(f"Turbo samples with TurboSamplingParams (temperature, top_k, top_p, repetition_penalty), "
                            f"got {type(sampling).__name__}: cfg_weight and min_p do not apply to Turbo")
        sync_device(self.device)
        start = time.perf_counter()
        self._begin(t3_cond, text_tokens, max_new_tokens, sampling)
        sync_device(self.device)
        prefill_end = time.perf_counter()
        done = 1
        stop = self.t3.hp.stop_speech_token
        while done < max_new_tokens:
            batch = min(STOP_CHECK_INTERVAL, max_new_tokens - done)
            self._advance(done, batch)
            done += batch
            # Every STOP_CHECK_INTERVAL tokens the host looks for the stop token: one sync, not one a token.
            if stop_on_eos and bool((self.tokens[0, :done] == stop).any()):
                break
            if cancelled is not None and done < max_new_tokens and cancelled():
                raise Cancelled(f"stopped after {done} of at most {max_new_tokens} tokens")
        tokens = self.tokens[:, :done].clone()
        sync_device(self.device)
        end = time.perf_counter()
        if stop_on_eos:
            hits = (tokens[0] == stop).nonzero()
            tokens = tokens[:, : int(hits[0])] if len(hits) else tokens
        return DecodeResult(all_tokens=[tokens], prefill_s=prefill_end - start, decode_s=end - prefill_end,
                            steps_run=done)

    def _advance(self, first: int, steps: int) -> None:
        """Steps first, first + 1, ...: each feeds the token sampled before it and samples its own."""
        for i in range(first, first + steps):
            if self.plan.graph == "inductor" and self.tokens.is_cuda:
                torch.compiler.cudagraph_mark_step_begin()
            if self.plan.sampling != "host":
                self.step_fn()
                continue
            probs = self.step_fn(None if self.plan.embedding == "cached" else i - 1)
            token = sample_token(probs)
            self.tokens[:, i:i + 1] = token
            self.seen.scatter_(1, token, True)
