"""Static KV cache: one fixed-size key and value buffer per layer, allocated once.

Upstream grows a DynamicCache by concatenation every token, which reallocates and
changes shapes, so no CUDA graph can be captured over it. Here the buffers never
move: a step writes its keys and values at its position with `index_copy_`, and
attention masks out the slots not yet written. The capacity is fixed up front for
a job; a request that would not fit is refused with a message, never truncated.

Under the `int8_kv_cache` step the buffers hold int8 codes, with an fp32 scale per slot and head
(`kernels/quantized.py`): half the bytes a step reads from a long cache, and half the memory a
batch of many utterances holds. The attention kernel widens the codes as it reads them; PyTorch's
path reads the cache dequantized.
"""
from __future__ import annotations

import torch

from chatterbox_lab.kernels.quantized import dequantize_rows, quantize_rows


class CacheOverflowError(ValueError):
    pass


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Capacities are rounded up to this many slots, which is also the block that attention
# over the filled cache skips or reads as a whole (t3_forward.filled_cache_mask).
CACHE_MULTIPLE = 64


def cache_len_for(prompt_len: int, max_new_tokens: int, multiple: int = CACHE_MULTIPLE) -> int:
    """Slots a request needs (prompt + every generated token), rounded up."""
    return round_up(prompt_len + max_new_tokens, multiple)


def check_fits(prompt_len: int, max_new_tokens: int, capacity: int) -> None:
    needed = prompt_len + max_new_tokens
    if needed > capacity:
        raise CacheOverflowError(
            f"this request needs {needed} KV-cache slots ({prompt_len} prompt + {max_new_tokens} new "
            f"tokens) but the cache holds {capacity}: build the decoder with "
            f"max_cache_len >= {cache_len_for(prompt_len, max_new_tokens)}, or shorten the text "
            f"or max_new_tokens. Nothing was generated."
        )


class StaticKVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, format: str = "model"):
        """`format`: "model" (the buffers in `dtype`) or "int8" (codes, and `key_scales` and
        `value_scales`, one fp32 scale per (row, kv head, slot))."""
        if format not in ("model", "int8"):
            raise ValueError(f"unknown KV cache format {format!r}: choose from model, int8")
        self.capacity = capacity
        self.dtype = dtype
        self.format = format
        shape = (batch, n_kv_heads, capacity, head_dim)
        stored = torch.int8 if format == "int8" else dtype
        self.keys = [torch.zeros(shape, dtype=stored, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=stored, device=device) for _ in range(n_layers)]
        scaled = format == "int8"
        self.key_scales = [torch.ones(shape[:-1], device=device) for _ in range(n_layers)] if scaled else []
        self.value_scales = [torch.ones(shape[:-1], device=device) for _ in range(n_layers)] if scaled else []
        self.slots = torch.arange(capacity, device=device)
        self.batch_rows = torch.arange(batch, device=device)
        for t in (*self.keys, *self.values, *self.key_scales, *self.value_scales, self.slots, self.batch_rows):
            # Fixed addresses let a captured graph read and write them in place.
            torch._dynamo.mark_static_address(t)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: slice = slice(None)):
        """Write k, v (B, H, T, D) at positions (T,) of cache rows `rows`, or one step
        (T = 1) at positions (B, 1), one per row; return the layer's buffers for those rows, in the
        model's dtype (an int8 cache's dequantized: what the attention kernel reads)."""
        if self.format == "model":
            return (self._written(self.keys[layer][rows], positions, k),
                    self._written(self.values[layer][rows], positions, v))
        read = []
        for codes, scales, new in ((self.keys[layer], self.key_scales[layer], k),
                                   (self.values[layer], self.value_scales[layer], v)):
            new_codes, new_scales = quantize_rows(new, "int8")
            self._written(scales[rows], positions, new_scales)
            read.append(dequantize_rows(self._written(codes[rows], positions, new_codes), scales[rows], self.dtype))
        return tuple(read)

    def _written(self, buffer: torch.Tensor, positions: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """`new` (B, H, T, ...) written into `buffer` (B, H, capacity, ...) at `positions`, as `update`
        takes them; returns the buffer."""
        if positions.dim() == 1:
            buffer.index_copy_(2, positions, new)
        else:
            batch = self.batch_rows[: new.size(0)]
            buffer[batch, :, positions[:, 0]] = new[:, :, 0]
        return buffer

    def scales(self, layer: int) -> tuple | None:
        """An int8 cache's (key scales, value scales) of `layer`; None for the model's dtype."""
        return (self.key_scales[layer], self.value_scales[layer]) if self.format == "int8" else None

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Boolean, a query at position p sees slots 0..p: (T, capacity) for shared
        positions (T,), (B, 1, 1, capacity) for per-row positions (B, 1)."""
        if positions.dim() == 1:
            return self.slots[None, :] <= positions[:, None]
        return (self.slots[None, :] <= positions)[:, None, None, :]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, *self.key_scales,
                                                           *self.value_scales))
