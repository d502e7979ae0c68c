"""The padded prefill (CPU, tiny preset): the unpadded prompt's logits and cache, and slots past
the prompt that the decode overwrites before it reads them."""
import torch

from chatterbox_lab.decode.decoder import T3Decoder, prompt_len_for, text_tokens_for
from chatterbox_lab.decode.prefill_graph import PREFILL_BUCKET, BucketedPrefill


def test_padded_prefill_gives_the_unpadded_logits_and_cache(tiny_tts):
    text_tokens = text_tokens_for(tiny_tts, "A prompt padded to its bucket.")
    length = prompt_len_for(tiny_tts.t3, text_tokens)
    assert length % PREFILL_BUCKET != 0  # padded
    plain, padded = (T3Decoder(tiny_tts.t3, steps) for steps in (("static_cache",), ("static_cache", "prefill_graph")))
    assert isinstance(padded.prefill_graphs, BucketedPrefill)
    with torch.inference_mode():
        logits = [d.prefill(tiny_tts.conds.t3, text_tokens, 50, cfg_weight=0.5) for d in (plain, padded)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for cache_plain, cache_padded in zip(plain.forward.cache.keys + plain.forward.cache.values,
                                         padded.forward.cache.keys + padded.forward.cache.values):
        torch.testing.assert_close(cache_padded[:, :, :length], cache_plain[:, :, :length], rtol=1e-5, atol=1e-5)


def test_batched_decoders_keep_the_eager_prefill(tiny_tts):
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache", "prefill_graph"), streams=2)
    assert decoder.prefill_graphs is None
