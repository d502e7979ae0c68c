"""The HTTP example against a real server on 127.0.0.1, and the soak."""
import io

import httpx
import numpy as np
import pytest
import soundfile as sf

from chatterbox_lab.pipeline.synthesis import SAMPLES_PER_TOKEN
from chatterbox_lab.serving.server import create_app
from chatterbox_lab.serving.session import TTSSession
from chatterbox_lab.measure.soak import LoopbackServer, run_soak

# The first 50 requests fill per-shape caches (one set per token count and voice:
# oneDNN primitives, allocator pools; measured ~380 MiB on the tiny preset). From
# there to the end, resident memory may grow this much, no more (measured: 8 MiB
# over 250 requests).
RSS_GROWTH_BOUND_MIB = 50


# Few, so that the bound is reached in a test; a long request is this many tokens.
REGISTERED_VOICES = 3
LONG_TOKENS = 200


@pytest.fixture(scope="module")
def session():
    s = TTSSession(preset="tiny", device="cpu", max_new_tokens=LONG_TOKENS, max_registered_voices=REGISTERED_VOICES)
    s.warmup()
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(session):
    app = create_app(session)
    with LoopbackServer(app) as running:
        running.app, running.session = app, session
        yield running


def test_health_and_synthesis(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and {"alto", "tenor"} <= set(health["voices"]) and health["warmup_s"] > 0
    response = httpx.post(f"{server.url}/synthesize", json={"text": "Hello.", "max_new_tokens": 10}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
    wav, sr = sf.read(io.BytesIO(response.content))
    assert sr == 24000 and len(wav) == 10 * SAMPLES_PER_TOKEN


def test_voice_registration(server, tmp_path):
    t = np.arange(2 * 24000) / 24000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32), 24000, format="WAV")
    assert httpx.put(f"{server.url}/voices/sine", content=buffer.getvalue()).json() == {"voice": "sine"}
    response = httpx.post(f"{server.url}/synthesize", json={"text": "Hi.", "voice": "sine", "max_new_tokens": 4},
                          timeout=60)
    assert response.status_code == 200
    bad = httpx.put(f"{server.url}/voices/junk", content=b"not audio at all")
    assert bad.status_code == 422 and "cannot read" in bad.json()["detail"]


@pytest.mark.parametrize("body,status,detail", [
    ({"text": ""}, 422, "text is empty"),
    ({"text": "   "}, 422, "text is empty"),
    ({"text": "Hi.", "temperature": 0}, 422, "temperature must be in [0.01, 10], got 0"),
    ({"text": "Hi.", "top_p": 1.5}, 422, "top_p must be in (0, 1], got 1.5"),
    ({"text": "Hi.", "cfg_weight": -1}, 422, "cfg_weight must be in [0, 10], got -1"),
    ({"text": "Hi.", "max_new_tokens": -3}, 422, "must be a positive integer, got -3"),
    ({"text": "Hi.", "max_new_tokens": LONG_TOKENS + 1}, 422, "over this session's limit"),
    ({"text": "Hi.", "voice": "nobody"}, 404, "not found"),
])
def test_bad_requests(server, body, status, detail):
    response = httpx.post(f"{server.url}/synthesize", json=body, timeout=60)
    assert response.status_code == status
    assert detail in str(response.json()["detail"])


@pytest.mark.parametrize("voice", ["/etc/passwd", "/etc/no-such-file", "../data/voices/alto.wav",
                                   "data/voices/alto.wav", "~/.bashrc", "alto.wav"])
def test_a_voice_is_a_name_never_a_server_path(server, voice):
    """Existing and missing files get the same answer, which holds no path of the server."""
    from chatterbox_lab.pipeline.voices import VOICES_DIR

    response = httpx.post(f"{server.url}/synthesize", json={"text": "Hi.", "voice": voice, "max_new_tokens": 4},
                          timeout=60)
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert detail.startswith(f"voice {voice!r} not found; voices: alto, ")
    assert str(VOICES_DIR.parent) not in detail and "/tmp" not in detail


