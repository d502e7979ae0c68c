"""The serving session: output length, thread safety (bad input: tests/test_bad_input.py)."""
import threading

import numpy as np
import pytest

from chatterbox_lab.pipeline.synthesis import SAMPLES_PER_TOKEN
from chatterbox_lab.serving.session import TTSSession
from chatterbox_lab.validation import check_text

TOKENS = 8


@pytest.fixture(scope="module")
def session():
    # Its own model: the ladder's bf16 step casts T3 in place.
    s = TTSSession(preset="tiny", device="cpu", max_new_tokens=64)
    s.warmup()
    yield s
    s.close()


def test_synthesis_has_the_expected_length(session):
    speech = session.synthesize("A short sentence.", "tenor", max_new_tokens=TOKENS, seed=1)
    assert speech.wav.shape == (TOKENS * SAMPLES_PER_TOKEN,) and speech.wav.dtype == np.float32
    assert np.isfinite(speech.wav).all()
    assert speech.wav_bytes()[:4] == b"RIFF"


def test_utf8_bytes_are_accepted():
    assert check_text("café".encode()) == "café"


def test_voice_id_with_path_characters_is_refused(session):
    with pytest.raises(ValueError, match="voice id"):
        session.register_voice("../etc", "alto")


def test_concurrent_callers_get_their_own_results(session):
    """Same seed and request from several threads at once: identical, complete outputs."""
    expected = session.synthesize("Threads take turns.", "alto", max_new_tokens=TOKENS, seed=7).wav
    outputs, errors = [None] * 6, []

    def call(i):
        try:
            outputs[i] = session.synthesize("Threads take turns.", "alto", max_new_tokens=TOKENS, seed=7).wav
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    for out in outputs:
        np.testing.assert_array_equal(out, expected)



def test_worker_thread_gets_its_own_cudagraph_state():
    from torch._inductor import cudagraph_trees as trees

    from chatterbox_lab.serving.session import own_cudagraph_state

    seen = []

    def worker():
        own_cudagraph_state()
        seen.append(trees.get_obj(trees.local, "tree_manager_containers"))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [{}]


def test_a_registered_voice_is_prepared_before_its_first_request(session, tmp_path):
    import soundfile as sf

    from chatterbox_lab.pipeline.voices import voice_path

    wav, rate = sf.read(voice_path("tenor"))
    sf.write(tmp_path / "quieter.wav", 0.5 * wav, rate)  # new content: not in the voice cache yet
    before = session.voices.prepared_count
    session.register_voice("quieter", tmp_path / "quieter.wav")
    assert session.voices.prepared_count == before + 1
    session.synthesize("Registered, then spoken.", voice="quieter", max_new_tokens=4)
    assert session.voices.prepared_count == before + 1


def test_a_session_with_s3gen_steps_gives_the_same_length_and_close_audio():
    from chatterbox_lab.s3gen.s3gen_steps import S3GEN_STEPS, BucketedEstimator, s3gen_steps_of

    fast = TTSSession(preset="tiny", device="cpu", steps=("static_cache", "embed_cache"), s3gen_steps=S3GEN_STEPS,
                      max_new_tokens=64)
    plain = TTSSession(preset="tiny", device="cpu", steps=("static_cache", "embed_cache"), max_new_tokens=64)
    try:
        assert s3gen_steps_of(fast.tts) == set(S3GEN_STEPS) and not s3gen_steps_of(plain.tts)
        assert isinstance(fast.tts.s3gen.flow.decoder.estimator, BucketedEstimator)
        a = fast.synthesize("Same tokens either way.", max_new_tokens=20, seed=2)
        b = plain.synthesize("Same tokens either way.", max_new_tokens=20, seed=2)
        assert len(a.wav) == len(b.wav) == 20 * SAMPLES_PER_TOKEN
        assert float(np.linalg.norm(a.wav - b.wav) / np.linalg.norm(b.wav)) < 0.05
    finally:
        fast.close()
        plain.close()
