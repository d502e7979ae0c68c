"""The benchmark: every rung in one process, on one device, with the same text, voice and token count.

For each rung: two warm-up syntheses (the first one's extra time over a warm run
is the compile / warm-up cost), then `repeats` timed syntheses (median reported),
the peak device memory over them, and per-token kernel and launch counts from two
profiled T3 runs (never timed), taken once everything is timed. T3 is reported as
true speech tokens per second of decode (25 tokens = 1 s of audio); end to end
separately.

Rungs run in ladder order. The bf16 rung casts the model's T3 in place (one copy
of the weights on the device, so peak memory is that rung's own), which is why
upstream fp32 and the fp32 equivalence checks run first.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chatterbox_lab import registry
from chatterbox_lab.decode import precision
from chatterbox_lab.decode.decoder import T3Decoder, prompt_len_for, text_tokens_for
from chatterbox_lab.decode.plan import device_kind, unsupported_steps
from chatterbox_lab.kernels.picks import KernelPicks, shipped_for
from chatterbox_lab.kernels.quantized import FORMATS as EIGHT_BIT_FORMATS
from chatterbox_lab.measure import equivalence, flops, memory, profiling, quality, roofline, torchao_baseline
from chatterbox_lab.measure.equivalence import DEFAULT_TEXT
from chatterbox_lab.records import report, results
from chatterbox_lab.records.report import batch_table, summary_table  # noqa: F401 (the bench's tables)
from chatterbox_lab.tuning import chain_tuning, sweeps
from chatterbox_lab.decode.kv_cache import cache_len_for
from chatterbox_lab.loading.models import load_tts, resolve_device
from chatterbox_lab.pipeline.synthesis import TOKENS_PER_SECOND, Synthesis, synthesize, upstream_t3
from chatterbox_lab.s3gen.s3gen_steps import (HALF_FLOW_TOLERANCE, S3GEN_STEPS, apply_s3gen_steps,
                                              check_s3gen_steps, fewer_flow_steps_error, half_flow_error,
                                              s3gen_steps_of)
from chatterbox_lab.sampling import SamplingParams
from chatterbox_lab.validation import check_flow_steps
from chatterbox_lab.pipeline.voices import prepare_voice, voice_path

# A rung is a named set of T3 steps. `upstream_fp32` is upstream's own loop; a step's name is that
# step and every non-experimental step before it in ladder order; an experimental step's name is
# `recommended` with that step added; `recommended` is the registry's preset for the device; a
# torchao rung is the `compiled` rung's steps on a copy of T3 that torchao quantized
# (`torchao_baseline`). Timed in this order: the fp32 rungs first (bf16 casts T3 in place),
# `recommended` last, so the batches, the stream, the many utterances and S3Gen's rungs decode with it.
_SUPPORTED = tuple(n for n in registry.T3_STEPS if registry.STEPS[n].status != "experimental")
EXPERIMENTAL_RUNGS = tuple(n for n in registry.T3_STEPS if registry.STEPS[n].status == "experimental")
TORCHAO_RUNGS = torchao_baseline.RUNGS
RUNGS = ("upstream_fp32", *_SUPPORTED, *EXPERIMENTAL_RUNGS, *TORCHAO_RUNGS, "recommended")
# What `--ladder` (so `make bench`) runs: upstream, the guide's four rungs and the recommended set.
LADDER_RUNGS = ("upstream_fp32", *registry.GUIDE, "recommended")
# Steps whose Triton kernels sum in their own order: checked by logits and by tokens for the same
# random draws, not by fp32 identity with upstream.
KERNEL_STEPS = tuple(n for n in registry.T3_STEPS if not registry.STEPS[n].exact)


def rung_status(rung: str) -> str:
    """"upstream", or the status of the rung's step in the registry (`recommended` for that rung)."""
    if rung == "upstream_fp32":
        return "upstream"
    if rung in TORCHAO_RUNGS:
        return "library"
    return "recommended" if rung == "recommended" else registry.STEPS[rung].status


def rung_steps(rung: str, device: str | None = None) -> frozenset:
    """The T3 steps of `rung` on `device`, less those it cannot run (so later rungs still run there)."""
    device = resolve_device(device)
    if rung == "upstream_fp32":
        return frozenset()
    recommended = frozenset(registry.preset("recommended", device_kind(device)))
    if rung == "recommended":
        return recommended
    if rung in TORCHAO_RUNGS:
        return rung_steps("compiled", device)
    if rung in EXPERIMENTAL_RUNGS:
        steps = recommended | {rung} | registry.requirements(rung)
    else:
        steps = frozenset(_SUPPORTED[: _SUPPORTED.index(rung) + 1])
    return steps - unsupported_steps(device)


# Token counts of the two profiled T3 runs whose difference gives per-token counts.
PROFILE_TOKENS = (8, 24)


