"""S3Gen's steps on the CPU, tiny preset: same audio from padded buckets, half precision within
its stated tolerance, steps applied once and in any order."""
import pytest
import torch

from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.s3gen.s3gen_steps import (HALF_FLOW_TOLERANCE, S3GEN_STEPS, BucketedEncoder, BucketedEstimator,
                                              apply_s3gen_steps, half_flow_error, s3gen_steps_of)

TEXT = "The waveform side, made fast without changing what it computes."


@pytest.fixture()
def fresh_tts():
    """Steps change a model in place: each test gets its own."""
    from chatterbox_lab.loading.models import load_tts
    from chatterbox_lab.pipeline.voices import voice_path

    tts = load_tts(preset="tiny", device="cpu")
    tts.prepare_conditionals(str(voice_path("alto")))
    return tts


def _mels(tts, tokens, seed=0):
    torch.manual_seed(seed)
    return tts.s3gen.flow_inference(tokens, ref_dict=tts.conds.gen, finalize=True)


@pytest.mark.parametrize("n_tokens", [5, 32, 33])
def test_padded_buckets_give_the_unpadded_mels(fresh_tts, n_tokens):
    tokens = torch.randint(0, 6561, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    plain = _mels(fresh_tts, tokens)
    apply_s3gen_steps(fresh_tts, ["flow_graphs"])
    assert isinstance(fresh_tts.s3gen.flow.decoder.estimator, BucketedEstimator)
    frames = plain.size(-1) + 2 * fresh_tts.conds.gen["prompt_token"].size(-1)
    assert frames % 64 != 0  # the call is padded
    torch.testing.assert_close(_mels(fresh_tts, tokens), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_tokens", [5, 40])
def test_encoder_buckets_give_the_unpadded_mels(fresh_tts, n_tokens):
    tokens = torch.randint(0, 6561, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
    plain = _mels(fresh_tts, tokens)
    apply_s3gen_steps(fresh_tts, ["encoder_graphs"])
    encoder = fresh_tts.s3gen.flow.encoder
    assert isinstance(encoder, BucketedEncoder)
    assert (fresh_tts.conds.gen["prompt_token"].size(-1) + n_tokens) % encoder.token_bucket != 0  # padded
    torch.testing.assert_close(_mels(fresh_tts, tokens), plain, rtol=1e-5, atol=1e-5)


def test_compiled_estimator_gives_the_eager_mels_for_every_bucket(fresh_tts):
    apply_s3gen_steps(fresh_tts, ["flow_graphs"])
    for n_tokens in (5, 40):  # two buckets, one compile
        tokens = torch.randint(0, 6561, (n_tokens,), generator=torch.Generator().manual_seed(n_tokens))
        plain = _mels(fresh_tts, tokens)
        apply_s3gen_steps(fresh_tts, ["flow_compiled"])
        assert fresh_tts.s3gen.flow.decoder.estimator.compiled
        torch.testing.assert_close(_mels(fresh_tts, tokens), plain, rtol=1e-4, atol=1e-4)


def test_fused_projections_give_the_same_mels_with_one_copy_of_each_weight(fresh_tts):
    from diffusers.models.attention_processor import Attention

    tokens = torch.randint(0, 6561, (20,), generator=torch.Generator().manual_seed(3))
    plain = _mels(fresh_tts, tokens)
    estimator = fresh_tts.s3gen.flow.decoder.estimator
    weights_before = sum(p.numel() for p in estimator.parameters())
    apply_s3gen_steps(fresh_tts, ["flow_graphs", "flow_fused_projections"])
    attentions = [m for m in estimator.modules() if isinstance(m, Attention)]
    assert attentions and all(a.fused_projections for a in attentions)
    storages = {p.untyped_storage().data_ptr() for p in estimator.parameters()}
    assert attentions[0].to_q.weight.untyped_storage().data_ptr() == attentions[0].to_qkv.weight.untyped_storage().data_ptr()
    assert len(storages) < len(list(estimator.parameters()))  # q, k, v are views of to_qkv
    assert sum(p.numel() for p in estimator.parameters()) > weights_before  # counted twice by numel, stored once
    torch.testing.assert_close(_mels(fresh_tts, tokens), plain, rtol=1e-4, atol=1e-4)
    apply_s3gen_steps(fresh_tts, ["flow_half"])  # the cast copies each view; the step shares them again
    assert {p.untyped_storage().data_ptr() for p in estimator.parameters()} == \
        {p.untyped_storage().data_ptr() for p in estimator.parameters() if p not in
         {a.to_q.weight for a in attentions} | {a.to_k.weight for a in attentions} | {a.to_v.weight for a in attentions}}


def test_flow_compiled_needs_the_graphs(fresh_tts):
    with pytest.raises(ValueError, match="'flow_compiled' needs flow_graphs"):
        apply_s3gen_steps(fresh_tts, ["flow_compiled"])
    assert s3gen_steps_of(fresh_tts) == frozenset()


def test_compiled_hifigan_gives_upstreams_audio_with_the_same_random_source(fresh_tts):
    hift = fresh_tts.s3gen.mel2wav

    def speech(mels):
        torch.manual_seed(0)  # the source's random phase and noise
        with torch.inference_mode():
            wav, source = hift.inference(speech_feat=mels, cache_source=torch.zeros(1, 1, 0))
        return wav

    all_mels = [torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(frames)) for frames in (50, 77)]
    eager = [speech(mels) for mels in all_mels]
    apply_s3gen_steps(fresh_tts, ["hifigan_compiled"])
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in hift.modules())  # weight norms folded
    for mels, reference in zip(all_mels, eager):  # two lengths, one compile
        torch.testing.assert_close(speech(mels), reference, rtol=1e-4, atol=1e-5)


def test_half_flow_error_is_within_its_tolerance(fresh_tts):
    tokens = torch.randint(0, 6561, (40,), generator=torch.Generator().manual_seed(1))
    error = half_flow_error(fresh_tts, tokens)
    print("float16 estimator, mel relative error", error)
    assert 0 < error <= HALF_FLOW_TOLERANCE
    assert fresh_tts.s3gen.flow.decoder.estimator.dtype == torch.float32  # left as it was
    apply_s3gen_steps(fresh_tts, ["flow_graphs"])
    assert half_flow_error(fresh_tts, tokens) == error  # also with the graphs' wrapper installed
    apply_s3gen_steps(fresh_tts, ["flow_half"])
    with pytest.raises(ValueError, match="before flow_half"):
        half_flow_error(fresh_tts, tokens)


def test_steps_apply_once_in_any_order(fresh_tts):
    assert s3gen_steps_of(fresh_tts) == frozenset()
    apply_s3gen_steps(fresh_tts, ["flow_graphs"])
    assert apply_s3gen_steps(fresh_tts, S3GEN_STEPS[1:]) == set(S3GEN_STEPS)
    estimator = fresh_tts.s3gen.flow.decoder.estimator
    assert isinstance(estimator, BucketedEstimator) and not isinstance(estimator.estimator, BucketedEstimator)
    assert estimator.dtype == torch.float16
    apply_s3gen_steps(fresh_tts, ["flow_graphs"])  # already on: nothing wraps twice
    assert fresh_tts.s3gen.flow.decoder.estimator is estimator
    speech = synthesize(fresh_tts, TEXT, max_new_tokens=24)
    assert speech.wav.size > 0 and torch.isfinite(torch.from_numpy(speech.wav)).all()


def test_unknown_step_is_refused(fresh_tts):
    with pytest.raises(ValueError, match="choose from flow_graphs"):
        apply_s3gen_steps(fresh_tts, ["flow_graph"])


def test_voice_encoders_visit_the_device_only_to_prepare_a_voice(fresh_tts, monkeypatch):
    """On the CPU nothing moves; the moves are recorded instead: to the model's device for the
    preparation, back to the host after it, and none for a request with the voice prepared."""
    from chatterbox_lab.pipeline.voices import prepare_voice

    apply_s3gen_steps(fresh_tts, ["voice_encoders_on_host"])
    encoders = (fresh_tts.s3gen.tokenizer, fresh_tts.s3gen.speaker_encoder)
    assert all(p.device.type == "cpu" for encoder in encoders for p in encoder.parameters())
    # Upstream reads S3Gen's device from the tokenizer; with it on the host, from the flow.
    assert fresh_tts.s3gen.device == next(fresh_tts.s3gen.flow.parameters()).device
    moves = []
    for name, encoder in zip(("tokenizer", "speaker_encoder"), encoders):
        monkeypatch.setattr(encoder, "to", lambda device, name=name, encoder=encoder: moves.append((name, str(device))) or encoder)
    monkeypatch.setattr(fresh_tts, "device", "gpu-like", raising=False)
    monkeypatch.setattr(fresh_tts, "prepare_conditionals", lambda path, exaggeration: moves.append(("prepared", path)))
    prepare_voice(fresh_tts, "alto")
    assert [m[0] for m in moves] == ["tokenizer", "speaker_encoder", "prepared", "tokenizer", "speaker_encoder"]
    assert [m[1] for m in moves[:2]] == ["gpu-like"] * 2 and [m[1] for m in moves[3:]] == ["cpu"] * 2
