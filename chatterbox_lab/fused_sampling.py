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

The sums run in another order than PyTorch's, and ties at the top-p cut are
kept together where a sort would split them; so tokens are checked against
PyTorch's path for the same noise, not bit for bit in general.
"""
from __future__ import annotations

import torch

from . import fused_matvec
from .sampling import DeviceSampling

triton = fused_matvec.triton
if triton is not None:
    import triton.language as tl
    if fused_matvec.PDL_AVAILABLE:
        from triton.language.extra.cuda import gdc_wait

    @triton.jit
    def _softmax(scores):
        best = tl.max(scores, axis=0)
        weights = tl.exp(scores - best)
        return weights / tl.sum(weights, axis=0)

    @triton.jit
    def _sample_kernel(logits_ptr, stride_logits, seen_ptr, stride_seen, noise_ptr, stride_noise,
                       temperature_ptr, cfg_weight_ptr, penalty_ptr, min_p_ptr, one_minus_top_p_ptr,
                       out_ptr, nonfinite_ptr, V, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_wait()  # the logits are the kernel before's work
        utterance = tl.program_id(0)
        ids = tl.arange(0, BLOCK)
        valid = ids < V
        cond = tl.load(logits_ptr + 2 * utterance * stride_logits + ids, mask=valid, other=0.0).to(tl.float32)
        uncond = tl.load(logits_ptr + (2 * utterance + 1) * stride_logits + ids, mask=valid, other=0.0).to(tl.float32)
        scores = cond + tl.load(cfg_weight_ptr) * (cond - uncond)

        penalty = tl.load(penalty_ptr)
        seen = tl.load(seen_ptr + utterance * stride_seen + ids, mask=valid, other=0) != 0
        penalised = tl.where(scores < 0, scores * penalty, scores / penalty)
        scores = tl.where(seen, penalised, scores)
        scores = scores / tl.load(temperature_ptr)
        scores = tl.where(valid, scores, float("-inf"))

        probs = _softmax(scores)
        scores = tl.where(probs < tl.load(min_p_ptr) * tl.max(probs, axis=0), float("-inf"), scores)

        probs = _softmax(scores)
        bits = probs.to(tl.int32, bitcast=True)
        top_bits = tl.max(bits, axis=0)
        allowed = tl.load(one_minus_top_p_ptr)
        cut = tl.full([], -1, tl.int32)  # no probability's pattern is below 0: nothing dropped
        if allowed > 0:
            low = tl.full([], 0, tl.int32)  # mass at most `low` stays within `allowed`...
            high = top_bits                # ...and at most `high` exceeds it (all of it, 1)
            for _ in range(31):
                middle = low + (high - low) // 2
                within = tl.sum(tl.where(bits <= middle, probs, 0.0), axis=0) <= allowed
                low = tl.where(within, middle, low)
                high = tl.where(within, high, middle)
            cut = low
        # The most likely token is never dropped, as transformers keeps the last sorted one.
        scores = tl.where((bits <= cut) & (bits < top_bits), float("-inf"), scores)

        probs = _softmax(scores)
        bad = tl.max(tl.where(valid & ((probs != probs) | (tl.abs(probs) == float("inf"))), 1, 0), axis=0)
        tl.store(nonfinite_ptr, bad != 0, mask=bad != 0)
        noise = tl.load(noise_ptr + utterance * stride_noise + ids, mask=valid, other=1.0)
        token = tl.argmax(tl.where(valid, probs / noise, -1.0), axis=0)
        tl.store(out_ptr + utterance, token.to(tl.int64))


def kernel_applies(logits: torch.Tensor) -> bool:
    if triton is None:
        return False
    return logits.is_cuda or (logits.device.type == "cpu" and fused_matvec.interpreter_on_cpu)


def triton_sample(logits: torch.Tensor, seen: torch.Tensor, sampling: DeviceSampling, noise: torch.Tensor,
                  nonfinite: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """logits (2n, V), CFG rows alternating, `noise` (n, V) ~ Exp(1) -> tokens (n, 1): the token
    `sample_token(next_token_probs(...))` picks with that noise. Sets `nonfinite` on NaN or inf.
    `pdl`: launched as a programmatic dependent of the kernel before it."""
    n, vocab = seen.shape
    if logits.shape != (2 * n, vocab) or noise.shape != (n, vocab):
        raise ValueError(f"expected logits (2n, V) and noise (n, V) for seen (n, V) = {tuple(seen.shape)}, got "
                         f"{tuple(logits.shape)} and {tuple(noise.shape)}")
    if logits.stride(-1) != 1 or noise.stride(-1) != 1 or seen.stride(-1) != 1:
        raise ValueError("the kernel reads rows of contiguous values")
    tokens = torch.empty(n, 1, dtype=torch.long, device=logits.device)
    block = triton.next_power_of_2(vocab)
    from torch.library import wrap_triton

    wrap_triton(_sample_kernel)[(n,)](
        logits, logits.stride(0), seen, seen.stride(0), noise, noise.stride(0),
        *(sampling[name] for name in DeviceSampling.NAMES),  # the kernel's parameters are in this order
        tokens, nonfinite, vocab,
        BLOCK=block, PDL=pdl, num_warps=16 if block >= 8192 else 4, **({"launch_pdl": True} if pdl else {}))
    return tokens