@dataclass
class BenchConfig:
    source: str = "synthetic"
    preset: str | None = None      # full on a GPU, tiny on a CPU
    device: str | None = None
    tokens: int | None = None      # 256 on a GPU, 32 on a CPU
    repeats: int | None = None     # 3 on a GPU, 2 on a CPU
    rungs: tuple = ("upstream_fp32",)
    text: str = DEFAULT_TEXT
    voice: str = "alto"
    seed: int = 0
    profile: bool = True
    # Tune the kernels on the card before the rungs: each kernel's sweep, then the chain tuning inside
    # the captured step. Off, the rungs run with `picks` (by default the ones shipped for this card
    # model, else the kernels' defaults), as a user's session does.
    tune: bool = False
    checks: bool = False
    trace_dir: str | None = None
    batch_sizes: tuple = ()        # utterances decoded together, measured with the last rung's steps
    batch_rungs: tuple = ()        # and with each of these rungs' steps too (an 8-bit cache against bf16)
    stream: bool = False           # also time streamed speech (first audio) with the last rung's steps
    many: int = 0                  # also synthesize this many utterances together (x_realtime)
    many_flow_steps: int | None = None  # and again with this many Euler steps of the flow (not 10)
    stream_chunk_tokens: int = 32
    s3gen_steps: tuple = ()        # S3Gen rungs after the T3 rungs, with the last T3 rung's decoder
    # A record of this card whose chain-tuned picks the rungs run with (and the tuning starts from).
    tune_from: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    picks: KernelPicks | None = None  # resolved: from tune_from, else shipped for the card

    def resolved(self) -> "BenchConfig":
        device = resolve_device(self.device)
        on_gpu = device.startswith("cuda")
        unknown = [r for r in self.rungs if r not in RUNGS]
        if unknown:
            raise ValueError(f"unknown rungs {unknown}: choose from {', '.join(RUNGS)}")
        tokens = self.tokens if self.tokens is not None else (256 if on_gpu else 32)
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        repeats = self.repeats if self.repeats is not None else (3 if on_gpu else 2)
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        ordered = tuple(r for r in RUNGS if r in self.rungs)
        if any(n < 1 for n in self.batch_sizes):
            raise ValueError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")
        last = ordered[-1] if ordered else "upstream_fp32"
        if (self.batch_sizes or self.many) and "embed_cache" not in rung_steps(last, device):
            raise ValueError("batching needs a last rung at or past embed_cache (e.g. --ladder)")
        unbatched = [r for r in self.batch_rungs if r not in RUNGS or r in TORCHAO_RUNGS
                     or "embed_cache" not in rung_steps(r, device)]
        if unbatched:
            raise ValueError(f"batch rungs {unbatched} cannot batch: give rungs of ours at or past embed_cache")
        if self.batch_rungs and not self.batch_sizes:
            raise ValueError("batch rungs are measured at the batch sizes: give those too (--batch N ...)")
        if self.stream and last == "upstream_fp32":
            raise ValueError("streaming needs a decoder rung as the last one (e.g. --ladder)")
        s3gen_steps = tuple(step for step in S3GEN_STEPS if step in check_s3gen_steps(self.s3gen_steps))
        if self.many < 0:
            raise ValueError(f"--many must be >= 0, got {self.many}")
        check_flow_steps(self.many_flow_steps)
        if self.many_flow_steps is not None and not self.many:
            raise ValueError("--many-flow-steps compares against --many N: give both")
        if self.tune_from is not None:
            picks = chain_tuning.picks_from(results.load(Path(self.tune_from)), _gpu_name(device))
        else:
            picks = self.picks or shipped_for(_gpu_name(device))
        return BenchConfig(**{**asdict(self), "device": device, "tokens": tokens, "repeats": repeats,
                              "rungs": ordered, "s3gen_steps": s3gen_steps,
                              "sampling": self.sampling, "picks": picks})


def _gpu_name(device: str) -> str | None:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else None


def _peak_mib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _peak_reserved_mib(device: str) -> float | None:
    """The allocator's peak reservation: tensors plus cached free blocks and graph pools."""
    return torch.cuda.max_memory_reserved(device) / 2**20 if device.startswith("cuda") else None


