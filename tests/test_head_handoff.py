"""head_handoff: q/k/v and attention as one kernel give what the two kernels give."""
import pytest
import torch

from chatterbox_lab.kernels import decode_attention, fused_matvec
from chatterbox_lab.kernels.experimental import head_handoff
from chatterbox_lab.kernels.fused_matvec import Norm
from chatterbox_lab.decode.kv_cache import StaticKVCache

DIM, HEADS, KV_HEADS, D, CAPACITY = 64, 4, 2, 16, 96


def _layer(rows: int):
    torch.manual_seed(rows)
    x = torch.randn(rows, 1, DIM)
    weight = torch.randn((HEADS + 2 * KV_HEADS) * D, DIM) / DIM ** 0.5
    norm = Norm(torch.rand(DIM) + 0.5, 1e-5)
    cache = StaticKVCache(1, rows, KV_HEADS, CAPACITY, D, torch.float32, "cpu")
    for buffer in (*cache.keys, *cache.values):
        buffer.normal_()
    angles = torch.arange(CAPACITY)[:, None] * torch.rand(D // 2)[None]
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1) for f in (torch.cos, torch.sin))
    return x, weight, norm, cache, cos, sin


@pytest.mark.parametrize("rows, positions", [(2, [70]), (4, [[5], [5], [90], [90]])])
def test_one_kernel_gives_the_two_kernels_output_and_cache(interpreted, rows, positions):
    x, weight, norm, cache, cos, sin = _layer(rows)
    positions = torch.tensor(positions)
    arrivals = torch.zeros(rows * HEADS, dtype=torch.int32)
    splits = 4
    qkv = fused_matvec.triton_matvec(x, weight, norm=norm)
    q, k, v = qkv.split([HEADS * D, KV_HEADS * D, KV_HEADS * D], dim=-1)
    want_keys, want_values = cache.keys[0].clone(), cache.values[0].clone()
    want = decode_attention.triton_decode_attention(q, k, v, positions, cos, sin, want_keys, want_values, arrivals,
                                                    decode_attention.AttentionConfig(splits, 1, 64, 4))
    ready = head_handoff.counters(1, KV_HEADS, "cpu")
    for _ in range(2):  # the counters are back at zero for the next call
        got = head_handoff.handoff_attention(x, weight, norm, positions, cos, sin, cache.keys[0], cache.values[0],
                                             arrivals, ready[0], splits)
        assert torch.equal(got, want)
        assert torch.equal(cache.keys[0], want_keys) and torch.equal(cache.values[0], want_values)
        assert not ready.any() and not arrivals.any()


def test_counters_are_checked():
    x, weight, norm, cache, cos, sin = _layer(2)
    with pytest.raises(ValueError, match=r"ready must be this layer's \(2, 2\) int32 counters"):
        head_handoff.handoff_attention(x, weight, norm, torch.tensor([3]), cos, sin, cache.keys[0], cache.values[0],
                                       torch.zeros(8, dtype=torch.int32), torch.zeros(2, 4, dtype=torch.int32), 2)


def test_forward_takes_the_handoff_for_one_token_steps(tiny_tts, interpreted, monkeypatch):
    """The wiring in `StaticT3Forward`: a layer's attention with the handoff kernel is the two
    kernels' (the decoder's tokens with it are checked on the GPU, where the interpreter's
    thousands of head programs are not in the way)."""
    from chatterbox_lab.decode.plan import DecodePlan
    from chatterbox_lab.decode.t3_forward import StaticT3Forward

    calls = []
    launch = head_handoff.handoff_attention
    monkeypatch.setattr(head_handoff, "handoff_attention", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    kernels = {"static_cache", "fused_projections", "fused_matvec", "fused_attention"}
    plain, handoff = (StaticT3Forward(tiny_tts.t3, 64, DecodePlan.resolve(steps))
                      for steps in (kernels, kernels | {"head_handoff"}))
    assert (plain.handoff, handoff.plan.layer) == (None, "handoff")
    x = torch.randn(2, 1, tiny_tts.t3.cfg.hidden_size)
    positions = torch.tensor([10])
    layer = tiny_tts.t3.tfmr.layers[0]
    want = plain._attention(0, layer, x, positions, slice(None), None, None)
    assert torch.equal(handoff._attention(0, layer, x, positions, slice(None), None, None), want)
    assert calls == [1]
    assert torch.equal(handoff.cache.keys[0], plain.cache.keys[0]) and not handoff.handoff.any()
