"""T3 speech-token decoding with any set of the registry's T3 steps (`registry.T3_STEPS`).

Same semantics as upstream `T3.inference` (CFG pair, repetition penalty,
temperature, min-p, top-p, stop token, one `torch.multinomial` per token), so
the tokens plug into upstream's S3Gen. The steps are resolved once into a
`DecodePlan` (`plan.py`), and everything here reads the plan's fields.

Any number of utterances decode together (`streams`): each is a CFG pair of rows,
with its own prompt, position, repetition mask, sampling values and stop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatterbox_lab.kernels import fused_bookkeeping, fused_sampling
from chatterbox_lab.decode.embed_cache import SpeechEmbeddingCache, upstream_step_embedding
from chatterbox_lab.decode.kv_cache import CACHE_MULTIPLE, cache_len_for, check_fits
from chatterbox_lab.decode.precision import t3_in_dtype
from chatterbox_lab.sampling import DeviceSampling, SamplingParams, next_token_probs, race_noise, sample_token
from chatterbox_lab.decode.plan import DecodePlan
from chatterbox_lab.kernels.picks import DEFAULT as DEFAULT_PICKS, KernelPicks
from chatterbox_lab.decode.t3_forward import DynamicT3Forward, StaticT3Forward, filled_cache_mask

# How often the host looks for the stop token: each look is a device sync that
# stops the CPU from queueing further steps ahead of the GPU.
STOP_CHECK_INTERVAL = 16


def text_tokens_for(tts, text: str, language: str | None = None) -> torch.Tensor:
    """Upstream's text preparation: punctuation clean-up, tokens, CFG pair, start/stop ids.
    `language`: the multilingual model's language id, whose tag leads the text."""
    if language is None:
        from chatterbox.tts import punc_norm

        tokens = tts.tokenizer.text_to_tokens(punc_norm(text)).to(tts.device)
    else:
        from chatterbox.mtl_tts import punc_norm

        tokens = tts.tokenizer.text_to_tokens(punc_norm(text), language_id=language).to(tts.device)
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


class Cancelled(Exception):
    """The caller gave up on this synthesis (a client that went away, Ctrl-C): it stopped
    at a stop check and returned nothing."""


@dataclass
class DecodeResult:
    all_tokens: list      # (1, n_i) per utterance, as upstream returns them, stop token included
    prefill_s: float
    decode_s: float
    steps_run: int = 0    # decode steps, each giving one token to every utterance

    @property
    def tokens(self) -> torch.Tensor:
        """The first (for `generate`, the only) utterance's tokens."""
        return self.all_tokens[0]

    @property
    def decode_tok_s(self) -> float:
        """Per utterance: speech tokens per second of decode."""
        return self.steps_run / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def aggregate_tok_s(self) -> float:
        return self.decode_tok_s * len(self.all_tokens)


