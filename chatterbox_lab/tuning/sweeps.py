"""The kernels' sweeps: each times one kernel on its own, call after call in a CUDA graph, over its
configurations, and returns what it measured with `KernelPicks` holding the fastest.

The chain tuning (`chain_tuning.py`) then tunes the matvecs and attention inside the whole step,
where their neighbours change what is fastest. Nothing here writes module state: the picks a sweep
returns are passed to the decoder that uses them.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from chatterbox_lab.decode.kv_cache import StaticKVCache
from chatterbox_lab.decode.plan import DecodePlan
from chatterbox_lab.decode.precision import t3_in_dtype
from chatterbox_lab.decode.t3_forward import StaticT3Forward, cached_attention, rotary_tables
from chatterbox_lab.graphed_calls import capturing, warmup_stream
from chatterbox_lab.kernels import decode_attention, fused_matvec, fused_sampling
from chatterbox_lab.kernels.decode_attention import AttentionConfig
from chatterbox_lab.kernels.experimental.persistent_layer import LayerConfig
from chatterbox_lab.kernels.fused_matvec import KernelConfig
from chatterbox_lab.kernels.fused_sampling import SamplingConfig
from chatterbox_lab.kernels.picks import KernelPicks, config_named, name_of
from chatterbox_lab.sampling import DeviceSampling, SamplingParams


# What `matvec_sweep` tries per call: columns per program, input values per iteration, warps.
MATVEC_CONFIGS = tuple(KernelConfig(n, k, w) for n in (1, 2, 4, 8) for k in (512, 1024, 2048, 4096) for w in (4, 8))



def time_in_graph(calls: list, repeats: int = 5) -> float:
    """Seconds per call of `calls` (zero-argument functions) replayed as one CUDA graph."""
    stream = warmup_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()  # compiles each kernel, and warms up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with capturing(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def matvec_sweep(t3, picks: KernelPicks, dtype: torch.dtype = torch.bfloat16, rows: int = 2,
                 configs=MATVEC_CONFIGS, l2_bytes: int = 256 * 2**20) -> tuple[dict, KernelPicks]:
    """Time every config on each of the step's calls against PyTorch's path, inside CUDA graphs.
    Each call cycles through enough copies of its weights to overflow L2, as a step over 30 layers
    does. Returns microseconds per call, and `picks` with the fastest of each call."""
    device = t3.speech_head.weight.device
    found = {}
    for name, call in fused_matvec.step_calls(t3).items():
        n, k, gated = call["n"], call["k"], call.get("gated", False)
        copies = max(2, l2_bytes // ((2 * n if gated else n) * k * dtype.itemsize))
        weights = [torch.randn(2 * n if gated else n, k, device=device, dtype=dtype) / k ** 0.5
                   for _ in range(copies)]
        x = torch.randn(rows, 1, k, device=device, dtype=dtype)
        kw = dict(gated=gated,
                  norm=fused_matvec.Norm(torch.ones(k, device=device, dtype=dtype), 1e-5) if call.get("norm") else None,
                  residual=torch.randn(rows, 1, n, device=device, dtype=dtype) if call.get("residual") else None,
                  bias=torch.zeros(n, device=device, dtype=dtype) if call.get("bias") else None)

        def timed(fn, **extra):
            return time_in_graph([lambda w=w: fn(x, w, **kw, **extra) for w in weights]) * 1e6

        entry = dict(n=n, k=k, weight_mib=(2 * n if gated else n) * k * dtype.itemsize / 2**20,
                     pytorch_us=timed(fused_matvec.reference_matvec), configs={})
        for config in configs:
            if config.block_k > 1 << (k - 1).bit_length():
                continue  # the same work as a smaller block, masked
            entry["configs"][name_of(config)] = \
                timed(fused_matvec.triton_matvec, config=config)
        best = min(entry["configs"], key=entry["configs"].get)
        entry["best"], entry["best_us"] = best, entry["configs"][best]
        picks = picks.with_pick(name, config_named(best))
        found[name] = entry
        weights.clear()  # the copies go before the next call's are made
    return found, picks


def attention_sweep(t3, capacity: int, picks: KernelPicks, rows: int = 2, dtype: torch.dtype = torch.bfloat16,
                    layers: int = 30) -> tuple[dict, KernelPicks]:
    """Microseconds per call at the last position of a `capacity`-slot cache, inside a CUDA graph
    over `layers` caches (as many as a step reads, so they are not all in L2): PyTorch's path,
    then the kernel at each split count (one block of slots a load, 4 warps). Returns them, and
    `picks` with the fastest as its attention."""
    cfg = t3.cfg
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    device = t3.speech_head.weight.device
    cache = StaticKVCache(layers, rows, kv_heads, capacity, head_dim, dtype, device)
    for buffer in (*cache.keys, *cache.values):
        buffer.normal_()
    cos, sin = rotary_tables(t3, capacity, dtype)
    positions = torch.full((1,), capacity - 1, device=device)
    rotary = (cos[positions][None], sin[positions][None])
    q = torch.randn(rows, 1, heads * head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(rows, 1, kv_heads * head_dim, device=device, dtype=dtype) for _ in range(2))
    arrivals = torch.zeros(rows * heads, dtype=torch.int32, device=device)
    mask = cache.mask(positions)
    found = dict(capacity=capacity, pytorch_us=time_in_graph(
        [lambda i=i: cached_attention(q, k, v, positions, slice(None), rotary, cache, i, mask)
         for i in range(layers)]) * 1e6, splits={})
    for splits in (1 << e for e in range(decode_attention.MAX_SPLITS.bit_length())):
        config = AttentionConfig(splits, 1, decode_attention.BLOCK_SLOTS, 4)
        found["splits"][str(splits)] = time_in_graph(
            [lambda i=i: decode_attention.triton_decode_attention(q, k, v, positions, cos, sin, cache.keys[i], cache.values[i],
                                                 arrivals, config) for i in range(layers)]) * 1e6
    best = min(found["splits"], key=found["splits"].get)
    found["best"], found["best_us"] = int(best), found["splits"][best]
    return found, picks.with_pick("attention", AttentionConfig(int(best), 1, decode_attention.BLOCK_SLOTS, 4))


def sampling_sweep(vocab: int, device, picks: KernelPicks, utterances: int = 1,
                   warps=(4, 8, 16, 32)) -> tuple[dict, KernelPicks]:
    """Microseconds per call of the sampling kernel over a `vocab`-wide row pair at each warp count,
    inside a CUDA graph over 64 calls. Returns them, and `picks` with the fastest."""
    sampling = DeviceSampling(device)
    sampling.set(SamplingParams())
    logits = [fused_matvec.aligned_rows(2 * utterances, vocab, device=device, dtype=torch.bfloat16).normal_(0, 3)
              for _ in range(64)]  # as the speech head writes them
    seen = torch.rand(utterances, vocab, device=device) < 0.05
    noise = torch.empty(utterances, vocab, device=device).exponential_(1)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    block = fused_sampling.blocks(vocab)[0]
    found = dict(vocab=vocab, block=block, warps={})
    for count in warps:
        found["warps"][str(count)] = time_in_graph(
            [lambda i=i: fused_sampling.triton_sample(logits[i], seen, sampling, noise, nonfinite, warps=count)
             for i in range(len(logits))]) * 1e6
    best = min(found["warps"], key=found["warps"].get)
    found["best"], found["best_us"] = int(best), found["warps"][best]
    return found, picks.with_pick("sampling", SamplingConfig(int(best)))


# What `layer_sweep` tries: tile sizes, warps and programs per SM around the default.
LAYER_CONFIGS = tuple(LayerConfig(tile * 2**10, warps, per_sm)
                      for tile in (8, 16, 32) for warps in (4, 8, 16) for per_sm in (1, 2))


def layer_sweep(t3, capacity: int, picks: KernelPicks, rows: int = 2, dtype: torch.dtype = torch.bfloat16,
                configs=LAYER_CONFIGS) -> tuple[dict, KernelPicks]:
    """Microseconds per layer at the last slot of a `capacity`-slot cache, inside a CUDA graph over
    every layer of a `dtype` copy of `t3` (as many weights as a step reads, so L2 holds none of
    them): the five kernels of the `dependent_launch` step, this kernel with one launch per phase,
    then persistent in each config the SMs can hold at once. Returns them, and `picks` with the
    fastest as the layer pick."""
    device = t3.speech_head.weight.device
    pdl = fused_matvec.dependent_launch_supported(device)
    model = t3_in_dtype(copy.deepcopy(t3), dtype)  # a copy: the caller's model stays as it was
    # The plan of those steps alone: the sweep launches the kernels directly, as dependents where it can.
    plan = replace(DecodePlan.resolve({"static_cache", "fused_projections", "fused_matvec", "fused_attention",
                                       "persistent_layers"}, device), launch="dependent" if pdl else "plain")
    forward = StaticT3Forward(model, capacity, plan, batch=rows)
    for buffer in (*forward.cache.keys, *forward.cache.values):
        buffer.normal_()
    positions = torch.full((1,), capacity - 1, device=device)
    x = torch.randn(rows, 1, model.cfg.hidden_size, device=device, dtype=dtype)

    def timed(layer):
        return time_in_graph([lambda i=i: layer(i) for i in range(len(forward.layers))]) * 1e6

    found = dict(capacity=capacity,
                 kernel_per_call_us=timed(lambda i: forward._layer(i, forward.layers[i], x, positions, slice(None),
                                                                  None, None)),
                 kernel_per_call_dependent_launch=pdl,
                 phase_launches_us=timed(lambda i: forward.whole_layer(i, x, positions, persistent=False)),
                 configs={}, refused={})
    for config in configs:
        name = name_of(config)
        try:
            found["configs"][name] = timed(lambda i: forward.whole_layer(i, x, positions, config=config))
        except RuntimeError as refused:  # more programs than the SMs hold: never launched
            found["refused"][name] = str(refused)
    best = min(found["configs"], key=found["configs"].get)
    found["best"], found["best_us"] = best, found["configs"][best]
    return found, picks.with_pick("layer", config_named(best))