def _allocated_mib(device: str) -> float | None:
    """Device memory held by tensors now (weights, caches, graph pools), MiB."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _capacity(tts, cfg: BenchConfig) -> int:
    """KV-cache slots for the benchmark's text and token count (and the profile's, if longer)."""
    return cache_len_for(prompt_len_for(tts.t3, text_tokens_for(tts, cfg.text)), max(cfg.tokens, PROFILE_TOKENS[1]))


def _t3_steps(cfg: BenchConfig) -> frozenset:
    """The last T3 rung's steps (`recommended`, where it runs): what batches, streams and S3Gen rungs
    decode with."""
    return rung_steps(cfg.rungs[-1], cfg.device)


def _median(values):
    return statistics.median(values) if values else None


def measure_rung(tts, rung: str, cfg: BenchConfig, voice: Path, bar=None, bandwidth: float | None = None,
                 decoder: T3Decoder | None = None) -> dict:
    """Warm up and time `cfg.repeats` syntheses of one rung (with `decoder`, if given, built for its
    steps); returns its figures. Not profiled: `run` profiles every rung once all are timed."""
    figures, _ = measure_steps(tts, rung_steps(rung, cfg.device), replace(cfg, profile=False), voice, bar, bandwidth,
                               decoder=decoder)
    return figures


def measure_steps(tts, steps, cfg: BenchConfig, voice: Path, bar=None, bandwidth: float | None = None,
                  trace: Path | None = None, decoder: T3Decoder | None = None,
                  cached_voice: bool = False) -> tuple[dict, Synthesis]:
    """Warm up, time `cfg.repeats` syntheses and profile T3 with `steps` switched on (none: upstream's
    own loop), or with `decoder`, built for those steps earlier (its construction is then not in
    `compile_s`; its compile and capture, on first use, are). Returns the figures and the first
    timed synthesis. `bar`: anything with tqdm's `update()`, called after the warm-up and after
    each timed synthesis. `cached_voice`: also time the same requests with the voice already
    prepared (`figures["cached_voice"]`)."""
    text_tokens = text_tokens_for(tts, cfg.text)
    prompt_len = prompt_len_for(tts.t3, text_tokens)
    build_start = time.perf_counter()
    if steps and decoder is None:
        decoder = T3Decoder(tts.t3, steps, max_cache_len=_capacity(tts, cfg), picks=cfg.picks)
    build_s = time.perf_counter() - build_start

    def run(n_tokens=cfg.tokens, seed=cfg.seed, voice=voice):
        torch.manual_seed(seed)
        return synthesize(tts, cfg.text, voice=voice, decoder=decoder, max_new_tokens=n_tokens,
                          sampling=cfg.sampling)

    first = run()
    # Untimed as well: in the records before this second warm-up, the first timed synthesis of the
    # multi-step rungs was their slowest, by 1-3% (the first warm-up captures the graph of a
    # decode's first run of steps, but does not replay it).
    run()
    if bar:
        bar.update()
    _reset_peak(cfg.device)
    runs = []
    for i in range(cfg.repeats):
        runs.append(run(seed=cfg.seed + i))
        if bar:
            bar.update()
    peak = _peak_mib(cfg.device)

    t3_s = [r.seconds["t3"] for r in runs]
    figures = dict(
        t3_decode_tok_s=_median([r.t3_steps / r.t3_decode_s for r in runs]),
        t3_prefill_s=_median([r.t3_prefill_s for r in runs]),
        e2e_s=_median([r.e2e_s for r in runs]),
        audio_s=_median([r.audio_s for r in runs]),
        rtf=_median([r.e2e_s / r.audio_s for r in runs]),
        peak_vram_mib=peak,
        compile_s=max(0.0, build_s + first.seconds["t3"] - _median(t3_s)),
        tokens=runs[0].t3_steps,
        audio_s_per_token=1 / TOKENS_PER_SECOND,
        stages_s={stage: _median([r.seconds[stage] for r in runs]) for stage in runs[0].seconds},
        raw=dict(
            warmup_stages_s=first.seconds,
            stages_s=[r.seconds for r in runs],
            t3_prefill_s=[r.t3_prefill_s for r in runs],
            t3_decode_s=[r.t3_decode_s for r in runs],
            t3_steps=[r.t3_steps for r in runs],
        ),
    )
    figures["s3gen_warmup_s"] = report.s3gen_warmup_s(figures)
    if cached_voice:
        # As a server with a voice cache serves a request: the voice prepared already (by the
        # last run), so neither its conditioning time nor its encoders' memory is in the figures.
        resident = _allocated_mib(cfg.device)
        _reset_peak(cfg.device)
        resident_parts = memory.resident_parts_mib(tts, decoder)
        cached = [run(seed=cfg.seed + i, voice=None) for i in range(cfg.repeats)]
        figures["cached_voice"] = dict(
            e2e_s=_median([r.e2e_s for r in cached]), rtf=_median([r.e2e_s / r.audio_s for r in cached]),
            peak_vram_mib=_peak_mib(cfg.device), peak_reserved_mib=_peak_reserved_mib(cfg.device),
            resident_before_mib=resident, resident_parts_mib=resident_parts,
            stages_s={stage: _median([r.seconds[stage] for r in cached]) for stage in cached[0].seconds},
            raw=dict(e2e_s=[r.e2e_s for r in cached], audio_s=[r.audio_s for r in cached]))
    if bandwidth:
        plan = decoder.plan if decoder is not None else None
        figures.update(floor_figures(tts, bandwidth, prompt_len, figures,
                                     plan.weights if plan and plan.weights in EIGHT_BIT_FORMATS else None,
                                     plan.cache_format if plan else "model"))
    if decoder is not None:
        figures["kv_cache_mib"] = decoder.forward.cache.nbytes() / 2**20 if decoder.forward else None
    if cfg.profile:
        figures.update(profile_steps(tts, steps, cfg, trace, decoder))
    return figures, runs[0]


def floor_figures(tts, bandwidth: float, prompt_len: int, figures: dict, weights_format: str | None,
                  cache_format: str) -> dict:
    """The memory floor of a rung's decode with its weights and cache in their formats (8-bit ones
    read half the bytes), and the rung's share of it."""
    found = roofline.floor(tts.t3, bandwidth, prompt_len, figures["tokens"], weights_format, cache_format)
    return dict(found, weights_format=weights_format or "model", cache_format=cache_format,
                fraction_of_floor=figures["t3_decode_tok_s"] / found["floor_tok_s"])


