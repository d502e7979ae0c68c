"""Embedding cache: the next step's input embedding as two table lookups.

Upstream builds each step's input with `speech_emb(token)` plus
`speech_pos_emb.get_fixed_embedding(i + 1)`, which turns the Python int `i + 1`
into a new device tensor (a host-to-device copy) every token, then concatenates
the result twice for the CFG pair. Here both tables are gathered with device
indices and expanded, not copied, to the CFG batch: no host data per token, so
the step can live inside a CUDA graph.

A single table indexed by (position, token) would be positions x 8194 x 1024
values (over 4 GB in bf16 for 256 positions); the sum of two lookups is the same
number and costs one fused add.
"""
from __future__ import annotations

import torch


class SpeechEmbeddingCache:
    def __init__(self, t3, cfg_batch: int = 2):
        # The parameters themselves, not copies: a CUDA graph treats parameters as
        # fixed inputs, while any other tensor would be copied in before every replay.
        self.tokens = t3.speech_emb.weight
        self.positions = t3.speech_pos_emb.emb.weight
        self.cfg_batch = cfg_batch

    def __call__(self, token: torch.Tensor, speech_position: torch.Tensor) -> torch.Tensor:
        """token (n, 1) long, one per utterance, speech_position (1,) long -> (n * cfg_batch, 1, dim),
        each utterance's embedding repeated for its CFG rows."""
        embed = self.tokens[token[:, 0]] + self.positions[speech_position]
        # A view for one utterance (its rows share one embedding); a copy for several.
        return embed[:, None, None].expand(-1, self.cfg_batch, 1, -1).flatten(0, 1)


def upstream_step_embedding(t3, token: torch.Tensor, speech_position: int, cfg_batch: int = 2):
    """What upstream's loop does for the same step (kept for the rungs below the cache)."""
    embed = t3.speech_emb(token) + t3.speech_pos_emb.get_fixed_embedding(speech_position)
    return torch.cat([embed] * cfg_batch)
