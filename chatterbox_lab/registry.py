"""The step registry: every optimization step of T3 and S3Gen, once, with what it needs and how it measured.

Everything that lists steps reads this module: the decode plan, the bench and its ladder, the chain
tuning, the lab bench widget, the tests, the README's step table and the notebooks' tables. A step is
one `Step` record. Its `status` says where it stands:

- `guide`: one of the optimization guide's four steps;
- `recommended`: past the guide, part of the fastest set measured on a GPU;
- `experimental`: runnable and tested, but measured slower than the recommended set (`evidence` names
  the record that shows it), or not yet timed on a GPU (`unmeasured`), so no preset but `all`
  switches it on.

Its `runs_on` says where it can run: `cpu` (anywhere), `cuda` (a CUDA GPU; on a CPU the same
computation runs in PyTorch or Triton's interpreter, for tests) or `hopper` (Hopper or later GPUs
only: programmatic dependent launch, or Gluon's shared-memory copies).

This module imports nothing else of the package, so every layer may read it.
"""
from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("guide", "recommended", "experimental")
RUNS_ON = ("cpu", "cuda", "hopper")
# The ladders: the Llama T3 of the original and multilingual models, S3Gen, and Turbo's GPT-2 T3.
MODELS = ("t3", "s3gen", "turbo")


@dataclass(frozen=True)
class Step:
    name: str
    model: str                 # "t3" or "s3gen" (Turbo's ladder is the T3 steps marked `turbo`)
    status: str                # one of STATUSES
    runs_on: str               # one of RUNS_ON
    module: str                # where it is implemented, relative to the package
    summary: str               # one line, for tables
    needs: tuple = ()          # steps it builds on
    takes_over: tuple = ()     # steps it supersedes: with it on, they change nothing
    exact: bool = True         # keeps PyTorch's arithmetic: fp32 tokens identical to upstream's
    evidence: str | None = None  # for an experimental step: the record that measured it slower
    unmeasured: bool = False    # an experimental step no GPU record has timed yet (so no evidence)
    helps_on_cpu: bool = False  # part of the `recommended` preset on a CPU
    # The chain tuning runs without it: its kernels replace the tuned ones, or it changes only how
    # the captured step is replayed (every candidate recaptures, and a multi-step graph takes about
    # 16 times as long to capture).
    tuned_without: bool = False
    # Starts with a torch.compile of its own: tens of seconds from empty caches, so it pays off over
    # many requests, not one (`say` leaves it out).
    compiles: bool = False
    # Turbo's GPT-2 T3 runs this T3 step too. The others are Llama-shaped (RMSNorm, rotary positions,
    # separate q/k/v, a gated SiLU MLP, a CFG pair of rows) and do not apply to it.
    turbo: bool = False


# What 8-bit weights take over from: kernels that read weights in the model's dtype only.
_WHOLE_LAYER_AND_STAGED = ("staged_weights", "staged_head", "head_handoff", "persistent_layers")