def profile_steps(tts, steps, cfg: BenchConfig, trace: Path | None = None, decoder: T3Decoder | None = None) -> dict:
    """Per-token kernel and launch counts of T3 with `steps` switched on (none: upstream's own loop),
    or with `decoder`, built for those steps, from two profiled decodes of the voice prepared last;
    `trace`: where to write the shorter one's trace."""
    text_tokens = text_tokens_for(tts, cfg.text)
    if steps and decoder is None:
        decoder = T3Decoder(tts.t3, steps, max_cache_len=_capacity(tts, cfg), picks=cfg.picks)

    def t3_only(n):
        torch.manual_seed(cfg.seed)
        if decoder is None:
            upstream_t3(tts, text_tokens, n, cfg.sampling)
        else:
            decoder.generate(tts.conds.t3, text_tokens, n, cfg.sampling)

    counts = profiling.per_token_counts(t3_only, *PROFILE_TOKENS, trace_path=trace)
    on_gpu = cfg.device.startswith("cuda")
    figures = dict(gpu_kernels_per_token=counts["gpu_kernels"] if on_gpu else None,
                   host_launches_per_token=counts["host_launches"] if on_gpu else None,
                   graph_launches_per_token=counts["graph_launches"], cpu_ops_per_token=counts["cpu_ops"])
    if trace:
        figures["trace"] = str(trace)
    return figures


def measure_s3gen_rungs(tts, cfg: BenchConfig, voice: Path, doc: dict, decoder: T3Decoder | None, bar=None,
                        bandwidth: float | None = None, partial: Path | None = None) -> None:
    """Each of `cfg.s3gen_steps` switched on in turn (they stay on), every one measured end to end
    with `decoder`, the last T3 rung's (None: upstream's loop), already compiled. Before
    `flow_half`, while the flow is still fp32, the mel error it brings is measured into the
    checks: it is what that rung trades for speed."""
    t3_steps = _t3_steps(cfg)
    if "flow_half" in cfg.s3gen_steps and "flow_half" not in s3gen_steps_of(tts):
        prepare_voice(tts, voice)
        tokens = torch.randint(0, 6561, (cfg.tokens,), generator=torch.Generator().manual_seed(cfg.seed))
        error = half_flow_error(tts, tokens.to(tts.device), cfg.seed)
        doc["checks"].update(half_flow_mel_rel_error=error, half_flow_tolerance=HALF_FLOW_TOLERANCE,
                             half_flow_within_tolerance=error <= HALF_FLOW_TOLERANCE)
    for step in cfg.s3gen_steps:
        apply_s3gen_steps(tts, [step])
        figures, _ = measure_steps(tts, t3_steps, replace(cfg, profile=False), voice, bar, bandwidth,
                                   decoder=decoder, cached_voice=True)
        doc["rungs"][step] = dict(figures, t3_steps=sorted(t3_steps), s3gen_steps=sorted(s3gen_steps_of(tts)))
        if partial:
            results.write(doc, partial, overwrite=True)


def measure_batch(tts, cfg: BenchConfig, streams: int, steps=None) -> dict:
    """`streams` utterances decoded together with `steps` (None: the last rung's), all to `cfg.tokens`."""
    text_tokens = text_tokens_for(tts, cfg.text)
    capacity = _capacity(tts, cfg)
    build_start = time.perf_counter()
    decoder = T3Decoder(tts.t3, _t3_steps(cfg) if steps is None else steps, max_cache_len=capacity, streams=streams,
                        picks=cfg.picks)
    build_s = time.perf_counter() - build_start

    def run(seed):
        torch.manual_seed(seed)
        return decoder.generate_batch([tts.conds.t3] * streams, [text_tokens] * streams, cfg.tokens,
                                      cfg.sampling, stop_on_eos=False)

    first = run(cfg.seed)
    _reset_peak(cfg.device)
    runs = [run(cfg.seed + i) for i in range(cfg.repeats)]
    decode_s = [r.decode_s for r in runs]
    return dict(
        streams=streams,
        aggregate_tok_s=_median([r.aggregate_tok_s for r in runs]),
        per_stream_tok_s=_median([r.decode_tok_s for r in runs]),
        ms_per_step=1e3 * _median(decode_s) / cfg.tokens,
        t3_prefill_s=_median([r.prefill_s for r in runs]),
        peak_vram_mib=_peak_mib(cfg.device),
        kv_cache_mib=decoder.forward.cache.nbytes() / 2**20,
        compile_s=max(0.0, build_s + first.prefill_s + first.decode_s - _median([r.prefill_s + r.decode_s for r in runs])),
        raw=dict(decode_s=decode_s, prefill_s=[r.prefill_s for r in runs], steps=[r.steps_run for r in runs]),
    )


