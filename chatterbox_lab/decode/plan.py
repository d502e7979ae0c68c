"""A decode plan: a set of T3 steps resolved once, for one device, into one field per choice.

Steps are what a user switches on; a plan is what the decoder and the forward do. Some steps take
over from others (`fused_attention` makes `filled_cache_attention` inert; `persistent_layers` runs a
layer that `head_handoff` would otherwise split), and some change nothing on a device that cannot
run them (`dependent_launch` on a CPU). Those rules live here and nowhere else: the forward and the
decoder read the plan's fields, never the step names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chatterbox_lab import registry
from chatterbox_lab.kernels import fused_matvec, staged_matvec


def device_kind(device) -> str:
    """"hopper" where the Hopper-only steps can run (the GPU and this Triton both allow them),
    "cuda" on another CUDA GPU, "cpu" elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    if fused_matvec.dependent_launch_supported(device) and staged_matvec.supported(device):
        return "hopper"
    return "cuda"


def unsupported_steps(device) -> frozenset:
    """T3 steps this device cannot run, with every step that builds on them."""
    kind = device_kind(device)
    missing = {name for name in registry.T3_STEPS if not registry.runs_on(name, kind)}
    # A Hopper GPU whose Triton lacks one of the two features still runs the other's steps.
    device = torch.device(device)
    if kind == "cuda" and fused_matvec.dependent_launch_supported(device):
        missing -= {"dependent_launch", "launch_ahead"}
    for name in tuple(missing):
        missing |= registry.dependents(name)
    return frozenset(missing)


@dataclass(frozen=True)
class DecodePlan:
    steps: frozenset
    weights: str          # "fp32" | "bf16" | "int8" | "fp8": 8-bit codes for the matvecs of a bf16 model
    cache: str            # "dynamic": upstream's growing cache | "static": fixed buffers
    cache_format: str     # "model": the model's dtype | "int8": codes with a scale per slot and head
    embedding: str        # "upstream" | "cached": two device lookups
    graph: str            # "none" | "inductor" | "captured" | "multi_step"
    projections: str      # "separate" | "fused": q/k/v and gate/up one matrix each
    matmuls: str          # "pytorch" | "matvec": our Triton kernels for the one-token step
    staged: tuple         # the matvec calls whose weights are staged in shared memory
    attention: str        # "sdpa" | "filled_blocks" | "kernel"
    layer: str            # "separate" | "handoff" | "persistent": how a layer's kernels are joined
    sampling: str         # "host" | "graph" | "kernel"
    bookkeeping: str      # "pytorch" | "prologue" | "folded"
    launch: str           # "plain" | "dependent" | "ahead"
    draw: str             # "inline" | "aside"
    prefill: str          # "eager" | "graph" (a lone utterance's prefill)

    @classmethod
    def resolve(cls, steps, device="cpu", model: str = "t3") -> "DecodePlan":
        """The plan for `steps` of `model`'s ladder ("t3", or "turbo" for Turbo's GPT-2 T3), checked
        against the registry, on `device`. Steps the device cannot run are refused; steps that need a
        GPU's launch machinery change nothing on a CPU."""
        steps = registry.check(steps, model=model)
        on_gpu = torch.device(device).type == "cuda"
        if on_gpu:
            missing = sorted(steps & unsupported_steps(device))
            if missing:
                raise ValueError(f"steps {missing} need a Hopper or later GPU and a Triton that supports them: "
                                 f"leave them out on {torch.cuda.get_device_name(device)}")
        has = steps.__contains__
        launch = "plain"
        if has("dependent_launch") and on_gpu:
            launch = "ahead" if has("launch_ahead") else "dependent"
        eight_bit = "fp8" if has("fp8_weights") else "int8" if has("int8_weights") else None
        graph = "none"
        if has("compiled"):
            graph = ("multi_step" if has("multi_step_graph") else "captured") if has("captured_graph") else "inductor"
        return cls(
            steps=steps,
            weights=eight_bit or ("bf16" if has("bf16") else "fp32"),
            cache="static" if has("static_cache") else "dynamic",
            cache_format="int8" if has("int8_kv_cache") else "model",
            embedding="cached" if has("embed_cache") else "upstream",
            graph=graph,
            projections="fused" if has("fused_projections") else "separate",
            matmuls="matvec" if has("fused_matvec") else "pytorch",
            # The staged kernels read weights in the model's dtype only.
            staged=(("gate_up",) + (("head",) if has("staged_head") else ())) if has("staged_weights")
            and not eight_bit else (),
            attention="kernel" if has("fused_attention") else "filled_blocks" if has("filled_cache_attention")
            else "sdpa",
            layer="separate" if eight_bit or has("int8_kv_cache") else "persistent" if has("persistent_layers")
            else "handoff" if has("head_handoff") else "separate",
            sampling="kernel" if has("fused_sampling") else "graph" if has("sampling_in_graph") else "host",
            bookkeeping=("folded" if has("folded_prologue") else "prologue") if has("fused_bookkeeping")
            else "pytorch",
            launch=launch,
            draw="aside" if has("draw_aside") and on_gpu else "inline",
            prefill="graph" if has("prefill_graph") else "eager",
        )

    @property
    def opens_early(self) -> bool:
        """The sampling kernel lets the next step's first kernel (layer 0's q/k/v matvec, which loads
        only weights before its wait) launch at once; that kernel then holds its own dependents back
        until its wait, so the input the sampling kernel writes is in place before any kernel reads
        it. Not for the handoff or whole-layer kernels, which open the step otherwise."""
        return self.bookkeeping == "folded" and self.launch == "ahead" and self.layer == "separate"

    @property
    def pdl(self) -> bool:
        return self.launch != "plain"

    @property
    def captured(self) -> bool:
        """The step is captured by us, not by Inductor."""
        return self.graph in ("captured", "multi_step")