def sync_device(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class T3Decoder:
    """Decode speech tokens from a T3 with a chosen set of ladder steps.

    `max_cache_len` fixes the static cache's capacity for the whole job; requests
    that would not fit raise `CacheOverflowError`. Changing speaker, text or
    sampling values never recompiles: they change data, not the captured step.
    `streams` utterances decode together (`generate_batch`); the batch size is a
    shape, so each value gets its own compiled step.
    """

    def __init__(self, t3, steps=(), *, max_cache_len: int | None = None, max_new_tokens: int = 1000,
                 max_text_tokens: int = 300, streams: int = 1, picks: KernelPicks | None = None):
        """`steps`: T3 steps of the registry, resolved into `self.plan` for T3's device. `picks`: the
        kernels' configurations (`kernels.picks`); none, their defaults."""
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        device = t3.speech_head.weight.device
        self.plan = plan = DecodePlan.resolve(steps, device)
        self.steps = plan.steps
        if streams > 1 and not (plan.cache == "static" and plan.embedding == "cached"):
            raise ValueError("decoding several streams needs static_cache and embed_cache")
        self.streams = streams
        # 8-bit weights are codes for the matvecs of a bf16 model: everything else runs in bf16.
        self.t3 = t3_in_dtype(t3, torch.bfloat16) if plan.weights != "fp32" else t3
        self.device = device
        self.dtype = self.t3.speech_head.weight.dtype
        # Several streams may be several requests, each with its own sampling values.
        self.sampling = DeviceSampling(device, rows=streams if streams > 1 else None)
        self.embedding = SpeechEmbeddingCache(self.t3) if plan.embedding == "cached" else None
        # Decode state lives on the device at fixed addresses, so a captured step reads
        # and advances it without any host data: per utterance the tokens sampled so far,
        # a mask of them for the repetition penalty, its prompt length and whether it has
        # stopped; the shared step counter and a non-finite flag.
        n_speech_positions = self.t3.speech_pos_emb.emb.num_embeddings
        self.tokens = torch.zeros(streams, n_speech_positions, dtype=torch.long, device=device)
        self.seen = torch.zeros(streams, self.t3.hp.speech_tokens_dict_size, dtype=torch.bool, device=device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)
        self.prompt_len_t = torch.zeros(streams, dtype=torch.long, device=device)
        self.stopped = torch.zeros(streams, dtype=torch.bool, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        for t in (self.tokens, self.seen, self.step_index, self.prompt_len_t, self.stopped, self.nonfinite):
            torch._dynamo.mark_static_address(t)
        # Where a stop check's answer lands on the host: pinned, so the copy is queued like a kernel.
        on_gpu = torch.device(device).type == "cuda"
        self.check_flags = torch.zeros(2, dtype=torch.bool, pin_memory=on_gpu)
        self.check_done = torch.cuda.Event() if on_gpu else None
        self.forward = None
        if plan.cache == "static":
            if max_cache_len is None:
                max_cache_len = cache_len_for(cond_len(self.t3) + max_text_tokens + 4, max_new_tokens)
            if plan.attention == "filled_blocks" and max_cache_len % CACHE_MULTIPLE:
                raise ValueError(f"filled_cache_attention reads the cache in blocks of {CACHE_MULTIPLE} slots: "
                                 f"max_cache_len must be a multiple of it, got {max_cache_len}")
            self.forward = StaticT3Forward(self.t3, max_cache_len, plan, batch=2 * streams, picks=picks)
        self._active_forward = self.forward
        self.prefill_graphs = None
        if plan.prefill == "graph" and streams == 1:
            from chatterbox_lab.decode.prefill_graph import BucketedPrefill

            self.prefill_graphs = BucketedPrefill(self.forward)
        self.step_inputs = None
        if plan.bookkeeping != "pytorch":
            buffers = fused_bookkeeping.StepBuffers(streams, self.t3.cfg.hidden_size,
                                                    self.t3.hp.speech_tokens_dict_size, self.dtype, device)
            self.step_inputs = fused_bookkeeping.InputSources(self.prompt_len_t, self.embedding.tokens,
                                                              self.embedding.positions, buffers)
        # Where the draw_aside step draws: a stream that forks from the step's and joins it before
        # the sampling kernel.
        self.draw_stream = torch.cuda.Stream(device) if plan.draw == "aside" else None
        self.step_fn = self._step_and_sample if plan.sampling != "host" else self._step
        if plan.graph != "none":
            from chatterbox_lab.decode.compiled_step import CapturedStep, compile_step

            self.step_fn = CapturedStep(self.step_fn, device, runs=plan.graph == "multi_step") if plan.captured \
                else compile_step(self.step_fn, random_in_graph=plan.sampling != "host")

    @property
    def picks(self) -> KernelPicks:
        """The kernels' configurations this decoder's step is captured with (upstream's growing
        cache runs none of our kernels: the defaults)."""
        return self.forward.picks if self.forward is not None else DEFAULT_PICKS

    def _sampling_warps(self) -> int:
        return self.forward.picks.sampling_warps(self.t3.hp.speech_tokens_dict_size)

    @property
    def capacity(self) -> int | None:
        return self.forward.capacity if self.forward is not None else None

    def _embed(self, token: torch.Tensor, step: int | None):
        """Input embedding of the tokens sampled at `step` (device counter when step is None)."""
        if self.embedding is not None:
            return self.embedding(token, self.step_index + 1)
        return upstream_step_embedding(self.t3, token, step + 1)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = next_token_probs(logits, self.seen, self.sampling)
        self.nonfinite.logical_or_(~torch.isfinite(probs).all())
        return probs

    def _positions(self) -> torch.Tensor:
        """Cache position of the current step: (1,) shared by a lone CFG pair, else (2n, 1)."""
        positions = self.prompt_len_t + self.step_index
        return positions if self.streams == 1 else positions.repeat_interleave(2)[:, None]

    def _feed(self, token: torch.Tensor, step: int | None) -> torch.Tensor:
        """Logits (2n, V) after feeding `token` (n, 1), the ones sampled at the current step."""
        if self.forward is None:
            return self._active_forward(self._embed(token, step), None)
        return self._forward_at(self._embed(token, step), self._positions())

    def _forward_at(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        block_mask = filled_cache_mask(self.prompt_len_t, self.step_index, self.forward.n_heads, self.capacity) \
            if self.plan.attention == "filled_blocks" else None
        return self.forward(embeds, positions, block_mask=block_mask)

    def _feed_last(self, step: int | None = None) -> torch.Tensor:
        """Feed the last sampled tokens and advance the step counter; their logits (2n, V). With
        the caches on (step=None) it reads only device state, so one captured graph serves every step."""
        token = self.tokens.index_select(1, self.step_index)
        self.seen.scatter_(1, token, True)
        logits = self._feed(token, step)
        self.step_index.add_(1)
        return logits

    def _step(self, step: int | None = None) -> torch.Tensor:
        """`_feed_last`, then the next-token probabilities."""
        return self._probs(self._feed_last(step))

    def _step_and_sample(self) -> None:
        """`_feed_last`, then draw the next tokens into their slots, all on the device."""
        if self.step_inputs is not None and fused_bookkeeping.kernel_applies(self.tokens):
            buffers = self.step_inputs.out
            # The step's only draw, so it takes the same numbers wherever it sits in the step.
            if self.draw_stream is None:
                race_noise(self.seen, out=buffers.noise)
            else:
                self.draw_stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.draw_stream):
                    race_noise(self.seen, out=buffers.noise)
            if self.plan.bookkeeping != "folded":  # else the step before's sampling kernel wrote the input
                fused_bookkeeping.prologue(self.tokens, self.step_index, self.seen, self.step_inputs)
            logits = self._forward_at(buffers.embeds, buffers.positions)
            if self.draw_stream is not None:
                torch.cuda.current_stream().wait_stream(self.draw_stream)
            fused_sampling.triton_sample(logits, self.seen, self.sampling, buffers.noise, self.nonfinite, pdl=self.plan.pdl,
                                         write_token=(self.tokens, self.step_index, buffers.arrivals),
                                         next_input=self.step_inputs if self.plan.bookkeeping == "folded" else None,
                                         early=self.plan.opens_early, warps=self._sampling_warps())
            return
        logits = self._feed_last()
        if self.plan.sampling == "kernel" and fused_sampling.kernel_applies(logits):
            token = fused_sampling.triton_sample(logits, self.seen, self.sampling, race_noise(self.seen),
                                                 self.nonfinite, pdl=self.plan.pdl, warps=self._sampling_warps())
        else:
            token = sample_token(self._probs(logits))
        self.tokens.index_copy_(1, self.step_index, token)

    def prefill(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int, cfg_weight: float,
                stream: int = 0) -> torch.Tensor:
        """Run one utterance's prompt (conditioning, text, start token) into its rows of the
        cache; returns its logits (2, V)."""
        return self.prefill_streams([t3_cond], [text_tokens], max_new_tokens, cfg_weight, first_stream=stream)

    def prefill_streams(self, t3_conds: list, text_tokens: list, max_new_tokens: int, cfg_weight,
                        first_stream: int = 0) -> torch.Tensor:
        """`prefill` for consecutive streams from `first_stream`; returns their logits (2 per stream, V).
        `cfg_weight`: one for all, or one per stream.

        All the prompts go through one forward pass, each padded at its end to the longest: an eager
        prefill is launch-bound, so one pass for many utterances costs far less than a pass each. A
        row's logits are read at its own last position. Its padding writes cache slots past its
        prompt, which its decode overwrites, one slot per step, before attention may read them."""
        limit = self.tokens.size(1) - 1
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be between 1 and {limit} (T3's speech position table), "
                             f"got {max_new_tokens}")
        weights = cfg_weight if isinstance(cfg_weight, (list, tuple)) else [cfg_weight] * len(t3_conds)
        prompts = [self._prompt(cond, text, weight) for cond, text, weight in zip(t3_conds, text_tokens, weights)]
        hp = self.t3.hp
        for stream, prompt in enumerate(prompts, start=first_stream):
            self.prompt_len_t[stream] = prompt.size(1)
            self.seen[stream] = False
            self.seen[stream, hp.start_speech_token] = True
        if self.forward is None:
            if len(prompts) != 1:
                raise ValueError("without static_cache the decoder prefills one utterance")
            self._active_forward = DynamicT3Forward(self.t3)
            return self._active_forward(prompts[0])
        lengths = [prompt.size(1) for prompt in prompts]
        longest = max(lengths)
        check_fits(longest, max_new_tokens, self.capacity)
        if self.prefill_graphs is not None:  # a lone utterance: all rows
            return self.prefill_graphs(prompts[0])
        rows = slice(2 * first_stream, 2 * (first_stream + len(prompts)))
        embeds = torch.cat([F.pad(prompt, (0, 0, 0, longest - prompt.size(1))) for prompt in prompts])
        last = None if min(lengths) == longest else \
            torch.tensor([length - 1 for length in lengths for _ in range(2)], device=self.device)
        return self.forward(embeds, torch.arange(longest, device=self.device), rows=rows, last=last)

    def _prompt(self, t3_cond, text_tokens: torch.Tensor, cfg_weight: float) -> torch.Tensor:
        """One utterance's prompt embeddings (2, L, dim), CFG pair, as upstream builds them."""
        t3, hp, device = self.t3, self.t3.hp, self.device
        if t3_cond.speaker_emb.dtype != self.dtype:
            t3_cond = type(t3_cond)(**vars(t3_cond)).to(dtype=self.dtype)
        text_tokens = torch.atleast_2d(text_tokens).to(dtype=torch.long, device=device)
        bos = torch.full((1, 1), hp.start_speech_token, dtype=torch.long, device=device)
        embeds, _ = t3.prepare_input_embeds(t3_cond=t3_cond, text_tokens=text_tokens,
                                            speech_tokens=bos.expand(text_tokens.size(0), 1),
                                            cfg_weight=cfg_weight)
        # Upstream appends a second start token after the one prepare_input_embeds adds.
        return torch.cat([embeds, upstream_step_embedding(t3, bos, 0)], dim=1)

    def forward_step(self, token: torch.Tensor, step: int) -> torch.Tensor:
        """Logits (2, V) after feeding `token` as the one sampled at `step` (eager; for checks)."""
        self.step_index.fill_(step)
        self.tokens[:, step] = token.view(-1)
        return self._feed(token, step)

    @torch.inference_mode()
    def generate(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), stop_on_eos: bool = True,
                 cancelled=None) -> DecodeResult:
        return self.generate_batch([t3_cond], [text_tokens], max_new_tokens, sampling, stop_on_eos, cancelled)

    @torch.inference_mode()
    def generate_batch(self, t3_conds: list, text_tokens: list, max_new_tokens: int,
                       sampling: SamplingParams | list = SamplingParams(), stop_on_eos: bool = True,
                       cancelled=None) -> DecodeResult:
        """One utterance per stream (voices, texts and `sampling`, one set for all or a list of one
        per stream, may differ); each stops at its own stop token.
        `cancelled`: a callable asked at each stop check; when it answers True, `Cancelled` is
        raised there, and the decoder is ready for the next request."""
        sync_device(self.device)
        start = time.perf_counter()
        self._begin(t3_conds, text_tokens, max_new_tokens, sampling)
        prefill_end = time.perf_counter()
        steps = max(done for done, _ in self._decode(max_new_tokens, stop_on_eos, cancelled=cancelled))
        tokens = self.tokens[:, :steps].clone()
        sync_device(self.device)
        end = time.perf_counter()

        per_stream = [tokens[s:s + 1] for s in range(self.streams)]
        if stop_on_eos:
            per_stream = [_cut_at_stop(t, self.t3.hp.stop_speech_token) for t in per_stream]
        return DecodeResult(all_tokens=per_stream, prefill_s=prefill_end - start, decode_s=end - prefill_end,
                            steps_run=steps)

    @torch.inference_mode()
    def generate_stream(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int,
                        sampling: SamplingParams = SamplingParams(), chunk_tokens: int = 2 * STOP_CHECK_INTERVAL,
                        first_chunk_tokens: int | None = None):
        """One utterance's tokens while they are decoded: yields (tokens (1, k), last) with the
        tokens decoded since the previous yield, at least `chunk_tokens` of them (`first_chunk_tokens`
        for the first, if given; counted at the stop checks, every STOP_CHECK_INTERVAL tokens, and one
        more right at `first_chunk_tokens`, so the first audio never waits for a check) but for the
        last, which ends at the stop token. Same tokens, in the same order, as `generate`."""
        if self.streams != 1:
            raise ValueError("streaming decodes one utterance: build the decoder with streams=1")
        first_chunk_tokens = chunk_tokens if first_chunk_tokens is None else first_chunk_tokens
        if min(chunk_tokens, first_chunk_tokens) < 1:
            raise ValueError(f"chunk sizes must be >= 1, got {first_chunk_tokens} and {chunk_tokens}")
        self._begin([t3_cond], [text_tokens], max_new_tokens, sampling)
        sent = 0
        for done, last in self._decode(max_new_tokens, stop_on_eos=True, also_check_at=first_chunk_tokens):
            if last or done - sent >= (chunk_tokens if sent else first_chunk_tokens):
                # A stop token is found at the check after it, so only the last chunk holds one.
                yield _cut_at_stop(self.tokens[:1, sent:done].clone(), self.t3.hp.stop_speech_token), last
                sent = done

    def _begin(self, t3_conds: list, text_tokens: list, max_new_tokens: int, sampling) -> None:
        """Prefill every stream and sample its first token; synchronized at the end."""
        if not len(t3_conds) == len(text_tokens) == self.streams:
            raise ValueError(f"this decoder decodes {self.streams} utterance(s) at once; got "
                             f"{len(t3_conds)} conditionings and {len(text_tokens)} texts")
        self.sampling.set(sampling)
        sync_device(self.device)
        self.step_index.zero_()
        self.nonfinite.zero_()
        self.stopped.zero_()
        cfg_weight = [s.cfg_weight for s in sampling] if isinstance(sampling, (list, tuple)) else sampling.cfg_weight
        logits = self.prefill_streams(t3_conds, text_tokens, max_new_tokens, cfg_weight)
        probs = self._probs(logits)
        sync_device(self.device)
        sample_token(probs, out=self.tokens[:, :1])
        if self.plan.bookkeeping == "folded" and fused_bookkeeping.kernel_applies(self.tokens):
            # The first step's input; each step's sampling kernel writes the next one's.
            fused_bookkeeping.prologue(self.tokens, self.step_index, self.seen, self.step_inputs)

    def _decode(self, max_new_tokens: int, stop_on_eos: bool, also_check_at: int | None = None, cancelled=None):
        """The decode loop after `_begin`: yields (tokens decoded so far, whether that is all) at
        every stop check, the only points where the host knows how far the device has got; a check
        every STOP_CHECK_INTERVAL tokens, and one at step `also_check_at`.

        With `multi_step_graph` (and no `also_check_at`: a stream's chunk waits for no later run), the
        run after a check is queued before the host waits for that check's flags: the host takes
        milliseconds to launch a graph of a run's thousands of kernels, and the device would idle
        through it after every check. A stop found at a check then leaves the run after it computed
        in vain; the tokens and the counts returned end at the check all the same."""
        checks = {*range(STOP_CHECK_INTERVAL, max_new_tokens, STOP_CHECK_INTERVAL), max_new_tokens}
        if also_check_at is not None and 1 <= also_check_at < max_new_tokens:
            checks.add(also_check_at)
        ahead = self.plan.graph == "multi_step" and also_check_at is None
        ordered = sorted(checks)
        self._advance(1, ordered[0] - 1)  # the first token comes from the prefill
        for check, following in zip(ordered, [*ordered[1:], None]):
            self._queue_check(check, stop_on_eos)
            if ahead and following is not None:
                self._advance(check, following - check)
            # upstream runs one more forward after its last token and never uses its output
            last = self._stop_flags(check) or following is None
            if cancelled is not None and not last and cancelled():
                sync_device(self.device)  # a run queued ahead finishes before the next request's
                raise Cancelled(f"stopped after {check} of at most {max_new_tokens} tokens")
            yield check, last
            if last:
                return
            if not ahead:
                self._advance(check, following - check)

    def _advance(self, first: int, steps: int) -> None:
        """Steps first, first + 1, ...: each feeds the tokens sampled at the step before and samples
        its own."""
        if hasattr(self.step_fn, "run"):  # a captured step, sampling in its graph
            self.step_fn.run(steps)
            return
        for i in range(first, first + steps):
            if self.plan.graph == "inductor":
                torch.compiler.cudagraph_mark_step_begin()
                probs = self.step_fn()
            else:
                probs = self.step_fn(None if self.embedding is not None else i - 1)
            if self.plan.sampling == "host":
                sample_token(probs, out=self.tokens[:, i:i + 1])

    def _queue_check(self, steps_done: int, stop_on_eos: bool) -> None:
        """Queue the stop check after `steps_done` tokens: whether every utterance has stopped, and
        whether any numbers went bad, copied to the host behind the steps before it."""
        recent = self.tokens[:, max(0, steps_done - STOP_CHECK_INTERVAL): steps_done]
        self.stopped.logical_or_((recent == self.t3.hp.stop_speech_token).any(dim=1))
        self.check_flags.copy_(torch.stack([self.stopped.all() & stop_on_eos, self.nonfinite]),
                               non_blocking=self.check_flags.is_pinned())
        if self.check_done is not None:
            self.check_done.record()

    def _stop_flags(self, steps_done: int) -> bool:
        """The queued check's answer, the one wait for the device every STOP_CHECK_INTERVAL tokens
        (for that check only, not the steps queued after it): every utterance stopped?"""
        if self.check_done is not None:
            self.check_done.synchronize()
        all_stopped, nonfinite = self.check_flags.tolist()
        if nonfinite:
            raise FloatingPointError(
                f"T3 produced NaN or infinite probabilities within its first {steps_done} tokens; "
                f"the model or its dtype is broken (try the fp32 path without 'bf16'). Nothing was returned.")
        return all_stopped


def _cut_at_stop(tokens: torch.Tensor, stop: int) -> torch.Tensor:
    hits = (tokens[0] == stop).nonzero()
    return tokens[:, : int(hits[0]) + 1] if len(hits) else tokens
