"""decode_attention: the kernel is PyTorch's rotary, cache write and masked attention, for one token."""
import pytest
import torch

from chatterbox_lab import registry
from chatterbox_lab.kernels import decode_attention
from chatterbox_lab.measure import equivalence
from chatterbox_lab.kernels.decode_attention import AttentionConfig
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.decode.kv_cache import StaticKVCache
from chatterbox_lab.decode.t3_forward import cached_attention


def _caches(rows, kv_heads, capacity, head_dim, format="model"):
    """Two identical caches in `format`, filled with random history (an int8 cache's through `update`)."""
    caches = [StaticKVCache(1, rows, kv_heads, capacity, head_dim, torch.float32, "cpu", format=format)
              for _ in range(2)]
    history = [torch.randn(rows, kv_heads, capacity, head_dim) for _ in range(2)]
    for cache in caches:
        if format == "int8":
            cache.update(0, torch.arange(capacity), *history)
        else:
            cache.keys[0].copy_(history[0])
            cache.values[0].copy_(history[1])
    return caches


def _one_step(rows, heads, kv_heads, head_dim, capacity, positions, config, format="model"):
    """The kernel and PyTorch's path on one random step at `positions` over caches in `format`: the
    kernel's output, PyTorch's, their caches and the kernel's arrival counters."""
    cos, sin = (torch.randn(capacity, head_dim // 2).repeat(1, 2) for _ in range(2))
    q = torch.randn(rows, 1, heads * head_dim)
    k, v = (torch.randn(rows, 1, kv_heads * head_dim) for _ in range(2))
    kernel_cache, reference_cache = _caches(rows, kv_heads, capacity, head_dim, format)
    per_row = positions.dim() == 2
    rotary = (cos[positions], sin[positions]) if per_row else (cos[positions][None], sin[positions][None])
    arrivals = torch.zeros(rows * heads, dtype=torch.int32)
    got = decode_attention.triton_decode_attention(q, k, v, positions, cos, sin, kernel_cache.keys[0],
                                                   kernel_cache.values[0], arrivals, config,
                                                   scales=kernel_cache.scales(0))
    want = cached_attention(q, k, v, positions, slice(None), rotary, reference_cache, 0,
                            reference_cache.mask(positions))
    return got, want, kernel_cache, reference_cache, arrivals


# (splits, parts, block): stretches combined, value shares, both, and blocks longer than a stretch.
LAYOUTS = [(1, 1, 64), (2, 1, 64), (4, 1, 64), (1, 4, 64), (1, 2, 256), (2, 4, 128)]


@pytest.mark.parametrize("splits, parts, block", LAYOUTS)
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("per_row", [False, True])
def test_kernel_matches_pytorch_attention_under_the_interpreter(interpreted, splits, parts, block, kv_heads, per_row):
    torch.manual_seed(splits * 10 + kv_heads + parts)
    capacity = 192
    # A slot at the start, at a block edge, inside a block and the last one: every stretch shape.
    positions = torch.tensor([[0], [64], [100], [capacity - 1]]) if per_row else torch.tensor([130])
    got, want, kernel_cache, reference_cache, arrivals = _one_step(4, 4, kv_heads, 32, capacity, positions,
                                                                   AttentionConfig(splits, parts, block, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel_cache.keys[0], reference_cache.keys[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(kernel_cache.values[0], reference_cache.values[0])
    assert not arrivals.any()  # reset for the next call


@pytest.mark.parametrize("splits, parts", [(1, 1), (2, 2)])
@pytest.mark.parametrize("per_row", [False, True])
def test_the_kernel_reads_and_writes_an_int8_cache_as_pytorch_does(interpreted, splits, parts, per_row):
    """The kernel widens an int8 cache's codes as it reads them and writes the new slot's codes and
    scales exactly as `StaticKVCache.update` does; attention matches SDPA over the dequantized cache."""
    torch.manual_seed(6 + splits + per_row)
    positions = torch.tensor([[3], [100]]) if per_row else torch.tensor([70])
    got, want, kernel_cache, reference_cache, arrivals = _one_step(2, 4, 2, 32, 128, positions,
                                                                   AttentionConfig(splits, parts, 64, 4), "int8")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name in ("keys", "values", "key_scales", "value_scales"):
        assert torch.equal(getattr(kernel_cache, name)[0], getattr(reference_cache, name)[0]), name
    assert not arrivals.any()


@pytest.mark.parametrize("config, message", [(AttentionConfig(3, 1, 64, 4), "powers of two"),
                                             (AttentionConfig(1, 2, 48, 4), "powers of two"),
                                             (AttentionConfig(1, 64, 64, 4), "cannot be more than the head's 32")])
def test_splits_are_powers_of_two_that_grow_with_the_cache(config, message):
    assert [decode_attention.splits_for(c) for c in (64, 128, 384, 448, 1024, 4096)] == [1, 2, 8, 8, 16, 16]
    assert decode_attention.default_config(448) == AttentionConfig(8, 1, decode_attention.BLOCK_SLOTS, 4)
    one = torch.zeros(1, 1, 32)
    with pytest.raises(ValueError, match=message):
        decode_attention.triton_decode_attention(one, one, one, torch.zeros(1, dtype=torch.long),
                                                 torch.zeros(8, 32), torch.zeros(8, 32), torch.zeros(1, 1, 8, 32),
                                                 torch.zeros(1, 1, 8, 32), torch.zeros(1, dtype=torch.int32), config)


def test_the_kernel_serves_one_token_steps_only(interpreted):
    assert decode_attention.kernel_applies(torch.zeros(2, 1, 64))
    assert not decode_attention.kernel_applies(torch.zeros(2, 5, 64))  # a prefill keeps SDPA


def test_fused_attention_takes_over_from_filled_cache_attention(tiny_tts):
    steps = ("static_cache", "embed_cache", "compiled", "filled_cache_attention", "fused_attention")
    decoder = T3Decoder(tiny_tts.t3, registry.check(steps, model="t3"))
    assert decoder.plan.attention == "kernel" and decoder.forward.attention_kernel


@pytest.mark.parametrize("matvec", [False, True])
def test_decode_steps_through_the_kernel_give_upstreams_logits(interpreted, tiny_tts, matvec):
    """Teacher-forced against upstream fp32, the attention kernel run by the interpreter."""
    text_tokens = text_tokens_for(tiny_tts, "Four tokens.")
    forced = equivalence.seeded_tokens(tiny_tts, text_tokens, 4, seed=1)
    reference = equivalence.reference_logits(tiny_tts, text_tokens, forced)
    steps = ("static_cache", "embed_cache", "fused_attention") + (("fused_projections", "fused_matvec") if matvec else ())
    decoder = T3Decoder(tiny_tts.t3, steps)
    # The default cache is long: stretches are combined.
    assert decoder.picks.attention(decoder.capacity).splits > 1
    got = equivalence.forced_logits(decoder, tiny_tts.conds.t3, text_tokens, forced)
    assert equivalence.relative_error(got, reference) < 1e-5


def test_batched_utterances_through_the_kernel_match_one_at_a_time(interpreted, tiny_tts):
    """Per-row positions: utterances with prompts of different lengths, batched and alone."""
    from chatterbox_lab.sampling import SamplingParams

    greedy = SamplingParams(top_p=1e-6)
    steps = ("static_cache", "embed_cache", "fused_attention")
    conds = [tiny_tts.conds.t3] * 2
    texts = [text_tokens_for(tiny_tts, t) for t in ("Short.", "A rather longer sentence than that.")]
    batch = T3Decoder(tiny_tts.t3, steps, streams=2, max_new_tokens=10)
    result = batch.generate_batch(conds, texts, 10, greedy, stop_on_eos=False)
    single = T3Decoder(tiny_tts.t3, steps, max_new_tokens=10)
    for cond, text, tokens in zip(conds, texts, result.all_tokens):
        assert torch.equal(single.generate(cond, text, 10, greedy, stop_on_eos=False).tokens, tokens)
