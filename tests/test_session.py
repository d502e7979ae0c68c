"""The serving session: output length, thread safety (bad input: tests/test_bad_input.py)."""
import threading

import numpy as np
import pytest
import torch

from chatterbox_lab.kernels.picks import KernelPicks
from chatterbox_lab.pipeline.synthesis import SAMPLES_PER_TOKEN
from chatterbox_lab.serving.session import TTSSession
from chatterbox_lab.validation import check_text

TOKENS = 8


@pytest.fixture(scope="module")
def session():
    # Its own model: the steps a session applies change its model in place.
    s = TTSSession(preset="tiny", device="cpu", max_new_tokens=64)
    s.warmup()
    yield s
    s.close()


def test_a_session_defaults_to_the_recommended_steps_of_its_device(session):
    from chatterbox_lab import registry
    from chatterbox_lab.s3gen.s3gen_steps import s3gen_steps_of

    assert session.decoder.steps == {"static_cache", "embed_cache"} == set(registry.preset("recommended", "cpu"))
    assert not s3gen_steps_of(session.tts)
    assert session.decoder.picks == KernelPicks()  # no card, so no shipped picks


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
        # Nothing in C++ thread-local storage: its release at thread exit needs the GIL,
        # which a worker ending during interpreter shutdown cannot take (the process aborts).
        seen.append(torch._C._is_key_in_tls("tree_manager_containers"))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [{}, False]


def test_the_session_worker_holds_nothing_its_exit_must_release_under_the_gil(session):
    """With Inductor's graphs (`compiled`, not our own capture), the worker gets its own tree state
    in Python only: the trees were imported on the session's thread, not the worker."""
    from torch._inductor import cudagraph_trees as trees

    compiled = TTSSession(tts=session.tts, steps=("static_cache", "embed_cache", "compiled"))
    try:
        state = compiled._worker.submit(lambda: (hasattr(trees.local, "tree_manager_containers"),
                                                 torch._C._is_key_in_tls("tree_manager_containers"))).result()
    finally:
        compiled.close()
    assert state == (True, False)
    assert session._worker.submit(torch._C._is_key_in_tls, "tree_manager_containers").result() is False


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


def test_no_failed_request_poisons_the_session(session, monkeypatch):
    """A request refused at its checks, or one that fails inside the model, leaves the
    session giving exactly what it gave before."""
    from chatterbox_lab.pipeline import synthesis as pipeline

    expected = session.synthesize("The same words.", "alto", max_new_tokens=TOKENS, seed=9).wav
    for bad in [dict(exaggeration=float("nan")), dict(exaggeration=float("inf")), dict(exaggeration=1e300),
                dict(seed=2**64), dict(max_new_tokens=0)]:
        with pytest.raises(ValueError):
            session.synthesize("The same words.", "alto", **{"max_new_tokens": TOKENS, **bad})
        np.testing.assert_array_equal(session.synthesize("The same words.", "alto", max_new_tokens=TOKENS,
                                                         seed=9).wav, expected)

    def vocoder_fails(*args, **kwargs):
        raise RuntimeError("injected failure after T3")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "tokens_to_speech", vocoder_fails)
        with pytest.raises(RuntimeError, match="injected"):
            session.synthesize("The same words.", "tenor", max_new_tokens=TOKENS, exaggeration=1.5, seed=1)
    np.testing.assert_array_equal(session.synthesize("The same words.", "alto", max_new_tokens=TOKENS, seed=9).wav,
                                  expected)


def test_a_cancelled_request_stops_at_the_next_stop_check(session):
    from chatterbox_lab.pipeline.synthesis import Cancelled

    with pytest.raises(Cancelled, match="before the request started"):
        session.synthesize("Never spoken.", max_new_tokens=TOKENS, cancelled=lambda: True)
    asked = []

    def after_two_chunks():
        asked.append(1)
        return len(asked) > 2

    long_text = " ".join(["A sentence of its own, long enough to make a chunk of its own here."] * 12)
    with pytest.raises(Cancelled, match="stopped after"):
        session.synthesize(long_text, chunk=True, max_new_tokens=TOKENS, cancelled=after_two_chunks)
    assert len(session.synthesize("Then the next.", max_new_tokens=TOKENS).wav) == TOKENS * SAMPLES_PER_TOKEN


