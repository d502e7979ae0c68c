"""Per-token launch counts and short traces of the decode loop.

Counts come from two profiled generations of different lengths: the difference
divided by the difference in tokens is the per-token cost, with the prefill and
fixed costs cancelled out. Profiling perturbs timing, so nothing here is timed;
speeds come from `bench.py`.

Host launches are counted at both CUDA APIs: the runtime (`cudaLaunchKernel`,
used by ATen) and the driver (`cuLaunchKernel`/`cuLaunchKernelEx`, used by
Triton), plus graph launches. GPU kernels are device-side kernel events, so a
replayed CUDA graph shows 1 host launch and hundreds of kernels.

Traces are Chrome-trace JSON (`*.pt.trace.json`): open them at ui.perfetto.dev,
or in TensorBoard's profiler plugin (torch-tb-profiler, deprecated upstream,
reads the same files from `<logdir>/<run>/`).
"""
from __future__ import annotations

import gzip
import json
import math
import os
import statistics
import socket
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType

from chatterbox_lab.records.report import plot_counts  # noqa: F401 (drawn with the reports, used with the profiles)
from torch.profiler import ProfilerActivity, profile

# Kineto writes "USDT ... profiler_start" and "profiler_stop" to stderr around every profiled run,
# which fill notebook outputs and logs. It reads this level when a profile starts; its markers have
# the highest level, so only a level above them hides them. A failed profile still raises.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

RUNTIME_LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cudaLaunchCooperativeKernel"}
DRIVER_LAUNCHES = {"cuLaunchKernel", "cuLaunchKernelEx"}
GRAPH_LAUNCHES = {"cudaGraphLaunch", "cuGraphLaunch"}


def _activities():
    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    return acts


def count_events(events) -> dict:
    counts = dict(gpu_kernels=0, runtime_launches=0, driver_launches=0, graph_launches=0, cpu_ops=0)
    for e in events:
        name = e.name
        if e.device_type == DeviceType.CUDA:
            if not name.startswith(("Memcpy", "Memset")):
                counts["gpu_kernels"] += 1
        elif name in RUNTIME_LAUNCHES:
            counts["runtime_launches"] += 1
        elif name in DRIVER_LAUNCHES:
            counts["driver_launches"] += 1
        elif name in GRAPH_LAUNCHES:
            counts["graph_launches"] += 1
        elif name.startswith("aten::"):
            counts["cpu_ops"] += 1
    counts["host_launches"] = counts["runtime_launches"] + counts["driver_launches"] + counts["graph_launches"]
    return counts


def profile_run(fn: Callable[[], object], trace_path: Path | None = None) -> dict:
    with profile(activities=_activities()) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if trace_path is not None:
        write_trace(prof, trace_path)
    return count_events(prof.events())


def per_token_counts(generate: Callable[[int], object], short: int = 8, long: int = 24,
                     trace_path: Path | None = None) -> dict:
    """`generate(n)` decodes n tokens; returns launch and kernel counts per extra token. Each length
    runs once unprofiled first: a captured run of steps is captured on its first use, and its
    capture's launches are not the steps'."""
    if long <= short:
        raise ValueError("long must exceed short")
    generate(short)
    generate(long)
    first = profile_run(lambda: generate(short), trace_path)
    second = profile_run(lambda: generate(long))
    return {k: (second[k] - first[k]) / (long - short) for k in first}


def write_trace(prof, path: Path) -> Path:
    """Chrome trace, gzip-compressed when the name ends in .gz (Perfetto and TensorBoard read both)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        tmp = path.with_suffix("")
        prof.export_chrome_trace(str(tmp))
        with open(tmp, "rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())
        tmp.unlink()
    else:
        prof.export_chrome_trace(str(path))
    return path


def trace_path_for(logdir: Path, run: str, compressed: bool = True) -> Path:
    """TensorBoard's layout: <logdir>/<run>/<worker>.pt.trace.json[.gz]."""
    suffix = ".pt.trace.json.gz" if compressed else ".pt.trace.json"
    return Path(logdir) / run / f"{socket.gethostname()}{suffix}"


