"""The matvec kernels with their weights staged in shared memory before the wait.

Under `launch_ahead` a kernel launches while the kernels before it still run, loads
its weights, then waits for its input. `fused_matvec`'s Triton kernels can only hold
those weights in registers, and the register file is what every resident kernel
shares: the Triton gate/up's programs take 56K of an SM's 64K registers on an H100,
so its last programs become resident only as the kernels before them leave, and
much of its 16.8 MB streams after its wait, on the critical path (`docs/NOTES.md`).

Here each program copies its weight rows into shared memory with asynchronous
copies (`cp.async`) issued before the wait. They need no registers while in flight:
a gate/up program holding 64 KiB of weights takes 96 registers a thread (its working
set), and shared memory (228 KiB an SM) holds the weights of the kernels ahead on
top of the registers of the ones running. After the wait the program reads its
input once, normalizes it into shared memory, and multiplies chunk by chunk.

Same computation and roundings as `fused_matvec.matvec_columns` (norm, bias, SiLU
gate, residual), summed in another order. Any number of columns: the last
program's columns past the end copy the last row again, and are not stored.
Written in Gluon, Triton's lower-level language, which places data in shared
memory explicitly; it has no interpreter, so
the kernel runs on CUDA GPUs only (Hopper and later) and its tests are GPU tests.
Off the GPU, or for a shape it does not take, `staged_matvec` is `fused_matvec`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatterbox_lab.kernels import fused_matvec
from chatterbox_lab.kernels.fused_matvec import Norm

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    GLUON_AVAILABLE = True
except ImportError:  # an older Triton, or none (the CPU install)
    GLUON_AVAILABLE = False

# The matvecs of a layer, then the speech head, as `t3_forward.StaticT3Forward(staged=...)` names them.
CALLS = ("qkv", "o_proj", "gate_up", "down", "head")
# Those the `staged_weights` step stages. On the H100 staging gate/up alone was fastest; down, q/k/v
# and o_proj staged as well were each slower (`docs/NOTES.md`).
STAGED_CALLS = ("gate_up",)


@dataclass(frozen=True)
class StagedConfig:
    block_n: int    # output columns a program (gate and up columns each, when gated)
    chunk_k: int    # input values multiplied per step out of shared memory
    lanes_n: int    # lanes of a warp across columns; the other 32 / lanes_n run along the input
    warps_n: int    # warps across columns; the others run along the input
    warps: int

    def fits(self, n: int, k: int) -> bool:
        """Every thread has its own columns and inputs (none repeats another's work), and the last
        program has some columns of its own."""
        lanes_k, warps_k = 32 // self.lanes_n, self.warps // self.warps_n
        return (self.block_n <= n and self.block_n % (self.lanes_n * self.warps_n) == 0
                and k % self.chunk_k == 0 and self.chunk_k % (8 * lanes_k * warps_k) == 0)


def layout_for(block_n: int, warps: int) -> tuple[int, int]:
    """(lanes_n, warps_n): up to 4 lanes and every warp across the columns, as far as they go."""
    lanes_n = max(1, min(4, block_n // warps))
    return lanes_n, max(1, min(warps, block_n // lanes_n))


def default_config(n: int, k: int, gated: bool = False) -> StagedConfig:
    """Two programs an SM of an H100 for gate/up (256 programs of 16 + 16 rows, 64 KiB each): in the
    step it beat one program of 32 + 32 rows an SM, whatever the warps (`docs/NOTES.md`)."""
    block_n = max(4, min(32, 1 << ((n // 256).bit_length() - 1)))
    lanes_n, warps_n = layout_for(block_n, 4)
    return StagedConfig(block_n=block_n, chunk_k=min(k, 256), lanes_n=lanes_n, warps_n=warps_n, warps=4)


def candidates(n: int, k: int, gated: bool = False, rows: int = 2, max_shared: int = 227 * 1024) -> list[StagedConfig]:
    """What `chain_tuning` tries for a staged call: 8 to 32 columns a program, 4 or 8 warps, within
    `max_shared` bytes a program (an H100's or H200's most)."""
    found = []
    for block_n in (8, 16, 32):
        for warps in (4, 8):
            lanes_n, warps_n = layout_for(block_n, warps)
            chunk = next((c for c in (min(k, 256), 512, 1024) if c <= k and StagedConfig(block_n, c, lanes_n, warps_n,
                                                                                   warps).fits(n, k)), None)
            config = chunk and StagedConfig(block_n, chunk, lanes_n, warps_n, warps)
            if config and shared_bytes(rows, k, config, gated) <= max_shared:
                found.append(config)
    return found


def block_rows(rows: int) -> int:
    return max(2, 1 << (rows - 1).bit_length())


def shared_bytes(rows: int, k: int, config: StagedConfig, gated: bool, element_size: int = 2) -> int:
    """Shared memory one program takes: its weight rows and the (normalized) input rows."""
    return element_size * k * (config.block_n * (2 if gated else 1) + block_rows(rows))


def supported(device) -> bool:
    """A Hopper or later GPU and a Triton with Gluon."""
    device = torch.device(device)
    return GLUON_AVAILABLE and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def check_supported(device) -> None:
    """Staging needs Triton's Gluon on a Hopper or later GPU; say so rather than fall back unseen."""
    device = torch.device(device)
    if device.type == "cuda" and not supported(device):
        raise RuntimeError(f"staging weights in shared memory needs Triton's Gluon (triton.experimental.gluon, "
                           f"Triton 3.6 here) and a Hopper or later GPU, not {torch.cuda.get_device_name(device)}: "
                           f"leave out the staged_weights step")


def kernel_applies(x: torch.Tensor, weight: torch.Tensor, gated: bool = False, bias=None,
                   config: StagedConfig | None = None) -> bool:
    """The staged kernel serves this call: on a Hopper-or-later GPU with Gluon, few rows, a bias only
    without a gate (as `fused_matvec`), a config whose threads divide the shape, and a program's
    weights within an SM's shared memory. Not for 8-bit weights, which it does not read."""
    if not (GLUON_AVAILABLE and x.is_cuda and not (gated and bias is not None) and isinstance(weight, torch.Tensor)
            and weight.is_contiguous()):
        return False
    rows, k = x.numel() // x.size(-1), x.size(-1)
    n = weight.size(0) // 2 if gated else weight.size(0)
    config = config or default_config(n, k, gated)
    properties = torch.cuda.get_device_properties(x.device)
    return (rows <= fused_matvec.MAX_ROWS and config.fits(n, k) and properties.major >= 9
            and shared_bytes(rows, k, config, gated, x.element_size()) <= properties.shared_memory_per_block_optin)


def carveout_percent(programs: int, shared: int, properties) -> int:
    """The share of an SM's unified L1 and shared memory to give shared memory so that the SM holds
    its part of `programs` programs of `shared` bytes each, and no more."""
    per_sm = -(-programs // properties.multi_processor_count) * shared
    return min(100, -(-100 * per_sm // properties.shared_memory_per_multiprocessor))


_carved: set[int] = set()


def _carve(kernel, programs: int, device) -> None:
    """Set a compiled kernel's preferred shared-memory carveout (`carveout_percent`), once.

    Triton asks for the most shared memory (and the least L1) for any kernel above 48 KiB. An SM
    holds programs of kernels that prefer different splits only once it has drained and been
    reconfigured, and the other kernels of the step lose L1: on the H100 the staged gate/up then
    measured slower than the Triton kernel, and faster with just the shared memory it needs."""
    import ctypes

    kernel._init_handles()
    if kernel.function in _carved:
        return
    percent = carveout_percent(programs, kernel.metadata.shared, torch.cuda.get_device_properties(device))
    preferred_carveout = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
    status = ctypes.CDLL("libcuda.so.1").cuFuncSetAttribute(ctypes.c_void_p(kernel.function), preferred_carveout,
                                                            ctypes.c_int(percent))
    if status != 0:
        raise RuntimeError(f"cuFuncSetAttribute(preferred carveout {percent}%) failed with CUDA error {status}")
    _carved.add(kernel.function)


if GLUON_AVAILABLE:
    @gluon.jit
    def _grid_dependency(instruction: gl.constexpr):
        gl.inline_asm_elementwise(instruction + "; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _staged_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, norm_ptr, M, N, eps,
                       stride_x, stride_w, stride_out, stride_res,
                       K: gl.constexpr, BIAS: gl.constexpr, NORM: gl.constexpr, GATED: gl.constexpr,
                       RESIDUAL: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CHUNK_K: gl.constexpr, LANES_N: gl.constexpr,
                       WARPS_N: gl.constexpr, WARPS: gl.constexpr, PDL: gl.constexpr, AHEAD: gl.constexpr):
        if PDL and AHEAD:
            _grid_dependency("griddepcontrol.launch_dependents")
        # (rows, columns, inputs): every thread holds all rows of 8 consecutive inputs (one 16-byte
        # copy each), so the sums over the inputs run within a thread, then across lanes and warps.
        L3: gl.constexpr = gl.BlockedLayout([BLOCK_M, 1, 8], [1, LANES_N, 32 // LANES_N],
                                            [1, WARPS_N, WARPS // WARPS_N], [2, 1, 0])
        W_LAYOUT: gl.constexpr = gl.SliceLayout(0, L3)
        X_LAYOUT: gl.constexpr = gl.SliceLayout(1, L3)
        OUT_LAYOUT: gl.constexpr = gl.SliceLayout(2, L3)
        ROW_LAYOUT: gl.constexpr = gl.BlockedLayout([BLOCK_M, 8], [1, 32], [1, WARPS], [1, 0])
        CHUNKS: gl.constexpr = K // CHUNK_K
        SHARED: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])  # of each chunk; the allocation stacks them
        dtype = out_ptr.dtype.element_ty

        # The weights are parameters, written by no kernel: copied in before the wait. Columns past
        # the end (N need not be a multiple of BLOCK_N: the speech head's 8,194) copy the last row
        # again, which keeps every copy whole and unmasked; their results are not stored.
        cols = gl.minimum(gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, W_LAYOUT)), N - 1)
        ks = gl.arange(0, CHUNK_K, layout=gl.SliceLayout(0, W_LAYOUT))
        weights = gl.allocate_shared_memory(w_ptr.dtype.element_ty, [CHUNKS * (2 if GATED else 1), BLOCK_N, CHUNK_K],
                                            SHARED)
        for c in gl.static_range(CHUNKS):
            chunk = w_ptr + cols[:, None] * stride_w + (c * CHUNK_K + ks)[None, :]
            async_copy.async_copy_global_to_shared(weights.index(c), chunk)
            if GATED:  # the up rows follow the gate rows
                async_copy.async_copy_global_to_shared(weights.index(CHUNKS + c), chunk + N * stride_w)
        async_copy.commit_group()
        rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ROW_LAYOUT))
        kk = gl.arange(0, K, layout=gl.SliceLayout(0, ROW_LAYOUT))
        row_ok = rows < M
        if NORM:
            gain = gl.load(norm_ptr + kk).to(gl.float32)
        out_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, OUT_LAYOUT))
        out_cols = gl.program_id(0) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, OUT_LAYOUT))
        out_mask = (out_rows < M)[:, None] & (out_cols < N)[None, :]
        if BIAS:
            bias = gl.load(bias_ptr + out_cols, mask=out_cols < N, other=0.0).to(gl.float32)

        if PDL:
            _grid_dependency("griddepcontrol.wait")  # below: what earlier kernels wrote
            if not AHEAD:
                _grid_dependency("griddepcontrol.launch_dependents")
        # One round trip for the input rows and the residual.
        xs = gl.load(x_ptr + rows[:, None] * stride_x + kk[None, :], mask=row_ok[:, None], other=0.0)
        if RESIDUAL:
            res = gl.load(res_ptr + out_rows[:, None] * stride_res + out_cols[None, :], mask=out_mask, other=0.0)
        if NORM:  # transformers' RMSNorm: fp32 sums, the normed value and its scaling each rounded
            x32 = xs.to(gl.float32)
            inv_rms = 1.0 / gl.sqrt(gl.sum(x32 * x32, axis=1) / K + eps.to(gl.float32))
            normed = (x32 * inv_rms[:, None]).to(dtype)
            xs = (gain[None, :] * normed.to(gl.float32)).to(dtype)
        inputs = gl.allocate_shared_memory(xs.dtype, [BLOCK_M, K], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]), xs)

        async_copy.wait_group(0)
        gl.thread_barrier()  # every thread's copies and the inputs are in
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, OUT_LAYOUT)
        acc_up = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, OUT_LAYOUT)
        for c in gl.static_range(CHUNKS):
            x_chunk = inputs.slice(c * CHUNK_K, CHUNK_K, dim=1).load(X_LAYOUT).to(gl.float32)[:, None, :]
            acc += gl.sum(x_chunk * weights.index(c).load(W_LAYOUT).to(gl.float32)[None, :, :], axis=2)
            if GATED:
                acc_up += gl.sum(x_chunk * weights.index(CHUNKS + c).load(W_LAYOUT).to(gl.float32)[None, :, :], axis=2)
        if BIAS:
            acc += bias[None, :]
        y = fused_matvec.finished(acc, acc_up, res if RESIDUAL else acc, dtype, GATED, RESIDUAL)
        gl.store(out_ptr + out_rows[:, None] * stride_out + out_cols[None, :], y, mask=out_mask)


