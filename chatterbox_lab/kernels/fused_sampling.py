"""Sampling as one Triton kernel: CFG mix, penalties, min-p, top-p and the draw, one program an utterance.

`sampling.next_token_probs` is a dozen PyTorch operations, and its top-p sorts the
whole vocabulary. Compiled, that is still some thirty small kernels a token (radix
sort passes, split reductions), each paying a launch's latency for a few
microseconds of work: at ~1,000 tokens a second they are a fifth of the step.
Here one program per utterance holds both CFG rows of the vocabulary in registers
and does the same arithmetic in the same order:

- CFG mix, repetition penalty on the already-generated mask, temperature;
- softmax, min-p against the most likely token;
- top-p without a sort: the tokens it drops are exactly those whose probability
  is at most some cut `c` such that the mass of all tokens at most `c` stays
  within 1 - top_p. Probabilities are non-negative floats, so their bit patterns
  sort like their values and `c` is found by bisecting the 31-bit pattern, each
  step a masked sum. When top_p is 1 (upstream's default) there is nothing to
  cut and the bisection is skipped on the device;
- softmax again, the non-finite check, and `torch.multinomial`'s exponential race:
  argmax of p / q, the noise q drawn by PyTorch's own RNG kernel outside, so a
  seeded run draws the numbers upstream draws.

The three softmaxes share one set of weights (no cut drops the most likely token, so
their maximum is the same, and the most likely probability is exactly 1 / sum): with
top-p at 1 the kernel reduces a maximum, two sums and the draw's argmax, and keeps
few values per thread alive, which is what a program holding the whole vocabulary in
registers is short of.

The sums run in another order than PyTorch's, and ties at the top-p cut are
kept together where a sort would split them; so tokens are checked against
PyTorch's path for the same noise, not bit for bit in general.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatterbox_lab.kernels import fused_bookkeeping, fused_matvec
from chatterbox_lab.sampling import DeviceSampling

triton = fused_matvec.triton
if triton is not None:
    import triton.language as tl
    if fused_matvec.PDL_AVAILABLE:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from chatterbox_lab.kernels.fused_bookkeeping import write_step_input

    @triton.jit
    def _scores(cond, uncond, seen, cfg_weight, penalty, temperature):
        """CFG mix, repetition penalty on the tokens seen, temperature."""
        scores = cond + cfg_weight * (cond - uncond)
        penalised = tl.where(scores < 0, scores * penalty, scores / penalty)
        return tl.where(seen, penalised, scores) / temperature

    @triton.jit
    def _min_p_kept(weights, total, min_p):
        return tl.where(weights / total < min_p * (1.0 / total), 0.0, weights)

    @triton.jit
    def _top_p_kept(weights, kept, low, top_bits):
        """The weights of the tokens a top-p cut at probability bits `low` keeps (all for low = -1)."""
        bits = (weights / kept).to(tl.int32, bitcast=True)
        return tl.where((bits <= low) & (bits < top_bits), 0.0, weights)

    @triton.jit
    def _row(row_ptr, ids, V, other, MASKED: tl.constexpr):
        """A row's values at `ids`, masked past V only where the block overhangs the row: Triton
        vectorizes a load only where it can prove a whole vector in bounds and aligned."""
        if MASKED:
            values = tl.load(row_ptr + ids, mask=ids < V, other=other)
        else:
            values = tl.load(row_ptr + ids)
        return values

    @triton.jit
    def _tail_score(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, token, cfg_weight, penalty,
                    temperature):
        """One tail token's score, as the block's are computed, as a scalar: every thread computes it,
        so it needs no reduction across the program."""
        cond = tl.load(logits_ptr + 2 * utterance * stride_logits + token).to(tl.float32)
        uncond = tl.load(logits_ptr + (2 * utterance + 1) * stride_logits + token).to(tl.float32)
        seen = tl.load(seen_ptr + utterance * stride_seen + token) != 0
        return _scores(cond, uncond, seen, cfg_weight, penalty, temperature)

    @triton.jit
    def _tail_kept(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, token, cfg_weight, penalty,
                   temperature, top, total, min_p):
        """A tail token's weight after min-p."""
        score = _tail_score(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, token, cfg_weight, penalty,
                            temperature)
        return _min_p_kept(tl.exp(score - top), total, min_p)

    @triton.jit
    def _sample_kernel(logits_ptr, stride_logits, seen_ptr, stride_seen, noise_ptr, stride_noise,
                       temperature_ptr, cfg_weight_ptr, penalty_ptr, min_p_ptr, one_minus_top_p_ptr, stride_sampling,
                       out_ptr, nonfinite_ptr, tokens_ptr, stride_tokens, step_ptr, arrivals_ptr,
                       prompt_len_ptr, token_table_ptr, position_table_ptr, embeds_ptr, positions_ptr, V,
                       BLOCK: tl.constexpr, TAIL: tl.constexpr, PDL: tl.constexpr, WRITE_TOKEN: tl.constexpr,
                       NEXT_INPUT: tl.constexpr, DIM: tl.constexpr, SHARED_POSITION: tl.constexpr,
                       MASKED: tl.constexpr, EARLY: tl.constexpr, LONE: tl.constexpr):
        # The vocabulary as a block of a power of two tokens and a tail of a few, each tail token a
        # scalar that every thread computes: 8,194 speech tokens are 8,192 and 2, where one block of
        # 16,384 would compute twice the values, half of them masked, and a second block for the
        # tail would add a reduction (barriers across the program) to each of the block's.
        if PDL and EARLY:
            # The next kernel (the next step's first) loads only weights before its wait, and lets
            # nothing launch behind it before then: it may launch now.
            gdc_launch_dependents()
        utterance = tl.program_id(0)
        ids = tl.arange(0, BLOCK)
        # The mask and the values were written before any kernel of this step but its first launched
        # (by the prologue, or by the step before's sampling kernel, whose early dependent holds its
        # own until that kernel has finished): under a programmatic launch they load during the wait.
        seen = _row(seen_ptr + utterance * stride_seen, ids, V, 0, MASKED) != 0
        # One set of sampling values for all (stride 0), or each utterance its own.
        cfg_weight = tl.load(cfg_weight_ptr + utterance * stride_sampling)
        penalty = tl.load(penalty_ptr + utterance * stride_sampling)
        temperature = tl.load(temperature_ptr + utterance * stride_sampling)
        min_p = tl.load(min_p_ptr + utterance * stride_sampling)
        allowed = tl.load(one_minus_top_p_ptr + utterance * stride_sampling)
        if PDL:
            gdc_wait()  # the logits are the kernel before's work
        if WRITE_TOKEN:
            # Read before the reductions, whose barriers then order every warp's read before a lone
            # program's own write of the counter at the end.
            step = tl.load(step_ptr)
        cond = _row(logits_ptr + 2 * utterance * stride_logits, ids, V, 0.0, MASKED).to(tl.float32)
        uncond = _row(logits_ptr + (2 * utterance + 1) * stride_logits, ids, V, 0.0, MASKED).to(tl.float32)
        scores = _scores(cond, uncond, seen, cfg_weight, penalty, temperature)
        if MASKED:
            scores = tl.where(ids < V, scores, float("-inf"))

        # Three softmaxes over one set of weights: no cut drops the most likely token, so every
        # softmax has the same maximum and the same weight for every token it keeps (0 for the
        # rest), and the most likely probability is exactly 1 / sum. What is left to reduce is a
        # maximum, a sum before and after each cut, and the draw's argmax; a NaN or inf anywhere
        # makes every sum one. The tail's scores are recomputed where needed (their loads hit L1).
        top = tl.max(scores, axis=0)
        for j in tl.static_range(TAIL):
            top = tl.maximum(top, _tail_score(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, BLOCK + j,
                                              cfg_weight, penalty, temperature))
        weights = tl.exp(scores - top)
        total = tl.sum(weights, axis=0)
        for j in tl.static_range(TAIL):
            total += tl.exp(_tail_score(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, BLOCK + j,
                                        cfg_weight, penalty, temperature) - top)
        weights = _min_p_kept(weights, total, min_p)
        kept = tl.sum(weights, axis=0)
        for j in tl.static_range(TAIL):
            kept += _tail_kept(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, BLOCK + j, cfg_weight,
                               penalty, temperature, top, total, min_p)

        low = tl.full([], -1, tl.int32)  # no top-p cut unless one is asked for
        top_bits = (1.0 / kept).to(tl.int32, bitcast=True)
        final = kept
        if allowed > 0:
            probs = weights / kept
            bits = probs.to(tl.int32, bitcast=True)
            low = tl.full([], 0, tl.int32)  # mass at most `low` stays within `allowed`...
            high = top_bits                # ...and at most `high` exceeds it (all of it, 1)
            for _ in range(31):
                middle = low + (high - low) // 2
                mass = tl.sum(tl.where(bits <= middle, probs, 0.0), axis=0)
                for j in tl.static_range(TAIL):
                    p = _tail_kept(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, BLOCK + j, cfg_weight,
                                   penalty, temperature, top, total, min_p) / kept
                    mass += tl.where(p.to(tl.int32, bitcast=True) <= middle, p, 0.0)
                within = mass <= allowed
                low = tl.where(within, middle, low)
                high = tl.where(within, high, middle)
            # The most likely token is never dropped, as transformers keeps the last sorted one.
            weights = _top_p_kept(weights, kept, low, top_bits)
            final = tl.sum(weights, axis=0)
            for j in tl.static_range(TAIL):
                weight = _tail_kept(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, BLOCK + j,
                                    cfg_weight, penalty, temperature, top, total, min_p)
                final += _top_p_kept(weight, kept, low, top_bits)
        probs = weights / final

        bad = (final != final) | (tl.abs(final) == float("inf"))
        tl.store(nonfinite_ptr, bad, mask=bad)
        ratios = probs / _row(noise_ptr + utterance * stride_noise, ids, V, 1.0, MASKED)
        if MASKED:
            ratios = tl.where(ids < V, ratios, -1.0)
        # With the flag up the decode stops and its token is never used: no NaN reaches the argmax.
        best, token = tl.max(tl.where(bad, -1.0, ratios), axis=0, return_indices=True)
        for j in tl.static_range(TAIL):
            weight = _tail_kept(logits_ptr, stride_logits, seen_ptr, stride_seen, utterance, BLOCK + j, cfg_weight,
                                penalty, temperature, top, total, min_p)
            weight = _top_p_kept(weight, kept, low, top_bits)
            ratio = (weight / final) / tl.load(noise_ptr + utterance * stride_noise + BLOCK + j)
            # As torch.argmax, the first of equal maxima: a tail token only past a larger ratio.
            token = tl.where(ratio > best, BLOCK + j, token)
            best = tl.maximum(best, ratio)
        token = token.to(tl.int64)
        if WRITE_TOKEN:
            # Into the slot after the step counter's; the last program to get here advances the
            # counter, once every program has read it (acq_rel orders each read before its arrival).
            # A lone program needs no count of arrivals.
            tl.store(tokens_ptr + utterance * stride_tokens + step + 1, token)
            if NEXT_INPUT:  # the next step's prologue, here: that step starts with its first layer
                write_step_input(utterance, token, step + 1, seen_ptr, stride_seen, prompt_len_ptr, token_table_ptr,
                                 position_table_ptr, embeds_ptr, positions_ptr, DIM, SHARED_POSITION)
            if LONE:
                tl.store(step_ptr, step + 1)
            else:
                arrived = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel")
                if arrived == tl.num_programs(0) - 1:
                    tl.store(step_ptr, step + 1)
                    tl.store(arrivals_ptr, 0)
        else:
            tl.store(out_ptr + utterance, token)