def measure_stream(tts, cfg: BenchConfig, voice: Path) -> dict:
    """One utterance with the last rung's steps, streamed, the voice already prepared: time to
    the first audio and to the last, from the request; how long playback started at the first
    audio would wait for later pieces (`wait_s`, summed over the utterance); and the seams' error
    against the same tokens made into one waveform (unwatermarked, seeded alike)."""
    from chatterbox_lab.pipeline.streaming import FIRST_CHUNK_TOKENS, playback_waits, seam_error, stream_speech

    prepare_voice(tts, voice)
    decoder = T3Decoder(tts.t3, _t3_steps(cfg), max_cache_len=_capacity(tts, cfg), picks=cfg.picks)

    def run(seed, watermark=True):
        torch.manual_seed(seed)
        return list(stream_speech(tts, cfg.text, decoder=decoder, max_new_tokens=cfg.tokens, sampling=cfg.sampling,
                                  chunk_tokens=cfg.stream_chunk_tokens, first_chunk_tokens=FIRST_CHUNK_TOKENS,
                                  watermark=watermark))

    run(cfg.seed)
    runs = [run(cfg.seed + i) for i in range(cfg.repeats)]
    audio_s = [sum(len(p.wav) for p in pieces) / pieces[0].sample_rate for pieces in runs]
    streamed = np.concatenate([p.wav for p in run(cfg.seed, watermark=False)])
    torch.manual_seed(cfg.seed)
    whole = synthesize(tts, cfg.text, decoder=decoder, max_new_tokens=cfg.tokens, sampling=cfg.sampling,
                       watermark=False).wav
    return dict(
        steps=sorted(_t3_steps(cfg)), s3gen_steps=sorted(s3gen_steps_of(tts)), chunk_tokens=cfg.stream_chunk_tokens,
        first_chunk_tokens=FIRST_CHUNK_TOKENS,
        first_audio_s=_median([pieces[0].ready_s for pieces in runs]),
        e2e_s=_median([pieces[-1].ready_s for pieces in runs]),
        rtf=_median([pieces[-1].ready_s / a for pieces, a in zip(runs, audio_s)]),
        wait_s=_median([sum(playback_waits(pieces)) for pieces in runs]),
        seam_error=seam_error(streamed, whole),
        first_piece_stages_s={stage: _median([pieces[0].seconds.get(stage, 0.0) for pieces in runs])
                              for stage in runs[0][0].seconds},
        raw=dict(ready_s=[[p.ready_s for p in pieces] for pieces in runs], audio_s=audio_s,
                 piece_s=[[len(p.wav) / p.sample_rate for p in pieces] for pieces in runs],
                 waits_s=[playback_waits(pieces) for pieces in runs],
                 first_piece_stages_s=[pieces[0].seconds for pieces in runs]),
    )


def measure_many(tts, cfg: BenchConfig, voice: Path, flow_steps: int | None = None) -> dict:
    """`cfg.many` utterances (voices alternating between the benchmark's and the other bundled
    one) through batched T3 and a flow run per voice and batch: seconds of audio per second of
    wall time, and where that time went. With `flow_steps`, also the flow's mel difference
    from upstream's 10 steps on the first utterance's tokens."""
    from chatterbox_lab.pipeline.synthesis import synthesize_many
    from chatterbox_lab.pipeline.voices import bundled_voices

    others = [v for v in bundled_voices() if v != voice.stem] or [voice]
    voices = [voice if i % 2 == 0 else voice_path(others[0]) for i in range(cfg.many)]
    decoder = T3Decoder(tts.t3, _t3_steps(cfg), streams=cfg.many, max_cache_len=_capacity(tts, cfg),
                        picks=cfg.picks)

    def run(seed):
        torch.manual_seed(seed)
        return synthesize_many(tts, [cfg.text] * cfg.many, voices, decoder=decoder, max_new_tokens=cfg.tokens,
                               sampling=cfg.sampling, flow_steps=flow_steps)

    run(cfg.seed)
    runs = [run(cfg.seed + i) for i in range(cfg.repeats)]
    figures = {}
    if flow_steps is not None:
        prepare_voice(tts, voice)
        figures = dict(flow_steps=flow_steps, mel_rel_difference=fewer_flow_steps_error(
            tts, runs[0].speeches[0].speech_tokens[None], flow_steps, cfg.seed))
    return dict(
        **figures, steps=sorted(_t3_steps(cfg)), s3gen_steps=sorted(s3gen_steps_of(tts)), utterances=cfg.many,
        x_realtime=_median([r.x_realtime for r in runs]), wall_s=_median([r.wall_s for r in runs]),
        audio_s=_median([r.audio_s for r in runs]),
        stages_s={stage: _median([r.seconds[stage] for r in runs]) for stage in runs[0].seconds},
        raw=dict(wall_s=[r.wall_s for r in runs], audio_s=[r.audio_s for r in runs],
                 stages_s=[r.seconds for r in runs]),
    )


def run_checks(tts, cfg: BenchConfig, progress: bool = False) -> dict:
    """fp32 token identity of every step set below bf16 (run before the model is cast)."""
    text_tokens = text_tokens_for(tts, cfg.text)
    n = min(cfg.tokens, 64)
    step_sets = [(), ("static_cache",), ("embed_cache",), ("static_cache", "embed_cache"),
                 ("static_cache", "embed_cache", "compiled"), ("static_cache", "embed_cache", "fused_projections"),
                 ("static_cache", "embed_cache", "compiled", "fused_projections", "sampling_in_graph"),
                 # Every step whose math is upstream's: not bf16, no kernel step nor one that needs it.
                 tuple(step for step in registry.T3_STEPS
                       if step != "bf16" and not ({step} | registry.requirements(step)) & set(KERNEL_STEPS))]
    forced = equivalence.seeded_tokens(tts, text_tokens, n, cfg.seed)
    identity = equivalence.token_identity(tts, text_tokens, step_sets, n, seed=cfg.seed, reference=forced,
                                          progress=progress)
    reference = equivalence.reference_logits(tts, text_tokens, forced)
    return dict(fp32_token_identity=identity, fp32_tokens_checked=n, forced=forced, reference=reference)