def test_registered_voices_are_kept_in_memory(session, tmp_path):
    import soundfile as sf

    from chatterbox_lab.pipeline.voices import voice_path

    wav, rate = sf.read(voice_path("alto"))
    sf.write(tmp_path / "gone.wav", 0.7 * wav, rate)
    session.register_voice("gone", tmp_path / "gone.wav")
    (tmp_path / "gone.wav").unlink()
    try:
        assert len(session.synthesize("Still here.", "gone", max_new_tokens=TOKENS).wav) == TOKENS * SAMPLES_PER_TOKEN
    finally:
        session.delete_voice("gone")
    with pytest.raises(FileNotFoundError):
        session.synthesize("Now gone.", "gone", max_new_tokens=TOKENS)


@pytest.fixture
def batching(session):
    """The module's session, decoding up to four waiting requests together, and a way to hold its
    worker busy so that requests queue behind it."""
    session.batch_requests = 4
    release = threading.Event()
    yield session, release
    release.set()
    session.batch_requests = 1


def _hold_worker(session, release):
    session._worker.submit(release.wait)


def test_waiting_requests_are_decoded_together_each_with_its_own_values(batching):
    from chatterbox_lab.sampling import SamplingParams

    session, release = batching
    session.warmup(progress=False)
    assert "batches" in session.startup_s and set(session._request_decoders) == {2, 4}
    # Each stream's tokens with its own values: tests/test_decoder.py. Here, the session's part.
    before = session.batches_served.copy()
    _hold_worker(session, release)
    futures = [session.submit("A first request.", "alto", sampling=SamplingParams(top_p=1e-6), max_new_tokens=TOKENS),
               session.submit("A second request.", "tenor", sampling=SamplingParams(temperature=1.1, top_p=0.9),
                              max_new_tokens=TOKENS - 3, exaggeration=0.9),
               session.submit("A third.", "alto", max_new_tokens=TOKENS + 2)]
    release.set()
    speeches = [f.result(timeout=120) for f in futures]
    assert session.batches_served - before == {3: 1}
    assert [len(s.wav) for s in speeches] == [n * SAMPLES_PER_TOKEN for n in (TOKENS, TOKENS - 3, TOKENS + 2)]
    assert all(np.isfinite(s.wav).all() for s in speeches)
    assert all(s.seconds["t3"] == speeches[0].seconds["t3"] for s in speeches)  # one decode for all three


def test_a_request_with_a_seed_runs_alone(batching):
    session, release = batching
    before = session.batches_served.copy()
    _hold_worker(session, release)
    futures = [session.submit("Seeded.", "alto", max_new_tokens=TOKENS, seed=3) for _ in range(2)]
    release.set()
    first, second = (f.result(timeout=120).wav for f in futures)
    np.testing.assert_array_equal(first, second)
    assert session.batches_served == before


def test_a_request_given_up_or_failing_leaves_the_rest_of_its_batch_served(batching, monkeypatch):
    from chatterbox_lab.pipeline.synthesis import Cancelled

    session, release = batching
    use = session.voices.use

    def use_failing_for_tenor(voice, exaggeration=0.5):
        if "tenor" in str(voice):
            raise RuntimeError("this voice could not be prepared")
        return use(voice, exaggeration)

    monkeypatch.setattr(session.voices, "use", use_failing_for_tenor)
    _hold_worker(session, release)
    gone = session.submit("Its caller left.", "alto", max_new_tokens=TOKENS, cancelled=lambda: True)
    failing = session.submit("Its voice fails.", "tenor", max_new_tokens=TOKENS)
    served = [session.submit("Served.", "alto", max_new_tokens=TOKENS) for _ in range(2)]
    release.set()
    with pytest.raises(Cancelled):
        gone.result(timeout=120)
    with pytest.raises(RuntimeError, match="could not be prepared"):
        failing.result(timeout=120)
    assert [len(f.result(timeout=120).wav) for f in served] == [TOKENS * SAMPLES_PER_TOKEN] * 2


@pytest.mark.parametrize("value, message", [(0, "from 1 to 64"), (65, "from 1 to 64"), (True, "whole number"),
                                            ("2", "whole number")])
def test_batch_requests_out_of_range_is_refused(session, value, message):
    with pytest.raises(ValueError, match=message):
        session.batch_requests = value
    assert session.batch_requests == 1


def test_batching_needs_the_static_cache_and_the_original_model(session):
    from chatterbox_lab.serving.session import check_batch_requests

    with pytest.raises(ValueError, match="static_cache and embed_cache"):
        TTSSession(tts=session.tts, steps=(), batch_requests=2)
    with pytest.raises(ValueError, match="turbo model serves one request at a time"):
        check_batch_requests(2, "turbo")
