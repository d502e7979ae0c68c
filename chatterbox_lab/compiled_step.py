"""The compiled step: the one-token decode under torch.compile with CUDA graphs.

`mode="reduce-overhead"` records the step as a CUDA graph (from its third call)
and replays it with one launch, so the hundreds of small kernels of a 30-layer
step no longer each cost a host launch. `fullgraph=True` turns any graph break
into an error instead of a silent fallback. CUDA graphs can still be skipped
without an error (CPU tensors, mutated inputs, dynamic shapes): tests and the
notebook check that graphs are replayed by counting graph launches in a profile.

What recompiles: a new dtype or cache capacity (tensor shapes change). What must
not: speaker, text, sampling values and positions, which are all device data.
"""
from __future__ import annotations

import torch


def compile_step(step, mode: str | None = None):
    """Compile `step`; on CPU (no CUDA graphs) Inductor's default mode is used."""
    if mode is None:
        mode = "reduce-overhead" if torch.cuda.is_available() else "default"
    return torch.compile(step, mode=mode, fullgraph=True)


def compile_counters() -> dict:
    """Dynamo's frame and recompile counts so far in this process."""
    from torch._dynamo.utils import counters

    return {
        "frames_compiled": int(counters["stats"]["unique_graphs"]),
        "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
    }
