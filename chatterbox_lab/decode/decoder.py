"""T3 speech-token decoding with the optimization ladder's steps switched on one by one.

Same semantics as upstream `T3.inference` (CFG pair, repetition penalty,
temperature, min-p, top-p, stop token, one `torch.multinomial` per token), so
the tokens plug into upstream's S3Gen. Steps, each in its own module:

- "bf16":         T3 weights in bfloat16 (`precision.py`)
- "static_cache": fixed KV buffers and our attention (`kv_cache.py`, `t3_forward.py`)
- "embed_cache":  the step's input embedding as two device lookups (`embed_cache.py`)
- "compiled":     the one-token step under torch.compile with CUDA graphs (`compiled_step.py`)

Past the guide (`BEYOND`):

- "fused_projections": q/k/v and gate/up each as one matmul (`fused_projections.py`)
- "sampling_in_graph": sampling and the token write inside the captured step, so a
                       token costs one graph launch and nothing else on the host
- "fused_matvec":   each matmul of the one-token step a Triton kernel that streams its
                       weights and folds in the RMSNorm before it and the SiLU gate or
                       residual add after it (`fused_matvec.py`); four kernels a layer
                       around attention; prefill and large batches keep cuBLAS
- "filled_cache_attention": each step's attention reads only the filled blocks of each
                       row's cache (flex attention, `t3_forward.filled_cache_mask`), not the
                       whole allocation; compiled only (flex attention's eager form is a
                       reference that materializes every score)
- "fused_attention": the one-token step's rotary, cache write and attention over the filled
                       slots as one Triton kernel a layer (`decode_attention.py`); it takes
                       the step's attention over from `filled_cache_attention`, which then
                       serves nothing
- "fused_sampling": the in-graph sampling (CFG mix, penalties, min-p, top-p without a sort,
                       the exponential race) as one Triton kernel (`fused_sampling.py`),
                       the random draw still PyTorch's
- "captured_graph": with every kernel of the step hand-written, the step is captured as a
                       CUDA graph directly instead of through torch.compile
                       (`compiled_step.CapturedStep`): same kernels, a start-up of seconds
- "dependent_launch": in the captured step, each of our kernels is a programmatic dependent
                       of the one before (Hopper and later): it is launched while that one
                       finishes, streams in its first weights, and waits only before it
                       reads what earlier kernels wrote
- "launch_ahead":   each of those kernels lets the next one launch as soon as all its own
                       programs have started (not once they have passed their wait), so the
                       weights of several kernels stream in at once, and the attention kernel
                       loads its first block of earlier cache slots before its wait
- "fused_bookkeeping": the captured step's bookkeeping (last token, repetition mask, input
                       embedding, cache position, token write, step counter) in one prologue
                       kernel and the sampling kernel, the random draw moved to the step's start,
                       so our kernels' chain runs from the first kernel to the last
                       (`fused_bookkeeping.py`)
- "staged_weights": the gate/up kernel copies its weights into shared memory before its wait
                       (asynchronous copies, a Gluon kernel) instead of registers, which every
                       resident kernel shares; each program asks the SM for just the shared memory
                       it needs (`staged_matvec.py`)
- "multi_step_graph": the captured steps between two stop checks replayed as one graph
                       (`compiled_step.CapturedStep.run`), so PyTorch's per-replay generator
                       writes and the gap between launches come once per 16 steps
- "staged_head":    the speech head's kernel stages its weights in shared memory too: after the
                       last layer's down projection, whose programs hold little shared memory,
                       its 16.8 MB load before its wait instead of after it (`staged_matvec.py`)
- "draw_aside":     the step's random draw on a side branch of the captured graph, beside the
                       layers instead of ahead of the prologue, so the sampling kernel of one
                       step is followed by the next step's prologue directly
- "folded_prologue": that prologue's work at the end of the sampling kernel, for the step after
                       (the prologue runs once, after the prefill): a step's first layer
                       kernel launches as a dependent of the step before's sampling kernel,
                       early, and loads its weights while that kernel runs; one kernel and its
                       launch fewer a token
- "prefill_graph":  a lone utterance's prefill replayed from a CUDA graph per prompt-length
                       bucket, its prompt padded at the end (`prefill_graph.py`); batched
                       prefills stay eager (one pass serves many utterances already)
- "head_handoff":   a layer's q/k/v matvec and attention as one kernel: each head group's
                       attention programs start once that group's q/k/v columns are written,
                       polling a counter instead of waiting for the whole q/k/v kernel
                       (`head_handoff.py`); one kernel boundary fewer a layer
- "persistent_layers": each layer of the one-token step as one persistent kernel, one
                       program per SM walking the layer's five phases between grid barriers
                       and loading the next phase's weights before each barrier
                       (`persistent_layer.py`)

Any number of utterances decode together (`streams`): each is a CFG pair of rows,
with its own prompt, position, repetition mask and stop.
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
from chatterbox_lab.kernels.staged_matvec import STAGED_CALLS
from chatterbox_lab.decode.t3_forward import DynamicT3Forward, StaticT3Forward, filled_cache_mask

LADDER = ("bf16", "static_cache", "embed_cache", "compiled")
BEYOND = ("fused_projections", "sampling_in_graph", "fused_matvec", "filled_cache_attention", "fused_attention",
          "fused_sampling", "captured_graph", "dependent_launch", "launch_ahead", "fused_bookkeeping", "staged_weights",
          "multi_step_graph", "staged_head", "draw_aside", "folded_prologue", "prefill_graph", "head_handoff",
          "persistent_layers")
STEPS = LADDER + BEYOND
REQUIRES = {"compiled": ("static_cache", "embed_cache"), "fused_projections": ("static_cache",),
            "sampling_in_graph": ("compiled",), "fused_matvec": ("fused_projections",),
            "filled_cache_attention": ("compiled",), "fused_attention": ("static_cache",),
            "fused_sampling": ("sampling_in_graph",),
            "captured_graph": ("fused_matvec", "fused_attention", "fused_sampling"),
            "dependent_launch": ("captured_graph",), "launch_ahead": ("dependent_launch",),
            "fused_bookkeeping": ("captured_graph",), "staged_weights": ("launch_ahead",),
            "multi_step_graph": ("captured_graph",), "staged_head": ("staged_weights",),
            "draw_aside": ("fused_bookkeeping",), "folded_prologue": ("fused_bookkeeping",),
            "head_handoff": ("fused_matvec", "fused_attention"),
            "prefill_graph": ("static_cache",),
            "persistent_layers": ("fused_matvec", "fused_attention")}
# Steps whose Triton kernels sum in their own order: checked against PyTorch by logits and by
# tokens for the same random draws, not by fp32 identity with upstream.
KERNEL_STEPS = ("fused_matvec", "fused_attention", "fused_sampling", "fused_bookkeeping", "staged_weights",
                "staged_head", "folded_prologue", "head_handoff", "persistent_layers")

# How often the host looks for the stop token: each look is a device sync that
# stops the CPU from queueing further steps ahead of the GPU.
STOP_CHECK_INTERVAL = 16


def check_steps(steps) -> frozenset:
    steps = frozenset(steps)
    unknown = steps - set(STEPS)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)}: choose from {', '.join(STEPS)}")
    for step, needs in REQUIRES.items():
        missing = [n for n in needs if step in steps and n not in steps]
        if missing:
            raise ValueError(f"step {step!r} needs {', '.join(missing)} as well")
    return steps


def requirements(step: str) -> frozenset:
    """Every step `step` needs, directly or through another."""
    needs = set(REQUIRES.get(step, ()))
    for need in tuple(needs):
        needs |= requirements(need)
    return frozenset(needs)


def dependents(step: str) -> frozenset:
    """Every step that needs `step`, directly or through another."""
    return frozenset(other for other in STEPS if step in requirements(other))


def ladder_prefix(rung: str) -> frozenset:
    """The steps switched on at `rung`: it and every step before it."""
    return frozenset(STEPS[: STEPS.index(rung) + 1])


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
                 max_text_tokens: int = 300, streams: int = 1):
        self.steps = check_steps(steps)
        if streams < 1:
            raise ValueError(f"streams must be >= 1, got {streams}")
        if streams > 1 and not {"static_cache", "embed_cache"} <= self.steps:
            raise ValueError("decoding several streams needs static_cache and embed_cache")
        self.streams = streams
        self.t3 = t3_in_dtype(t3, torch.bfloat16) if "bf16" in self.steps else t3
        self.device = device = self.t3.speech_head.weight.device
        self.dtype = self.t3.speech_head.weight.dtype
        self.sampling = DeviceSampling(device)
        self.embedding = SpeechEmbeddingCache(self.t3) if "embed_cache" in self.steps else None
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
        self.filled_only = "filled_cache_attention" in self.steps and "fused_attention" not in self.steps
        # On the CPU (tests) the step changes nothing: there are no launches to chain.
        self.pdl = "dependent_launch" in self.steps and torch.device(device).type == "cuda"
        self.folded_prologue = "folded_prologue" in self.steps
        # Folded, the sampling kernel lets the next step's first kernel (layer 0's q/k/v matvec,
        # which loads only weights before its wait) launch at once, and that kernel holds its own
        # dependents back until its wait, so the input the sampling kernel writes is in place
        # before any kernel reads it. Not for the handoff or whole-layer kernels, which open the
        # step otherwise.
        self.early_first_layer = self.folded_prologue and self.pdl and "launch_ahead" in self.steps and \
            not {"head_handoff", "persistent_layers"} & self.steps
        if "static_cache" in self.steps:
            if max_cache_len is None:
                max_cache_len = cache_len_for(cond_len(self.t3) + max_text_tokens + 4, max_new_tokens)
            if self.filled_only and max_cache_len % CACHE_MULTIPLE:
                raise ValueError(f"filled_cache_attention reads the cache in blocks of {CACHE_MULTIPLE} slots: "
                                 f"max_cache_len must be a multiple of it, got {max_cache_len}")
            self.forward = StaticT3Forward(self.t3, max_cache_len, batch=2 * streams,
                                           fused="fused_projections" in self.steps,
                                           matvec="fused_matvec" in self.steps,
                                           attention_kernel="fused_attention" in self.steps,
                                           dependent_launch=self.pdl,
                                           launch_ahead=self.pdl and "launch_ahead" in self.steps,
                                           handoff="head_handoff" in self.steps,
                                           whole_layers="persistent_layers" in self.steps,
                                           staged=self._staged_calls(), opens_early=self.early_first_layer)
        self._active_forward = self.forward
        self.prefill_graphs = None
        if "prefill_graph" in self.steps and streams == 1:
            from chatterbox_lab.decode.prefill_graph import BucketedPrefill

            self.prefill_graphs = BucketedPrefill(self.forward)
        self.compiled = "compiled" in self.steps
        self.sample_in_graph = "sampling_in_graph" in self.steps
        self.sampling_kernel = "fused_sampling" in self.steps
        self.step_inputs = None
        if "fused_bookkeeping" in self.steps:
            buffers = fused_bookkeeping.StepBuffers(streams, self.t3.cfg.hidden_size,
                                                    self.t3.hp.speech_tokens_dict_size, self.dtype, device)
            self.step_inputs = fused_bookkeeping.InputSources(self.prompt_len_t, self.embedding.tokens,
                                                              self.embedding.positions, buffers)
        # Where the draw_aside step draws: a stream that forks from the step's and joins it before
        # the sampling kernel (on the CPU there is no other stream: the step changes nothing).
        self.draw_stream = torch.cuda.Stream(device) if "draw_aside" in self.steps and on_gpu else None
        self.step_fn = self._step_and_sample if self.sample_in_graph else self._step
        if self.compiled:
            from chatterbox_lab.decode.compiled_step import CapturedStep, compile_step

            self.step_fn = CapturedStep(self.step_fn, device, runs="multi_step_graph" in self.steps) \
                if "captured_graph" in self.steps else \
                compile_step(self.step_fn, random_in_graph=self.sample_in_graph)

    def _staged_calls(self) -> tuple:
        if "staged_weights" not in self.steps:
            return ()
        return STAGED_CALLS + (("head",) if "staged_head" in self.steps else ())

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
            if self.filled_only else None
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
            if not self.folded_prologue:  # else the step before's sampling kernel wrote the input
                fused_bookkeeping.prologue(self.tokens, self.step_index, self.seen, self.step_inputs)
            logits = self._forward_at(buffers.embeds, buffers.positions)
            if self.draw_stream is not None:
                torch.cuda.current_stream().wait_stream(self.draw_stream)
            fused_sampling.triton_sample(logits, self.seen, self.sampling, buffers.noise, self.nonfinite, pdl=self.pdl,
                                         write_token=(self.tokens, self.step_index, buffers.arrivals),
                                         next_input=self.step_inputs if self.folded_prologue else None,
                                         early=self.early_first_layer)
            return
        logits = self._feed_last()
        if self.sampling_kernel and fused_sampling.kernel_applies(logits):
            token = fused_sampling.triton_sample(logits, self.seen, self.sampling, race_noise(self.seen),
                                                 self.nonfinite, pdl=self.pdl)
        else:
            token = sample_token(self._probs(logits))
        self.tokens.index_copy_(1, self.step_index, token)

    def prefill(self, t3_cond, text_tokens: torch.Tensor, max_new_tokens: int, cfg_weight: float,
                stream: int = 0) -> torch.Tensor:
        """Run one utterance's prompt (conditioning, text, start token) into its rows of the
        cache; returns its logits (2, V)."""
        return self.prefill_streams([t3_cond], [text_tokens], max_new_tokens, cfg_weight, first_stream=stream)

    def prefill_streams(self, t3_conds: list, text_tokens: list, max_new_tokens: int, cfg_weight: float,
                        first_stream: int = 0) -> torch.Tensor:
        """`prefill` for consecutive streams from `first_stream`; returns their logits (2 per stream, V).
        Neighbouring streams with prompts of one length share a forward pass: an eager prefill
        is launch-bound, so one pass for many utterances costs far less than a pass each."""
        limit = self.tokens.size(1) - 1
        if not 1 <= max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be between 1 and {limit} (T3's speech position table), "
                             f"got {max_new_tokens}")
        prompts = [self._prompt(cond, text, cfg_weight) for cond, text in zip(t3_conds, text_tokens)]
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
        logits, start = [], 0
        while start < len(prompts):
            length = prompts[start].size(1)
            end = start + 1
            while end < len(prompts) and prompts[end].size(1) == length:
                end += 1
            check_fits(length, max_new_tokens, self.capacity)
            rows = slice(2 * (first_stream + start), 2 * (first_stream + end))
            embeds = torch.cat(prompts[start:end])
            if self.prefill_graphs is not None:  # a lone utterance: all rows
                logits.append(self.prefill_graphs(embeds))
            else:
                logits.append(self.forward(embeds, torch.arange(length, device=self.device), rows=rows))
            start = end
        return torch.cat(logits)

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
                 sampling: SamplingParams = SamplingParams(), stop_on_eos: bool = True) -> DecodeResult:
        return self.generate_batch([t3_cond], [text_tokens], max_new_tokens, sampling, stop_on_eos)

    @torch.inference_mode()
    def generate_batch(self, t3_conds: list, text_tokens: list, max_new_tokens: int,
                       sampling: SamplingParams = SamplingParams(), stop_on_eos: bool = True) -> DecodeResult:
        """One utterance per stream (voices and texts may differ); each stops at its own stop token."""
        sync_device(self.device)
        start = time.perf_counter()
        self._begin(t3_conds, text_tokens, max_new_tokens, sampling)
        prefill_end = time.perf_counter()
        steps = max(done for done, _ in self._decode(max_new_tokens, stop_on_eos))
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

    def _begin(self, t3_conds: list, text_tokens: list, max_new_tokens: int, sampling: SamplingParams) -> None:
        """Prefill every stream and sample its first token; synchronized at the end."""
        if not len(t3_conds) == len(text_tokens) == self.streams:
            raise ValueError(f"this decoder decodes {self.streams} utterance(s) at once; got "
                             f"{len(t3_conds)} conditionings and {len(text_tokens)} texts")
        self.sampling.set(sampling)
        sync_device(self.device)
        self.step_index.zero_()
        self.nonfinite.zero_()
        self.stopped.zero_()
        logits = self.prefill_streams(t3_conds, text_tokens, max_new_tokens, sampling.cfg_weight)
        probs = self._probs(logits)
        sync_device(self.device)
        sample_token(probs, out=self.tokens[:, :1])
        if self.folded_prologue and fused_bookkeeping.kernel_applies(self.tokens):
            # The first step's input; each step's sampling kernel writes the next one's.
            fused_bookkeeping.prologue(self.tokens, self.step_index, self.seen, self.step_inputs)

    def _decode(self, max_new_tokens: int, stop_on_eos: bool, also_check_at: int | None = None):
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
        ahead = "multi_step_graph" in self.steps and also_check_at is None
        ordered = sorted(checks)
        self._advance(1, ordered[0] - 1)  # the first token comes from the prefill
        for check, following in zip(ordered, [*ordered[1:], None]):
            self._queue_check(check, stop_on_eos)
            if ahead and following is not None:
                self._advance(check, following - check)
            # upstream runs one more forward after its last token and never uses its output
            last = self._stop_flags(check) or following is None
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
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
                probs = self.step_fn()
            else:
                probs = self.step_fn(None if self.embedding is not None else i - 1)
            if not self.sample_in_graph:
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
