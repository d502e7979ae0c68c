"""Turbo and Multilingual served by the session and `say`: speech comes out, and bad input gets a
clear error before any model work (an unknown language, fields Turbo would ignore, a short clip)."""
import numpy as np
import pytest

from chatterbox_lab.__main__ import main
from chatterbox_lab.sampling import SamplingParams, TurboSamplingParams
from chatterbox_lab.serving.session import TTSSession

TOKENS = 12


@pytest.fixture(scope="module")
def turbo_session(tiny_turbo):
    session = TTSSession(model="turbo", tts=tiny_turbo, max_new_tokens=32)
    yield session
    session.close()


@pytest.fixture(scope="module")
def multilingual_session(tiny_multilingual):
    session = TTSSession(model="multilingual", tts=tiny_multilingual, max_new_tokens=32)
    yield session
    session.close()


def test_turbo_session_speaks(turbo_session):
    speech = turbo_session.synthesize("Hello there.", "alto", max_new_tokens=TOKENS, seed=1,
                                      sampling=TurboSamplingParams(top_k=200))
    # The tokens and upstream's three silence tokens, 960 samples each at 24 kHz.
    assert len(speech.wav) == (TOKENS + 3) * 960 and np.isfinite(speech.wav).all()
    assert type(turbo_session.decoder).__name__ == "TurboDecoder"


def test_multilingual_session_speaks_a_language(multilingual_session):
    speech = multilingual_session.synthesize("Καλημέρα σας.", "alto", max_new_tokens=TOKENS, seed=1, language="el")
    assert len(speech.wav) == TOKENS * 960 and np.isfinite(speech.wav).all()


def test_turbo_refuses_what_upstream_would_ignore(turbo_session):
    with pytest.raises(ValueError, match="cfg_weight and min_p do not apply to the turbo model .* would ignore them"):
        turbo_session.submit("Hello.", "alto", sampling=SamplingParams())
    with pytest.raises(ValueError, match="speaks English only, got language 'fr'"):
        turbo_session.submit("Bonjour.", "alto", language="fr")
    with pytest.raises(ValueError, match="batched decoding runs the original model's decoder only"):
        turbo_session.submit_many(["Hello."], ["alto"])


def test_turbo_refuses_a_clip_of_five_seconds_or_less(turbo_session, tmp_path):
    import soundfile as sf

    clip = tmp_path / "short.wav"
    sf.write(clip, 0.1 * np.sin(np.arange(24_000 * 3) / 20.0).astype(np.float32), 24_000)
    with pytest.raises(ValueError, match="clip is 3.0 s long; the turbo model needs one longer than 5 s"):
        turbo_session.submit("Hello.", str(clip))


def test_multilingual_refuses_unknown_and_unprepared_languages(multilingual_session):
    with pytest.raises(ValueError, match="unknown language 'klingon'"):
        multilingual_session.submit("Hello.", "alto", language="klingon")
    with pytest.raises(ValueError, match="'he' needs the optional package 'dicta-onnx'"):
        multilingual_session.submit("Hello.", "alto", language="he")


@pytest.mark.parametrize("arguments, message", [
    (["--model", "turbo", "--cfg-weight", "0.3"], "cfg_weight does not apply to the turbo model"),
    (["--model", "turbo", "--min-p", "0.1", "--cfg-weight", "0"], "cfg_weight and min_p do not apply"),
    (["--top-k", "50"], "top_k applies to the turbo model only"),
    (["--model", "multilingual", "--language", "xx"], "unknown language 'xx'"),
    (["--model", "original", "--language", "fr"], "speaks English only"),
    (["--model", "mini"], "invalid choice: 'mini'"),
])
def test_say_refuses_bad_model_fields_before_loading(arguments, message, tmp_path, capsys, monkeypatch):
    from chatterbox_lab.loading import models

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_tts", no_loading)
    with pytest.raises(SystemExit):
        main(["say", "Hello.", "--out", str(tmp_path / "x.wav"), "--device", "cpu", *arguments])
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def turbo_server(turbo_session):
    from chatterbox_lab.measure.soak import LoopbackServer
    from chatterbox_lab.serving.server import create_app

    with LoopbackServer(create_app(turbo_session)) as running:
        yield running


def test_turbo_server_speaks_and_refuses_the_fields_turbo_ignores(turbo_server):
    import httpx

    ok = httpx.post(f"{turbo_server.url}/synthesize", timeout=120,
                    json={"text": "Hello.", "max_new_tokens": TOKENS, "top_k": 100, "model": "turbo"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "audio/wav"
    for body, detail in [({"cfg_weight": 0.5}, "cfg_weight does not apply to the turbo model"),
                         ({"min_p": 0.1}, "min_p does not apply to the turbo model"),
                         ({"top_k": -1}, "top_k must be a whole number >= 0"),
                         ({"language": "fr"}, "speaks English only"),
                         ({"model": "multilingual"}, "this server serves the turbo model, not 'multilingual'")]:
        refused = httpx.post(f"{turbo_server.url}/synthesize", json={"text": "Hi.", **body}, timeout=60)
        assert refused.status_code == 422 and detail in str(refused.json()["detail"]), body