def gluon_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, norm: Norm | None = None,
                 gated: bool = False, residual: torch.Tensor | None = None, config: StagedConfig | None = None,
                 pdl: bool = False, ahead: bool = False) -> torch.Tensor:
    """`fused_matvec.reference_matvec` as the staged kernel; the caller checks `kernel_applies`."""
    x2, out, res = fused_matvec.matvec_rows(x, weight, gated, residual)
    (m, k), n = x2.shape, out.size(1)
    config = config or default_config(n, k, gated)
    programs = -(-n // config.block_n)
    kernel = _staged_kernel[(programs,)](
        x2, weight, bias if bias is not None else weight, out, res, norm.weight if norm is not None else weight, m, n,
        norm.eps if norm is not None else 0.0, x2.stride(0), weight.stride(0), out.stride(0), res.stride(0),
        K=k, BIAS=bias is not None, NORM=norm is not None, GATED=gated, RESIDUAL=residual is not None,
        BLOCK_M=block_rows(m), BLOCK_N=config.block_n, CHUNK_K=config.chunk_k,
        LANES_N=config.lanes_n, WARPS_N=config.warps_n, WARPS=config.warps, PDL=pdl, AHEAD=ahead,
        num_warps=config.warps, **({"launch_pdl": True} if pdl else {}))
    _carve(kernel, programs, x.device)
    return out.view(*x.shape[:-1], n)


def staged_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, norm: Norm | None = None,
                  gated: bool = False, residual: torch.Tensor | None = None, config: StagedConfig | None = None,
                  pdl: bool = False, ahead: bool = False) -> torch.Tensor:
    """The staged kernel in `config` where it applies, else `fused_matvec.fused_matvec` (Triton kernel in
    its default configuration, or PyTorch)."""
    if kernel_applies(x, weight, gated, bias, config):
        return gluon_matvec(x, weight, bias, norm, gated, residual, config, pdl=pdl, ahead=ahead)
    return fused_matvec.fused_matvec(x, weight, bias, norm=norm, gated=gated, residual=residual, pdl=pdl, ahead=ahead)
