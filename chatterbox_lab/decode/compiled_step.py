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

from chatterbox_lab.graphed_calls import capturing, warmup_stream


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


class CapturedStep:
    """`step` (no arguments, no result: it reads and writes device state in place) replayed as one
    CUDA graph captured directly, without torch.compile.

    Worth it when every kernel of the step is already hand-written (the `fused_*` steps): Inductor
    would have little left to fuse, and its compile is most of a minute on a cold start, while
    capture costs Triton's compile of those few kernels. Like Inductor's CUDA graphs, the first
    call runs eagerly (it compiles the kernels and allocates what they need, outside any
    capture); the second is captured and then replayed, since capture records without running.
    PyTorch's generator is captured with its seed and offset read per replay, so random draws
    continue the eager sequence and `torch.manual_seed` still applies. On the CPU the step runs
    eagerly every time.

    `runs`: `run(n)` replays n steps as one graph, one graph per n (captured on first use), instead
    of n one-step graphs. Before every replay PyTorch writes the generator's seed and offset with
    two small kernels of its own, and between two replays the GPU waits for the next launch: on
    an H100 about 7 us a step (traced) that a graph of 16 steps pays once. Such a graph takes the
    host milliseconds to launch: the decoder queues it ahead of the stop check before it.
    """

    def __init__(self, step, device, runs: bool = False):
        self.step = step
        self.on_gpu = torch.device(device).type == "cuda"
        self.runs = runs
        self.warmed_up = False
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # steps a replay -> graph

    def recapture(self) -> None:
        """Drop the graphs, so that the next step runs eagerly and the ones after capture again: a
        graph keeps every kernel's launch configuration as it was captured."""
        self.graphs.clear()
        self.warmed_up = False

    def __call__(self) -> None:
        self.run(1)

    def run(self, steps: int) -> None:
        """`steps` steps, one after the other: one graph replay with `runs`, else one per step."""
        if steps > 1 and not self.runs:
            for _ in range(steps):
                self.run(1)
        elif steps < 1:
            return
        elif steps in self.graphs:
            self.graphs[steps].replay()
        elif not self.on_gpu:
            for _ in range(steps):
                self.step()
        elif not self.warmed_up:
            # Off the default stream, as capture needs: lazy handles and workspaces are made here.
            side = warmup_stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.warmed_up = True
            if steps > 1:
                # This run's other steps replay a graph one step short; the same run of the next
                # decode finds its own graph captured already, not on its clock.
                self._capture(steps)
            self.run(steps - 1)
        else:
            self._capture(steps).replay()

    def _capture(self, steps: int) -> torch.cuda.CUDAGraph:
        """Record `steps` steps as one graph (capture runs nothing)."""
        graph = torch.cuda.CUDAGraph()
        with capturing(graph):
            for _ in range(steps):
                self.step()
        self.graphs[steps] = graph
        return graph
