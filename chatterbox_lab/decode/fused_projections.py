"""Fused projections: q, k and v as one matrix, gate and up as another.

A decode step multiplies two rows (the CFG pair) by every weight matrix. At that
size a matmul's cost is reading its weights plus a fixed launch-and-ramp cost, so
three small launches for q, k, v (and two for gate, up) pay that fixed cost three
(two) times. One matrix per group reads the same bytes in one kernel: 7 matmuls
per layer become 4.

The fused matrices are built once and the upstream modules' own weights are made
views into them, so the model holds one copy of each weight and upstream code
that calls `q_proj` or `gate_proj` keeps working (and sees the same numbers).
"""
from __future__ import annotations

import torch
from torch import nn


def _already_fused(linears: list[nn.Linear]) -> torch.Tensor | None:
    """The fused matrix, if an earlier decoder on this model made these weights views of one."""
    first = linears[0].weight
    storage = first.untyped_storage()
    rows = sum(linear.out_features for linear in linears)
    if any(linear.weight.untyped_storage().data_ptr() != storage.data_ptr() for linear in linears):
        return None
    if storage.nbytes() != rows * first.size(1) * first.element_size():
        return None
    return first.detach().new_empty(0).set_(storage, 0, (rows, first.size(1)))


def fused_weight(linears: list[nn.Linear]) -> torch.Tensor:
    """The weights of bias-free `linears` stacked as one matrix, with each linear's own weight made
    a view of its rows: one copy in memory. Found, not rebuilt, when they are views of one already."""
    if any(linear.bias is not None for linear in linears):
        raise ValueError("fused projections expect bias-free projections")
    fused = _already_fused(linears)
    if fused is None:
        fused = torch.cat([linear.weight.detach() for linear in linears])
        start = 0
        for linear in linears:
            rows = linear.out_features
            linear.weight = nn.Parameter(fused[start:start + rows], requires_grad=False)
            start += rows
    # Every time, also for a matrix found already fused (a new tensor object over the same
    # storage): a CUDA graph copies each input not marked static in before every replay,
    # which for these is most of the model's weights (measured on an H100: 0.5 ms a step).
    torch._dynamo.mark_static_address(fused)
    return fused


class FusedProjections:
    """Per layer: `qkv` (q+k+v rows, dim) and `gate_up` (2 * intermediate, dim) weights."""

    def __init__(self, layers):
        self.qkv, self.gate_up = [], []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv.append(fused_weight([attn.q_proj, attn.k_proj, attn.v_proj]))
            self.gate_up.append(fused_weight([mlp.gate_proj, mlp.up_proj]))

    def mlp(self, i: int, layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = torch.nn.functional.linear(x, self.gate_up[i]).chunk(2, dim=-1)
        return layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