_T3 = (
    Step("bf16", "t3", "guide", "cpu", "decode/precision.py", "T3 weights in bfloat16", turbo=True),
    Step("static_cache", "t3", "guide", "cpu", "decode/kv_cache.py",
         "fixed KV buffers and positions as device tensors", helps_on_cpu=True, turbo=True),
    Step("embed_cache", "t3", "guide", "cpu", "decode/embed_cache.py",
         "the step's input embedding as two device lookups", helps_on_cpu=True, turbo=True),
    Step("compiled", "t3", "guide", "cuda", "decode/compiled_step.py",
         "the one-token step under torch.compile as one CUDA graph", needs=("static_cache", "embed_cache"),
         turbo=True),
    Step("fused_projections", "t3", "recommended", "cpu", "decode/fused_projections.py",
         "q/k/v as one matmul and gate/up as another", needs=("static_cache",)),
    Step("sampling_in_graph", "t3", "recommended", "cuda", "decode/decoder.py",
         "sampling and the token write inside the captured step", needs=("compiled",), turbo=True),
    Step("fused_matvec", "t3", "recommended", "cuda", "kernels/fused_matvec.py",
         "each matmul of the step a Triton kernel with its norm, gate or residual folded in",
         needs=("fused_projections",), exact=False),
    Step("filled_cache_attention", "t3", "experimental", "cuda", "decode/t3_forward.py",
         "flex attention over the filled blocks of the cache only", needs=("compiled",),
         evidence="beyond/nvidia-h100-80gb-hbm3-full-20261125T1923Z.json"),
    Step("fused_attention", "t3", "recommended", "cuda", "kernels/decode_attention.py",
         "rotary, cache write and attention as one Triton kernel per layer", needs=("static_cache",),
         takes_over=("filled_cache_attention",), exact=False),
    Step("fused_sampling", "t3", "recommended", "cuda", "kernels/fused_sampling.py",
         "the in-graph sampling as one Triton kernel per utterance", needs=("sampling_in_graph",), exact=False),
    Step("captured_graph", "t3", "recommended", "cuda", "decode/compiled_step.py",
         "the hand-written step captured as a CUDA graph directly, not through torch.compile",
         needs=("fused_matvec", "fused_attention", "fused_sampling")),
    Step("dependent_launch", "t3", "recommended", "hopper", "kernels/fused_matvec.py",
         "each kernel launched as a programmatic dependent of the one before", needs=("captured_graph",)),
    Step("launch_ahead", "t3", "recommended", "hopper", "kernels/fused_matvec.py",
         "each kernel lets the next launch once all its programs have started", needs=("dependent_launch",)),
    Step("fused_bookkeeping", "t3", "recommended", "cuda", "kernels/fused_bookkeeping.py",
         "the step's bookkeeping in one prologue kernel and the sampling kernel",
         needs=("captured_graph",), exact=False),
    Step("staged_weights", "t3", "recommended", "hopper", "kernels/staged_matvec.py",
         "gate/up's weights copied into shared memory before the kernel's wait",
         needs=("launch_ahead",), exact=False),
    Step("multi_step_graph", "t3", "recommended", "cuda", "decode/compiled_step.py",
         "the steps between two stop checks replayed as one graph", needs=("captured_graph",), tuned_without=True),
    Step("staged_head", "t3", "recommended", "hopper", "kernels/staged_matvec.py",
         "the speech head's weights staged in shared memory too", needs=("staged_weights",), exact=False),
    Step("draw_aside", "t3", "recommended", "cuda", "decode/decoder.py",
         "the step's random draw on a side branch of the captured graph", needs=("fused_bookkeeping",)),
    Step("folded_prologue", "t3", "recommended", "cuda", "kernels/fused_bookkeeping.py",
         "the next step's input written by the sampling kernel; one kernel fewer per token",
         needs=("fused_bookkeeping",), exact=False),
    Step("prefill_graph", "t3", "recommended", "cuda", "decode/prefill_graph.py",
         "a lone utterance's prefill replayed from a CUDA graph per length bucket", needs=("static_cache",)),
    Step("head_handoff", "t3", "experimental", "cuda", "kernels/experimental/head_handoff.py",
         "a layer's q/k/v and attention as one kernel, handing over through counters",
         needs=("fused_matvec", "fused_attention"), exact=False, tuned_without=True,
         evidence="beyond/nvidia-h100-80gb-hbm3-full-20261126T1408Z.json"),
    Step("persistent_layers", "t3", "experimental", "cuda", "kernels/experimental/persistent_layer.py",
         "each layer as one persistent kernel with grid-wide barriers between its phases",
         needs=("fused_matvec", "fused_attention"), takes_over=("head_handoff",), exact=False, tuned_without=True,
         evidence="beyond/nvidia-h100-80gb-hbm3-full-20261126T0429Z.json"),
    # 8-bit formats (`kernels/quantized.py`): the whole-layer kernels read weights and cache in the
    # model's dtype only, and the staged kernels weights, so an 8-bit format takes over from them.
    Step("int8_weights", "t3", "experimental", "cuda", "kernels/quantized.py",
         "T3's layer and head weights as int8 with a scale per output row, widened in the matvec kernels",
         needs=("bf16", "fused_matvec"), takes_over=_WHOLE_LAYER_AND_STAGED, exact=False, unmeasured=True),
    Step("fp8_weights", "t3", "experimental", "hopper", "kernels/quantized.py",
         "the same weights as fp8 e4m3; a prefill multiplies them with cuBLAS's fp8 matmul",
         needs=("bf16", "fused_matvec"), takes_over=("int8_weights",) + _WHOLE_LAYER_AND_STAGED,
         exact=False, unmeasured=True),
    Step("int8_kv_cache", "t3", "experimental", "cuda", "decode/kv_cache.py",
         "the KV cache as int8 with a scale per slot and head, widened as attention reads it",
         needs=("static_cache",), takes_over=("head_handoff", "persistent_layers"), exact=False, unmeasured=True),
)

