"""A whole Llama layer of the one-token step as one persistent Triton kernel.

With one kernel per matmul (`fused_matvec.py`), a layer is five kernels in a chain,
and each link costs more than its weights: the kernel before must finish and
flush, the next must launch and wait, even with programmatic dependent launch
hiding part of it. Here one program per SM stays resident for the whole layer
and walks its five phases:

    qkv (RMSNorm + matmul) | attention | o_proj + residual | RMSNorm + gate/up + SiLU | down + residual

separated by grid-wide barriers: an arrival counter every program increments, then
polls until all have arrived. A barrier is a round trip to L2, far less than a kernel
boundary. And because weights depend on nothing computed, each program loads its
first tile of the next phase's weights *before* it waits at the barrier, so the weight
stream runs on while the grid synchronizes.

A barrier is only safe when every program of the grid is resident at once, or the
first ones would wait forever for programs that cannot start. The grid is therefore
one program per SM, which always fits: the device runs nothing else of ours while the
kernel runs (a dependent launched early waits before using any of them).

Each phase is also a launch of its own (`persistent=False`): the same code without
barriers, phase after phase. That is how the CPU tests run the kernel (Triton's
interpreter runs programs one after another, so a barrier would never open) and it
is the reference the barriers are timed against.

Numerics are those of `fused_matvec` and `decode_attention`, phase for phase, except
that the attention's stretches divide the filled slots among a fixed number of
programs (the sums' order, not their terms).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatterbox_lab.kernels import decode_attention, fused_matvec
from chatterbox_lab.kernels.fused_matvec import Norm

triton = fused_matvec.triton
if triton is not None:
    import triton.language as tl

    from chatterbox_lab.kernels.decode_attention import attend, first_block
    if fused_matvec.PDL_AVAILABLE:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

PHASES = ("qkv", "attention", "o_proj", "gate_up", "down")


@dataclass(frozen=True)
class LayerConfig:
    tile_bytes: int        # weight bytes a program loads per tile; it keeps two in flight
    warps: int
    programs_per_sm: int   # all must be resident at once: checked against the compiled kernel


# What the kernel launches with untuned: the fastest of the layer sweep on an H100 and on an H200
# (`layer_sweep` in the bench's records); a card's own sweep result travels as the "layer" pick.
DEFAULT_CONFIG = LayerConfig(tile_bytes=16 * 2**10, warps=4, programs_per_sm=2)


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights as the kernel reads them (fused q/k/v and gate/up, `fused_projections`)."""
    input_norm: Norm
    qkv: torch.Tensor
    o_proj: torch.Tensor
    post_norm: Norm
    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def of(cls, layer, qkv: torch.Tensor, gate_up: torch.Tensor) -> "LayerWeights":
        return cls(Norm.of(layer.input_layernorm), qkv, layer.self_attn.o_proj.weight,
                   Norm.of(layer.post_attention_layernorm), gate_up, layer.mlp.down_proj.weight)


