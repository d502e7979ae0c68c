"""T3's transformer forward over a static KV cache, reusing upstream's own modules.

The Llama layers, norms, MLPs, rotary tables and speech head are upstream's
(`t3.tfmr`, `t3.speech_head`); only attention is written here, because it must
read and write the fixed cache buffers and take positions as device tensors.
That is what makes the one-token step capturable as a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from chatterbox_lab.decode.kv_cache import CACHE_MULTIPLE, StaticKVCache
from chatterbox_lab.decode.plan import DecodePlan
from chatterbox_lab.kernels import decode_attention, fused_matvec, quantized, staged_matvec
from chatterbox_lab.kernels.experimental import head_handoff, persistent_layer
from chatterbox_lab.kernels.fused_matvec import Norm
from chatterbox_lab.kernels.picks import DEFAULT as DEFAULT_PICKS, KernelPicks


def rotary_tables(t3, capacity: int, dtype: torch.dtype):
    """cos, sin for every position of the cache, as upstream's rotary module computes them."""
    device = t3.speech_head.weight.device
    positions = torch.arange(capacity, device=device)[None]
    probe = torch.zeros(1, dtype=dtype, device=device)
    cos, sin = t3.tfmr.rotary_emb(probe, position_ids=positions)
    return cos[0], sin[0]  # (capacity, head_dim)


