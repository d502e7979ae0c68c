"""8-bit formats: T3's weights and its KV cache in one byte a value, with a scale per row.

A one-token step reads every weight once, so its floor is bytes over bandwidth. bf16 holds two
bytes a weight; an 8-bit format holds one, and a scale per row (per output channel of a weight,
per slot and head of the cache) brings each row back to its range. Two formats:

- `int8`: symmetric integers in [-127, 127], the row's largest magnitude at 127. Rounding to the
  nearest step errs by at most half a step, `scale / 2`, in every value of the row.
- `fp8`: `torch.float8_e4m3fn` (4 exponent bits, 3 mantissa bits), the row's largest magnitude at
  448, the format's largest. Rounding errs by at most 2^-4 of the value (half a unit in the last of
  4 significant bits); values below 2^-6 of the range fall on the subnormal grid, whose half step
  is 2^-10 of the range. Hopper and later GPUs convert it natively.

`quantize` and `dequantize` are the reference the kernels are tested against: a kernel loads the
8-bit rows, widens them in registers and applies the scale, and must give what PyTorch gives on
the dequantized rows, up to the order of its sums.

Many rows at once (a prefill, a batch of utterances) go through `quantized_linear`: a tiled
Triton matmul that widens each tile of codes to the input's dtype (both formats' codes are exact
in bf16) and scales the sums once, so the weights cross memory once, one byte each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: many rows take the dequantized weight
    triton = None

FORMATS = ("int8", "fp8")
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# The code a row's largest magnitude maps to.
LARGEST = {"int8": 127.0, "fp8": 448.0}
# Round-trip bounds of one value, from the formats themselves (see the module's docstring).
INT8_HALF_STEP = 0.5                # of the row's scale
FP8_RELATIVE = 2.0 ** -4            # of the value
FP8_SUBNORMAL_HALF_STEP = 2.0 ** -10  # of the row's range (the scale times 448)
# Adding and subtracting 1.5 * 2^23 rounds an fp32 value of magnitude below 2^22 to the nearest
# integer, ties to even, as `torch.round` does: the same integers in PyTorch and in a kernel
# (Triton's interpreter has no `rint`).
ROUNDING_MAGIC = 12582912.0


def check_format(format: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"unknown 8-bit format {format!r}: choose from {', '.join(FORMATS)}")
    return format


def rounded(x: torch.Tensor) -> torch.Tensor:
    """fp32 `x` rounded to integers, ties to even, by the addition the kernels use."""
    return (x + ROUNDING_MAGIC) - ROUNDING_MAGIC


def quantize_rows(x: torch.Tensor, format: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (..., k) as 8-bit codes (..., k) and an fp32 scale per row (...,): x ~ codes * scale.
    A row of zeros gets scale 1 (its codes are zeros), never a division by zero."""
    check_format(format)
    x32 = x.float()
    largest = x32.abs().amax(dim=-1)
    scale = torch.where(largest > 0, largest / LARGEST[format], torch.ones_like(largest))
    scaled = x32 / scale[..., None]
    if format == "int8":
        return rounded(scaled).clamp(-127, 127).to(torch.int8), scale
    # e4m3fn has no infinity: a value past 448 would become NaN, so clamp the last rounding's slack.
    return scaled.clamp(-LARGEST["fp8"], LARGEST["fp8"]).to(torch.float8_e4m3fn), scale


def dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`quantize_rows` undone: codes (..., k) times scale (...,), in fp32, then rounded to `dtype`."""
    return (codes.float() * scale[..., None]).to(dtype)


def round_trip_bound(x: torch.Tensor, scale: torch.Tensor, format: str) -> torch.Tensor:
    """The most `dequantize_rows(quantize_rows(x))` may differ from `x` in fp32, value by value."""
    if check_format(format) == "int8":
        return (INT8_HALF_STEP * scale)[..., None].expand_as(x)
    subnormal = (FP8_SUBNORMAL_HALF_STEP * LARGEST["fp8"] * scale)[..., None]
    return torch.maximum(FP8_RELATIVE * x.float().abs(), subnormal)


@dataclass(frozen=True)
class QuantizedWeight:
    """A weight matrix (n, k) in an 8-bit format: `codes` (n, k) and an fp32 `scale` per output row.
    `dtype`: the model's dtype, which the matvecs compute and return in."""
    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    format: str

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def size(self, dim: int) -> int:
        return self.codes.size(dim)

    def dequantized(self) -> torch.Tensor:
        return dequantize_rows(self.codes, self.scale, self.dtype)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()


