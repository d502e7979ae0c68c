"""Turbo's loop on our structure: fp32 tokens identical to upstream's `T3.inference_turbo` for the same
seed at every step of the Turbo ladder, whatever the sampling values; the Llama-shaped steps refused."""
import pytest
import torch

from chatterbox_lab import registry
from chatterbox_lab.decode.compiled_step import compile_counters
from chatterbox_lab.decode.turbo import TurboDecoder, turbo_text_tokens
from chatterbox_lab.measure import equivalence
from chatterbox_lab.sampling import TurboSamplingParams

COMPILED = ("static_cache", "embed_cache", "compiled", "sampling_in_graph")


@pytest.fixture(scope="module")
def text_tokens(tiny_turbo):
    return turbo_text_tokens(tiny_turbo, "Every step is measured and checked against upstream.")


def test_fp32_tokens_identical_to_upstream(tiny_turbo, text_tokens):
    steps = [(), ("static_cache",), ("static_cache", "embed_cache"), COMPILED]
    verdicts = equivalence.turbo_token_identity(tiny_turbo, text_tokens, steps, n=24, seed=5)
    assert all(verdicts.values()), verdicts


@pytest.mark.parametrize("sampling", [TurboSamplingParams(temperature=1.3, top_k=50, top_p=0.7, repetition_penalty=2.0),
                                      TurboSamplingParams(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0)],
                         ids=["other", "neutral"])
def test_identical_with_other_sampling_values(tiny_turbo, text_tokens, sampling):
    verdicts = equivalence.turbo_token_identity(tiny_turbo, text_tokens, [("static_cache", "embed_cache")], n=24,
                                                seed=7, sampling=sampling)
    assert all(verdicts.values()), verdicts


def test_changing_sampling_values_does_not_recompile(tiny_turbo, text_tokens):
    decoder = TurboDecoder(tiny_turbo.t3, COMPILED, max_new_tokens=8)
    decoder.generate(tiny_turbo.conds.t3, text_tokens, 8)
    before = compile_counters()
    for sampling in (TurboSamplingParams(top_k=5), TurboSamplingParams(top_p=0.5, repetition_penalty=1.5),
                     TurboSamplingParams(temperature=1.2, top_k=0)):
        decoder.generate(tiny_turbo.conds.t3, text_tokens, 8, sampling)
    assert compile_counters() == before


def test_bf16_decodes_valid_tokens(tiny_turbo, text_tokens):
    import copy

    decoder = TurboDecoder(copy.deepcopy(tiny_turbo.t3), ("bf16", "static_cache", "embed_cache"), max_new_tokens=12)
    tokens = decoder.generate(tiny_turbo.conds.t3, text_tokens, 12).tokens
    assert decoder.dtype == torch.bfloat16 and tokens.shape == (1, 12) and int(tokens.max()) < 6561


def test_the_turbo_ladder_in_the_registry():
    assert registry.TURBO_STEPS == ("bf16", "static_cache", "embed_cache", "compiled", "sampling_in_graph")
    assert registry.preset("recommended", "hopper", model="turbo") == registry.TURBO_STEPS
    assert registry.preset("recommended", "cpu", model="turbo") == ("static_cache", "embed_cache")
    with pytest.raises(ValueError, match=r"\['fused_matvec', 'fused_projections'\] are the original's Llama-shaped T3 steps and do not "
                                         r"apply to Turbo's GPT-2 T3: choose from bf16, "):
        registry.check(["static_cache", "fused_projections", "fused_matvec"], model="turbo")


def test_bad_requests_are_refused(tiny_turbo, tiny_tts, text_tokens):
    with pytest.raises(ValueError, match="decodes Turbo's GPT-2 T3; for the original or multilingual"):
        TurboDecoder(tiny_tts.t3)
    decoder = TurboDecoder(tiny_turbo.t3, ("static_cache",), max_new_tokens=8, max_cache_len=64)
    with pytest.raises(ValueError, match="max_new_tokens must be between 1 and 8"):
        decoder.generate(tiny_turbo.conds.t3, text_tokens, 9)
    with pytest.raises(ValueError, match=r"needs \d+ KV-cache slots .* holds 64"):
        decoder.generate(tiny_turbo.conds.t3, text_tokens, 8)
    with pytest.raises(ValueError, match="top_k must be a whole number >= 0"):
        TurboSamplingParams(top_k=-1)


def test_turbos_floor_reads_its_weights_once_and_one_row_of_cache(tiny_turbo):
    from chatterbox_lab.measure import roofline

    t3 = tiny_turbo.t3
    weights = sum(p.numel() * p.element_size() for part in (t3.tfmr.h, t3.tfmr.ln_f, t3.speech_head)
                  for p in part.parameters())
    cache = 2 * t3.cfg.n_layer * t3.cfg.hidden_size * (100 + 20 / 2) * 4  # keys and values, fp32, one row
    assert roofline.floor(t3, 1e9, prompt_len=100, tokens=20)["bytes_per_step"] == weights + cache
