"""Thin matmuls as Triton kernels, fused with the norm before them and what follows.

A decode step multiplies two rows (the CFG pair) by every weight matrix. cuBLAS
reads these tall, thin problems at well under the card's bandwidth, and each
matmul comes with its own small kernels around it: an RMSNorm before, a SiLU
gate or a residual add after. Here one kernel does all of it. A program owns a
few output columns, streams their weight rows once, and:

- `norm`: normalizes the input rows first (RMSNorm, recomputed by every program:
  the input is two rows of 1,024 values, cheap next to the weights it multiplies);
- `gated`: multiplies by gate and up rows together and writes SiLU(gate) * up, so
  the MLP's activation never goes through memory;
- `residual`: adds the residual stream to its result.

The weights may be 8-bit (`kernels/quantized.py`): the kernel loads one byte a weight, widens it
in registers and applies the row's scale to the row's sums, where it factors out of the sum over
the inputs (one multiply per column, not per weight).

A Llama layer becomes four of these kernels plus rotary, cache write and attention.
Rounding follows transformers' Llama in the model's dtype: the normed input, the
matmul output, the activation and the residual sum are each rounded to it, so the
results differ from the unfused modules only by the order of the fp32 sums.

`fused_matvec` runs the kernel on CUDA when Triton is there and the rows are few;
otherwise `reference_matvec`, the same computation in PyTorch, with upstream's
operations in upstream's order. On the CPU, Triton's interpreter runs the kernel
itself (tests).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from chatterbox_lab.kernels.quantized import QuantizedWeight, quantized_linear


try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: every call takes the reference path
    triton = None

# Run the kernel on CPU tensors through Triton's interpreter (slow; for tests and for stepping
# through the kernel). Needs TRITON_INTERPRET=1 in the environment before Triton is imported.
interpreter_on_cpu = False

# Above this many rows (batches of utterances, the prefill) a matmul is no longer thin,
# and cuBLAS's tiles do better than streaming rows.
MAX_ROWS = 8


@dataclass(frozen=True)
class Norm:
    """An RMSNorm's weight and epsilon (transformers' `LlamaRMSNorm`)."""
    weight: torch.Tensor
    eps: float

    @classmethod
    def of(cls, module) -> "Norm":
        return cls(module.weight, module.variance_epsilon)


def rms_normed(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """transformers' LlamaRMSNorm, operation for operation."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * x32.to(x.dtype)


