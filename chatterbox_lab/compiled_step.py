"""The compiled step: the one-token decode under torch.compile with CUDA graphs.

Inductor's CUDA-graph option (what `mode="reduce-overhead"` turns on; set directly
here so other options can join it) records the step as a CUDA graph (from its
third call) and replays it with one launch, so the hundreds of small kernels of a
30-layer step no longer each cost a host launch. `fullgraph=True` turns any graph break
into an error instead of a silent fallback. CUDA graphs can still be skipped
without an error (CPU tensors, mutated inputs, dynamic shapes): tests and the
notebook check that graphs are replayed by counting graph launches in a profile.

What recompiles: a new dtype, cache capacity or batch size (tensor shapes change).
What must not: speaker, text, sampling values and positions, which are all device data.
"""
from __future__ import annotations

import torch


def compile_step(step, random_in_graph: bool = False):
    """Compile `step` with CUDA graphs where there are any (on CPU, Inductor's default).

    `random_in_graph`: the step draws random numbers. Inductor would replace PyTorch's
    RNG kernels with its own generator (same distribution, other numbers); keeping
    PyTorch's (`fallback_random`) keeps a seeded run's tokens those of upstream.
    """
    options = {"triton.cudagraphs": torch.cuda.is_available()}
    if random_in_graph:
        options["fallback_random"] = True
    # The same options as mode="reduce-overhead" (which cannot be combined with options).
    # dynamic=False: a decoder with another batch size gets its own static graph, which a
    # CUDA graph needs anyway, instead of a recompile traced with a symbolic batch.
    return torch.compile(step, options=options, fullgraph=True, dynamic=False)


def compile_counters() -> dict:
    """Dynamo's frame and recompile counts so far in this process."""
    from torch._dynamo.utils import counters

    return {
        "frames_compiled": int(counters["stats"]["unique_graphs"]),
        "recompiles": int(sum(counters["recompiles"].values())) if "recompiles" in counters else 0,
    }