def test_nan_is_rejected(server):
    response = httpx.post(f"{server.url}/synthesize", content=b'{"text": "Hi.", "temperature": NaN}',
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 422


SOAK_REQUESTS = 150  # three memory samples after the first; the hostile soak below adds its own


def test_soak(server):
    report = run_soak(server.url, ["alto", "tenor"], requests=SOAK_REQUESTS, clients=4, time_limit_s=480)
    print(report)
    assert report["errors"] == 0, report["first_errors"]
    assert report["completed"] == SOAK_REQUESTS and report["not_started"] == 0
    assert report["bad_lengths"] == 0
    assert report["recompiles"] == 0 and report["new_frames"] == 0
    after_burn_in = report["rss_every_50"][0][1]
    assert report["rss_end_mib"] - after_burn_in < RSS_GROWTH_BOUND_MIB, report["rss_every_50"]


def test_voice_id_with_odd_characters_is_refused(server):
    response = httpx.put(f"{server.url}/voices/a.b", content=b"x")
    assert response.status_code == 422 and "voice id" in response.json()["detail"]


def test_soak_command_with_s3gen_steps(tmp_path, capsys):
    import json

    from chatterbox_lab.__main__ import main
    from chatterbox_lab.s3gen.s3gen_steps import S3GEN_STEPS

    out = tmp_path / "soak.json"
    assert main(["soak", "--requests", "4", "--clients", "2", "--preset", "tiny", "--device", "cpu", "--s3gen",
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    report = doc["rungs"]["soak"]
    assert report["completed"] == 4 and report["errors"] == 0 and report["bad_lengths"] == 0
    assert doc["provenance"]["s3gen_steps"] == sorted(S3GEN_STEPS)


def test_soak_command_compares_batched_requests_with_one_at_a_time(tmp_path):
    import json

    from chatterbox_lab.__main__ import main

    out = tmp_path / "soak.json"
    assert main(["soak", "--requests", "16", "--clients", "8", "--preset", "tiny", "--device", "cpu",
                 "--batch-requests", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())["rungs"]["soak"]
    for phase in (report, report["one_at_a_time"]):
        assert phase["completed"] == 16 and phase["errors"] == 0 and phase["bad_lengths"] == 0, phase
        assert phase["recompiles"] == 0 and phase["x_realtime"] > 0
    assert report["batch_requests"] == 4 and max(map(int, report["batches_served"])) > 1, report["batches_served"]


# Hostile use, one test per class of defect. Each asserts the status and the message a
# caller sees, and that the server keeps serving valid requests afterwards.

def wav_bytes(seconds=2.0, rate=24000, frequency=150.0) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), rate, format="WAV",
             subtype="PCM_16")
    return buffer.getvalue()


def speak(server, tokens=4, **fields):
    return httpx.post(f"{server.url}/synthesize", json={"text": "Hi.", "max_new_tokens": tokens, **fields},
                      timeout=120)


def assert_speech(response, tokens=4):
    assert response.status_code == 200, response.text
    wav, sr = sf.read(io.BytesIO(response.content))
    assert sr == 24000 and len(wav) == tokens * SAMPLES_PER_TOKEN


@pytest.fixture
def cleanup(server):
    """Voice ids a test registers, deleted afterwards so the next test has room under the bound."""
    ids = []
    yield ids
    for voice in ids:
        httpx.delete(f"{server.url}/voices/{voice}")


def test_a_failed_reupload_keeps_the_voice(server, cleanup):
    cleanup.append("keeper")
    assert httpx.put(f"{server.url}/voices/keeper", content=wav_bytes()).status_code == 200
    before = speak(server, voice="keeper", seed=3)
    for bad, message in [(b"not audio at all", "cannot read the recording for voice 'keeper' as audio"),
                         (wav_bytes(0.5), "is 0.50 s long"), (wav_bytes(2.0, frequency=0), "is silent")]:
        response = httpx.put(f"{server.url}/voices/keeper", content=bad)
        assert response.status_code == 422 and message in response.json()["detail"]
        assert "/tmp" not in response.json()["detail"]
        assert speak(server, voice="keeper", seed=3).content == before.content


@pytest.mark.parametrize("voice", ["alto", "tenor"])
def test_bundled_voices_are_read_only(server, voice):
    before = speak(server, voice=voice, seed=4)
    for response in [httpx.put(f"{server.url}/voices/{voice}", content=wav_bytes()),
                     httpx.put(f"{server.url}/voices/{voice}", content=b"junk"),
                     httpx.delete(f"{server.url}/voices/{voice}")]:
        assert response.status_code == 403 and "bundled and read-only" in response.json()["detail"]
    assert speak(server, voice=voice, seed=4).content == before.content


def test_concurrent_uploads_to_one_id(server, cleanup):
    """Good and bad uploads at once: each gets its own honest answer, and the voice stays usable."""
    from concurrent.futures import ThreadPoolExecutor

    cleanup.append("contested")
    bodies = [wav_bytes(2.0, frequency=100 + 20 * i) if i % 2 == 0 else b"junk" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda body: httpx.put(f"{server.url}/voices/contested", content=body,
                                                     timeout=120).status_code, bodies))
    assert codes == [200 if i % 2 == 0 else 422 for i in range(8)]
    assert_speech(speak(server, voice="contested"))


def test_voices_are_bounded_and_can_be_deleted(server, cleanup):
    registered = [v for v in httpx.get(f"{server.url}/health").json()["voices"] if v not in ("alto", "tenor")]
    room = REGISTERED_VOICES - len(registered)
    ids = [f"v{i}" for i in range(room)]
    cleanup.extend(ids)
    for voice in ids:
        assert httpx.put(f"{server.url}/voices/{voice}", content=wav_bytes()).status_code == 200
    full = httpx.put(f"{server.url}/voices/onemore", content=wav_bytes())
    assert full.status_code == 409 and "the limit: delete one first" in full.json()["detail"]
    # At the bound, an id that exists can still be replaced.
    assert httpx.put(f"{server.url}/voices/{ids[0]}", content=wav_bytes(frequency=200)).status_code == 200
    assert httpx.delete(f"{server.url}/voices/{ids[0]}").json() == {"deleted": ids[0]}
    assert speak(server, voice=ids[0]).status_code == 404
    again = httpx.delete(f"{server.url}/voices/{ids[0]}")
    assert again.status_code == 404 and "is not registered" in again.json()["detail"]
    assert httpx.put(f"{server.url}/voices/onemore", content=wav_bytes()).status_code == 200
    cleanup.append("onemore")


@pytest.mark.parametrize("voice_id,message", [
    ("x" * 65, "voice id is 65 characters, over the limit of 64"),
    ("x" * 5000, "voice id is 5000 characters"),
    ("caf%C3%A9", "must be ASCII letters, digits"),
    ("a%00b", "must be ASCII letters, digits"),
    ("a.b", "must be ASCII letters, digits"),
])
def test_odd_voice_ids_are_refused(server, voice_id, message):
    response = httpx.put(f"{server.url}/voices/{voice_id}", content=wav_bytes())
    assert response.status_code == 422 and message in response.json()["detail"]


def test_uploads_leave_no_file_and_their_folder_goes_at_shutdown(session, tmp_path):
    """Its own server on the shared session: stopping it must remove the uploads folder."""
    app = create_app(session)
    uploads = app.state.uploads
    with LoopbackServer(app) as other:
        assert httpx.put(f"{other.url}/voices/passing", content=wav_bytes()).status_code == 200
        assert httpx.put(f"{other.url}/voices/failing", content=b"junk").status_code == 422
        assert list(uploads.iterdir()) == []
        httpx.delete(f"{other.url}/voices/passing")
    assert not uploads.exists()


def test_upload_size_is_enforced_while_reading(server):
    """Declared or not, a body over the limit is refused without being held in memory."""
    from chatterbox_lab.serving.server import MAX_VOICE_BYTES
    from chatterbox_lab.measure.soak import rss_mib

    declared = httpx.put(f"{server.url}/voices/big", content=b"\0" * (MAX_VOICE_BYTES + 1))
    assert declared.status_code == 413 and "over the limit of 20 MB" in declared.json()["detail"]

    def undeclared_body():  # chunked, no Content-Length: 200 MB of it
        for _ in range(200):
            yield b"\0" * (1 << 20)

    before = rss_mib()
    try:
        response = httpx.put(f"{server.url}/voices/big", content=undeclared_body(), timeout=60)
        assert response.status_code == 413
    except httpx.TransportError:
        pass  # the server answered and closed while the client was still sending: also a refusal
    assert rss_mib() - before < 60  # the server runs in this process: it held no 200 MB
    assert_speech(speak(server))


def test_every_endpoint_has_a_body_limit(server):
    from chatterbox_lab.serving.server import MAX_REQUEST_BYTES

    padding = "x" * MAX_REQUEST_BYTES
    for path in ["/synthesize", "/v1/audio/speech"]:
        response = httpx.post(f"{server.url}{path}", json={"text": "Hi.", "input": "Hi.", "pad": padding})
        assert response.status_code == 413 and "over the limit of 64 KB" in response.text


def test_a_long_reference_is_read_only_as_far_as_used(server, cleanup):
    import time

    cleanup.append("lengthy")
    too_long = httpx.put(f"{server.url}/voices/lengthy", content=wav_bytes(600, rate=8000), timeout=60)
    assert too_long.status_code == 422 and "is 600 s long, over the limit of 300 s" in too_long.json()["detail"]
    start = time.perf_counter()
    accepted = httpx.put(f"{server.url}/voices/lengthy", content=wav_bytes(290, rate=16000), timeout=60)
    assert accepted.status_code == 200
    assert time.perf_counter() - start < 10  # a few seconds at most: 10 s of it are read, not 290


def test_abandoned_requests_do_not_delay_the_next(server):
    """Three clients give up on long requests; a short one behind them waits for at most the
    one already running, not for all three."""
    import time

    start = time.perf_counter()
    assert_speech(speak(server, tokens=LONG_TOKENS), tokens=LONG_TOKENS)
    long_s = time.perf_counter() - start

    def abandon(_):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{server.url}/synthesize", json={"text": "Hi.", "max_new_tokens": LONG_TOKENS},
                       timeout=long_s / 4)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(abandon, range(3)))
    start = time.perf_counter()
    assert_speech(speak(server))
    assert time.perf_counter() - start < 1.8 * long_s, long_s