def reference_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     norm: Norm | None = None, gated: bool = False,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight.T (+ bias), with the optional norm before and gate / residual after.
    `gated`: weight holds gate rows then up rows; the result is SiLU(gate) * up. An 8-bit weight
    (`QuantizedWeight`) is multiplied as `quantized.quantized_linear` does."""
    if norm is not None:
        x = rms_normed(x, norm)
    y = quantized_linear(x, weight, bias) if isinstance(weight, QuantizedWeight) else F.linear(x, weight, bias)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else residual + y


@dataclass(frozen=True)
class KernelConfig:
    block_n: int   # output columns per program
    block_k: int   # input values per loop iteration
    warps: int


def default_config(n: int, k: int, gated: bool = False) -> KernelConfig:
    """What was fastest for the full model's calls on H100s: each program reads whole rows in one
    load, a few of them, so that thousands of loads are in flight at once (`sweep`, recorded under
    `matvec_sweep`); inside the step, gate/up with 8 columns a program, 512 programs that the SMs
    hold in one wave, and 4 warps for every call (`chain_tuning`, under `chain_sweep`)."""
    block_k = min(4096, triton.next_power_of_2(k))
    return KernelConfig(block_n=8 if gated else 4 if n >= 2048 else 2, block_k=block_k, warps=4)


if triton is not None:
    try:  # programmatic dependent launch (Hopper and later; Triton with grid dependency control)
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
        PDL_AVAILABLE = True
    except ImportError:
        PDL_AVAILABLE = False

    @triton.jit
    def _normed(xs, gain, inv_rms, dtype: tl.constexpr, NORM: tl.constexpr):
        """Raw inputs (BLOCK_M, BLOCK_K), normed as transformers norms them: (BLOCK_M, 1, BLOCK_K) fp32."""
        if NORM:
            normed = (xs.to(tl.float32) * inv_rms[:, None]).to(dtype)
            xs = (gain[None, :].to(tl.float32) * normed.to(tl.float32)).to(dtype)
        return xs.to(tl.float32)[:, None, :]

    @triton.jit
    def _matvec_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, norm_ptr, M, N, K, eps,
                       stride_x, stride_w, stride_out, stride_res,
                       BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                       AHEAD: tl.constexpr, scale_ptr=None, SCALED: tl.constexpr = False):
        if PDL and AHEAD:
            # Nothing the next kernel does before its own wait depends on this one: let it launch as
            # soon as every program here has started, so its weights stream in behind these.
            gdc_launch_dependents()
        matvec_columns(tl.program_id(0), x_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, norm_ptr, M, N, K, eps,
                       stride_x, stride_w, stride_out, stride_res, BIAS, NORM, GATED, RESIDUAL, BLOCK_M, BLOCK_N,
                       BLOCK_K, PDL, AHEAD, scale_ptr, SCALED)

    @triton.jit
    def matvec_columns(program, x_ptr, w_ptr, bias_ptr, out_ptr, res_ptr, norm_ptr, M, N, K, eps,
                       stride_x, stride_w, stride_out, stride_res,
                       BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                       AHEAD: tl.constexpr, scale_ptr=None, SCALED: tl.constexpr = False):
        """Program `program`'s columns of the kernel's result (`head_handoff` calls it as well).
        `SCALED`: the weights are 8-bit codes, row r standing for its codes times `scale_ptr[r]`."""
        rows = tl.arange(0, BLOCK_M)
        cols = program * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        out_mask = row_ok[:, None] & col_ok[None, :]
        dtype = out_ptr.dtype.element_ty
        # The first block's weights, the norm's gain and the bias are parameters, written by no
        # kernel: under programmatic dependent launch they stream in while the kernel before this
        # one is still finishing.
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        w_mask = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0)
        if GATED:
            w_up = tl.load(w_ptr + (cols + N)[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0)
        gain = tl.load(norm_ptr + ks, mask=k_ok & NORM, other=0.0)
        if BIAS:
            bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if SCALED:
            scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
            if GATED:
                scale_up = tl.load(scale_ptr + cols + N, mask=col_ok, other=0.0)
        if PDL:
            gdc_wait()  # everything below reads or writes what earlier kernels touch
            if not AHEAD:
                gdc_launch_dependents()
        # After the wait, one round trip for everything earlier kernels wrote: the input's first
        # block (also the norm's whole input when one block spans it) and the residual, whose
        # latency would otherwise come after the sums.
        xs = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if RESIDUAL:
            res = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=out_mask, other=0.0)
        inv_rms = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NORM:
            squares = tl.sum(xs.to(tl.float32) * xs.to(tl.float32), axis=1)
            for k0 in range(BLOCK_K, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                more = tl.load(x_ptr + rows[:, None] * stride_x + kk[None, :],
                               mask=row_ok[:, None] & (kk < K)[None, :], other=0.0).to(tl.float32)
                squares += tl.sum(more * more, axis=1)
            # In fp32, as transformers' norm: a compiled graph passes a Python float as fp64, which
            # would move the normed values by a rounding step against the eagerly launched kernel.
            inv_rms = 1.0 / tl.sqrt(squares / K + tl.cast(eps, tl.float32))
        normed = _normed(xs, gain, inv_rms, dtype, NORM)
        acc = tl.sum(normed * w.to(tl.float32)[None, :, :], axis=2)
        if GATED:
            acc_up = tl.sum(normed * w_up.to(tl.float32)[None, :, :], axis=2)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            xs = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                         other=0.0)
            gain = tl.load(norm_ptr + ks, mask=k_ok & NORM, other=0.0)
            normed = _normed(xs, gain, inv_rms, dtype, NORM)
            w_mask = col_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0)
            acc += tl.sum(normed * w.to(tl.float32)[None, :, :], axis=2)
            if GATED:
                w_up = tl.load(w_ptr + (cols + N)[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0)
                acc_up += tl.sum(normed * w_up.to(tl.float32)[None, :, :], axis=2)
        if SCALED:
            acc *= scale[None, :]
            if GATED:
                acc_up *= scale_up[None, :]
        if BIAS:
            acc += bias[None, :]
        y = finished(acc, acc_up if GATED else acc, res if RESIDUAL else acc, dtype, GATED, RESIDUAL)
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], y, mask=out_mask)

    @triton.jit
    def finished(acc, acc_up, res, dtype: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr):
        """The fp32 sums as transformers rounds them in the model's dtype: the matmul's output, then
        SiLU(gate) * up, then the residual sum (`staged_matvec` finishes the same way)."""
        y = acc.to(dtype).to(tl.float32)
        if GATED:
            silu = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32)
            y = (silu * acc_up.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        if RESIDUAL:
            y = res.to(tl.float32) + y
        return y.to(dtype)


def stored(weight: torch.Tensor | QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the kernel reads of a weight: its rows (8-bit codes, or the model's dtype) and the rows'
    scales (None for a weight in the model's dtype)."""
    if isinstance(weight, QuantizedWeight):
        return weight.codes, weight.scale
    return weight, None


