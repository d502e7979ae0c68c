"""Multilingual runs the original's Llama T3 with a language tag leading the text, so the original's
decoder and steps apply unchanged: fp32 tokens identical to upstream's `ChatterboxMultilingualTTS`
loop for the same seed, in three languages, one of them in a non-Latin script.

Upstream's multilingual loop also watches three attention heads and forces the stop token when the
speech looks stuck (a token twice in a row, attention lingering on the text's end); our decoder does
not. The test checks that those checks never fired, so the comparison covers every token."""
import pytest

from chatterbox_lab.decode.decoder import text_tokens_for
from chatterbox_lab.measure import equivalence

TEXTS = {"en": "Every step is measured and checked against upstream.",
         "fr": "Chaque étape est mesurée et vérifiée.",
         "el": "Κάθε βήμα μετριέται και ελέγχεται."}
N = 24


@pytest.mark.parametrize("language", TEXTS)
def test_fp32_tokens_identical_to_upstream(tiny_multilingual, language):
    text_tokens = text_tokens_for(tiny_multilingual, TEXTS[language], language)
    assert text_tokens[0, 1] == tiny_multilingual.tokenizer.tokenizer.token_to_id(f"[{language}]")
    reference = equivalence.seeded_tokens(tiny_multilingual, text_tokens, N, seed=11)
    assert reference.size(1) == N  # no forced stop: the comparison covers every token
    steps = [("static_cache", "embed_cache", "fused_projections")] + ([()] if language == "el" else [])
    verdicts = equivalence.token_identity(tiny_multilingual, text_tokens, steps, n=N, seed=11, reference=reference)
    assert all(verdicts.values()), verdicts

