import copy

import pytest

from chatterbox_lab.measure.flops import flow_flops, t3_cache_ceiling_x_realtime, utterance_flops, x_realtime_ceiling


def test_ceiling_is_audio_over_the_time_every_operation_takes_at_the_rate():
    # 10 s of audio, 4 TFLOP in all, 800 TFLOP/s: 5 ms of arithmetic, 2,000x real time.
    assert x_realtime_ceiling({"t3": 1e12, "s3gen_flow": 3e12}, 10.0, 800e12) == pytest.approx(2000)


def test_flow_count_scales_with_its_euler_steps_and_refuses_a_model_with_steps_applied(tiny_tts):
    two, four = flow_flops(tiny_tts, 12, 2), flow_flops(tiny_tts, 12, 4)
    # The estimator's share doubles; the encoder, counted once, is the rest.
    assert 0 < two < four < 2 * two
    stepped = copy.copy(tiny_tts)
    stepped._chatterbox_lab_s3gen_steps = frozenset({"flow_half"})
    for count in (lambda: flow_flops(stepped, 12), lambda: utterance_flops(stepped, "Hi.", 4)):
        with pytest.raises(ValueError, match="before any S3Gen step is applied"):
            count()


def test_the_cache_ceiling_is_bandwidth_over_the_cache_a_token_reads(tiny_tts):
    from chatterbox_lab.measure.roofline import kv_bytes_per_step

    per_token = kv_bytes_per_step(tiny_tts.t3, 100 + 32 / 2)
    assert t3_cache_ceiling_x_realtime(tiny_tts.t3, 100, 32, 25 * per_token) == pytest.approx(1.0)
