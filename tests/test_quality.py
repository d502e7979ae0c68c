"""The 8-bit steps' quality figures on the tiny synthetic model (random weights: a check of the
measurement, not of the formats), and the one-call check on a real checkpoint where one is given."""
import copy
import os

import pytest
import torch

from chatterbox_lab.decode.decoder import text_tokens_for
from chatterbox_lab.measure import quality

TEXT = "Eight bits a weight."


@pytest.fixture(scope="module")
def own_tts(tiny_tts):
    """The shared model with its own T3: the 8-bit steps' decoders cast T3 to bf16 in place."""
    tts = copy.copy(tiny_tts)
    tts.t3 = copy.deepcopy(tiny_tts.t3)
    return tts


@pytest.fixture(scope="module")
def reference(own_tts):
    return quality.fp32_reference(own_tts, text_tokens_for(own_tts, TEXT), 8, seed=3)


@pytest.mark.parametrize("step", quality.EIGHT_BIT_STEPS)
def test_every_8_bit_step_is_measured_the_same_way(own_tts, reference, step):
    figures = quality.format_quality(own_tts, {"static_cache", "embed_cache"}, step, reference, TEXT, 8, seed=3,
                                     audio=step == "int8_weights")
    assert 0 < figures["logit_error_vs_bf16"] < quality.LOGIT_TOLERANCE[step]
    assert 0 < figures["logit_error_vs_fp32"] and 0 < figures["bf16_logit_error_vs_fp32"]
    assert 0 <= figures["same_draw_agreement"] <= 1 and 0 <= figures["free_tokens_identical"] <= 8
    assert figures["cache_slots"] <= figures["capacity"]
    if step == "int8_weights":
        assert figures["mel_difference"] >= 0 and figures["waveform_difference"] >= 0
        assert (figures["mel_difference"] == 0) == (figures["free_tokens_identical"] == 8)
    assert set(figures["tolerances"]) <= {"logit_error_vs_bf16", "same_draw_agreement", "mel_difference"}


def test_the_same_logits_agree_at_every_step_and_the_reference_needs_fp32(own_tts, reference):
    logits = reference["logits"]
    start = own_tts.t3.hp.start_speech_token
    assert quality.same_draw_agreement(logits, logits, reference["forced"], start, quality.SamplingParams(), 0) == 1
    # Flat logits against peaked ones: the draws part.
    flat = torch.zeros_like(logits)
    assert quality.same_draw_agreement(flat, logits * 50, reference["forced"], start, quality.SamplingParams(), 0) < 1
    bf16 = copy.copy(own_tts)
    bf16.t3 = copy.deepcopy(own_tts.t3).to(torch.bfloat16)
    with pytest.raises(ValueError, match="needs T3 in fp32"):
        quality.fp32_reference(bf16, text_tokens_for(own_tts, TEXT), 4, 0)


def test_check_quality_refuses_what_it_cannot_measure():
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at /nowhere"):
        quality.check_quality("/nowhere")
    with pytest.raises(ValueError, match="unknown 8-bit steps"):
        quality.check_quality("synthetic", formats=("int4_weights",), preset="tiny", device="cpu")


@pytest.mark.skipif(not os.environ.get("CHATTERBOX_CHECKPOINT"),
                    reason="set CHATTERBOX_CHECKPOINT to a real checkpoint directory to measure real-weight quality")
def test_real_weights_keep_their_quality_in_8_bits():
    found = quality.check_quality(os.environ["CHATTERBOX_CHECKPOINT"])
    for step, figures in found.items():
        assert figures.get("skipped") or figures["within_tolerance"], (step, figures)


def test_the_bench_measures_8_bit_rungs_with_their_quality_floor_and_batches(tiny_tts, monkeypatch, capsys):
    """An 8-bit rung's record: its quality against bf16, the floor of its formats, its batches beside
    the last rung's; a torchao rung without torchao (or off a GPU) is skipped, saying why."""
    import functools

    from chatterbox_lab.measure import bench
    from chatterbox_lab.measure.bench import BenchConfig, run

    monkeypatch.setattr(bench.quality, "format_quality", functools.partial(quality.format_quality, audio=False))
    tts = copy.copy(tiny_tts)
    tts.t3 = copy.deepcopy(tiny_tts.t3)  # the quality's decoders cast T3 to bf16 in place
    doc = run(BenchConfig(rungs=("int8_kv_cache", "torchao_int8"), tokens=8, repeats=1, profile=False, device="cpu",
                          batch_sizes=(2,), batch_rungs=("int8_kv_cache",)), progress=False, tts=tts)
    assert "torchao" in doc["skipped_rungs"]["torchao_int8"] and "skipped: " in capsys.readouterr().err
    rung = doc["rungs"]["int8_kv_cache"]
    assert rung["cache_format"] == "int8" and rung["weights_format"] == "model" and rung["fraction_of_floor"] > 0
    figures = doc["quality"]["int8_kv_cache"]
    assert figures["tokens"] == 8 and "same_draw_agreement" in figures and "within_tolerance" in figures
    assert doc["batch_by_rung"]["int8_kv_cache"]["streams"]["2"]["kv_cache_mib"] > 0
    with pytest.raises(ValueError, match="batch rungs .* cannot batch"):
        BenchConfig(rungs=("recommended",), batch_sizes=(2,), batch_rungs=("torchao_int8",), device="cpu").resolved()
