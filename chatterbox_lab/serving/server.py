"""HTTP example over a `TTSSession` (FastAPI; `pip install -e .[serve]`).

    python -m chatterbox_lab serve --host 127.0.0.1 --port 8000

POST   /synthesize       JSON {text, voice, sampling values, exaggeration, max_new_tokens, seed, model, language}
                         -> audio/wav
POST   /v1/audio/speech  OpenAI's speech request {model, input, voice, response_format, speed} -> audio, streamed
PUT    /voices/{id}      raw audio bytes (WAV, FLAC, OGG)                                       -> registers a voice
DELETE /voices/{id}      forgets a registered voice
GET    /health           device, preset, warm-up time, batch_requests, voices

A voice is always a name here, bundled or registered, never a path on the server.
With the API key variable set, every request needs `Authorization: Bearer <key>`.
The limits (body sizes, reference length, voice count, queue) are in docs/serving.md.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
import os
import shutil
import tempfile
import threading
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatterbox_lab.pipeline.synthesis import Cancelled
from chatterbox_lab.sampling import sampling_for
from chatterbox_lab.serving.session import Speech, TTSSession, VoiceLimitReached

API_KEY_VARIABLE = "CHATTERBOX_LAB_API_KEY"
# A reference needs 10 s of audio: 20 MB holds that in any format, even 96 kHz stereo WAV.
MAX_VOICE_BYTES = 20 << 20
# Every other body is one JSON request of at most 600 characters of text: 64 KB holds it
# with any escaping.
MAX_REQUEST_BYTES = 64 << 10
# Requests queued or running at once; one more gets 503, so a flood queues no unbounded work.
MAX_WAITING = 16
# How often a waiting request looks whether its client is still there.
DISCONNECT_POLL_S = 0.25
STREAM_CHUNK_BYTES = 16 << 10
# Status for a request whose client went away (nginx's convention); no one reads it.
CLIENT_CLOSED = 499
SAMPLING_FIELDS = ("temperature", "cfg_weight", "repetition_penalty", "min_p", "top_p")
# response_format -> soundfile's (format, subtype); pcm is OpenAI's raw 16-bit little-endian mono.
AUDIO_FORMATS = {"wav": ("WAV", "PCM_16"), "pcm": ("RAW", "PCM_16"), "mp3": ("MP3", None),
                 "opus": ("OGG", "OPUS"), "flac": ("FLAC", "PCM_16")}
MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg",
               "flac": "audio/flac"}
# Errors a request can cause, by the status that tells the caller what to change.
STATUS_OF_ERROR = ((LookupError, 404), (PermissionError, 403), (VoiceLimitReached, 409), (ValueError, 422),
                   (TypeError, 422), (MemoryError, 503))


class Options(BaseModel):
    """This server's own request fields, shared by both synthesis endpoints. Only types are
    checked here; ranges are the session's (`validation.py`), one rule for every caller."""
    temperature: float = 0.8
    cfg_weight: float = 0.5
    repetition_penalty: float = 1.2
    min_p: float = 0.05
    top_p: float = 1.0
    exaggeration: float = 0.5
    max_new_tokens: int | None = None
    seed: int | None = None
    top_k: int | None = None          # Turbo only
    language: str | None = None       # the multilingual model's language id


class SynthesisRequest(Options):
    text: str
    voice: str = "alto"
    model: str | None = None  # when given, it must be the model this server serves


class SpeechRequest(Options):
    """OpenAI's fields; `model` is accepted and ignored (this server has one model)."""
    model: str
    input: str
    voice: str | dict
    response_format: str = "mp3"
    speed: float = 1.0
    instructions: str | None = None
    stream_format: str = "audio"