FIELD_ERRORS = [
    ("text", "", "text is empty"),
    ("text", "你好", "use Chatterbox's multilingual model"),
    ("text", "x" * 601, "over the limit of 600"),
    ("voice", "/etc/passwd", "not found"),
    ("voice", "x" * 10_000, "not found"),
    ("temperature", 1e-300, "temperature must be in [0.01, 10]"),
    ("temperature", "hot", "valid number"),
    ("cfg_weight", 1e300, "cfg_weight must be in [0, 10]"),
    ("repetition_penalty", 1e300, "repetition_penalty must be in [0.1, 10]"),
    ("min_p", -0.5, "min_p must be in [0, 1]"),
    ("top_p", 0, "top_p must be in (0, 1]"),
    ("exaggeration", 1e300, "exaggeration must be in [0, 2]"),
    ("exaggeration", -1, "exaggeration must be in [0, 2]"),
    ("max_new_tokens", 10**30, "over T3's limit"),
    ("max_new_tokens", 0, "must be a positive integer"),
    ("seed", 2**64, "seed must be an integer from 0 to 2**64 - 1"),
    ("seed", -1, "seed must be an integer from 0 to 2**64 - 1"),
]


@pytest.mark.parametrize("field,value,message", FIELD_ERRORS, ids=[f"{f}={str(v)[:12]}" for f, v, _ in FIELD_ERRORS])
def test_a_bad_field_then_a_good_request(server, field, value, message):
    """After any refused request the next valid one gives exactly what it gave before."""
    expected = speak(server, seed=11)
    bad = speak(server, **{field: value})
    assert bad.status_code in (404, 422) and message in str(bad.json()["detail"])
    assert speak(server, seed=11).content == expected.content


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "exaggeration", "top_p"])
def test_non_finite_numbers_then_a_good_request(server, field, literal):
    expected = speak(server, seed=12)
    bad = httpx.post(f"{server.url}/synthesize", content=b'{"text": "Hi.", "%s": %s}' % (field.encode(), literal),
                     headers={"content-type": "application/json"}, timeout=60)
    assert bad.status_code == 422
    assert speak(server, seed=12).content == expected.content


