"""HTTP example over a `TTSSession` (FastAPI; `pip install -e .[serve]`).

    python -m chatterbox_lab serve --host 127.0.0.1 --port 8000

POST /synthesize  JSON {text, voice, sampling values, max_new_tokens, seed} -> audio/wav
PUT  /voices/{id} raw audio bytes (WAV, FLAC, OGG)                         -> registers a voice
GET  /health      device, preset, warm-up time, voices
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from .sampling import SamplingParams
from .session import TTSSession
from .validation import MAX_TEXT_CHARS, check_voice_id

MAX_VOICE_BYTES = 20 << 20


class SynthesisRequest(BaseModel):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    voice: str = "alto"
    temperature: float = Field(0.8, gt=0, allow_inf_nan=False)
    cfg_weight: float = Field(0.5, ge=0, allow_inf_nan=False)
    repetition_penalty: float = Field(1.2, gt=0, allow_inf_nan=False)
    min_p: float = Field(0.05, ge=0, le=1, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    max_new_tokens: int | None = Field(None, ge=1)
    seed: int | None = None


def create_app(session: TTSSession) -> FastAPI:
    app = FastAPI(title="chatterbox_lab")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, exc: RequestValidationError):
        # FastAPI's default echoes the offending input, and a NaN cannot be written as JSON.
        detail = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)
    uploads = Path(tempfile.mkdtemp(prefix="chatterbox_lab-voices-"))

    @app.get("/health")
    def health():
        return dict(status="ok", device=str(session.tts.device), preset=session.tts.preset,
                    warmup_s=session.warmup_s, voices=session.voice_names())

    @app.put("/voices/{voice_id}")
    async def register_voice(voice_id: str, request: Request):
        body = await request.body()
        if len(body) > MAX_VOICE_BYTES:
            raise HTTPException(413, f"reference audio over {MAX_VOICE_BYTES >> 20} MB")
        try:
            path = uploads / f"{check_voice_id(voice_id)}.audio"
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        path.write_bytes(body)
        try:
            # Preparing the voice takes a while: off the event loop.
            await run_in_threadpool(session.register_voice, voice_id, path)
        except (ValueError, FileNotFoundError) as exc:
            path.unlink(missing_ok=True)
            raise HTTPException(422, str(exc)) from None
        return {"voice": voice_id}

    @app.post("/synthesize")
    def synthesize(req: SynthesisRequest):
        sampling_fields = ("temperature", "cfg_weight", "repetition_penalty", "min_p", "top_p")
        try:
            sampling = SamplingParams(**{k: getattr(req, k) for k in sampling_fields})
            # A name only: a path would let a caller read files of the server, or probe for them.
            speech = session.synthesize(req.text, session.named_voice(req.voice), sampling=sampling,
                                        max_new_tokens=req.max_new_tokens, seed=req.seed)
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except MemoryError as exc:
            raise HTTPException(503, str(exc)) from None
        return Response(speech.wav_bytes(), media_type="audio/wav")

    return app