def unprotected_exposure(host: str, api_key: str | None) -> str | None:
    """A warning when the server is reachable from other machines with no key, else None."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback:
        return None
    return (f"serving on {host} without an API key: anyone who reaches this port can use the model and "
            f"register voices; set {API_KEY_VARIABLE} to require a key")


def encode(speech: Speech, response_format: str) -> bytes:
    import soundfile as sf

    container, subtype = AUDIO_FORMATS[response_format]
    buffer = io.BytesIO()
    sf.write(buffer, speech.wav, speech.sample_rate, format=container, subtype=subtype,
             **({"endian": "LITTLE"} if container == "RAW" else {}))
    return buffer.getvalue()


def error_response(path: str, status: int, message, headers=None) -> JSONResponse:
    """An error in the shape its caller reads: OpenAI's under /v1 (its clients show that
    message), FastAPI's `detail` elsewhere."""
    if path.startswith("/v1/"):
        text = message if isinstance(message, str) else "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in message)
        body = {"error": {"message": text, "type": "invalid_request_error", "code": status}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def http_error(exc: Exception) -> HTTPException:
    for kind, status in STATUS_OF_ERROR:
        if isinstance(exc, kind):
            return HTTPException(status, str(exc))
    raise exc  # not the request's fault: a server error, as it should be


class Guard:
    """ASGI middleware in front of every endpoint: the API key, then the body's size.

    The key is checked before a byte of the body is read. A body over its endpoint's
    limit is refused at once from its Content-Length, or, sent without one, as soon as
    the bytes read pass the limit: no body is ever held past it."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and not hmac.compare_digest(headers.get(b"authorization", b""),
                                                    f"Bearer {self.api_key}".encode()):
            response = error_response(scope["path"], 401, "missing or wrong API key: send the header "
                                                          "'Authorization: Bearer <key>'",
                                      headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        limit = MAX_VOICE_BYTES if scope["path"].startswith("/voices/") else MAX_REQUEST_BYTES
        message = (f"request body over the limit of {limit >> 10} KB" if limit < 1 << 20 else
                   f"reference audio over the limit of {limit >> 20} MB: send 6-10 s of speech")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > limit:
            return await error_response(scope["path"], 413, message)(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > limit:
                raise HTTPException(413, message)
            return event

        await self.app(scope, counted_receive, send)


def create_app(session: TTSSession, api_key: str | None = None) -> FastAPI:
    """`api_key`: required of every request when given; by default the API key variable's value."""
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    # Uploads pass through here on their way into memory; gone when the server stops.
    uploads = Path(tempfile.mkdtemp(prefix="chatterbox_lab-uploads-"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            shutil.rmtree(uploads, ignore_errors=True)

    app = FastAPI(title="chatterbox_lab", lifespan=lifespan)
    app.state.uploads = uploads
    app.add_middleware(Guard, api_key=api_key)
    waiting = 0

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        # FastAPI's default echoes the offending input, and a NaN cannot be written as JSON.
        detail = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return error_response(request.url.path, 422, detail)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's and Starlette's own (404 of a route)
    async def refused(request, exc: StarletteHTTPException):
        return error_response(request.url.path, exc.status_code, exc.detail, exc.headers)

    async def watch(request: Request, gone: threading.Event) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        gone.set()

    async def speak(request: Request, text: str, voice, options: Options) -> Speech:
        """Queue one synthesis and wait for it; a client that goes away cancels it."""
        nonlocal waiting
        if waiting >= MAX_WAITING:
            raise HTTPException(503, f"{MAX_WAITING} requests are waiting already: retry shortly",
                                headers={"Retry-After": "1"})
        gone = threading.Event()
        try:
            # Only the fields the caller set: a left-out one takes the served model's default, and a
            # field Turbo would ignore is refused only when it was sent.
            sampling = sampling_for(session.model, **{k: getattr(options, k) for k in (*SAMPLING_FIELDS, "top_k")
                                                      if k in options.model_fields_set})
            # A name only: a path would let a caller read files of the server, or probe for them.
            future = session.submit(text, session.named_voice(voice), sampling=sampling,
                                    max_new_tokens=options.max_new_tokens, exaggeration=options.exaggeration,
                                    seed=options.seed, cancelled=gone.is_set, language=options.language)
        except Exception as exc:
            raise http_error(exc) from None
        waiting += 1
        watcher = asyncio.create_task(watch(request, gone))
        try:
            return await asyncio.wrap_future(future)
        except Cancelled as exc:
            raise HTTPException(CLIENT_CLOSED, str(exc)) from None
        except Exception as exc:
            raise http_error(exc) from None
        finally:
            waiting -= 1
            watcher.cancel()
            gone.set()  # if this wait itself was cancelled, the worker skips the request

    @app.get("/health")
    def health():
        return dict(status="ok", device=str(session.tts.device), preset=session.tts.preset,
                    warmup_s=session.warmup_s, batch_requests=session.batch_requests, voices=session.voice_names())

    @app.put("/voices/{voice_id}")
    async def register_voice(voice_id: str, request: Request):
        try:
            session.check_writable_voice_id(voice_id)  # before the upload, not after it
        except Exception as exc:
            raise http_error(exc) from None
        # Streamed to disk, never whole in memory; deleted on close, whatever happens.
        with tempfile.NamedTemporaryFile(dir=uploads, suffix=".upload") as file:
            async for chunk in request.stream():
                file.write(chunk)
            file.flush()
            try:
                # Reading and preparing the voice take a while: off the event loop.
                await run_in_threadpool(session.register_voice, voice_id, Path(file.name))
            except Exception as exc:
                raise http_error(exc) from None
        return {"voice": voice_id}

    @app.delete("/voices/{voice_id}")
    async def delete_voice(voice_id: str):
        try:
            await run_in_threadpool(session.delete_voice, voice_id)
        except Exception as exc:
            raise http_error(exc) from None
        return {"deleted": voice_id}

    @app.post("/synthesize")
    async def synthesize(req: SynthesisRequest, request: Request):
        if req.model is not None and req.model != session.model:
            raise HTTPException(422, f"this server serves the {session.model} model, not {req.model[:20]!r}: "
                                     f"send model {session.model!r} or leave it out")
        speech = await speak(request, req.text, req.voice, req)
        return Response(await run_in_threadpool(speech.wav_bytes), media_type="audio/wav")

    @app.post("/v1/audio/speech")
    async def openai_speech(req: SpeechRequest, request: Request):
        if req.response_format not in AUDIO_FORMATS:
            raise HTTPException(422, f"response_format {req.response_format[:20]!r} is not supported: choose one "
                                     f"of {', '.join(AUDIO_FORMATS)}")
        if req.speed != 1.0:
            raise HTTPException(422, f"speed {req.speed} is not supported: Chatterbox speaks at its own pace; "
                                     f"send speed 1.0 (or leave it out) and change the speed client-side")
        if req.instructions:
            raise HTTPException(422, "instructions are not supported: Chatterbox takes its style from the voice "
                                     "and the exaggeration field")
        if req.stream_format != "audio":
            raise HTTPException(422, f"stream_format {req.stream_format[:20]!r} is not supported: send 'audio'")
        voice = req.voice.get("id") if isinstance(req.voice, dict) else req.voice
        speech = await speak(request, req.input, voice, req)
        audio = await run_in_threadpool(encode, speech, req.response_format)
        # Sent in pieces as it is read: a client can play or save it while it arrives.
        pieces = (audio[i:i + STREAM_CHUNK_BYTES] for i in range(0, len(audio), STREAM_CHUNK_BYTES))
        return StreamingResponse(pieces, media_type=MEDIA_TYPES[req.response_format])

    return app