def tile_columns(k: int, itemsize: int, gated: bool = False, tile_bytes: int | None = None) -> int:
    """Output columns per tile: `tile_bytes` of weight rows (gate and up rows counted together)."""
    return max(1, (tile_bytes or DEFAULT_CONFIG.tile_bytes) // (k * itemsize * (2 if gated else 1)))


def attention_splits(rows: int, heads: int, programs: int) -> int:
    """Stretches per (row, head): as many as keep every program busy, a power of two."""
    splits = 1
    while rows * heads * splits * 2 <= programs and splits < decode_attention.MAX_SPLITS:
        splits *= 2
    return splits


def programs_for(device, config: LayerConfig | None = None) -> int:
    """`programs_per_sm` per SM on CUDA; on the CPU (interpreter) a few, so the tiles' striding is exercised."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count * (config or DEFAULT_CONFIG).programs_per_sm
    return 3


def resident_per_sm(compiled, device) -> int:
    """Programs of a compiled kernel one SM can hold at once, by registers, shared memory and warps."""
    props = torch.cuda.get_device_properties(device)
    if getattr(compiled, "n_regs", None) is None:
        compiled._init_handles()  # Triton reads the register count when it loads the binary
    warps = compiled.metadata.num_warps
    regs = -(-max(compiled.n_regs, 1) // 8) * 8 * 32 * warps  # allocated per warp in 8-register steps
    limits = [getattr(props, "regs_per_multiprocessor", 65536) // regs,
              getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)]
    shared = compiled.metadata.shared
    if shared:
        limits.append(getattr(props, "shared_memory_per_multiprocessor", 228 * 2**10) // shared)
    return max(0, min(limits))


# Per compiled variant (kernel, its compile-time arguments, dtype): its programs an SM holds at once.
_RESIDENT: dict[tuple, int] = {}


def resident_per_sm_of(kernel, args, options: dict, device) -> int:
    """`resident_per_sm` of `kernel` compiled for `args` and `options` (constexprs and num_warps),
    compiled (not launched) once per variant."""
    key = (kernel.fn.__name__, tuple(sorted(options.items())), str(args[0].dtype))
    if key not in _RESIDENT:
        _RESIDENT[key] = resident_per_sm(kernel.warmup(*args, **options, grid=(1,)), device)
    return _RESIDENT[key]


def _check_resident(args, shape: dict, config: LayerConfig, programs: int, pdl: bool, device) -> None:
    """Refuse a grid the SMs cannot hold at once: its barriers would wait forever."""
    per_sm = resident_per_sm_of(_layer_kernel, args, dict(**shape, PHASE=-1, PDL=pdl, num_warps=config.warps), device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs > sms * per_sm:
        raise RuntimeError(f"{programs} programs of the whole-layer kernel cannot all be resident on {sms} SMs "
                           f"({per_sm} per SM with {config}); their grid barriers would never open: "
                           f"lower programs_per_sm, tile_bytes or warps")


if triton is not None:
    @triton.jit
    def _grid_barrier(sync_ptr, target):
        """Arrive, then wait until `target` arrivals in all. The CTA barrier before the release
        makes every thread's stores part of what the arrival publishes; the acquire polls make
        every other program's stores visible after it."""
        tl.debug_barrier()
        arrived = tl.atomic_add(sync_ptr, 1, sem="release") + 1
        # Wait with acquire loads: read-modify-writes from every SM would queue behind each other
        # at the counter.
        while arrived < target:
            arrived = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [sync_ptr],
                                                dtype=tl.int32, is_pure=False, pack=1)
        tl.debug_barrier()

    @triton.jit
    def _leave(sync_ptr, programs):
        """The last program out resets the barrier counter for the next launch: by then no
        program is polling it."""
        tl.debug_barrier()
        left = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
        if left == programs - 1:
            tl.store(sync_ptr, 0)
            tl.store(sync_ptr + 1, 0)

    @triton.jit
    def _weight_tile(w_ptr, tile, N, K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Rows tile * BLOCK_N ... of a contiguous (N, K) weight; nothing past N (masked)."""
        cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, K)
        return tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols < N)[:, None], other=0.0)

    @triton.jit
    def _matvec_phase(x_ptr, norm_ptr, eps, w_ptr, res_ptr, out_ptr, M, N, first, first_up, program, programs,
                      K: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """out (M, N) = [residual +] [SiLU-gated] ([RMSNorm] x) @ W.T over this program's tiles, each
        computed with the next one's weights already loading. `first` (and `first_up`, gated) are this
        program's first tile, loaded by the caller ahead of time. Rounds as `fused_matvec` does."""
        dtype = out_ptr.dtype.element_ty
        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < M
        ks = tl.arange(0, K)
        # Written by other programs of this launch: .cg reads L2, never a stale L1 line.
        xs = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0,
                     cache_modifier=".cg")
        if NORM:
            x32 = xs.to(tl.float32)
            inv_rms = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=1) / K + tl.cast(eps, tl.float32))
            normed = (x32 * inv_rms[:, None]).to(dtype)
            gain = tl.load(norm_ptr + ks)
            xs = (gain[None, :].to(tl.float32) * normed.to(tl.float32)).to(dtype)
        xs = xs.to(tl.float32)[:, None, :]
        w = first
        w_up = first_up
        for tile in range(program, tl.cdiv(N, BLOCK_N), programs):
            w_next = _weight_tile(w_ptr, tile + programs, N, K, BLOCK_N)
            if GATED:
                w_up_next = _weight_tile(w_ptr + N * K, tile + programs, N, K, BLOCK_N)
            else:
                w_up_next = w_next
            acc = tl.sum(xs * w.to(tl.float32)[None, :, :], axis=2)
            acc_up = acc
            if GATED:
                acc_up = tl.sum(xs * w_up.to(tl.float32)[None, :, :], axis=2)
            cols = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < N)[None, :]
            res = acc
            if RESIDUAL:
                res = tl.load(res_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rows[:, None] * N + cols[None, :],
                     fused_matvec.finished(acc, acc_up, res, dtype, GATED, RESIDUAL), mask=mask)
            w = w_next
            w_up = w_up_next

    @triton.jit
    def _attention_phase(qkv_ptr, attn_ptr, pos_ptr, stride_pos, cos_ptr, sin_ptr, keys_ptr, values_ptr,
                         partial_ptr, arrivals_ptr, capacity, scale, M, program, programs,
                         HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                         BLOCK_SLOTS: tl.constexpr):
        QKV: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
        for item in range(program, M * HEADS * SPLITS, programs):
            keys, values, cos, sin = first_block(pos_ptr, stride_pos, cos_ptr, sin_ptr, keys_ptr, values_ptr, capacity,
                                                 item // SPLITS, item % SPLITS, 0, HEADS, KV_HEADS, D, SPLITS,
                                                 BLOCK_SLOTS, True, 1)
            attend(qkv_ptr, qkv_ptr + HEADS * D, qkv_ptr + (HEADS + KV_HEADS) * D, QKV, QKV, QKV,
                   pos_ptr, stride_pos, keys_ptr, values_ptr, attn_ptr, HEADS * D,
                   partial_ptr, arrivals_ptr, capacity, scale, item // SPLITS, item % SPLITS, 0, keys, values,
                   cos, sin, HEADS, KV_HEADS, D, SPLITS, BLOCK_SLOTS, True, 1)

    @triton.jit
    def _layer_kernel(h_ptr, qkv_ptr, attn_ptr, h2_ptr, act_ptr, out_ptr,
                      input_norm_ptr, input_eps, qkv_w_ptr, o_w_ptr, post_norm_ptr, post_eps, gate_up_w_ptr, down_w_ptr,
                      pos_ptr, stride_pos, cos_ptr, sin_ptr, keys_ptr, values_ptr, partial_ptr, arrivals_ptr,
                      sync_ptr, M, capacity, scale,
                      DIM: tl.constexpr, INTER: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                      D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                      QKV_COLS: tl.constexpr, O_COLS: tl.constexpr, GATE_UP_COLS: tl.constexpr,
                      DOWN_COLS: tl.constexpr, PHASE: tl.constexpr, PDL: tl.constexpr):
        """PHASE -1: every phase, with grid barriers between them (all programs resident);
        0-4: that phase alone (`PHASES`)."""
        program = tl.program_id(0)
        programs = tl.num_programs(0)
        QKV: tl.constexpr = (HEADS + 2 * KV_HEADS) * D
        # One sequence serves both modes: each phase's first weight tile is loaded ahead of the
        # barrier before it (in one-phase mode, just before the phase).
        ALL: tl.constexpr = PHASE == -1
        if ALL | (PHASE == 0):
            qkv_w = _weight_tile(qkv_w_ptr, program, QKV, DIM, QKV_COLS)
        if ALL & PDL:
            gdc_wait()  # the layer's input is the kernel before's work
            gdc_launch_dependents()
        if ALL | (PHASE == 0):
            _matvec_phase(h_ptr, input_norm_ptr, input_eps, qkv_w_ptr, h_ptr, qkv_ptr, M, QKV, qkv_w, qkv_w,
                          program, programs, DIM, True, False, False, BLOCK_M, QKV_COLS)
        if ALL | (PHASE == 2):
            o_w = _weight_tile(o_w_ptr, program, DIM, HEADS * D, O_COLS)
        if ALL:
            _grid_barrier(sync_ptr, programs)
        if ALL | (PHASE == 1):
            _attention_phase(qkv_ptr, attn_ptr, pos_ptr, stride_pos, cos_ptr, sin_ptr, keys_ptr, values_ptr,
                             partial_ptr, arrivals_ptr, capacity, scale, M, program, programs,
                             HEADS, KV_HEADS, D, SPLITS, BLOCK_SLOTS)
        if ALL | (PHASE == 3):
            gate_w = _weight_tile(gate_up_w_ptr, program, INTER, DIM, GATE_UP_COLS)
            up_w = _weight_tile(gate_up_w_ptr + INTER * DIM, program, INTER, DIM, GATE_UP_COLS)
        if ALL:
            _grid_barrier(sync_ptr, 2 * programs)
        if ALL | (PHASE == 2):
            _matvec_phase(attn_ptr, input_norm_ptr, input_eps, o_w_ptr, h_ptr, h2_ptr, M, DIM, o_w, o_w,
                          program, programs, HEADS * D, False, False, True, BLOCK_M, O_COLS)
        if ALL | (PHASE == 4):
            down_w = _weight_tile(down_w_ptr, program, DIM, INTER, DOWN_COLS)
        if ALL:
            _grid_barrier(sync_ptr, 3 * programs)
        if ALL | (PHASE == 3):
            _matvec_phase(h2_ptr, post_norm_ptr, post_eps, gate_up_w_ptr, h2_ptr, act_ptr, M, INTER, gate_w, up_w,
                          program, programs, DIM, True, True, False, BLOCK_M, GATE_UP_COLS)
        if ALL:
            _grid_barrier(sync_ptr, 4 * programs)
        if ALL | (PHASE == 4):
            _matvec_phase(act_ptr, post_norm_ptr, post_eps, down_w_ptr, h2_ptr, out_ptr, M, DIM, down_w, down_w,
                          program, programs, INTER, False, False, True, BLOCK_M, DOWN_COLS)
        if ALL:
            _leave(sync_ptr, programs)