def quantize(weight: torch.Tensor, format: str) -> QuantizedWeight:
    """`weight` (n, k) with a symmetric scale per output row (channel)."""
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a weight matrix (n, k), got shape {tuple(weight.shape)}")
    codes, scale = quantize_rows(weight.detach(), format)
    return QuantizedWeight(codes.contiguous(), scale.contiguous(), weight.dtype, format)


def dequantize(weight: QuantizedWeight) -> torch.Tensor:
    return weight.dequantized()


def scaled_mm_applies(x2: torch.Tensor, weight: QuantizedWeight) -> bool:
    """cuBLAS's fp8 matmul serves this call: fp8 weights on a Hopper or later GPU, and the shapes
    it takes (rows at least 16 and both widths multiples of 16)."""
    return (weight.format == "fp8" and x2.is_cuda and torch.cuda.get_device_capability(x2.device)[0] >= 9
            and x2.size(0) >= 16 and x2.size(1) % 16 == 0 and weight.size(0) % 16 == 0)


# The dequantizing matmul's tiles: untuned, a common shape for a few hundred rows on an H100.
MATMUL_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)

if triton is not None:
    @triton.jit
    def _dequantizing_matmul_kernel(x_ptr, codes_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
                                    stride_x, stride_codes, stride_out, BIAS: tl.constexpr, IEEE: tl.constexpr,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=(rows < M)[:, None] & (ks < K)[None, :],
                        other=0.0)
            # (BLOCK_K, BLOCK_N) of the codes, widened to the input's dtype: exact for both formats.
            w = tl.load(codes_ptr + cols[None, :] * stride_codes + ks[:, None],
                        mask=(cols < N)[None, :] & (ks < K)[:, None], other=0.0).to(x.dtype)
            if IEEE:  # fp32 inputs (tests): no TF32 rounding
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x, w)
        acc *= tl.load(scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
        if BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        out_mask = (rows < M)[:, None] & (cols < N)[None, :]
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def triton_quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`quantized_linear` as the dequantizing Triton matmul (CUDA, or Triton's interpreter on the CPU)."""
    x2 = x.reshape(-1, x.size(-1))
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    (m, k), n = x2.shape, weight.size(0)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, MATMUL_BLOCKS["BLOCK_M"]), triton.cdiv(n, MATMUL_BLOCKS["BLOCK_N"]))
    _dequantizing_matmul_kernel[grid](x2, weight.codes, weight.scale, bias if bias is not None else out, out, m, n, k,
                                      x2.stride(0), weight.codes.stride(0), out.stride(0), BIAS=bias is not None,
                                      IEEE=x.dtype == torch.float32, **MATMUL_BLOCKS)
    return out.view(*x.shape[:-1], n)


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., k) @ weight.T (+ bias) in the model's dtype, for many rows (a prefill, large batches).
    fp8 on Hopper: cuBLAS multiplies fp8 rows (the input quantized per row) by the fp8 weights with
    both scales. Otherwise, on CUDA, the dequantizing Triton matmul; on the CPU, PyTorch on the
    dequantized weight (the reference)."""
    x2 = x.reshape(-1, x.size(-1))
    if scaled_mm_applies(x2, weight):
        codes, x_scale = quantize_rows(x2, "fp8")
        y = torch._scaled_mm(codes, weight.codes.t(), scale_a=x_scale[:, None], scale_b=weight.scale[None, :],
                             bias=bias, out_dtype=weight.dtype)
        return y.view(*x.shape[:-1], -1)
    if triton is not None and x.is_cuda:
        return triton_quantized_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight.dequantized(), bias)
