"""CUDA graphs of a module's calls, one per shape key, captured on first use and replayed after.

For calls whose shapes vary from request to request (the flow's frames, T3's prompt), padded
by the caller to a bucket so that a few graphs serve every length. The caller proves that
padding changes no real output; this class only captures and replays.
"""
from __future__ import annotations

import contextlib
import gc

import torch

_WARMUP_STREAMS: dict = {}


def warmup_stream() -> torch.cuda.Stream:
    """The one side stream of the current device on which every call is warmed up before its
    capture (capture needs lazy handles and workspaces made off the default stream). One for
    all: cuBLAS keeps a workspace, tens of MiB, for every stream it has run on, for the life
    of the process, so a new stream per capture would hold one more per graph."""
    device = torch.cuda.current_device()
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, pool=None):
    """`torch.cuda.graph(graph, pool=pool)` with Python's garbage collector paused.

    A collection during the capture may free an earlier, unreachable CUDA graph (a decoder
    dropped in a reference cycle), and destroying a graph is not permitted while a stream
    captures: the capture fails with cudaErrorStreamCaptureInvalidated, at random (it did so in a
    bench's profile pass on an H100). torch.cuda.graph no longer collects before it captures, and
    still lets a collection run during the capture (pytorch/pytorch#161037).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            yield
    finally:
        if was_enabled:
            gc.enable()


class GraphedCalls(torch.nn.Module):
    """CUDA graphs of calls to one module, one per key (batch size, length bucket, dtype),
    sharing one memory pool: replays run one at a time, and outputs are copied out."""

    def __init__(self):
        super().__init__()
        self._graphs: dict = {}
        self._pool = None

    @property
    def graphs_captured(self) -> int:
        return len(self._graphs)

    def drop_graphs(self) -> None:
        """Forget the captured graphs (recaptured on next use): a graph holds the addresses of
        the weights it was captured with, so it must go when they are reallocated."""
        self._graphs.clear()

    def _context(self):
        """Entered around every call, eager, warm-up or captured (subclasses: what a capture needs)."""
        return contextlib.nullcontext()

    def _run(self, key, call, inputs: dict):
        """`call(**inputs)`; on CUDA replayed from the graph for `key`, captured on first use.
        Every tensor the call reads besides weights must be in `inputs`: the graph keeps them
        at fixed addresses. The outputs live in the graphs' shared pool, which the next replay
        overwrites: callers copy out what they keep."""
        if not next(iter(inputs.values())).is_cuda:
            with self._context():
                return call(**inputs)
        if key not in self._graphs:
            self._graphs[key] = self._capture(call, inputs)
        graph, static, output = self._graphs[key]
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return output

    def _capture(self, call, inputs: dict):
        """(graph, its static inputs, its outputs) for `call(**inputs)`."""
        # Warm-up on a side stream first: cuBLAS / cuDNN set themselves up outside the capture.
        side = warmup_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._context():
            call(**inputs)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with self._context(), capturing(graph, pool=self._pool):
            output = call(**inputs)
        return graph, inputs, output