def kernel_applies(x: torch.Tensor) -> bool:
    """The kernel serves this step: one position of at most `fused_matvec.MAX_ROWS` rows (more would
    not fit a program's registers), on CUDA (or the CPU interpreter)."""
    return decode_attention.kernel_applies(x) and x.size(0) <= fused_matvec.MAX_ROWS


def triton_layer(x: torch.Tensor, weights: LayerWeights, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, arrivals: torch.Tensor,
                 sync: torch.Tensor, persistent: bool = True, programs: int | None = None,
                 pdl: bool = False, config: LayerConfig | None = None) -> torch.Tensor:
    """One Llama layer for one position: x (B, 1, dim), the residual stream, at `positions` ((1,)
    shared or (B, 1) one per row), its key and value written into `keys` and `values` (B, kv_heads,
    capacity, head_dim) -> the layer's output (B, 1, dim). `arrivals` (int32, B * heads) and `sync`
    (int32, 2) are zero and left zero. `persistent`: one launch with barriers; else one launch a
    phase. `pdl`: launched as a programmatic dependent of the kernel before it."""
    from torch.library import wrap_triton

    rows, _, dim = x.shape
    head_dim = cos.size(-1)
    heads = weights.o_proj.size(1) // head_dim
    kv_heads = keys.size(1)
    inter = weights.down.size(1)
    for name in ("qkv", "o_proj", "gate_up", "down"):
        if not getattr(weights, name).is_contiguous():
            raise ValueError(f"the kernel reads weights as contiguous rows: {name} is not")
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("the kernel addresses the cache buffers as contiguous (rows, kv heads, slots, dim)")
    if sync.numel() < 2 or sync.dtype != torch.int32 or arrivals.dtype != torch.int32 \
            or arrivals.numel() < rows * heads:
        raise ValueError(f"sync must be 2 int32 zeros and arrivals at least {rows * heads} int32 zeros")
    config = config or DEFAULT_CONFIG
    programs = programs or programs_for(x.device, config)
    splits = attention_splits(rows, heads, programs)
    h = x.reshape(rows, dim).contiguous()
    new = x.new_empty
    qkv, attn = new(rows, (heads + 2 * kv_heads) * head_dim), new(rows, heads * head_dim)
    h2, act, out = new(rows, dim), new(rows, inter), new(rows, dim)
    partial = torch.empty(rows * heads * splits, head_dim + 2, dtype=torch.float32, device=x.device)
    positions = positions.reshape(-1)
    size = x.element_size()
    args = (h, qkv, attn, h2, act, out, weights.input_norm.weight, weights.input_norm.eps, weights.qkv,
            weights.o_proj, weights.post_norm.weight, weights.post_norm.eps, weights.gate_up, weights.down,
            positions, 0 if positions.numel() == 1 else 1, cos, sin, keys, values, partial, arrivals, sync,
            rows, keys.size(2), head_dim ** -0.5)
    shape = dict(DIM=dim, INTER=inter, HEADS=heads, KV_HEADS=kv_heads, D=head_dim, SPLITS=splits,
                 BLOCK_SLOTS=decode_attention.BLOCK_SLOTS, BLOCK_M=max(2, triton.next_power_of_2(rows)),
                 QKV_COLS=tile_columns(dim, size, tile_bytes=config.tile_bytes),
                 O_COLS=tile_columns(heads * head_dim, size, tile_bytes=config.tile_bytes),
                 GATE_UP_COLS=tile_columns(dim, size, gated=True, tile_bytes=config.tile_bytes),
                 DOWN_COLS=tile_columns(inter, size, tile_bytes=config.tile_bytes))
    kernel = wrap_triton(_layer_kernel)[(programs,)]
    if persistent:
        _check_resident(args, shape, config, programs, pdl, x.device)
        kernel(*args, **shape, PHASE=-1, PDL=pdl, num_warps=config.warps, **({"launch_pdl": True} if pdl else {}))
    else:
        for phase in range(len(PHASES)):
            kernel(*args, **shape, PHASE=phase, PDL=False, num_warps=config.warps)
    return out.view(rows, 1, dim)
