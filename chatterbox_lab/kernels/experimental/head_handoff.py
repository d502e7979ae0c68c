"""q/k/v and attention as one kernel, each head group handed over as soon as it is written.

Under `launch_ahead` a layer is a chain of five kernels, and the attention kernel waits
for the whole q/k/v kernel to finish and flush before it reads any q. Yet attention for
one key/value head group needs only that group's columns of q, k and v: with 16 groups,
a sixteenth of the q/k/v kernel's programs. Here the two are one kernel:

- its first programs are the q/k/v matvec's (`fused_matvec.matvec_columns`, after their
  wait for the kernel before); once its columns are stored, each increments its group's
  ready counter with release semantics;
- the programs after them are the attention kernel's (`decode_attention.first_block`,
  `attend`): each loads its first block of earlier cache slots, polls its group's counter
  with acquire loads (after the wait for the kernel before, under a dependent launch) until
  every q/k/v program of the group has arrived, then attends;
- the last attention program of a group to get past its poll resets the group's counters,
  which belong to this layer alone: a later layer's kernel may already be polling its own.

One link fewer a layer; the o_proj kernel after it still waits for the whole kernel. Measured
slower than the two kernels on an H100 (`docs/NOTES.md`): the fences and polls cost more than
the boundary.

Polling inside a kernel is safe only if the programs it waits for can run. They never wait
on attention, and launched in index order they are dispatched before any attention program;
even if they were not, `handoff_attention` refuses a grid whose attention programs alone could
fill every slot the SMs have for it (the decoder then launches the two kernels). On the CPU,
Triton's interpreter runs programs one after another in index order, so every counter is full
before the first attention program reads it.
"""
from __future__ import annotations

import torch

from chatterbox_lab.kernels import decode_attention, fused_matvec
from chatterbox_lab.kernels.experimental.persistent_layer import resident_per_sm_of