def kernel_applies(logits: torch.Tensor) -> bool:
    if triton is None:
        return False
    return logits.is_cuda or (logits.device.type == "cpu" and fused_matvec.interpreter_on_cpu)


def triton_sample(logits: torch.Tensor, seen: torch.Tensor, sampling: DeviceSampling, noise: torch.Tensor,
                  nonfinite: torch.Tensor, pdl: bool = False, write_token=None,
                  next_input: fused_bookkeeping.InputSources | None = None, early: bool = False,
                  warps: int | None = None) -> torch.Tensor | None:
    """logits (2n, V), CFG rows alternating, `noise` (n, V) ~ Exp(1) -> tokens (n, 1): the token
    `sample_token(next_token_probs(...))` picks with that noise. Sets `nonfinite` on NaN or inf.
    `pdl`: launched as a programmatic dependent of the kernel before it.
    `write_token` = (tokens, step_index, arrivals): instead of returning them, write the tokens into
    tokens[:, step_index + 1] and advance step_index by one (`fused_bookkeeping`); `arrivals` is an
    int32 counter, zero, kept zero between calls. `next_input` (with `write_token`): then do what
    `fused_bookkeeping.prologue` does for the step after, from these sources. `early` (with `pdl`):
    let the kernel after this one launch at once; only for one that loads nothing but weights
    before its wait and lets no kernel launch behind it before then. `warps`: None, `default_warps`."""
    n, vocab = seen.shape
    if logits.shape != (2 * n, vocab) or noise.shape != (n, vocab):
        raise ValueError(f"expected logits (2n, V) and noise (n, V) for seen (n, V) = {tuple(seen.shape)}, got "
                         f"{tuple(logits.shape)} and {tuple(noise.shape)}")
    if sampling.rows not in (None, n):
        raise ValueError(f"sampling values for {sampling.rows} utterances, logits for {n}")
    if logits.stride(-1) != 1 or noise.stride(-1) != 1 or seen.stride(-1) != 1:
        raise ValueError("the kernel reads rows of contiguous values")
    if next_input is not None and write_token is None:
        raise ValueError("next_input prepares the step after the token written: pass write_token too")
    out = torch.empty(n, 1, dtype=torch.long, device=logits.device) if write_token is None else None
    tokens, step_index, arrivals = write_token if write_token is not None else (out, out, out)
    sources, constants = next_input.kernel_args() if next_input is not None else \
        ((tokens,) * 5, dict(DIM=1, SHARED_POSITION=True))
    block, tail = blocks(vocab)
    # A lone utterance's rows get stride 0: its one row starts where the tensor does, which Triton
    # then knows to be aligned (8,194-wide rows are not, after the first).
    seen_stride, noise_stride = (0, 0) if n == 1 else (seen.stride(0), noise.stride(0))
    from torch.library import wrap_triton

    wrap_triton(_sample_kernel)[(n,)](
        logits, logits.stride(0), seen, seen_stride, noise, noise_stride,
        *(sampling[name] for name in DeviceSampling.NAMES),  # the kernel's parameters are in this order
        sampling.row_stride,
        tokens if out is None else out, nonfinite, tokens, tokens.stride(0), step_index, arrivals, *sources, vocab,
        BLOCK=block, TAIL=tail, PDL=pdl, WRITE_TOKEN=write_token is not None, NEXT_INPUT=next_input is not None,
        MASKED=block > vocab, EARLY=early, LONE=n == 1, **constants, num_warps=warps or default_warps(block),
        **({"launch_pdl": True} if pdl else {}))
    return out


# Tail tokens computed as scalars: each adds a few scalar operations to every pass over the block.
MAX_TAIL = 8


def blocks(vocab: int) -> tuple[int, int]:
    """The kernel's block (the largest power of two within `vocab`) and its tail (the tokens past it,
    each a scalar) when there are at most MAX_TAIL of those, else the next power of two and none."""
    block = 1 << (vocab.bit_length() - 1)
    return (block, vocab - block) if vocab - block <= MAX_TAIL else (2 * block, 0)


def default_warps(block: int) -> int:
    return 16 if block >= 8192 else 4


@dataclass(frozen=True)
class SamplingConfig:
    warps: int