# Teacher-forced logits against the fp32 reference: bf16 with PyTorch's matmuls, and bf16
# with the fused kernels (on the CPU these are the same computation).
LOGIT_CHECKS = {"bf16": ("bf16", "static_cache", "embed_cache"),
                "fused_matvec": ("bf16", "static_cache", "embed_cache", "fused_projections", "fused_matvec"),
                "fused_attention": ("bf16", "static_cache", "embed_cache", "fused_projections", "fused_matvec",
                                    "fused_attention"),
                "persistent_layers": ("bf16", "static_cache", "embed_cache", "fused_projections", "fused_matvec",
                                      "fused_attention", "persistent_layers")}


def bf16_logit_error(tts, text_tokens, forced, reference, steps=LOGIT_CHECKS["bf16"]) -> float:
    decoder = T3Decoder(tts.t3, steps)
    return equivalence.relative_error(
        equivalence.forced_logits(decoder, tts.conds.t3, text_tokens, forced), reference)


def _chain_steps(cfg: BenchConfig) -> frozenset:
    """The steps whose captured chain `configure_chain` tunes: the last rung's, less those the chain
    tuning runs without (`chain_tuning.tuned_steps`)."""
    return chain_tuning.tuned_steps(_t3_steps(cfg))


def configure_chain(tts, cfg: BenchConfig, voice: Path) -> tuple[dict, KernelPicks]:
    """`chain_tuning.tune` on a decoder with `_chain_steps` decoding the benchmark's text, every token
    (no stop), starting from `cfg.picks`. Returns the record's "chain_sweep" section (what the tuning
    tried) and the tuned picks, which every rung measured after it runs with."""
    decoder = T3Decoder(tts.t3, _chain_steps(cfg), max_cache_len=_capacity(tts, cfg), picks=cfg.picks)
    prepare_voice(tts, voice)
    text_tokens = text_tokens_for(tts, cfg.text)

    def decode():
        torch.manual_seed(cfg.seed)
        return decoder.generate(tts.conds.t3, text_tokens, cfg.tokens, cfg.sampling,
                                stop_on_eos=False).decode_tok_s

    found = chain_tuning.tune(decoder, decode)
    found["steps"] = sorted(_chain_steps(cfg))
    found["started_from"] = cfg.picks.source
    picks = replace(decoder.picks, source="chain tuning in this run", gpu=_gpu_name(cfg.device))
    decoder = None  # its cache and graphs freed before the rungs (`decode` reads this same name)
    gc.collect()
    torch.cuda.empty_cache()
    return found, picks


