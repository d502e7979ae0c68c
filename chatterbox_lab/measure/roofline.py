"""The memory-bandwidth floor of a T3 decode step, and how close each rung gets to it.

Decoding one token multiplies a CFG pair of vectors by every weight matrix of T3:
about 2 GFLOP, microseconds of matrix-unit time, against ~1 GB of bf16 weights
that must cross the memory bus. So the floor of a step is the bytes it must read
(weights once, plus the filled part of the KV cache) over the card's bandwidth,
measured here as a large device-to-device copy (bytes read plus bytes written).
"""
from __future__ import annotations

import statistics
import time

import torch


def copy_bandwidth(device: str, nbytes: int | None = None, repeats: int = 10) -> float:
    """Bytes per second of a large on-device copy, counting read + write; median of repeats."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    nbytes = nbytes or (2 << 30 if on_gpu else 256 << 20)
    src = torch.randn(nbytes // 4, device=device)  # random data, not zeros: zeros can run faster
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), on_gpu, repeats)
    return 2 * nbytes / seconds


def matmul_rate(device: str, size: int | None = None, repeats: int = 10) -> float:
    """FLOP/s of a large square half-precision matmul (fp32 on the CPU), median of repeats: what
    the card's matrix units reach on the easiest shape, a ceiling for compute-bound stages."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    size = size or (8192 if on_gpu else 512)
    dtype = torch.float16 if on_gpu else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = _median_seconds(lambda: a @ b, on_gpu, repeats)
    return 2 * size**3 / seconds


def _median_seconds(work, on_gpu: bool, repeats: int) -> float:
    for _ in range(3):
        work()
    times = []
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            work()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            work()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


# An 8-bit row's fp32 scale (`kernels/quantized.py`): a weight row's, or a cache slot's per head.
SCALE_BYTES = 4


def weight_bytes_per_step(t3, weights_format: str | None = None) -> int:
    """Weights a step reads: every decoder layer, the final norm and the speech head. With an 8-bit
    `weights_format`, the linear layers' weights (the matvecs') take one byte each and a scale a row."""
    total = 0
    # Turbo's GPT-2 names its blocks and final norm otherwise than the Llama T3.
    parts = (t3.tfmr.h, t3.tfmr.ln_f) if getattr(t3, "is_gpt", False) else (t3.tfmr.layers, t3.tfmr.norm)
    for part in (*parts, t3.speech_head):
        for module in part.modules():
            for name, p in module.named_parameters(recurse=False):
                eight_bit = weights_format and isinstance(module, torch.nn.Linear) and name == "weight"
                total += p.numel() + SCALE_BYTES * p.size(0) if eight_bit else p.numel() * p.element_size()
    return total


def kv_bytes_per_step(t3, position: float, batch: int = 2, cache_format: str = "model") -> float:
    """KV cache a step reads at `position` (filled slots), both CFG rows, all layers; an int8 cache's
    codes and its scale per slot and head."""
    cfg = t3.cfg
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = 1 + SCALE_BYTES / head_dim if cache_format == "int8" else t3.speech_head.weight.element_size()
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)  # GPT-2 has no grouped heads
    return 2 * cfg.num_hidden_layers * batch * kv_heads * head_dim * position * element


def floor(t3, bandwidth: float, prompt_len: int, tokens: int, weights_format: str | None = None,
          cache_format: str = "model") -> dict:
    """Floor of the decode at its mean position (prompt + half the generated tokens), with the
    weights and the cache in the formats given."""
    rows = 1 if getattr(t3, "is_gpt", False) else 2  # Turbo has no CFG pair
    step_bytes = weight_bytes_per_step(t3, weights_format) + kv_bytes_per_step(t3, prompt_len + tokens / 2, rows,
                                                                              cache_format=cache_format)
    seconds = step_bytes / bandwidth
    return dict(bytes_per_step=step_bytes, floor_ms_per_token=seconds * 1e3, floor_tok_s=1 / seconds)
