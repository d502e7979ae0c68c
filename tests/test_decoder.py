import copy

import pytest
import torch

from chatterbox_lab import equivalence
from chatterbox_lab.compiled_step import compile_counters
from chatterbox_lab.decoder import LADDER, T3Decoder, check_steps, ladder_prefix, text_tokens_for
from chatterbox_lab.kv_cache import CacheOverflowError
from chatterbox_lab.sampling import SamplingParams

STEP_SETS = [(), ("static_cache",), ("embed_cache",), ("static_cache", "embed_cache"),
             ("static_cache", "embed_cache", "compiled")]


@pytest.fixture(scope="module")
def text_tokens(tiny_tts):
    return text_tokens_for(tiny_tts, "Every step is measured and checked against upstream.")


def test_fp32_tokens_identical_to_upstream(tiny_tts, text_tokens):
    verdicts = equivalence.token_identity(tiny_tts, text_tokens, STEP_SETS, n=40, seed=11)
    assert all(verdicts.values()), verdicts


def test_identical_with_other_sampling_values(tiny_tts, text_tokens):
    sampling = SamplingParams(temperature=1.3, cfg_weight=0.0, repetition_penalty=2.0, min_p=0.2, top_p=0.7)
    reference = equivalence.seeded_tokens(tiny_tts, text_tokens, 30, 4, sampling=sampling)
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache"))
    assert torch.equal(equivalence.seeded_tokens(tiny_tts, text_tokens, 30, 4, decoder, sampling), reference)


def test_bf16_logits_within_tolerance(tiny_tts, text_tokens):
    forced = equivalence.seeded_tokens(tiny_tts, text_tokens, 24, 2)
    reference = equivalence.reference_logits(tiny_tts, text_tokens, forced)
    t3 = copy.deepcopy(tiny_tts.t3)
    for steps in [("bf16",), ("bf16", "static_cache", "embed_cache")]:
        decoder = T3Decoder(t3, steps)
        assert decoder.dtype == torch.bfloat16
        err = equivalence.relative_error(equivalence.forced_logits(decoder, tiny_tts.conds.t3, text_tokens, forced), reference)
        assert err < equivalence.BF16_LOGIT_TOLERANCE, (steps, err)


def test_cache_overflow_is_refused(tiny_tts, text_tokens):
    decoder = T3Decoder(tiny_tts.t3, ("static_cache",), max_cache_len=64)
    with pytest.raises(CacheOverflowError, match=r"needs \d+ KV-cache slots .* holds 64: build the decoder with max_cache_len >= \d+"):
        decoder.generate(tiny_tts.conds.t3, text_tokens, 100)


def test_token_count_limits(tiny_tts, text_tokens):
    decoder = T3Decoder(tiny_tts.t3, ())
    with pytest.raises(ValueError, match="max_new_tokens must be between 1 and"):
        decoder.generate(tiny_tts.conds.t3, text_tokens, 0)


def test_step_rules():
    assert ladder_prefix("embed_cache") == {"bf16", "static_cache", "embed_cache"}
    assert check_steps(LADDER) == set(LADDER)
    with pytest.raises(ValueError, match="needs static_cache, embed_cache"):
        check_steps(["compiled"])
    with pytest.raises(ValueError, match="unknown steps"):
        check_steps(["fp8"])


def test_switching_speaker_text_and_sampling_does_not_recompile(tiny_tts):
    from chatterbox_lab.voices import VoiceCache

    voices = VoiceCache(tiny_tts)
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache", "compiled"), max_cache_len=256)
    first = text_tokens_for(tiny_tts, "A first sentence.")
    decoder.generate(voices.use("alto").t3, first, 8)
    decoder.generate(voices.use("tenor").t3, first, 8)  # both voices prepared, step warm
    before = compile_counters()
    requests = [("alto", "A much longer second sentence, with other words in it.", SamplingParams()),
                ("tenor", "Third.", SamplingParams(temperature=0.5, cfg_weight=0.3, top_p=0.9)),
                ("alto", "A first sentence.", SamplingParams(repetition_penalty=1.5, min_p=0.1))]
    for voice, text, sampling in requests:
        decoder.generate(voices.use(voice).t3, text_tokens_for(tiny_tts, text), 12, sampling)
    assert compile_counters() == before
    assert voices.prepared_count == 2