def run(config: BenchConfig, progress: bool = True, tts=None, partial: Path | None = None) -> dict:
    """Every rung, then the batch sizes. `partial`: rewritten after each measurement, so a run
    cut short still leaves what it measured."""
    cfg = config.resolved()
    # The library baseline is optional: its rungs are left out, saying why, where it cannot run.
    skipped = {rung: why for rung in cfg.rungs if rung in TORCHAO_RUNGS
               and (why := torchao_baseline.missing_reason(rung, cfg.device))}
    for why in skipped.values():
        print(f"skipped: {why}", file=sys.stderr)
    cfg = replace(cfg, rungs=tuple(rung for rung in cfg.rungs if rung not in skipped))
    if not cfg.rungs:
        raise ValueError("every rung asked for was skipped (above): nothing to measure")
    start = time.perf_counter()
    if tts is None:
        tts = load_tts(cfg.source, preset=cfg.preset, device=cfg.device)
    load_s = time.perf_counter() - start
    voice = voice_path(cfg.voice)
    doc = dict(schema=results.SCHEMA, provenance=results.provenance(
        device=cfg.device, preset=tts.preset, text=cfg.text, tokens=cfg.tokens, repeats=cfg.repeats,
        voice=voice.name, seed=cfg.seed, source=str(cfg.source), synthetic=tts.synthetic,
        sampling=asdict(cfg.sampling), load_s=load_s), rungs={}, checks={})
    if skipped:
        doc["skipped_rungs"] = skipped

    bandwidth = roofline.copy_bandwidth(cfg.device)
    flop_rate = roofline.matmul_rate(cfg.device)
    doc["roofline"] = dict(copy_bandwidth_gb_s=bandwidth / 1e9,
                           method="median of 10 timed copies of a 2 GiB (GPU) / 256 MiB (CPU) "
                                  "random tensor, bytes read + written",
                           matmul_tflops=flop_rate / 1e12,
                           matmul_method="median of 10 timed 8192^3 fp16 matmuls (GPU) / 512^3 fp32 (CPU)")
    if cfg.many and not s3gen_steps_of(tts):
        # Counted before any rung: the counter cannot see into graphs or compiled code.
        prepare_voice(tts, voice)
        doc["flops"] = dict(per_utterance=flops.utterance_flops(tts, cfg.text, cfg.tokens, cfg.sampling),
                            audio_s=cfg.tokens / TOKENS_PER_SECOND,
                            method="torch.utils.flop_counter on upstream's eager modules, one utterance")
        if cfg.many_flow_steps is not None:
            doc["flops"]["s3gen_flow_with_many_flow_steps"] = flops.flow_flops(tts, cfg.tokens, cfg.many_flow_steps)

    every_step = set().union(*(rung_steps(rung, cfg.device) for rung in cfg.rungs))
    if cfg.tune and cfg.device.startswith("cuda"):
        # Each kernel on its own first, before any rung is timed; recorded. A sweep's pick replaces
        # the starting one only where the chain tuning (after it) does not tune that knob.
        picks = cfg.picks
        if "fused_matvec" in every_step:
            doc["matvec_sweep"], swept = sweeps.matvec_sweep(tts.t3, picks)
            picks = picks if cfg.tune_from else swept  # a record's picks start the chain tuning instead
        if "fused_attention" in every_step:
            doc["attention_sweep"], swept = sweeps.attention_sweep(tts.t3, _capacity(tts, cfg), picks)
            picks = picks if cfg.tune_from else swept
        if "fused_sampling" in every_step:
            doc["sampling_sweep"], picks = sweeps.sampling_sweep(tts.t3.hp.speech_tokens_dict_size, cfg.device,
                                                                 picks)
        if "persistent_layers" in every_step:
            doc["layer_sweep"], picks = sweeps.layer_sweep(tts.t3, _capacity(tts, cfg), picks)
        cfg = replace(cfg, picks=picks)

    checks = None
    if cfg.checks:
        prepare_voice(tts, voice)
        checks = run_checks(tts, cfg, progress)
        doc["checks"]["fp32_token_identity"] = checks["fp32_token_identity"]
        doc["checks"]["fp32_tokens_checked"] = checks["fp32_tokens_checked"]

    # Every figure is timed before any rung is profiled: a profiler session leaves the process's
    # later decodes slower (on an H100, by half a percent and more, CUPTI torn down or not), and
    # a rung timed after another's profile would carry that. The profile of upstream's loop needs
    # T3 in fp32, which the bf16 rungs cast in place: a host copy puts it back.
    casts = any("bf16" in rung_steps(rung, cfg.device) for rung in cfg.rungs)
    kept = precision.weights_restored(tts.t3) if cfg.profile and "upstream_fp32" in cfg.rungs and casts \
        else contextlib.nullcontext()
    # The 8-bit rungs' quality is measured against upstream's fp32 logits, computed while T3 is fp32.
    reference = None
    if any(rung in quality.EIGHT_BIT_STEPS for rung in cfg.rungs):
        prepare_voice(tts, voice)
        reference = quality.fp32_reference(tts, text_tokens_for(tts, cfg.text), cfg.tokens, cfg.seed)
        doc["quality"] = {}
    with kept:
        cfg = _time_everything(tts, cfg, voice, doc, checks, bandwidth, flop_rate, progress, partial, reference)
    doc["picks"] = cfg.picks.to_json()
    doc["provenance"]["run_s"] = time.perf_counter() - start  # the whole run, the model's load included
    if cfg.profile:
        prepare_voice(tts, voice)
        for rung in tqdm(cfg.rungs, desc="profile", disable=not progress):
            trace = profiling.trace_path_for(cfg.trace_dir, rung) if cfg.trace_dir else None
            doc["rungs"][rung].update(profile_steps(tts, rung_steps(rung, cfg.device), cfg, trace,
                                                    _torchao_decoder(tts, rung, cfg)))
    if "upstream_fp32" in doc["rungs"]:
        base = doc["rungs"]["upstream_fp32"]["t3_decode_tok_s"]
        for figures in doc["rungs"].values():
            figures["t3_speedup_vs_upstream"] = figures["t3_decode_tok_s"] / base
    return results.validate(doc)


def _torchao_decoder(tts, rung: str, cfg: BenchConfig) -> T3Decoder | None:
    """For a torchao rung, a decoder on its quantized copy of T3; None for any other rung."""
    if rung not in TORCHAO_RUNGS:
        return None
    return torchao_baseline.decoder(tts.t3, rung, rung_steps(rung, cfg.device), max_cache_len=_capacity(tts, cfg))