_S3GEN = (
    Step("flow_graphs", "s3gen", "recommended", "cuda", "s3gen/s3gen_steps.py",
         "the flow's estimator replayed from CUDA graphs per length bucket"),
    Step("flow_half", "s3gen", "recommended", "cuda", "s3gen/s3gen_steps.py",
         "the flow's estimator in float16, its mel difference measured every run", exact=False),
    Step("watermark_on_device", "s3gen", "recommended", "cuda", "s3gen/s3gen_steps.py",
         "the watermarking network on the GPU"),
    Step("encoder_graphs", "s3gen", "recommended", "cuda", "s3gen/s3gen_steps.py",
         "the flow's encoder replayed from CUDA graphs per token bucket"),
    Step("voice_encoders_on_host", "s3gen", "experimental", "cuda", "s3gen/s3gen_steps.py",
         "the speech tokenizer and speaker encoder kept in host memory between voices (saves memory)",
         evidence="e2e/nvidia-h100-80gb-hbm3-full-20261126T1116Z.json"),
    Step("hifigan_compiled", "s3gen", "recommended", "cuda", "s3gen/s3gen_steps.py",
         "HiFi-GAN's convolution stack under torch.compile", compiles=True),
    Step("flow_fused_projections", "s3gen", "recommended", "cuda", "s3gen/s3gen_steps.py",
         "the estimator's q, k and v as one matmul in each self-attention"),
    Step("flow_compiled", "s3gen", "recommended", "cuda", "s3gen/s3gen_steps.py",
         "the estimator's blocks under torch.compile, inside the flow's graphs", needs=("flow_graphs",),
         compiles=True),
)

STEPS: dict[str, Step] = {step.name: step for step in _T3 + _S3GEN}
# In ladder order: each step after the ones it needs.
T3_STEPS = tuple(step.name for step in _T3)
S3GEN_STEPS = tuple(step.name for step in _S3GEN)
TURBO_STEPS = tuple(step.name for step in _T3 if step.turbo)
GUIDE = tuple(name for name in T3_STEPS if STEPS[name].status == "guide")
PRESETS = ("guide", "recommended", "all")


def step(name: str) -> Step:
    try:
        return STEPS[name]
    except KeyError:
        raise ValueError(f"unknown step {name!r}: choose from {', '.join(STEPS)}") from None


def requirements(name: str) -> frozenset:
    """Every step `name` needs, directly or through another."""
    found = set()
    for need in step(name).needs:
        found |= {need} | requirements(need)
    return frozenset(found)


def dependents(name: str) -> frozenset:
    """Every step that needs `name`, directly or through another."""
    return frozenset(other for other in STEPS if name in requirements(other))


