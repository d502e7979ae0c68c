import contextlib

import numpy as np
import pytest

from chatterbox_lab.pipeline.long_text import JOIN_FADE_S, JOIN_PAUSE_S, join_speech, split_text
from chatterbox_lab.pipeline.synthesis import SAMPLES_PER_TOKEN
from chatterbox_lab.validation import MAX_TEXT_CHARS

CHAPTER = ("It was a bright cold day in April. The clocks were striking thirteen! Was it late? "
           "“Nobody knows,” she said. He walked on… and on, past the station, the square, the long grey "
           "wall of the old market, the bridge over the canal where the boats slept in rows, and the "
           "school whose windows were all lit although it was Sunday. Then he stopped.")


def words(text):
    return text.split()


@pytest.mark.parametrize("max_chars", [40, 80, 300])
def test_chunks_fit_keep_every_word_and_end_at_sentences_where_they_can(max_chars):
    chunks = split_text(CHAPTER, max_chars)
    assert all(0 < len(c) <= max_chars for c in chunks)
    assert words(" ".join(chunks)) == words(CHAPTER)
    if max_chars == 300:
        # The long sentence fits whole, so every chunk boundary is a sentence end.
        assert all(c.rstrip("”’\"')").endswith((".", "!", "?", "…")) for c in chunks)


def test_an_over_long_sentence_is_cut_at_a_clause_mark_before_a_space():
    sentence = "one two three four, five six seven eight nine ten eleven"
    assert split_text(sentence, 30) == ["one two three four,", "five six seven eight nine ten", "eleven"]


def test_a_word_longer_than_a_chunk_is_refused_with_what_to_check():
    with pytest.raises(ValueError, match="longer than a chunk may be"):
        split_text("fine words then " + "x" * 50, 20)


def test_joins_fade_to_silence_and_pause_between_chunks():
    rate = 24_000
    loud = [np.full(4_800, 0.8, dtype=np.float32), np.full(2_400, -0.8, dtype=np.float32)]
    joined = join_speech(loud, rate)
    pause = int(JOIN_PAUSE_S * rate)
    assert len(joined) == 4_800 + pause + 2_400
    # Around each seam the signal ramps to zero: no step between two loud samples.
    assert joined[4_799] == 0 and joined[4_800 + pause] == 0
    assert np.abs(np.diff(joined)).max() <= 0.8 / (JOIN_FADE_S * rate) + 1e-6
    assert np.all(joined[4_800:4_800 + pause] == 0)
    assert loud[0][0] == 0.8, "the chunks passed in are left as they were"


def test_long_text_through_a_session_is_spoken_whole(tiny_tts):
    from chatterbox_lab.serving.session import TTSSession

    text = " ".join([CHAPTER] * 3)  # over one utterance's limit
    assert len(text) > MAX_TEXT_CHARS
    session = TTSSession(tts=tiny_tts, steps=("static_cache", "embed_cache"), max_new_tokens=6)
    try:
        with pytest.raises(ValueError, match="chunk=True"):
            session.synthesize(text)
        speech = session.synthesize(text, chunk=True, seed=0)
    finally:
        session.close()
    chunks = split_text(text, 300)
    # The synthetic model never stops early: every chunk speaks its 6 tokens.
    expected = len(chunks) * 6 * SAMPLES_PER_TOKEN + (len(chunks) - 1) * int(JOIN_PAUSE_S * speech.sample_rate)
    assert len(speech.wav) == expected


def test_say_speaks_long_text_with_chunk_and_refuses_it_without(tmp_path, capsys):
    import soundfile as sf

    from chatterbox_lab.__main__ import main

    text = " ".join([CHAPTER] * 3)
    args = ["say", text, "--preset", "tiny", "--device", "cpu", "--max-new-tokens", "4", "--seed", "0"]
    with pytest.raises(SystemExit) as refused:
        main(args + ["--out", str(tmp_path / "refused.wav")])
    assert refused.value.code == 2 and "--chunk" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    assert main(args + ["--out", str(tmp_path / "long.wav"), "--chunk"]) == 0
    chunks = split_text(text, 300)
    wav, rate = sf.read(tmp_path / "long.wav")
    assert len(wav) == len(chunks) * 4 * SAMPLES_PER_TOKEN + (len(chunks) - 1) * int(JOIN_PAUSE_S * rate)


