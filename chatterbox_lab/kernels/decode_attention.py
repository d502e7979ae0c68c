"""One decode step's attention as one Triton kernel: rotary, cache write, attention over the filled slots.

In the one-token step, PyTorch's path spends several kernels a layer around the
attention itself: rotary embedding of q and k, two cache writes, the mask, then
SDPA over the whole cache allocation, whose (row, head) pairs keep only a
quarter of the SMs busy. Here one kernel does it all:

- every program rotates its head's new q and k (Llama's rotate-half form,
  rounded to the model's dtype as transformers rounds them) and the first program
  of a key/value head writes the new key and value into the cache;
- programs split each row's cache into `splits` stretches, read only the slots
  already written (the position is device data, so a captured graph serves every
  step) and fold them with an online softmax;
- the program that finishes a (row, head) last combines the stretches, found by an
  arrival counter it resets for the next call, so no second kernel is launched;
- or programs split each (row, head)'s value dimensions into `parts` instead: each scores
  every slot itself and owns its share of the output, so none waits for another. The
  combine's fence, atomic and second round trip leave the critical path; what it costs is
  the keys read by every part (from L2 after the first).

The new key and value are used from registers: no program reads the slot being
written, so there is no race between the writer and the readers.

A program's first block of earlier slots (`first_block`) is loaded apart from the rest:
under `launch_ahead` it streams in before the kernel waits for the ones before it.

An int8 cache (`QUANTIZED`, the `int8_kv_cache` step) holds codes and an fp32 scale per slot and
head (`kernels/quantized.py`). The kernel widens each block as it loads it, and writes the new
key and value as codes, rounded as `quantized.quantize_rows` rounds them. It attends to the new
slot as later steps will read it, dequantized, so that every step sees one cache.

The decoder takes the kernel for one-token steps on CUDA (`kernel_applies`);
otherwise, and as the reference, `t3_forward.cached_attention`: transformers' rotary,
`StaticKVCache.update` and SDPA under a mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatterbox_lab.kernels import fused_matvec
from chatterbox_lab.kernels.quantized import LARGEST, ROUNDING_MAGIC

triton = fused_matvec.triton
if triton is not None:
    import triton.language as tl
    if fused_matvec.PDL_AVAILABLE:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    # The int8 format's constants as a kernel reads them (`kernels/quantized.py`).
    INT8_LARGEST = tl.constexpr(LARGEST["int8"])
    ROUNDING = tl.constexpr(ROUNDING_MAGIC)

# Slots per loop iteration, and the least a program is given.
BLOCK_SLOTS = 64
MAX_SPLITS = 16


@dataclass(frozen=True)
class AttentionConfig:
    """How the kernel's programs divide one (row, head)."""
    splits: int  # stretches of the slots, combined by the program that finishes last
    parts: int   # shares of the value dimensions, each scoring every slot of its stretch
    block: int   # slots per load; a program's first block loads before its wait
    warps: int