# OpenAI's protocol, through OpenAI's own client.

def openai_client(server, api_key="unused"):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, timeout=120, max_retries=0)


@pytest.mark.parametrize("response_format", ["wav", "flac", "mp3", "opus"])
def test_openai_client_speech(server, response_format):
    audio = openai_client(server).audio.speech.create(model="tts-1", voice="alto", input="Hello there.",
                                                      response_format=response_format,
                                                      extra_body={"max_new_tokens": 8, "seed": 1})
    wav, sr = sf.read(io.BytesIO(audio.content))
    assert sr == 24000 and abs(len(wav) - 8 * SAMPLES_PER_TOKEN) <= (0 if response_format in ("wav", "flac")
                                                                      else 2048)  # lossy codecs pad frames
    assert np.abs(wav).max() > 0.001


def test_openai_client_streaming_pcm(server):
    with openai_client(server).audio.speech.with_streaming_response.create(
            model="tts-1", voice={"id": "tenor"}, input="Streamed to the client.", response_format="pcm",
            extra_body={"max_new_tokens": 40}) as response:
        assert response.headers["content-type"] == "audio/pcm"
        pieces = list(response.iter_bytes())
    body = b"".join(pieces)
    assert len(pieces) > 1 and len(body) == 40 * SAMPLES_PER_TOKEN * 2  # 16-bit samples