def test_many_texts_in_batches_match_one_at_a_time(tiny_tts):
    import torch

    from chatterbox_lab.decode.decoder import T3Decoder
    from chatterbox_lab.pipeline.synthesis import synthesize, synthesize_many
    from chatterbox_lab.sampling import SamplingParams
    from chatterbox_lab.pipeline.voices import VoiceCache, voice_path

    greedy = SamplingParams(top_p=1e-6)  # no randomness left: batch and alone must agree
    texts = ["First of five.", "The second one, somewhat longer.", "Third.", "Fourth here.", "Fifth and last."]
    voices = ["alto", "tenor", "alto", "tenor", "alto"]
    steps = ("static_cache", "embed_cache")
    many = synthesize_many(tiny_tts, texts, voices, decoder=T3Decoder(tiny_tts.t3, steps, streams=2),
                           max_new_tokens=6, sampling=greedy, watermark=False)
    assert len(many.speeches) == 5 and many.x_realtime > 0
    alone = T3Decoder(tiny_tts.t3, steps)
    prepared = VoiceCache(tiny_tts, capacity=2)  # each voice prepared once, not once per text
    for text, voice, speech in zip(texts, voices, many.speeches):
        prepared.use(voice_path(voice))
        single = synthesize(tiny_tts, text, decoder=alone, max_new_tokens=6, sampling=greedy, watermark=False)
        assert torch.equal(single.speech_tokens, speech.speech_tokens)
        assert len(single.wav) == len(speech.wav) == 6 * SAMPLES_PER_TOKEN
    with pytest.raises(ValueError, match="one voice for all texts or one per text"):
        synthesize_many(tiny_tts, texts, ["alto"], decoder=alone)


def test_one_flow_run_for_utterances_of_different_lengths_gives_each_ones_own_mels(tiny_tts, monkeypatch):
    """Upstream's batched flow, as `tokens_to_speeches` calls it: with the encoder's padding
    zeroed, each utterance's mels are those of a run on its own (noise set to zero to compare
    them); without, the shorter rows' look-ahead reads the padding."""
    import torch

    from chatterbox_lab.pipeline.synthesis import tokens_to_speeches
    from chatterbox_lab.pipeline.padding import padding_zeroed

    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    s3gen, ref = tiny_tts.s3gen, tiny_tts.conds.gen
    rows = [torch.randint(0, 6561, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 23, 16)]
    lengths = torch.tensor([len(r) for r in rows])

    def batched():
        return s3gen.flow_inference(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), ref_dict=ref,
                                    speech_token_lens=lengths, finalize=True)
    with torch.inference_mode():
        upstream = batched()
        with padding_zeroed(s3gen.flow.encoder):
            zeroed = batched()
        for row, mels, leaky in zip(rows, zeroed, upstream):
            alone = s3gen.flow_inference(row, ref_dict=ref, finalize=True)[0]
            torch.testing.assert_close(mels[:, : alone.size(-1)], alone, rtol=1e-4, atol=1e-4)
            assert (len(row) == 23) == torch.allclose(leaky[:, : alone.size(-1)], alone, rtol=1e-4, atol=1e-4)
        made = tokens_to_speeches(tiny_tts, [r[None] for r in rows], ref, lambda stage: contextlib.nullcontext(),
                                  watermark=False)
    assert [len(wav) for _, wav in made] == [n * SAMPLES_PER_TOKEN for n in (9, 23, 16)]
    assert all(torch.equal(tokens, row) for (tokens, _), row in zip(made, rows))