def load_trace(path: Path) -> dict:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def kernel_spans(trace: dict) -> list[tuple[str, float, float]]:
    """(name, start_us, duration_us) of GPU kernels in a trace, in time order."""
    spans = [(e["name"], float(e["ts"]), float(e.get("dur", 0)))
             for e in trace.get("traceEvents", [])
             if e.get("ph") == "X" and e.get("cat") == "kernel"]
    return sorted(spans, key=lambda s: s[1])


def decode_window(trace: dict, last_fraction: float = 0.5) -> tuple[float, float]:
    """(start_us, end_us) of the last part of the trace's kernels: the decode steps, not the prefill."""
    spans = kernel_spans(trace)
    if not spans:
        raise ValueError("trace has no GPU kernel events (was it recorded on a GPU?)")
    start, end = spans[0][1], spans[-1][1] + spans[-1][2]
    return end - (end - start) * last_fraction, end


def steps_window(trace: dict) -> tuple[float, float]:
    """(start_us, end_us) of all the decode steps: from the first graph launch where the steps are
    replayed graphs (the prefill before it is eager), else `decode_window`'s last half."""
    lo, hi = decode_window(trace)
    launches = [e["ts"] for e in trace["traceEvents"] if e.get("name") in GRAPH_LAUNCHES and "ts" in e]
    return (min(launches), hi) if launches else (lo, hi)


def gpu_busy_fraction(trace: dict, window: tuple[float, float] | None = None) -> float:
    """Share of wall time in `window` during which some GPU kernel was running."""
    spans = kernel_spans(trace)
    lo, hi = window or decode_window(trace, 1.0)
    busy, cursor = 0.0, lo
    for _, ts, dur in spans:
        start, end = max(ts, cursor), min(ts + dur, hi)
        if end > start:
            busy += end - start
            cursor = end
    return busy / (hi - lo)


# Kernel kinds by name, matched in this order: cuBLAS and our matvec kernel, cuDNN / flex / our
# attention kernel, sampling (a vocabulary sort's passes, or our one kernel), Inductor's kernels.
KERNEL_KINDS = (
    ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "_matvec_kernel", "_staged_kernel")),
    ("attention", ("sdpa", "flash", "fmha", "attention")),
    ("sampling", ("radix_sort", "_sample_kernel")),
    ("generated (Triton)", ("triton_",)),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in lowered for m in marks)), "other kernels")


def kernel_mix(trace: dict, window: tuple[float, float] | None = None) -> dict[str, float]:
    """Share of the kernels in `window` (default: the decode steps) of each kind. Counts, not
    durations: under the profiler each kernel of a replayed graph is stretched, so a trace's
    durations say little about the step's real time (the bench times it unprofiled)."""
    lo, hi = window or steps_window(trace)
    kinds = [kernel_kind(name) for name, ts, _ in kernel_spans(trace) if lo <= ts < hi]
    return {kind: kinds.count(kind) / len(kinds) for kind in [k for k, _ in KERNEL_KINDS] + ["other kernels"]}