triton = fused_matvec.triton
if triton is not None:
    import triton.language as tl

    from chatterbox_lab.kernels.decode_attention import attend, first_block
    from chatterbox_lab.kernels.fused_matvec import matvec_columns
    if fused_matvec.PDL_AVAILABLE:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def _group_of_columns(first_col, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr):
        """The key/value head group whose q, k or v holds column `first_col` of the fused q/k/v."""
        if first_col < HEADS * D:
            group = first_col // D // (HEADS // KV_HEADS)
        elif first_col < (HEADS + KV_HEADS) * D:
            group = (first_col - HEADS * D) // D
        else:
            group = (first_col - (HEADS + KV_HEADS) * D) // D
        return group

    @triton.jit
    def _handoff_kernel(x_ptr, w_ptr, bias_ptr, qkv_ptr, res_ptr, norm_ptr, M, N, K, eps,
                        stride_x, stride_w, stride_qkv, stride_res,
                        q_ptr, k_ptr, v_ptr, stride_q, stride_k, stride_v, pos_ptr, stride_pos,
                        cos_ptr, sin_ptr, keys_ptr, values_ptr, out_ptr, stride_out, partial_ptr, arrivals_ptr,
                        capacity, scale, ready_ptr, departed_ptr, qkv_programs,
                        BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                        AHEAD: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr,
                        SPLITS: tl.constexpr, BLOCK: tl.constexpr, PARTS: tl.constexpr):
        if PDL and AHEAD:
            gdc_launch_dependents()
        program = tl.program_id(0)
        if program < qkv_programs:
            matvec_columns(program, x_ptr, w_ptr, bias_ptr, qkv_ptr, res_ptr, norm_ptr, M, N, K, eps,
                           stride_x, stride_w, stride_qkv, stride_res, BIAS, NORM, GATED, RESIDUAL, BLOCK_M,
                           BLOCK_N, BLOCK_K, PDL, AHEAD)
            # Every thread's stores, then one release: what the group's attention programs acquire.
            tl.debug_barrier()
            tl.atomic_add(ready_ptr + _group_of_columns(program * BLOCK_N, HEADS, KV_HEADS, D), 1, sem="release")
        else:
            job = program - qkv_programs
            row_head = job // SPLITS
            split = job % SPLITS
            keys, values, cos, sin = first_block(pos_ptr, stride_pos, cos_ptr, sin_ptr, keys_ptr, values_ptr, capacity,
                                                 row_head, split, 0, HEADS, KV_HEADS, D, SPLITS, BLOCK, False, PARTS)
            group = row_head % HEADS // (HEADS // KV_HEADS)
            writers = (HEADS // KV_HEADS + 2) * D // BLOCK_N
            if PDL:
                # Nothing to poll for before the kernel before has finished: waiting for it first keeps
                # the polls off the memory system while its weights and these programs' still stream.
                gdc_wait()
            ready = tl.atomic_add(ready_ptr + group, 0, sem="acquire")
            while ready < writers:
                # Every thread polls (a scalar is every thread's); a pause between polls leaves L2 to
                # the q/k/v programs' stores and arrivals.
                ready = tl.inline_asm_elementwise("nanosleep.u32 128;\n\tmov.u32 $0, $1;", "=r,r", [ready],
                                                  dtype=tl.int32, is_pure=False, pack=1)
                ready = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ready_ptr + group],
                                                  dtype=tl.int32, is_pure=False, pack=1)
            tl.debug_barrier()
            # Every reader of the group past its poll: the last one resets the counters. Its
            # result is needed only at the end, so the round trip overlaps the attention.
            readers = M * (HEADS // KV_HEADS) * SPLITS
            departed = tl.atomic_add(departed_ptr + group, 1, sem="relaxed")
            attend(q_ptr, k_ptr, v_ptr, stride_q, stride_k, stride_v, pos_ptr, stride_pos,
                   keys_ptr, values_ptr, out_ptr, stride_out, partial_ptr, arrivals_ptr, capacity, scale,
                   row_head, split, 0, keys, values, cos, sin, HEADS, KV_HEADS, D, SPLITS, BLOCK, False, PARTS)
            if departed == readers - 1:
                tl.store(ready_ptr + group, 0)
                tl.store(departed_ptr + group, 0)


def counters(layers: int, kv_heads: int, device) -> torch.Tensor:
    """Per layer, a ready and a departed counter per key/value head group: (layers, 2, kv_heads)
    int32 zeros, kept zero between calls by the kernel."""
    return torch.zeros(layers, 2, kv_heads, dtype=torch.int32, device=device)


def kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return fused_matvec.kernel_applies(x, weight) and decode_attention.kernel_applies(x)


def handoff_attention(x: torch.Tensor, qkv_weight: torch.Tensor, norm: fused_matvec.Norm, positions, cos, sin,
                      keys, values, arrivals, ready: torch.Tensor, splits: int, pdl: bool = False,
                      ahead: bool = False, refuse: bool = True) -> torch.Tensor | None:
    """`decode_attention.triton_decode_attention` of the q, k and v that
    `fused_matvec.triton_matvec(x, qkv_weight, norm=norm)` gives, as one kernel: x (B, 1, dim) ->
    attention's output (B, 1, heads * D). `ready`: this layer's (2, kv_heads) int32 counters
    (`counters`), zero, kept zero by the kernel. A grid whose polling attention programs could
    fill every slot the SMs hold for it is refused: an error, or None with `refuse=False` (the
    caller then launches the two kernels)."""
    from torch.library import wrap_triton

    if ready.shape != (2, keys.size(1)) or ready.dtype != torch.int32:
        raise ValueError(f"ready must be this layer's (2, {keys.size(1)}) int32 counters, got "
                         f"{tuple(ready.shape)} {ready.dtype}")
    matvec = fused_matvec.matvec_launch(x, qkv_weight, norm=norm, pdl=pdl, ahead=ahead)
    rows, head_dim = matvec.out.size(0), cos.size(-1)
    kv_width = keys.size(1) * head_dim
    q, k, v = matvec.out[:, None].split([matvec.out.size(1) - 2 * kv_width, kv_width, kv_width], dim=-1)
    # One program a stretch, as the readers counted per group assume.
    attention, shape, out = decode_attention.attention_launch(
        q, k, v, positions, cos, sin, keys, values, arrivals,
        decode_attention.AttentionConfig(splits, 1, decode_attention.BLOCK_SLOTS, matvec.warps))
    if head_dim % matvec.constexprs["BLOCK_N"]:
        raise ValueError(f"each q/k/v program must write one head's columns: {matvec.constexprs['BLOCK_N']} "
                         f"columns a program do not divide head_dim {head_dim}")
    attention_programs = rows * shape["HEADS"] * splits
    args = (*matvec.args, *attention, ready[0], ready[1], matvec.programs)
    constexprs = dict(**matvec.constexprs, **shape)
    slots = torch.cuda.get_device_properties(x.device).multi_processor_count * resident_per_sm_of(
        _handoff_kernel, args, dict(**constexprs, num_warps=matvec.warps), x.device) if x.is_cuda else None
    if slots is not None and attention_programs >= slots:
        if not refuse:
            return None
        raise RuntimeError(f"{attention_programs} attention programs of the q/k/v handoff kernel could fill all "
                           f"{slots} slots the SMs hold for it and poll forever: use fewer attention splits or rows")
    wrap_triton(_handoff_kernel)[(matvec.programs + attention_programs,)](
        *args, **constexprs, num_warps=matvec.warps, **({"launch_pdl": True} if pdl else {}))
    return out.view(rows, 1, -1)