def filled_cache_mask(prompt_lens: torch.Tensor, step_index: torch.Tensor, heads: int, capacity: int):
    """A flex-attention block mask for one decode step of utterances with prompt lengths
    `prompt_lens` (n,) at step `step_index` (1,): CFG row b (utterance b // 2) sees cache
    slots 0 .. prompt_lens[b // 2] + step_index, the one being written included.

    Blocks of CACHE_MULTIPLE slots past a row's position are not in its list at all, so the
    attention kernel never reads them; only the block holding the position is masked
    slot by slot. Built from device tensors, so a captured step serves every position.
    """
    from torch.nn.attention.flex_attention import BlockMask

    rows = 2 * prompt_lens.numel()
    last = (prompt_lens + step_index).repeat_interleave(2)
    n_blocks = capacity // CACHE_MULTIPLE
    kv_num_blocks = (last // CACHE_MULTIPLE + 1).to(torch.int32)[:, None, None].expand(rows, heads, 1)
    kv_indices = torch.arange(n_blocks, dtype=torch.int32, device=last.device).expand(rows, heads, 1, n_blocks)

    def up_to_position(b, h, q_idx, kv_idx):
        # The decoder's buffers themselves, not `last`: Inductor's CPU flex-attention
        # template accepts only graph inputs in a mask.
        return kv_idx <= prompt_lens[b // 2] + step_index[0]
    return BlockMask.from_kv_blocks(kv_num_blocks.contiguous(), kv_indices.contiguous(),
                                    BLOCK_SIZE=(128, CACHE_MULTIPLE), mask_mod=up_to_position,
                                    seq_lengths=(1, capacity), compute_q_blocks=False)


def cached_attention(q, k, v, positions: torch.Tensor, rows: slice, rotary, cache: StaticKVCache,
                     layer: int, mask) -> torch.Tensor:
    """PyTorch's attention over the static cache: q (B, T, heads * D), k and v (B, T, kv_heads * D)
    at `positions` get transformers' rotary (`rotary`: cos, sin gathered at the positions), are
    written into cache rows `rows`, and attend to the slots `mask` allows: a boolean tensor
    (SDPA) or a flex-attention block mask -> (B, T, heads * D)."""
    B, T, _ = q.shape
    head_dim = rotary[0].size(-1)
    q, k, v = (t.view(B, T, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rotary_pos_emb(q, k, *rotary)
    keys, values = cache.update(layer, positions, k, v, rows)
    gqa = q.size(1) != keys.size(1)
    if isinstance(mask, torch.Tensor):
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)
    else:
        from torch.nn.attention.flex_attention import flex_attention

        out = flex_attention(q, keys, values, block_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(B, T, -1)


class StaticT3Forward:
    """Rows of the batch are CFG pairs, one pair per utterance (cond, uncond, cond, ...)."""

    def __init__(self, t3, capacity: int, plan: DecodePlan, batch: int = 2, picks: KernelPicks | None = None):
        """`plan`: the decode plan whose T3 forward this is (`plan.py`): its projections, matmuls,
        staged calls, attention, layer kernels and launch mode. `picks`: the kernels' configurations
        (`kernels.picks`), read when a step is captured, so a tuner that sets new picks and
        recaptures the step runs them."""
        from chatterbox_lab.decode.fused_projections import FusedProjections

        cfg = t3.cfg
        self.t3 = t3
        self.layers = t3.tfmr.layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.plan = plan
        self.picks = picks or DEFAULT_PICKS
        self.fused = FusedProjections(self.layers) if plan.projections == "fused" else None
        self.matvec = plan.matmuls == "matvec"
        self.staged = frozenset(plan.staged)
        weight = t3.speech_head.weight
        if self.staged and weight.is_cuda:
            staged_matvec.check_supported(weight.device)
        self.cache = StaticKVCache(len(self.layers), batch, self.n_kv_heads, capacity, self.head_dim,
                                   weight.dtype, weight.device, format=plan.cache_format)
        self.eight_bit = plan.weights if plan.weights in quantized.FORMATS else None
        self.quantized = self._eight_bit_weights(self.eight_bit) if self.eight_bit else None
        self.cos, self.sin = rotary_tables(t3, capacity, weight.dtype)
        torch._dynamo.mark_static_address(self.cos)
        torch._dynamo.mark_static_address(self.sin)
        self.attention_kernel = plan.attention == "kernel"
        if plan.pdl:
            fused_matvec.check_dependent_launch(weight.device)
        self.launch = dict(pdl=plan.pdl, ahead=plan.launch == "ahead")
        self.opens_early = plan.opens_early
        # The kernel's per-(row, head) arrival counter: zero between calls, at a fixed address.
        self.arrivals = torch.zeros(batch * self.n_heads, dtype=torch.int32, device=weight.device)
        torch._dynamo.mark_static_address(self.arrivals)
        handoff = plan.layer == "handoff"
        self.handoff = head_handoff.counters(len(self.layers), self.n_kv_heads, weight.device) if handoff else None
        if handoff:
            torch._dynamo.mark_static_address(self.handoff)
        self.layer_weights = [persistent_layer.LayerWeights.of(layer, self.fused.qkv[i], self.fused.gate_up[i])
                              for i, layer in enumerate(self.layers)] if plan.layer == "persistent" else None
        # The whole-layer kernel's grid barrier: arrivals and departures, zero between calls.
        self.sync = torch.zeros(2, dtype=torch.int32, device=weight.device)
        torch._dynamo.mark_static_address(self.sync)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def _eight_bit_weights(self, format: str) -> dict[str, list]:
        """Every matvec's weight in `format`, per call name, a list over the layers (the head's of
        one). The model keeps its bf16 weights: upstream's modules and the reference checks read them."""
        def of(weights):
            found = [quantized.quantize(w, format) for w in weights]
            for q in found:
                torch._dynamo.mark_static_address(q.codes)
                torch._dynamo.mark_static_address(q.scale)
            return found

        return dict(qkv=of(self.fused.qkv), o_proj=of(layer.self_attn.o_proj.weight for layer in self.layers),
                    gate_up=of(self.fused.gate_up), down=of(layer.mlp.down_proj.weight for layer in self.layers),
                    head=of([self.t3.speech_head.weight]))

    def _weight(self, name: str, i: int, weight: torch.Tensor):
        """What call `name` of layer i multiplies: its 8-bit copy under an 8-bit format, else `weight`."""
        return self.quantized[name][i] if self.quantized else weight

    def _qkv(self, i: int, layer, x: torch.Tensor):
        """q, k, v of layer i's input x (before its norm)."""
        attn = layer.self_attn
        if self.fused is None:
            x = layer.input_layernorm(x)
            return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if self.matvec:
            # Launched early behind the step before, the first kernel lets its dependents launch only
            # once past its wait: the attention kernel after it reads the step's cache position
            # before its own wait.
            launch = dict(self.launch, ahead=False) if i == 0 and self.opens_early else self.launch
            qkv = self._matvec("qkv", x, self._weight("qkv", i, self.fused.qkv[i]), norm=Norm.of(layer.input_layernorm),
                               launch=launch)
        else:
            qkv = F.linear(layer.input_layernorm(x), self.fused.qkv[i])
        kv = self.n_kv_heads * self.head_dim
        return qkv.split([self.n_heads * self.head_dim, kv, kv], dim=-1)

    def _matvec(self, name: str, x: torch.Tensor, weight: torch.Tensor, launch: dict | None = None,
                **fusions) -> torch.Tensor:
        rows, k = x.numel() // x.size(-1), x.size(-1)
        n = weight.size(0) // 2 if fusions.get("gated") else weight.size(0)
        if name in self.staged:
            config = self.picks.staged(name, rows, n, k, fusions.get("gated", False))
            return staged_matvec.staged_matvec(x, weight, **fusions, config=config, **(launch or self.launch))
        config = self.picks.matvec(name, rows, n, k, fusions.get("gated", False), format=self.eight_bit)
        return fused_matvec.fused_matvec(x, weight, **fusions, config=config, **(launch or self.launch))

    def _attention(self, i: int, layer, x: torch.Tensor, positions: torch.Tensor, rows: slice, rotary, mask):
        """Attention's output for layer i, before the output projection: (B, T, heads * head_dim).
        No `mask`: the one-token kernel, which gathers its own rotary row and reads the filled slots."""
        if mask is None and self.handoff is not None and head_handoff.kernel_applies(x, self.fused.qkv[i]):
            out = head_handoff.handoff_attention(
                x, self.fused.qkv[i], Norm.of(layer.input_layernorm), positions, self.cos, self.sin,
                self.cache.keys[i], self.cache.values[i], self.arrivals, self.handoff[i],
                self.picks.attention(self.capacity).splits, **self.launch,
                refuse=False)
            if out is not None:
                return out
        q, k, v = self._qkv(i, layer, x)
        if mask is None:
            return decode_attention.triton_decode_attention(
                q, k, v, positions, self.cos, self.sin, self.cache.keys[i], self.cache.values[i],
                self.arrivals, self.picks.attention(self.capacity), **self.launch, scales=self.cache.scales(i))
        return cached_attention(q, k, v, positions, rows, rotary, self.cache, i, mask)

    def _layer(self, i: int, layer, x: torch.Tensor, positions: torch.Tensor, rows: slice, rotary, mask):
        attended = self._attention(i, layer, x, positions, rows, rotary, mask)
        if self.matvec:
            x = self._matvec("o_proj", attended, self._weight("o_proj", i, layer.self_attn.o_proj.weight), residual=x)
            act = self._matvec("gate_up", x, self._weight("gate_up", i, self.fused.gate_up[i]),
                               norm=Norm.of(layer.post_attention_layernorm), gated=True)
            return self._matvec("down", act, self._weight("down", i, layer.mlp.down_proj.weight), residual=x)
        x = x + layer.self_attn.o_proj(attended)
        normed = layer.post_attention_layernorm(x)
        return x + (layer.mlp(normed) if self.fused is None else self.fused.mlp(i, layer, normed))

    def whole_layer(self, i: int, x: torch.Tensor, positions: torch.Tensor, **options) -> torch.Tensor:
        """Layer i of a one-token step as one kernel (`persistent_layer.triton_layer`, `options` passed
        on). On the CPU the interpreter runs programs one by one: a launch a phase, no barriers."""
        options = dict(dict(persistent=x.is_cuda, pdl=self.launch["pdl"], config=self.picks.layer()), **options)
        return persistent_layer.triton_layer(x, self.layer_weights[i], positions, self.cos, self.sin, self.cache.keys[i],
                                             self.cache.values[i], self.arrivals, self.sync, **options)

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, rows: slice = slice(None),
                 block_mask=None, last: torch.Tensor | None = None) -> torch.Tensor:
        """embeds (B, T, dim) for cache rows `rows` at positions (T,) shared by the rows, or
        (B, 1) one per row -> speech logits of the last position (B, V), or of index `last`
        along T (a (1,) tensor for every row, or (B,), one per row). `block_mask` (`filled_cache_mask`, one step only): flex
        attention over the filled cache instead of SDPA over the whole allocation."""
        if self.attention_kernel and rows == slice(None) and decode_attention.kernel_applies(embeds):
            mask = rotary = None
        else:
            mask = self.cache.mask(positions) if block_mask is None else block_mask
            # cos/sin gathered once and shared by every layer: (1, T, D) or (B, 1, D).
            rotary = (self.cos[positions], self.sin[positions]) if positions.dim() == 2 else \
                (self.cos[positions][None], self.sin[positions][None])
        x = embeds
        whole_layers = mask is None and self.layer_weights is not None and persistent_layer.kernel_applies(embeds)
        for i, layer in enumerate(self.layers):
            if whole_layers:
                x = self.whole_layer(i, x, positions)
            else:
                x = self._layer(i, layer, x, positions, rows, rotary, mask)
        if last is None:
            x = x[:, -1]
        elif last.numel() == 1:
            x = x.index_select(1, last)[:, 0]
        else:
            x = x[torch.arange(x.size(0), device=x.device), last]
        if self.matvec:
            head = self.t3.speech_head
            return self._matvec("head", x, self._weight("head", 0, head.weight), bias=head.bias,
                                norm=Norm.of(self.t3.tfmr.norm))
        return self.t3.speech_head(self.t3.tfmr.norm(x))


class DynamicT3Forward:
    """Upstream's way: transformers' LlamaModel with a cache that grows every token."""

    def __init__(self, t3):
        import inspect

        self.t3 = t3
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns).
        params = inspect.signature(t3.tfmr.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.cache = None

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        out = self.t3.tfmr(inputs_embeds=embeds, use_cache=True, **{self.cache_kw: self.cache})
        self.cache = getattr(out, self.cache_kw, None) or out.past_key_values
        return self.t3.speech_head(out.last_hidden_state[:, -1])