def kernel_applies(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> bool:
    """The Triton kernel serves this call: few rows, on CUDA (or `interpreter_on_cpu`)."""
    if triton is None or x.numel() // x.size(-1) > MAX_ROWS or not stored(weight)[0].is_contiguous():
        return False
    return x.is_cuda or (x.device.type == "cpu" and interpreter_on_cpu)


def dependent_launch_supported(device) -> bool:
    """A Hopper or later GPU and a Triton that controls programmatic dependent launch."""
    device = torch.device(device)
    return (triton is not None and PDL_AVAILABLE and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def check_dependent_launch(device) -> None:
    if not dependent_launch_supported(device):
        raise RuntimeError(f"programmatic dependent launch needs a Hopper or later GPU and a Triton with grid "
                           f"dependency control (triton.language.extra.cuda.gdc_wait), not {device}: leave out "
                           f"the dependent_launch step")


def aligned_rows(m: int, n: int, **options) -> torch.Tensor:
    """An empty (m, n) tensor whose rows start a multiple of 16 values apart, so that each starts
    aligned for a kernel that reads them as vectors (the sampling kernel reads the speech head's CFG
    rows, 8,194 wide); contiguous where n is a multiple of 16, as every other call's width is."""
    return torch.empty(m, -(-n // 16) * 16, **options)[:, :n]


def matvec_rows(x: torch.Tensor, weight: torch.Tensor, gated: bool, residual: torch.Tensor | None):
    """A matvec kernel's rows: the input as (m, k) with unit stride along k, the output (m, n) and
    the residual as (m, n) rows (the output itself when there is none)."""
    k = x.size(-1)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.size(0)
    n = weight.size(0) // 2 if gated else weight.size(0)
    out = aligned_rows(m, n, dtype=x.dtype, device=x.device)
    return x2, out, residual.reshape(m, n).contiguous() if residual is not None else out


@dataclass
class MatvecLaunch:
    """A matvec kernel's arguments for `matvec_columns`, its program count, warps and output;
    `scales`: the 8-bit weight's row scales and whether there are any, as keyword arguments."""
    args: tuple
    constexprs: dict
    programs: int
    warps: int
    out: torch.Tensor
    scales: dict = field(default_factory=dict)


def matvec_launch(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None, norm: Norm | None = None,
                  gated: bool = False, residual: torch.Tensor | None = None, config: KernelConfig | None = None,
                  pdl: bool = False, ahead: bool = False) -> MatvecLaunch:
    if gated and bias is not None:
        raise ValueError("a gated matvec takes no bias (Llama's MLP has none)")
    x2, out, res = matvec_rows(x, weight, gated, residual)
    (m, k), n = x2.shape, out.size(1)
    if config is None:
        config = default_config(n, k, gated)
    rows, scale = stored(weight)
    args = (x2, rows, bias if bias is not None else out, out, res, norm.weight if norm is not None else out,
            m, n, k, norm.eps if norm is not None else 0.0,
            x2.stride(0), rows.stride(0), out.stride(0), res.stride(0))
    constexprs = dict(BIAS=bias is not None, NORM=norm is not None, GATED=gated, RESIDUAL=residual is not None,
                      BLOCK_M=max(2, triton.next_power_of_2(m)), BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                      PDL=pdl, AHEAD=ahead)
    # Passed even when unused (the output as a placeholder): Inductor's launcher of a user kernel
    # takes every argument by name.
    scales = dict(scale_ptr=scale if scale is not None else out, SCALED=scale is not None)
    return MatvecLaunch(args, constexprs, triton.cdiv(n, config.block_n), config.warps, out, scales)


def triton_matvec(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None,
                  norm: Norm | None = None, gated: bool = False, residual: torch.Tensor | None = None,
                  config: KernelConfig | None = None, pdl: bool = False, ahead: bool = False) -> torch.Tensor:
    """`reference_matvec` as one Triton kernel (x has at most MAX_ROWS rows). `pdl`: launched as a
    programmatic dependent of the kernel before it (CUDA, Hopper or later; eager launches only:
    a graph captured from them keeps the dependency, Inductor's launcher does not pass it).
    `ahead` (with `pdl`): the kernel after it may launch once all of its programs have started,
    not once they have all passed their wait."""
    from torch.library import wrap_triton

    launch = matvec_launch(x, weight, bias, norm, gated, residual, config, pdl, ahead)
    wrap_triton(_matvec_kernel)[(launch.programs,)](
        *launch.args, **launch.constexprs, **launch.scales, num_warps=launch.warps, **({"launch_pdl": True} if pdl else {}))
    return launch.out.view(*x.shape[:-1], launch.out.size(-1))


def fused_matvec(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None,
                 norm: Norm | None = None, gated: bool = False, residual: torch.Tensor | None = None,
                 config: KernelConfig | None = None, pdl: bool = False, ahead: bool = False) -> torch.Tensor:
    """The Triton kernel where it applies (`kernel_applies`), in `config` (None: `default_config`),
    else `reference_matvec`."""
    if kernel_applies(x, weight):
        return triton_matvec(x, weight, bias, norm=norm, gated=gated, residual=residual, config=config,
                             pdl=pdl and x.is_cuda, ahead=ahead)
    return reference_matvec(x, weight, bias, norm=norm, gated=gated, residual=residual)


def step_calls(t3) -> dict[str, dict]:
    """The five matvecs of a one-token step of `t3` (per layer four, then the head), as
    shapes and options: {name: dict(n=output columns, k=inputs, options)}."""
    cfg = t3.cfg
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dim, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    return {
        "qkv": dict(n=(heads + 2 * kv) * head_dim, k=dim, norm=True),
        "o_proj": dict(n=dim, k=heads * head_dim, residual=True),
        "gate_up": dict(n=cfg.intermediate_size, k=dim, norm=True, gated=True),
        "down": dict(n=dim, k=cfg.intermediate_size, residual=True),
        "head": dict(n=t3.speech_head.out_features, k=dim, norm=True, bias=t3.speech_head.bias is not None),
    }
