import numpy as np
import pytest
import torch

from chatterbox_lab.decode.decoder import T3Decoder, text_tokens_for
from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.streaming import AudioPiece, playback_waits, seam_error, stream_speech

TEXT = "Streaming starts to speak before the sentence is decoded."
STEPS = ("static_cache", "embed_cache")


@pytest.fixture(scope="module")
def decoder(tiny_tts):
    return T3Decoder(tiny_tts.t3, STEPS, max_new_tokens=96)


def test_streamed_tokens_are_generates_tokens_in_chunks(tiny_tts, decoder):
    tokens = text_tokens_for(tiny_tts, TEXT)
    torch.manual_seed(5)
    whole = decoder.generate(tiny_tts.conds.t3, tokens, 80).tokens
    torch.manual_seed(5)
    chunks = list(decoder.generate_stream(tiny_tts.conds.t3, tokens, 80, chunk_tokens=32))
    assert [c.size(1) for c, _ in chunks] == [32, 32, 16] and [last for _, last in chunks] == [False, False, True]
    assert torch.equal(torch.cat([c for c, _ in chunks], dim=1), whole)
    torch.manual_seed(5)
    chunks = list(decoder.generate_stream(tiny_tts.conds.t3, tokens, 80, chunk_tokens=32, first_chunk_tokens=16))
    assert [c.size(1) for c, _ in chunks] == [16, 32, 32]
    assert torch.equal(torch.cat([c for c, _ in chunks], dim=1), whole)
    # A first chunk between two stop checks is handed over at once, not at the next check.
    torch.manual_seed(5)
    chunks = list(decoder.generate_stream(tiny_tts.conds.t3, tokens, 80, chunk_tokens=32, first_chunk_tokens=8))
    assert [c.size(1) for c, _ in chunks] == [8, 40, 32]
    assert torch.equal(torch.cat([c for c, _ in chunks], dim=1), whole)


def test_one_chunk_is_the_whole_utterance(tiny_tts, decoder):
    torch.manual_seed(3)
    whole = synthesize(tiny_tts, TEXT, decoder=decoder, max_new_tokens=40, watermark=False).wav
    torch.manual_seed(3)
    pieces = list(stream_speech(tiny_tts, TEXT, decoder=decoder, max_new_tokens=40, chunk_tokens=64,
                                 first_chunk_tokens=None, watermark=False))
    assert len(pieces) == 1 and pieces[0].last
    np.testing.assert_array_equal(pieces[0].wav, whole)


def test_chunks_join_to_the_utterances_length_and_arrive_in_order(tiny_tts, decoder):
    torch.manual_seed(4)
    whole = synthesize(tiny_tts, TEXT, decoder=decoder, max_new_tokens=80, watermark=False).wav
    torch.manual_seed(4)
    pieces = list(stream_speech(tiny_tts, TEXT, decoder=decoder, max_new_tokens=80, chunk_tokens=16, watermark=False))
    assert len(pieces) >= 3 and [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert set(pieces[0].seconds) == {"t3", "s3gen_flow", "hifigan"}  # unwatermarked
    assert sum(pieces[0].seconds.values()) <= pieces[0].ready_s
    ready = [p.ready_s for p in pieces]
    assert ready == sorted(ready) and ready[0] < ready[-1]
    streamed = np.concatenate([p.wav for p in pieces])
    assert len(streamed) == len(whole)
    # The synthetic flow attends over the whole sequence with random weights, so its seams
    # are far from inaudible; this only checks the measure. Real weights: notebook / GPU run.
    assert np.isfinite(seam_error(streamed, whole))


def test_playback_waits_only_for_pieces_not_ready_when_the_ones_before_have_played():
    def piece(seconds, ready_s):
        return AudioPiece(np.zeros(int(seconds * 100), dtype=np.float32), 100, ready_s, last=False)

    # Plays 0.2 s from 0.1 s: the second piece (ready at 0.25) is on time, the third (ready at
    # 0.9) keeps the listener waiting 0.9 - (0.1 + 0.2 + 0.5) s, and the clock starts again there.
    pieces = [piece(0.2, 0.1), piece(0.5, 0.25), piece(0.3, 0.9), piece(0.4, 1.1)]
    assert playback_waits(pieces) == pytest.approx([0.0, 0.1, 0.0])
    assert playback_waits(pieces[:1]) == []


def test_streaming_needs_a_single_stream_decoder(tiny_tts):
    batch = T3Decoder(tiny_tts.t3, STEPS, streams=2, max_new_tokens=16)
    with pytest.raises(ValueError, match="streams=1"):
        next(batch.generate_stream(tiny_tts.conds.t3, text_tokens_for(tiny_tts, TEXT), 16))