def layer_links(trace: dict) -> list[dict]:
    """A layer of the decode steps, kernel by kernel, the median over the trace's layers: its grid,
    threads, registers a thread and shared memory, when it started (its first programs resident) and
    completed, in us from the layer's first start, and its link: how long after the kernel before it
    it completed. A layer runs from the kernel before one attention kernel to the kernel before the
    next one of the same step. Under programmatic dependent launch a kernel starts long before its
    link, and the links are what the step's critical path pays."""
    lo, hi = steps_window(trace)
    kernels = sorted((e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") == "kernel"
                      and lo <= e["ts"] < hi), key=lambda e: e["ts"])
    attention = [i for i, e in enumerate(kernels) if kernel_kind(e["name"]) == "attention"]
    if len(attention) < 2:
        raise ValueError("the trace's decode steps hold fewer than two attention kernels")
    # Between the last attention of a step and the first of the next come the head, sampling and
    # bookkeeping too: those pairs are farther apart than a layer.
    gaps = [b - a for a, b in zip(attention, attention[1:])]
    layers = [[kernels[i] for i in range(a - 1, b - 1)] for a, b, gap in zip(attention, attention[1:], gaps)
              if gap == min(gaps) and a > 0]
    rows = []
    for position in range(min(gaps)):
        spans = [(layer[position], layer[0]["ts"], kernels[kernels.index(layer[position]) - 1]) for layer in layers]
        e, args = spans[0][0], spans[0][0].get("args", {})
        rows.append(dict(
            kernel=e["name"], programs=math.prod(args.get("grid", [1])), threads=math.prod(args.get("block", [1])),
            registers=args.get("registers per thread"), shared_bytes=args.get("shared memory"),
            start_us=statistics.median(k["ts"] - origin for k, origin, _ in spans),
            end_us=statistics.median(k["ts"] + k["dur"] - origin for k, origin, _ in spans),
            link_us=statistics.median(k["ts"] + k["dur"] - (p["ts"] + p["dur"]) for k, _, p in spans)))
    return rows


def step_seam(trace: dict) -> dict:
    """Where one captured step meets the next (`fused_bookkeeping` and later): medians over the
    trace's steps of the sampling kernel's duration and of the time from its end to the start of
    the next step's first kernel of ours (us), the prologue or, under `folded_prologue`, the first
    layer's; and to the first layer's kernel either way. Also the next kernel's name and the
    kernels in between (the last step's), by name. Ours are the Triton kernels, named after their
    functions (`_..._kernel`); PyTorch's are namespaced."""
    spans = kernel_spans(trace)
    seams, to_layers, samples, between, opener = [], [], [], None, None
    for i, (name, start, duration) in enumerate(spans):
        if name != "_sample_kernel":
            continue
        samples.append(duration)
        ours = (j for j in range(i + 1, len(spans)) if spans[j][0].startswith("_"))
        first = next(ours, None)
        layer = first if first is None or spans[first][0] != "_prologue_kernel" else next(ours, None)
        if layer is not None:
            seams.append(spans[first][1] - (start + duration))
            to_layers.append(spans[layer][1] - (start + duration))
            between = [short_name(n) for n, _, _ in spans[i + 1:first]]
            opener = spans[first][0]
    if not seams:
        raise ValueError("the trace holds no sampling kernel followed by another step (a fused_bookkeeping step)")
    return dict(seam_us=statistics.median(seams), to_layers_us=statistics.median(to_layers),
                sample_us=statistics.median(samples), next_kernel=opener, kernels_between=between, steps=len(seams))


def short_name(kernel: str) -> str:
    """A kernel's name without its template arguments and namespaces: `vectorized_elementwise_kernel`."""
    return kernel.split("<")[0].split("::")[-1].split("(")[0].replace("void ", "")


def plot_timeline(trace: dict, ax=None, title: str = "", window: tuple[float, float] | None = None):
    """GPU kernels (top) and host-side CPU ops (bottom) on one time axis (ms from the window start)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 2.2))
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    if window:
        events = [e for e in events if window[0] <= float(e["ts"]) <= window[1]]
    if not events:
        ax.set_title(title + " (empty trace)")
        return ax
    t0 = window[0] if window else min(float(e["ts"]) for e in events)
    rows = {"kernel": (1, "tab:green"), "cpu_op": (0, "tab:blue")}
    for cat, (row, color) in rows.items():
        spans = [((float(e["ts"]) - t0) / 1e3, max(float(e["dur"]) / 1e3, 1e-4))
                 for e in events if e.get("cat") == cat]
        # No edges: with edges, thin bars merge and hide the idle gaps the plot is for.
        ax.broken_barh(spans, (row - 0.4, 0.8), color=color, linewidth=0)
    ax.set_yticks([0, 1], ["host ops", "GPU kernels"])
    ax.set_xlabel("ms")
    ax.set_title(title)
    return ax
