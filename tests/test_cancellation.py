"""A request whose caller has gone stops at the decoder's next stop check, and the next one is served."""
import pytest
import torch

from chatterbox_lab.decode.decoder import STOP_CHECK_INTERVAL, Cancelled, T3Decoder, text_tokens_for

TOKENS = 3 * STOP_CHECK_INTERVAL


def test_cancelled_at_a_stop_check_then_the_next_request_is_served(tiny_tts):
    decoder = T3Decoder(tiny_tts.t3, ("static_cache", "embed_cache"), max_new_tokens=TOKENS)
    text_tokens = text_tokens_for(tiny_tts, "Stop me early.")
    torch.manual_seed(0)
    expected = decoder.generate(tiny_tts.conds.t3, text_tokens, TOKENS, stop_on_eos=False).tokens
    asked = []

    def gone():
        asked.append(1)
        return True

    with pytest.raises(Cancelled, match=f"after {STOP_CHECK_INTERVAL} of"):
        decoder.generate(tiny_tts.conds.t3, text_tokens, TOKENS, stop_on_eos=False, cancelled=gone)
    assert len(asked) == 1  # asked once, at the first stop check, and stopped there
    torch.manual_seed(0)
    again = decoder.generate(tiny_tts.conds.t3, text_tokens, TOKENS, stop_on_eos=False,
                             cancelled=lambda: False).tokens
    assert torch.equal(again, expected)
