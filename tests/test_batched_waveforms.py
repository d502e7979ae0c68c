import numpy as np
import pytest
import torch

from chatterbox_lab.pipeline.batched_waveforms import equal_length_groups, vocode_all, watermark_all


def test_groups_are_equal_lengths_in_first_seen_order_and_split_at_the_budget():
    assert equal_length_groups([5, 7, 5, 5, 7]) == [[0, 2, 3], [1, 4]]
    assert equal_length_groups([5, 7, 5, 5, 7], max_total=10) == [[0, 2], [3], [1], [4]]
    assert equal_length_groups([50], max_total=10) == [[0]]  # too long for the budget: alone
    assert equal_length_groups([]) == []


def test_vocoding_equal_lengths_together_gives_each_utterance_its_own_waveform(tiny_tts, monkeypatch):
    """With the random source replaced by a fixed one, a row vocoded with others of its length is the
    row vocoded alone: HiFi-GAN is exact per row once no row is padded."""
    s3gen = tiny_tts.s3gen
    # A source without random draws (phase, noise), the same function of each row's f0.
    monkeypatch.setattr(s3gen.mel2wav.m_source, "forward", lambda f0: (torch.sin(f0.cumsum(1) * 1e-3), None, None))
    generator = torch.Generator().manual_seed(0)
    mels = [torch.randn(80, frames, generator=generator) - 5 for frames in (20, 32, 20, 20)]
    with torch.inference_mode():
        together = vocode_all(s3gen, mels)
        for mel, wav in zip(mels, together):
            alone, _ = s3gen.hift_inference(mel[None], None)
            alone[:, : len(s3gen.trim_fade)] *= s3gen.trim_fade
            torch.testing.assert_close(wav, alone[0], rtol=1e-5, atol=1e-6)
    assert [wav.numel() for wav in together] == [mel.size(-1) * 480 for mel in mels]


def test_watermarking_many_matches_upstream_one_at_a_time(tiny_tts):
    rate = 24_000
    generator = np.random.default_rng(0)
    wavs = [(0.1 * generator.standard_normal(n)).astype(np.float32) for n in (12_000, 20_000, 12_000)]
    together = watermark_all(tiny_tts.watermarker, wavs, rate)
    for wav, marked in zip(wavs, together):
        alone = tiny_tts.watermarker.apply_watermark(wav, sample_rate=rate)
        assert marked.shape == alone.shape
        np.testing.assert_allclose(marked, alone, rtol=1e-4, atol=1e-5)


def test_another_watermarker_is_applied_one_by_one():
    class Marker:
        def apply_watermark(self, wav, sample_rate):
            return wav + sample_rate

    assert [w.tolist() for w in watermark_all(Marker(), [np.zeros(2), np.ones(3)], 10)] == [[10, 10], [11, 11, 11]]


def test_fewer_flow_steps_is_explicit_and_its_difference_measured(tiny_tts, monkeypatch):
    from chatterbox_lab.pipeline.synthesis import synthesize
    from chatterbox_lab.s3gen.s3gen_steps import fewer_flow_steps_error
    from chatterbox_lab.validation import check_flow_steps

    tokens = torch.randint(0, 6561, (1, 12), generator=torch.Generator().manual_seed(1))
    assert fewer_flow_steps_error(tiny_tts, tokens, 10) == 0.0  # upstream's own count
    assert fewer_flow_steps_error(tiny_tts, tokens, 2) > 0.0
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="flow_steps must be a whole number"):
            check_flow_steps(bad)
    estimator = tiny_tts.s3gen.flow.decoder.estimator
    calls = []

    def counted(*args, **kwargs):  # upstream's Euler loop calls `estimator.forward` directly
        calls.append(1)
        return type(estimator).forward(estimator, *args, **kwargs)
    monkeypatch.setattr(estimator, "forward", counted)
    synthesize(tiny_tts, "Three steps.", max_new_tokens=4, watermark=False, flow_steps=3)
    assert len(calls) == 3
    calls.clear()
    synthesize(tiny_tts, "Upstream's ten.", max_new_tokens=4, watermark=False)
    assert len(calls) == 10
