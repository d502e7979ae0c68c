"""Static KV cache: one fixed-size key and value buffer per layer, allocated once.

Upstream grows a DynamicCache by concatenation every token, which reallocates and
changes shapes, so no CUDA graph can be captured over it. Here the buffers never
move: a step writes its keys and values at its position with `index_copy_`, and
attention masks out the slots not yet written. The capacity is fixed up front for
a job; a request that would not fit is refused with a message, never truncated.
"""
from __future__ import annotations

import torch


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
                 dtype: torch.dtype, device: torch.device | str):
        self.capacity = capacity
        shape = (batch, n_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.slots = torch.arange(capacity, device=device)
        self.batch_rows = torch.arange(batch, device=device)
        for t in (*self.keys, *self.values, self.slots, self.batch_rows):
            # Fixed addresses let a captured graph read and write them in place.
            torch._dynamo.mark_static_address(t)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               rows: slice = slice(None)):
        """Write k, v (B, H, T, D) at positions (T,) of cache rows `rows`, or one step
        (T = 1) at positions (B, 1), one per row; return the layer's buffers for those rows."""
        keys, values = self.keys[layer][rows], self.values[layer][rows]
        if positions.dim() == 1:
            keys.index_copy_(2, positions, k)
            values.index_copy_(2, positions, v)
        else:
            batch = self.batch_rows[: k.size(0)]
            keys[batch, :, positions[:, 0]] = k[:, :, 0]
            values[batch, :, positions[:, 0]] = v[:, :, 0]
        return keys, values

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Boolean, a query at position p sees slots 0..p: (T, capacity) for shared
        positions (T,), (B, 1, 1, capacity) for per-row positions (B, 1)."""
        if positions.dim() == 1:
            return self.slots[None, :] <= positions[:, None]
        return (self.slots[None, :] <= positions)[:, None, None, :]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
