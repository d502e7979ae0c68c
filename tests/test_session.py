"""The serving session: bad input refused with a message and no output, thread safety."""
import threading

import numpy as np
import pytest
import soundfile as sf

from chatterbox_lab.pipeline import SAMPLES_PER_TOKEN
from chatterbox_lab.session import TTSSession
from chatterbox_lab.validation import MAX_TEXT_CHARS, check_text

TOKENS = 8


@pytest.fixture(scope="module")
def session():
    # Its own model: the ladder's bf16 step casts T3 in place.
    s = TTSSession(preset="tiny", device="cpu", max_new_tokens=64)
    s.warmup()
    return s


def test_synthesis_has_the_expected_length(session):
    speech = session.synthesize("A short sentence.", "tenor", max_new_tokens=TOKENS, seed=1)
    assert speech.wav.shape == (TOKENS * SAMPLES_PER_TOKEN,) and speech.wav.dtype == np.float32
    assert np.isfinite(speech.wav).all()
    assert speech.wav_bytes()[:4] == b"RIFF"


@pytest.mark.parametrize("text,message", [
    ("", "text is empty"),
    ("  \t\n", "text is empty"),
    ("x" * (MAX_TEXT_CHARS + 1), "over the limit"),
    (b"caf\xe9", "not valid UTF-8"),
])
def test_bad_text(session, text, message):
    with pytest.raises(ValueError, match=message):
        session.synthesize(text, max_new_tokens=TOKENS)


def test_utf8_bytes_are_accepted():
    assert check_text("café".encode()) == "café"


@pytest.mark.parametrize("count", [0, -5, 2.5, True, 10_000])
def test_bad_token_counts(session, count):
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.synthesize("Hello.", max_new_tokens=count)


def test_unknown_voice(session):
    with pytest.raises(FileNotFoundError, match="bundled voices"):
        session.synthesize("Hello.", "nobody", max_new_tokens=TOKENS)


def _write(path, wav, sr):
    sf.write(path, wav, sr)
    return path


def test_voice_files(session, tmp_path):
    t = np.arange(int(3 * 16000)) / 16000
    speechy = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    stereo_44k = np.stack([np.interp(np.arange(3 * 44100) / 44100, t, speechy)] * 2, axis=1)
    session.register_voice("stereo44k", _write(tmp_path / "stereo.wav", stereo_44k, 44100))
    session.register_voice("mono16k", _write(tmp_path / "mono.flac", speechy, 16000))
    for name in ("stereo44k", "mono16k"):
        assert session.synthesize("Hi.", name, max_new_tokens=TOKENS).wav.size == TOKENS * SAMPLES_PER_TOKEN
    long = np.tile(speechy, 5)  # 15 s
    with pytest.warns(UserWarning, match="only its first 10 s are used"):
        session.register_voice("long", _write(tmp_path / "long.wav", long, 16000))
    for bad, message in [(_write(tmp_path / "silent.wav", np.zeros(48000, np.float32), 16000), "silent"),
                         (_write(tmp_path / "short.wav", speechy[:8000], 16000), "at least 1 s"),
                         (_write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000), "at least 1 s")]:
        with pytest.raises(ValueError, match=message):
            session.register_voice("bad", bad)
    (tmp_path / "text.wav").write_text("RIFF but not really")
    with pytest.raises(ValueError, match="cannot read"):
        session.register_voice("bad", tmp_path / "text.wav")
    with pytest.raises(ValueError, match="voice id"):
        session.register_voice("../etc", tmp_path / "mono.flac")


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

    from chatterbox_lab.session import own_cudagraph_state

    seen = []

    def worker():
        own_cudagraph_state()
        seen.append(trees.get_obj(trees.local, "tree_manager_containers"))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [{}]
