"""The bf16 step: T3's weights in bfloat16 where the device supports it.

Decoding one token reads every weight once, so halving the bytes per weight is
the first lever on a memory-bound step. On its own it can make upstream *slower*
on an H100: in an eager loop PyTorch's SDPA dispatches bf16 attention to cuDNN,
whose per-call host overhead is larger than the math it saves, and the loop is
bound by the host, not the GPU. The gain appears once launches stop dominating
(static cache and CUDA graphs, the next rungs).
"""
from __future__ import annotations

import contextlib
import itertools
import warnings

import torch


def supports(device: torch.device | str, dtype: torch.dtype) -> bool:
    device = torch.device(device)
    if dtype != torch.bfloat16:
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def t3_in_dtype(t3, dtype: torch.dtype):
    """Cast T3 in place to `dtype`, or leave it in float32 with a warning where unsupported."""
    device = t3.speech_head.weight.device
    if not supports(device, dtype):
        warnings.warn(f"{dtype} is not supported on {device}; T3 stays in float32", stacklevel=2)
        return t3
    return t3.to(dtype)


@contextlib.contextmanager
def weights_restored(module: torch.nn.Module):
    """Put `module`'s tensors back as they were on exit, undoing an in-place cast (the bf16 step's)
    without the rounding a cast back would keep. The copy is held in host memory, so the device's
    peak memory stays the cast model's own."""
    def tensors():
        return itertools.chain(module.named_parameters(), module.named_buffers())

    saved = {name: t.detach().to("cpu", copy=True) for name, t in tensors()}
    try:
        yield module
    finally:
        current = dict(tensors())
        for name, original in saved.items():
            current[name].data = original.to(current[name].device)