def _time_everything(tts, cfg: BenchConfig, voice: Path, doc: dict, checks: dict | None,
                     bandwidth: float | None, flop_rate: float | None, progress: bool,
                     partial: Path | None, reference: dict | None = None) -> BenchConfig:
    """Every rung, then the S3Gen rungs, the batch sizes, the stream and the many utterances, timed
    into `doc` (with the checks that need the bf16 model, after the fp32 rungs). Returns `cfg` with
    the picks the rungs ran with (tuned, with `cfg.tune`). `reference`: `quality.fp32_reference`,
    which the 8-bit rungs' quality is measured against."""
    total = (len(cfg.rungs) + len(cfg.s3gen_steps)) * (cfg.repeats + 1)
    decoder = None
    # Tuned in the chain (or set to a record's picks) just before the first captured rung: after the
    # fp32 rungs, since the last rung's decoder casts T3 to bf16 in place.
    chain_rung = next((r for r in cfg.rungs if "captured_graph" in rung_steps(r, cfg.device)), None) \
        if cfg.tune and cfg.device.startswith("cuda") and "captured_graph" in _chain_steps(cfg) else None
    with tqdm(total=total, desc="bench", disable=not progress) as bar:
        for rung in cfg.rungs:
            bar.set_postfix_str(rung)
            if rung == chain_rung:
                doc["chain_sweep"], picks = configure_chain(tts, cfg, voice)
                cfg = replace(cfg, picks=picks)
            if rung != "upstream_fp32" and checks is not None and "bf16_logit_rel_error" not in doc["checks"]:
                text_tokens = text_tokens_for(tts, cfg.text)
                for name, steps in LOGIT_CHECKS.items():
                    err = bf16_logit_error(tts, text_tokens, checks["forced"], checks["reference"], steps)
                    doc["checks"].update({f"{name}_logit_rel_error": err,
                                          f"{name}_within_tolerance": err <= equivalence.BF16_LOGIT_TOLERANCE})
                doc["checks"]["bf16_logit_tolerance"] = equivalence.BF16_LOGIT_TOLERANCE
            # The S3Gen rungs decode with the last T3 rung's decoder, compiled once for both.
            if cfg.s3gen_steps and rung == cfg.rungs[-1] and rung != "upstream_fp32":
                decoder = T3Decoder(tts.t3, rung_steps(rung, cfg.device), max_cache_len=_capacity(tts, cfg),
                                    picks=cfg.picks)
            doc["rungs"][rung] = measure_rung(tts, rung, cfg, voice, bar, bandwidth,
                                              _torchao_decoder(tts, rung, cfg) or decoder)
            doc["rungs"][rung]["status"] = rung_status(rung)
            if rung in TORCHAO_RUNGS and bandwidth:
                doc["rungs"][rung].update(floor_figures(
                    tts, bandwidth, prompt_len_for(tts.t3, text_tokens_for(tts, cfg.text)), doc["rungs"][rung],
                    torchao_baseline.FORMAT[rung], "model"))
            if rung in quality.EIGHT_BIT_STEPS:
                bar.set_postfix_str(f"{rung}: quality")
                doc["quality"][rung] = quality.format_quality(
                    tts, rung_steps(rung, cfg.device), rung, reference, cfg.text, cfg.tokens,
                    cfg.seed, cfg.sampling, capacity=_capacity(tts, cfg))
            # A rung's name alone does not fix its steps once steps are promoted: records of the same
            # name are compared only where these match (records/spread.py).
            doc["rungs"][rung]["t3_steps"] = sorted(rung_steps(rung, cfg.device))
            if partial:
                results.write(doc, partial, overwrite=True)
        if cfg.s3gen_steps:
            bar.set_postfix_str("S3Gen: " + ", ".join(cfg.s3gen_steps))
            measure_s3gen_rungs(tts, cfg, voice, doc, decoder, bar, bandwidth, partial)
    if cfg.batch_sizes:
        doc["batch"] = dict(steps=sorted(_t3_steps(cfg)), streams={})
        for n in tqdm(cfg.batch_sizes, desc="batch", disable=not progress):
            doc["batch"]["streams"][str(n)] = measure_batch(tts, cfg, n)
            if partial:
                results.write(doc, partial, overwrite=True)
        for rung in cfg.batch_rungs:
            steps = rung_steps(rung, cfg.device)
            found = doc.setdefault("batch_by_rung", {})[rung] = dict(steps=sorted(steps), streams={})
            for n in tqdm(cfg.batch_sizes, desc=f"batch {rung}", disable=not progress):
                found["streams"][str(n)] = measure_batch(tts, cfg, n, steps)
                if partial:
                    results.write(doc, partial, overwrite=True)
    if cfg.stream or cfg.many:
        doc["end_to_end"] = {}
        if cfg.stream:
            doc["end_to_end"]["stream"] = measure_stream(tts, cfg, voice)
            if partial:
                results.write(doc, partial, overwrite=True)
        many_runs = {"many": None} if cfg.many else {}
        if cfg.many_flow_steps is not None:
            many_runs["many_fewer_flow_steps"] = cfg.many_flow_steps
        if many_runs:
            cache_ceiling = flops.t3_cache_ceiling_x_realtime(
                tts.t3, prompt_len_for(tts.t3, text_tokens_for(tts, cfg.text)), cfg.tokens, bandwidth)
        for kind, flow_steps in many_runs.items():
            figures = doc["end_to_end"][kind] = measure_many(tts, cfg, voice, flow_steps)
            figures["t3_cache_ceiling_x_realtime"] = cache_ceiling
            if "flops" in doc:
                counted = dict(doc["flops"]["per_utterance"])
                if flow_steps is not None:
                    counted["s3gen_flow"] = doc["flops"]["s3gen_flow_with_many_flow_steps"]
                figures["x_realtime_ceiling"] = flops.x_realtime_ceiling(counted, doc["flops"]["audio_s"],
                                                                         flop_rate)
            if partial:
                results.write(doc, partial, overwrite=True)
    return cfg
