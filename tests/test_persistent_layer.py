"""persistent_layer: one layer of the one-token step as one kernel is the layer PyTorch computes."""
import pytest
import torch

from chatterbox_lab.measure import equivalence
from chatterbox_lab.kernels.experimental import persistent_layer
from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.decode.plan import DecodePlan
from chatterbox_lab.decode.t3_forward import StaticT3Forward

LAYER_STEPS = ("static_cache", "embed_cache", "fused_projections", "fused_matvec", "fused_attention",
               "persistent_layers")


def _layer_pair(t3, capacity: int, device: str, seed: int):
    """A whole-layer forward and PyTorch's over the same cache of random history, and a step's
    inputs: positions at the start, at a block edge, inside a block and the last slot."""
    torch.manual_seed(seed)
    kernel = StaticT3Forward(t3, capacity, DecodePlan.resolve(set(LAYER_STEPS) - {"embed_cache"}, device), batch=4)
    reference = StaticT3Forward(t3, capacity, DecodePlan.resolve({"static_cache", "fused_projections"}, device), batch=4)
    for buffer in ("keys", "values"):
        history = torch.randn_like(getattr(kernel.cache, buffer)[0])
        getattr(kernel.cache, buffer)[0].copy_(history)
        getattr(reference.cache, buffer)[0].copy_(history)
    positions = torch.tensor([[0], [64], [100], [capacity - 1]], device=device)
    x = torch.randn(4, 1, t3.cfg.hidden_size, device=device, dtype=kernel.cos.dtype)
    return kernel, reference, positions, x


def _pytorch_layer(reference, positions, x):
    rotary = (reference.cos[positions], reference.sin[positions]) if positions.dim() == 2 else \
        (reference.cos[positions][None], reference.sin[positions][None])
    with torch.no_grad():
        return reference._layer(0, reference.layers[0], x, positions, slice(None), rotary,
                                reference.cache.mask(positions))


@pytest.mark.parametrize("programs", [1, 3, 7])
@pytest.mark.parametrize("per_row", [False, True])
def test_layer_kernel_is_pytorchs_layer_under_the_interpreter(interpreted, tiny_tts, programs, per_row):
    """Phase by phase (the interpreter cannot run the barriers), with as many programs as tiles,
    fewer, and a count that divides nothing evenly."""
    kernel, reference, positions, x = _layer_pair(tiny_tts.t3, 192, "cpu", seed=programs)
    if not per_row:
        positions = torch.tensor([130])
    got = kernel.whole_layer(0, x, positions, persistent=False, programs=programs)
    torch.testing.assert_close(got, _pytorch_layer(reference, positions, x), rtol=1e-5, atol=1e-5)
    # The new key and value come out of the kernel's own q/k/v sums.
    for buffer in ("keys", "values"):
        torch.testing.assert_close(getattr(kernel.cache, buffer)[0], getattr(reference.cache, buffer)[0],
                                   rtol=1e-5, atol=1e-5)
    assert not kernel.arrivals.any() and not kernel.sync.any()  # left zero for the next call


@pytest.mark.gpu
@pytest.mark.parametrize("capacity", [128, 1024])
def test_layer_kernel_with_barriers_is_its_phases_one_launch_each(capacity):
    """Full model, bf16, one program per SM: the barriers change nothing (bit for bit against a
    launch per phase, call after call, so the counter resets too) and the layer is PyTorch's within
    bf16 rounding."""
    from chatterbox_lab.loading.models import load_tts
    from chatterbox_lab.decode.precision import t3_in_dtype, weights_restored

    t3 = load_tts(preset="full", device="cuda").t3
    with weights_restored(t3):
        t3 = t3_in_dtype(t3, torch.bfloat16)
        kernel, reference, positions, x = _layer_pair(t3, capacity, "cuda", seed=capacity)
        phased = kernel.whole_layer(0, x, positions, persistent=False)
        keys = kernel.cache.keys[0].clone()
        for _ in range(3):
            assert torch.equal(kernel.whole_layer(0, x, positions, persistent=True), phased)
            assert torch.equal(kernel.cache.keys[0], keys)
            assert not kernel.arrivals.any() and not kernel.sync.any()
        want = _pytorch_layer(reference, positions, x).float()
        error = float((phased.float() - want).norm() / want.norm())
        print(f"whole-layer kernel vs PyTorch's layer at {capacity} slots: relative error {error:.1e}")
        assert error < 1e-2


def test_decode_steps_through_whole_layer_kernels_give_upstreams_logits(interpreted, tiny_tts):
    """Teacher-forced against upstream fp32."""
    text_tokens = text_tokens_for(tiny_tts, "Four tokens.")
    forced = equivalence.seeded_tokens(tiny_tts, text_tokens, 4, seed=1)
    reference = equivalence.reference_logits(tiny_tts, text_tokens, forced)
    decoder = T3Decoder(tiny_tts.t3, LAYER_STEPS)
    assert decoder.forward.layer_weights is not None
    got = equivalence.forced_logits(decoder, tiny_tts.conds.t3, text_tokens, forced)
    assert equivalence.relative_error(got, reference) < 1e-5


def test_tiles_and_splits_fill_the_grid():
    assert persistent_layer.tile_columns(1024, 2) == 8
    assert persistent_layer.tile_columns(1024, 2, gated=True) == 4
    assert persistent_layer.tile_columns(4096, 2) == 2
    assert persistent_layer.tile_columns(2**20, 2) == 1  # never zero columns
    # A CFG pair of 16 heads on 132 SMs: 4 stretches each, 128 programs busy.
    assert persistent_layer.attention_splits(2, 16, 132) == 4
    assert persistent_layer.attention_splits(8, 16, 132) == 1
    assert persistent_layer.attention_splits(1, 1, 10**6) == 16  # capped like the attention kernel's


def test_whole_layers_need_the_matvec_and_attention_kernels():
    with pytest.raises(ValueError, match="'persistent_layers' needs fused_attention"):
        DecodePlan.resolve({"static_cache", "fused_projections", "fused_matvec", "persistent_layers"})
    with pytest.raises(ValueError, match="'persistent_layers' needs fused_matvec"):
        DecodePlan.resolve({"static_cache", "fused_attention", "persistent_layers"})
