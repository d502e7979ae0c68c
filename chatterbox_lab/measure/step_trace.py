"""A committed trace seen step by step: where each decode step begins, and several rungs' steps
drawn on one time axis so that a shorter step shows as a shorter bar.

A step begins where the one before it has sampled its token. Where the step samples in our Triton
kernel (`fused_sampling` on), that is the end of `_sample_kernel`, which also splits a graph that
replays many steps at once (`multi_step_graph`). Before that, each step is one graph launch, and
a step begins with the first kernel its launch ran (the kernels of a replayed graph carry their
launch's correlation id). Upstream's eager loop has neither: there a step is split at the first
pass of its vocabulary sort, which PyTorch's top-p sampling runs once per token.

Under the profiler every kernel of a replayed graph runs slower, so a trace's step is longer than
the bench's timed one; compare traces with each other, never with a record's rate.
"""
from __future__ import annotations

from chatterbox_lab.measure.profiling import GRAPH_LAUNCHES, kernel_spans, steps_window

SAMPLING_KERNEL = "_sample_kernel"
# PyTorch's own sampling sorts the vocabulary once per token (top-p), so the first pass of each sort
# marks a step where neither a sampling kernel nor a graph launch does: upstream's eager loop.
SORT_PASS = "DeviceRadixSortHistogramKernel"


def step_boundaries(trace: dict) -> list[float]:
    """Start times (us, the trace's clock) of the decode steps the trace holds, in order."""
    lo, hi = steps_window(trace)
    spans = [(name, start, duration) for name, start, duration in kernel_spans(trace) if lo <= start < hi]
    sample_ends = [start + duration for name, start, duration in spans if name == SAMPLING_KERNEL]
    if len(sample_ends) >= 3:
        # A step begins with the first kernel after a sampling; the part before the first sampling
        # may hold the prefill's tail, so it is not counted as a step.
        starts = []
        for end in sample_ends:
            later = [start for _, start, _ in spans if start >= end]
            if later:
                starts.append(later[0])
        return starts
    launches = {e["args"]["correlation"] for e in trace["traceEvents"]
                if e.get("name") in GRAPH_LAUNCHES and "correlation" in e.get("args", {})}
    firsts = {}
    for e in trace["traceEvents"]:
        correlation = e.get("args", {}).get("correlation")
        if e.get("cat") == "kernel" and correlation in launches and lo <= e["ts"] < hi:
            firsts[correlation] = min(firsts.get(correlation, e["ts"]), e["ts"])
    if len(firsts) >= 2:
        return sorted(firsts.values())
    sorts = [start for name, start, _ in spans if SORT_PASS in name]
    if len(sorts) < 3:
        raise ValueError("the trace shows no sampling kernels, graph launches or vocabulary sorts to split its "
                         "decode steps at: pass a trace of a decode of several tokens, recorded on a GPU")
    return sorts


def step_lengths_us(trace: dict) -> list[float]:
    """Each whole step's length under the profiler (us), from one boundary to the next."""
    starts = step_boundaries(trace)
    return [b - a for a, b in zip(starts, starts[1:])]


def plot_steps(traces: dict, steps: int = 2, ax=None, title: str = ""):
    """One row per labelled trace: its GPU kernels over `steps` whole decode steps, every row from
    its own first step's start on one shared time axis (us), each step boundary a black line."""
    import matplotlib.pyplot as plt

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if ax is None:
        _, ax = plt.subplots(figsize=(11, 0.6 + 0.55 * len(traces)))
    labels = list(traces)
    for row, label in enumerate(reversed(labels)):
        trace = traces[label]
        starts = step_boundaries(trace)
        if len(starts) < steps + 1:
            raise ValueError(f"trace {label!r} holds {len(starts) - 1} whole steps; ask for at most that many")
        t0, t1 = starts[0], starts[steps]
        spans = [((start - t0), max(duration, 0.05)) for _, start, duration in kernel_spans(trace)
                 if t0 <= start < t1]
        ax.broken_barh(spans, (row - 0.35, 0.7), color="tab:green", linewidth=0)
        for boundary in starts[: steps + 1]:
            ax.plot([boundary - t0] * 2, [row - 0.45, row + 0.45], color="black", linewidth=1.5)
    ax.set_yticks(range(len(labels)), list(reversed(labels)))
    ax.set_xlabel("us from the first step's start (under the profiler); black lines: step boundaries")
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.figure.tight_layout()
    return ax.figure