def ladder(model: str) -> tuple:
    """The steps of `model` (one of MODELS), in ladder order."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} of the registry: choose from {', '.join(MODELS)}")
    return {"t3": T3_STEPS, "s3gen": S3GEN_STEPS, "turbo": TURBO_STEPS}[model]


def check(names, model: str | None = None) -> frozenset:
    """`names` as a set of known steps (of `model`, if given), each with what it needs."""
    names = frozenset(names)
    known = ladder(model) if model else tuple(STEPS)
    if model == "turbo" and (llama_only := sorted(names & set(T3_STEPS) - set(known))):
        raise ValueError(f"steps {llama_only} are the original's Llama-shaped T3 steps and do not apply to "
                         f"Turbo's GPT-2 T3: choose from {', '.join(known)}")
    unknown = sorted(names - set(known))
    if unknown:
        what = f"{model} steps" if model else "steps"
        raise ValueError(f"unknown {what} {unknown}: choose from {', '.join(known)}")
    for name in sorted(names):
        missing = [need for need in step(name).needs if need not in names]
        if missing:
            raise ValueError(f"step {name!r} needs {', '.join(missing)} as well")
    return names


def runs_on(name: str, device_kind: str) -> bool:
    """Whether step `name` can run on a device of `device_kind` ("cpu", "cuda" or "hopper"). A `cuda`
    step runs on a CPU too (the same computation in PyTorch or Triton's interpreter); a `hopper`
    step needs a Hopper or later GPU."""
    return step(name).runs_on != "hopper" or device_kind == "hopper"


def preset(name: str, device_kind: str = "hopper", model: str = "t3", compiles: bool = True) -> tuple:
    """A named step set of `model`, in ladder order, for a device of `device_kind`.

    - `guide`: the guide's four steps (T3 and Turbo only);
    - `recommended`: the fastest set measured on a GPU, less what `device_kind` cannot run; on a CPU,
      the steps that help there;
    - `all`: every step `device_kind` can run, the experimental ones included.

    Without `compiles`, the steps that start with a torch.compile of their own are left out. A step
    is left out where something it needs is left out."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose from {', '.join(PRESETS)}")
    if device_kind not in RUNS_ON:
        raise ValueError(f"unknown device kind {device_kind!r}: choose from {', '.join(RUNS_ON)}")
    names = ladder(model)
    if name == "guide":
        chosen = [n for n in names if STEPS[n].status == "guide"]
    elif name == "all":
        chosen = [n for n in names if runs_on(n, device_kind)]
    elif device_kind == "cpu":
        chosen = [n for n in names if STEPS[n].helps_on_cpu]
    else:
        chosen = [n for n in names if STEPS[n].status != "experimental" and runs_on(n, device_kind)]
    if not compiles:
        chosen = [n for n in chosen if not STEPS[n].compiles]
    kept = []
    for n in chosen:
        if all(need in kept for need in STEPS[n].needs):
            kept.append(n)
    return tuple(kept)


def ladder_prefix(rung: str) -> frozenset:
    """The T3 steps switched on at `rung` in ladder order: it and every step before it."""
    return frozenset(T3_STEPS[: T3_STEPS.index(step(rung).name) + 1])


def markdown_table(model: str = "t3") -> str:
    """The README's step table for `model`: generated, so it cannot drift from this registry."""
    rows = ["| step | status | runs on | module | what changes |", "|---|---|---|---|---|"]
    for name in ladder(model):
        s = STEPS[name]
        status = s.status + (f" (`{s.evidence}`)" if s.evidence else " (not yet timed on a GPU)" if s.unmeasured
                             else "")
        runs = {"cpu": "CPU or GPU", "cuda": "CUDA GPU", "hopper": "Hopper or later"}[s.runs_on]
        over = "".join(f"; `{other}` then changes nothing" for other in s.takes_over)
        rows.append(f"| `{name}` | {status} | {runs} | `{s.module}` | {s.summary}{over} |")
    return "\n".join(rows)