@pytest.mark.parametrize("options,message", [
    (dict(response_format="aac"), "response_format 'aac' is not supported: choose one of wav, pcm, mp3, opus, flac"),
    (dict(speed=2.0), "speed 2.0 is not supported"),
    (dict(instructions="Whisper."), "instructions are not supported"),
    (dict(voice="/etc/passwd"), "voice '/etc/passwd' not found"),
])
def test_openai_client_refusals(server, options, message):
    import openai

    with pytest.raises(openai.UnprocessableEntityError if "voice" not in options else openai.NotFoundError) as raised:
        openai_client(server).audio.speech.create(**{"model": "tts-1", "voice": "alto", "input": "Hi."} | options)
    assert message in str(raised.value)


def test_api_key(session):
    import openai

    with LoopbackServer(create_app(session, api_key="s3cret")) as guarded:
        for headers in [{}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}]:
            response = httpx.get(f"{guarded.url}/health", headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["detail"]
        refused = httpx.put(f"{guarded.url}/voices/sneaky", content=wav_bytes())
        assert refused.status_code == 401
        assert httpx.get(f"{guarded.url}/health", headers={"authorization": "Bearer s3cret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai_client(guarded, "wrong").audio.speech.create(model="tts-1", voice="alto", input="Hi.")
        audio = openai_client(guarded, "s3cret").audio.speech.create(
            model="tts-1", voice="alto", input="Hi.", response_format="wav", extra_body={"max_new_tokens": 4})
        assert len(sf.read(io.BytesIO(audio.content))[0]) == 4 * SAMPLES_PER_TOKEN


@pytest.mark.parametrize("host,key,warned", [("127.0.0.1", None, False), ("localhost", None, False),
                                             ("::1", None, False), ("0.0.0.0", None, True),
                                             ("192.168.1.5", None, True), ("example.org", None, True),
                                             ("0.0.0.0", "k", False)])
def test_a_warning_when_exposed_without_a_key(host, key, warned):
    from chatterbox_lab.serving.server import unprotected_exposure

    warning = unprotected_exposure(host, key)
    assert (warning is not None) == warned
    if warned:
        assert "CHATTERBOX_LAB_API_KEY" in warning


# Hostile requests that must each be refused with a 4xx, never a 500 or a crash.
HOSTILE = [
    ("post", "/synthesize", dict(json={"text": "Hi.", "voice": "/etc/passwd"})),
    ("post", "/synthesize", dict(json={"text": "Hi.", "temperature": 1e-300})),
    ("post", "/synthesize", dict(json={"text": "Hi.", "exaggeration": 1e300})),
    ("post", "/synthesize", dict(json={"text": "Hi.", "seed": 2**70})),
    ("post", "/synthesize", dict(json={"text": "🙂" * 5})),
    ("post", "/synthesize", dict(json={"text": "x" * 5000})),
    ("post", "/synthesize", dict(content=b'{"text": "Hi.", "top_p": NaN}', headers={"content-type": "application/json"})),
    ("post", "/synthesize", dict(content=b"{not json", headers={"content-type": "application/json"})),
    ("post", "/synthesize", dict(content=b"x" * 100_000)),
    ("post", "/v1/audio/speech", dict(json={"model": "tts-1", "input": "Hi.", "voice": "alto", "response_format": "aac"})),
    ("post", "/v1/audio/speech", dict(json={"model": "tts-1", "input": "Hi.", "voice": "../alto"})),
    ("put", "/voices/alto", dict(content=b"junk")),
    ("put", "/voices/" + "x" * 300, dict(content=b"junk")),
    ("put", "/voices/soaked", dict(content=b"RIFF....WAVEfmt ")),
    ("delete", "/voices/never-registered", {}),
]
SOAK_REQUESTS, SOAK_TIME_LIMIT_S = 120, 240
SOAK_RSS_BOUND_MIB = 150


def test_hostile_soak(server):
    """Hostile and valid requests mixed, from 4 clients on loopback: no crash, no 500, every
    valid request a WAV of its length, and memory within its bound."""
    import random
    import time
    from concurrent.futures import ThreadPoolExecutor

    from chatterbox_lab.measure.soak import rss_mib

    rng = random.Random(5)
    jobs = [rng.choice(HOSTILE) if i % 2 else ("valid", rng.randint(2, 8)) for i in range(SOAK_REQUESTS)]
    deadline = time.monotonic() + SOAK_TIME_LIMIT_S
    start_rss = rss_mib()

    def run(job):
        if time.monotonic() > deadline:
            return "not started"
        if job[0] == "valid":
            response = speak(server, tokens=job[1], seed=job[1])
            wav, sr = sf.read(io.BytesIO(response.content)) if response.status_code == 200 else ((), 0)
            return "ok" if sr == 24000 and len(wav) == job[1] * SAMPLES_PER_TOKEN else f"bad: {response.status_code}"
        method, path, options = job
        response = httpx.request(method, f"{server.url}{path}", timeout=120, **options)
        return "refused" if 400 <= response.status_code < 500 else f"{path}: {response.status_code}"

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(run, jobs))
    assert set(outcomes) <= {"ok", "refused"}, [o for o in outcomes if o not in ("ok", "refused")][:5]
    assert outcomes.count("ok") == SOAK_REQUESTS // 2
    assert rss_mib() - start_rss < SOAK_RSS_BOUND_MIB
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
