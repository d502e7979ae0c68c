"""The prefill replayed from CUDA graphs, one per prompt-length bucket.

Once a token costs about a millisecond, the prefill is a large piece of the time to first
audio, and run eagerly it waits on Python launching each layer's kernels: 17.6 ms on an H200
against 6.7 ms replayed (`data/results/beyond/nvidia-h200-full-20261126T0716Z.json`). A prompt padded at its end to a bucket of `PREFILL_BUCKET` positions gives its
real positions exactly what the unpadded prompt gives: attention is causal, so no real
position sees a padded one. The padded positions write their keys and values into cache
slots past the prompt, which the decode overwrites, each before any step reads it (a step
writes its own slot, then attends up to it). The logits are read at the last real position.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from chatterbox_lab.graphed_calls import GraphedCalls

# Prompt positions per bucket: a few graphs cover every prompt length, and the padding, at
# most 31 positions, is small next to a prompt of 100-300.
PREFILL_BUCKET = 32


class BucketedPrefill(GraphedCalls):
    """A `StaticT3Forward`'s prefill of the whole batch (rows `slice(None)`), padded to a bucket
    and, on CUDA, replayed from a graph captured for it on first use."""

    def __init__(self, forward, bucket: int = PREFILL_BUCKET):
        super().__init__()
        self.forward = forward
        self.bucket = bucket

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        """embeds (B, T, dim), the prompt of every row -> logits at its last position (B, V)."""
        length = embeds.size(1)
        padded = min(math.ceil(length / self.bucket) * self.bucket, self.forward.capacity)
        device = embeds.device
        inputs = dict(embeds=F.pad(embeds, (0, 0, 0, padded - length)),
                      positions=torch.arange(padded, device=device),
                      last=torch.full((1,), length - 1, device=device))
        return self._run((embeds.size(0), padded, embeds.dtype), self._prefill, inputs).clone()

    def _prefill(self, embeds, positions, last):
        return self.forward(embeds, positions, last=last)