def splits_for(capacity: int) -> int:
    """The default stretches per (row, head), a power of two: one block of slots each, so that even
    a lone CFG pair's 32 (row, head) pairs spread over most of the SMs."""
    blocks = -(-capacity // BLOCK_SLOTS)
    return min(MAX_SPLITS, 1 << (blocks - 1).bit_length())


def default_config(capacity: int) -> AttentionConfig:
    """One block of slots per stretch, no value shares, 4 warps: what a card gets untuned."""
    return AttentionConfig(splits_for(capacity), 1, BLOCK_SLOTS, 4)


if triton is not None:
    @triton.jit
    def _rotated(ptr, cos, sin, D: tl.constexpr):
        """x * cos + rotate_half(x) * sin for one head's D values at `ptr`, rounded to x's dtype; cos
        and sin are the rotary table's rows at the position, in fp32."""
        d = tl.arange(0, D)
        partner = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        x = tl.load(ptr + d)
        other = tl.load(ptr + partner).to(tl.float32)
        return (x.to(tl.float32) * cos + sign * other * sin).to(x.dtype)

    @triton.jit
    def _stretch(pos_ptr, stride_pos, capacity, row_head, split, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                 SPLITS: tl.constexpr, BLOCK: tl.constexpr, SPLIT_FILLED: tl.constexpr):
        """Where program (row_head, split) works: its row, head and key/value head, the step's
        position, the first cache slot of its key/value head, and its stretch of the slots
        before the position, [start, end) of at most `stretch` slots."""
        row = row_head // HEADS
        head = row_head % HEADS
        kv_head = head // (HEADS // KV_HEADS)
        pos = tl.load(pos_ptr + row * stride_pos).to(tl.int32)
        cache_row = (row * KV_HEADS + kv_head) * capacity
        span = pos + 1 if SPLIT_FILLED else capacity
        stretch = tl.cdiv(tl.cdiv(span, SPLITS), BLOCK) * BLOCK
        start = split * stretch
        return row, head, kv_head, pos, cache_row, start, tl.minimum(start + stretch, pos), stretch

    @triton.jit
    def _int8_codes(x, scale):
        """fp32 `x` as int8 codes of `scale` (kept in fp32), rounded ties to even as PyTorch rounds."""
        codes = (tl.math.div_rn(x, scale) + ROUNDING) - ROUNDING
        return tl.minimum(tl.maximum(codes, -INT8_LARGEST), INT8_LARGEST)

    @triton.jit
    def _int8_row(x):
        """One row `x` (fp32) as `quantized.quantize_rows` makes it: codes (fp32) and the row's scale."""
        largest = tl.max(tl.abs(x), axis=0)
        scale = tl.where(largest > 0, tl.math.div_rn(largest, tl.full([], INT8_LARGEST, tl.float32)), 1.0)
        return _int8_codes(x, scale), scale

    @triton.jit
    def _slot_block(keys_ptr, values_ptr, cache_row, first, end, part, D: tl.constexpr, BLOCK: tl.constexpr,
                    PARTS: tl.constexpr, key_scales_ptr=None, value_scales_ptr=None, QUANTIZED: tl.constexpr = False):
        """The cached keys and values of slots [first, first + BLOCK) below `end`: keys (BLOCK, D),
        values (BLOCK, D // PARTS), the value dimensions of share `part`; an int8 cache's widened and
        scaled, in fp32."""
        DV: tl.constexpr = D // PARTS
        ok = (first + tl.arange(0, BLOCK)) < end
        slot = (cache_row + first + tl.arange(0, BLOCK))[:, None] * D
        keys = tl.load(keys_ptr + slot + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
        values = tl.load(values_ptr + slot + part * DV + tl.arange(0, DV)[None, :], mask=ok[:, None], other=0.0)
        if QUANTIZED:
            scales_at = cache_row + first + tl.arange(0, BLOCK)
            keys = keys.to(tl.float32) * tl.load(key_scales_ptr + scales_at, mask=ok, other=0.0)[:, None]
            values = values.to(tl.float32) * tl.load(value_scales_ptr + scales_at, mask=ok, other=0.0)[:, None]
        return keys, values

    @triton.jit
    def first_block(pos_ptr, stride_pos, cos_ptr, sin_ptr, keys_ptr, values_ptr, capacity, row_head, split, part,
                    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                    BLOCK: tl.constexpr, SPLIT_FILLED: tl.constexpr, PARTS: tl.constexpr, key_scales_ptr=None,
                    value_scales_ptr=None, QUANTIZED: tl.constexpr = False):
        """What `attend` reads of memory no kernel of this step writes: the first block of this
        program's stretch, its keys and values written by earlier steps, and the rotary table's rows
        at the position (fp32), so that a programmatic dependent may load them before its wait and
        rotate q and k one round trip after it. So may it read the position: the step's first
        dependent kernel is launched only once the kernels before it, which write the position, have
        finished."""
        _, _, _, pos, cache_row, start, end, _ = _stretch(pos_ptr, stride_pos, capacity, row_head, split, HEADS,
                                                          KV_HEADS, SPLITS, BLOCK, SPLIT_FILLED)
        keys, values = _slot_block(keys_ptr, values_ptr, cache_row, start, end, part, D, BLOCK, PARTS,
                                   key_scales_ptr, value_scales_ptr, QUANTIZED)
        d = tl.arange(0, D)
        cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
        return keys, values, cos, sin

    @triton.jit
    def _fold(best, total, acc, q, keys, values, ok):
        """One block of slots (`ok` marks the real ones) into the online softmax's running maximum,
        sum of weights and weighted sum of values."""
        scores = tl.where(ok, tl.sum(keys.to(tl.float32) * q[None, :], axis=1), float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        weights = tl.exp(scores - new_best)
        rescale = tl.exp(best - new_best)
        acc = acc * rescale + tl.sum(weights[:, None] * values.to(tl.float32), axis=0)
        total = total * rescale + tl.sum(weights, axis=0)
        return new_best, total, acc

    @triton.jit
    def attend(q_ptr, k_ptr, v_ptr, stride_q, stride_k, stride_v, pos_ptr, stride_pos,
               keys_ptr, values_ptr, out_ptr, stride_out, partial_ptr, arrivals_ptr,
               capacity, scale, row_head, split, part, first_keys, first_values, cos, sin, HEADS: tl.constexpr,
               KV_HEADS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK: tl.constexpr,
               SPLIT_FILLED: tl.constexpr, PARTS: tl.constexpr, key_scales_ptr=None, value_scales_ptr=None,
               QUANTIZED: tl.constexpr = False):
        """Stretch `split`, value share `part`, of (row, head) `row_head`: one program's share of the
        kernel, with the stretch's first block and the rotary rows already loaded (`first_block`).
        `SPLIT_FILLED`: the stretches divide the filled slots, not the whole capacity (for a
        caller whose split count is fixed by its grid rather than by the cache)."""
        row, head, kv_head, pos, cache_row, start, end, stretch = _stretch(
            pos_ptr, stride_pos, capacity, row_head, split, HEADS, KV_HEADS, SPLITS, BLOCK, SPLIT_FILLED)
        d = tl.arange(0, D)
        DV: tl.constexpr = D // PARTS
        dv = part * DV + tl.arange(0, DV)

        # The scale folded into q, in fp32: a compiled graph passes Python floats as fp64.
        q = _rotated(q_ptr + row * stride_q + head * D, cos, sin, D).to(tl.float32) * tl.cast(scale, tl.float32)
        k_new = _rotated(k_ptr + row * stride_k + kv_head * D, cos, sin, D)
        v_new = tl.load(v_ptr + row * stride_v + kv_head * D + dv)
        writes = (split == 0) & (part == 0) & (head % (HEADS // KV_HEADS) == 0)
        if QUANTIZED:
            k_codes, k_scale = _int8_row(k_new.to(tl.float32))
            v_codes, v_scale = _int8_row(tl.load(v_ptr + row * stride_v + kv_head * D + d).to(tl.float32))
            if writes:
                tl.store(keys_ptr + (cache_row + pos) * D + d, k_codes.to(tl.int8))
                tl.store(values_ptr + (cache_row + pos) * D + d, v_codes.to(tl.int8))
                tl.store(key_scales_ptr + cache_row + pos, k_scale)
                tl.store(value_scales_ptr + cache_row + pos, v_scale)
            k_new = k_codes * k_scale
            v_new = _int8_codes(v_new.to(tl.float32), v_scale) * v_scale
        elif writes:
            tl.store(keys_ptr + (cache_row + pos) * D + d, k_new)
            tl.store(values_ptr + (cache_row + pos) * D + d, tl.load(v_ptr + row * stride_v + kv_head * D + d))

        # This program's stretch of the slots before `pos`; the one holding `pos` adds it.
        best = tl.full([], float("-inf"), tl.float32)
        total = tl.zeros([], dtype=tl.float32)
        acc = tl.zeros([DV], dtype=tl.float32)
        if start < end:  # an all-masked block would give exp(-inf - -inf)
            best, total, acc = _fold(best, total, acc, q, first_keys, first_values,
                                     (start + tl.arange(0, BLOCK)) < end)
        for first in range(start + BLOCK, end, BLOCK):
            keys, values = _slot_block(keys_ptr, values_ptr, cache_row, first, end, part, D, BLOCK, PARTS,
                                       key_scales_ptr, value_scales_ptr, QUANTIZED)
            best, total, acc = _fold(best, total, acc, q, keys, values, (first + tl.arange(0, BLOCK)) < end)
        if (pos >= start) & (pos < start + stretch):
            score = tl.sum(k_new.to(tl.float32) * q, axis=0)
            new_best = tl.maximum(best, score)
            weight = tl.exp(score - new_best)
            rescale = tl.exp(best - new_best)
            acc = acc * rescale + weight * v_new.to(tl.float32)
            total = total * rescale + weight
            best = new_best

        out_at = out_ptr + row * stride_out + head * D
        if SPLITS == 1:
            tl.store(out_at + dv, (acc / total).to(out_ptr.dtype.element_ty))
        else:
            # Each stretch leaves (best, total, acc), each value share its part of acc (and the same
            # best and total); the last program of this (row, head) to arrive combines them. The
            # barrier and the release/acquire counter make every program's partial visible to it;
            # .cg loads skip the L1, which may hold stale lines.
            partial = partial_ptr + (row_head * SPLITS + split) * (D + 2)
            tl.store(partial + dv, acc)
            tl.store(partial + D, best)
            tl.store(partial + D + 1, total)
            tl.debug_barrier()
            arrived = tl.atomic_add(arrivals_ptr + row_head, 1, sem="acq_rel")
            if arrived == SPLITS * PARTS - 1:
                parts = partial_ptr + (row_head * SPLITS + tl.arange(0, SPLITS)) * (D + 2)
                bests = tl.load(parts + D, cache_modifier=".cg")
                totals = tl.load(parts + D + 1, cache_modifier=".cg")
                accs = tl.load(parts[:, None] + d[None, :], cache_modifier=".cg")
                overall = tl.max(bests, axis=0)
                weights = tl.exp(bests - overall)
                combined = tl.sum(weights[:, None] * accs, axis=0) / tl.sum(weights * totals, axis=0)
                tl.store(out_at + d, combined.to(out_ptr.dtype.element_ty))
                tl.store(arrivals_ptr + row_head, 0)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, stride_q, stride_k, stride_v, pos_ptr, stride_pos,
                                 cos_ptr, sin_ptr, keys_ptr, values_ptr, out_ptr, stride_out,
                                 partial_ptr, arrivals_ptr, capacity, scale,
                                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                                 SPLITS: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr, PDL: tl.constexpr,
                                 AHEAD: tl.constexpr, key_scales_ptr=None, value_scales_ptr=None,
                                 QUANTIZED: tl.constexpr = False):
        row_head = tl.program_id(0)
        split = tl.program_id(1) // PARTS
        part = tl.program_id(1) % PARTS
        # q, k, v are earlier kernels' work: a dependent launch waits for them. Ahead, it lets the
        # next kernel launch at once (as `fused_matvec.triton_matvec` does) and waits only after
        # loading its first block of earlier slots, which no kernel of this step writes.
        if PDL and AHEAD:
            gdc_launch_dependents()
        elif PDL:
            gdc_wait()
            gdc_launch_dependents()
        keys, values, cos, sin = first_block(pos_ptr, stride_pos, cos_ptr, sin_ptr, keys_ptr, values_ptr, capacity,
                                             row_head, split, part, HEADS, KV_HEADS, D, SPLITS, BLOCK, False, PARTS,
                                             key_scales_ptr, value_scales_ptr, QUANTIZED)
        if PDL and AHEAD:
            gdc_wait()
        attend(q_ptr, k_ptr, v_ptr, stride_q, stride_k, stride_v, pos_ptr, stride_pos,
               keys_ptr, values_ptr, out_ptr, stride_out, partial_ptr, arrivals_ptr, capacity, scale,
               row_head, split, part, keys, values, cos, sin, HEADS, KV_HEADS, D, SPLITS, BLOCK, False, PARTS,
               key_scales_ptr, value_scales_ptr, QUANTIZED)


def kernel_applies(q: torch.Tensor) -> bool:
    """The kernel serves this step: one query position, on CUDA (or the CPU interpreter)."""
    if triton is None or q.size(1) != 1:
        return False
    return q.is_cuda or (q.device.type == "cpu" and fused_matvec.interpreter_on_cpu)


def _power_of_two(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def attention_launch(q, k, v, positions, cos, sin, keys, values, arrivals, config: AttentionConfig):
    """The attention kernel's arguments for `first_block` / `attend` (checked), its constexprs and
    its output (rows, heads * D): shared by this module's kernel and `head_handoff`'s."""
    rows, _, width = q.shape
    head_dim = cos.size(-1)
    heads, kv_heads = width // head_dim, keys.size(1)
    splits = config.splits
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("the kernel addresses the cache buffers as contiguous (rows, kv heads, slots, dim)")
    if not (_power_of_two(splits) and _power_of_two(config.parts) and _power_of_two(config.block)):
        raise ValueError(f"splits, parts and block must be powers of two, got {config}")
    if config.parts > head_dim:
        raise ValueError(f"parts ({config.parts}) cannot be more than the head's {head_dim} value dimensions")
    if arrivals.numel() < rows * heads or arrivals.dtype != torch.int32:
        raise ValueError(f"arrivals must be an int32 counter with at least {rows * heads} entries")
    q2, k2, v2 = (t[:, 0] for t in (q, k, v))
    out = torch.empty(rows, width, dtype=q.dtype, device=q.device)
    partial = torch.empty(rows * heads * splits, head_dim + 2, dtype=torch.float32, device=q.device)
    positions = positions.reshape(-1)
    args = (q2, k2, v2, q2.stride(0), k2.stride(0), v2.stride(0), positions, 0 if positions.numel() == 1 else 1,
            cos, sin, keys, values, out, out.stride(0), partial, arrivals, keys.size(2), head_dim ** -0.5)
    constexprs = dict(HEADS=heads, KV_HEADS=kv_heads, D=head_dim, SPLITS=splits, BLOCK=config.block,
                      PARTS=config.parts)
    return args, constexprs, out


def triton_decode_attention(q, k, v, positions, cos, sin, keys, values, arrivals, config: AttentionConfig,
                            pdl: bool = False, ahead: bool = False, scales: tuple | None = None):
    """`t3_forward.cached_attention` for one query position as one kernel: q (B, 1, heads * D),
    k and v (B, 1, kv_heads * D) at `positions` ((1,) shared, or (B, 1) one per row), written
    into `keys` and `values` (B, kv_heads, capacity, D), the whole cache of one layer.
    `arrivals`: an int32 counter per (row, head), zero, kept zero between calls by the kernel.
    `pdl`, `ahead`: launched as a programmatic dependent of the kernel before it, as
    `fused_matvec.triton_matvec` is. `scales`: an int8 cache's (key scales, value scales), each
    (B, kv_heads, capacity) fp32, `keys` and `values` then holding its codes."""
    from torch.library import wrap_triton

    args, constexprs, out = attention_launch(q, k, v, positions, cos, sin, keys, values, arrivals, config)
    rows, heads = q.size(0), constexprs["HEADS"]
    # Passed even for a cache in the model's dtype (the buffers as placeholders): Inductor's launcher
    # of a user kernel takes every argument by name.
    quantized = dict(key_scales_ptr=keys, value_scales_ptr=values, QUANTIZED=False)
    if scales is not None:
        if keys.dtype != torch.int8 or any(s.shape != keys.shape[:-1] or s.dtype != torch.float32 for s in scales):
            raise ValueError("an int8 cache takes int8 keys and values and an fp32 scale per (row, kv head, slot)")
        quantized = dict(key_scales_ptr=scales[0], value_scales_ptr=scales[1], QUANTIZED=True)
    wrap_triton(_decode_attention_kernel)[(rows * heads, config.splits * config.parts)](
        *args, **constexprs, **quantized, PDL=pdl, AHEAD=ahead, num_warps=config.warps,
        **({"launch_pdl": True} if pdl else {}))
    return out.view(rows, 1, q.size(-1))
