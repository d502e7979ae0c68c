"""Reference voices: the bundled ones, checks on user audio, and a cache of prepared voices."""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from chatterbox_lab.validation import check_number, check_turbo_voice

VOICES_DIR = Path(__file__).resolve().parents[2] / "data" / "voices"
MIN_SECONDS = 1.0
# Upstream conditions S3Gen on the first 10 s of the reference and T3 on the first 6 s;
# only these seconds are read from the file.
USED_SECONDS = 10.0
# Past this a recording is no reference but a mistake (a whole interview, a film track):
# refused at once from its header, before any sample is read.
MAX_REFERENCE_SECONDS = 300.0
SILENCE_PEAK = 1e-4  # about -80 dBFS
# S3Gen's rate: upstream resamples every reference to it first.
REFERENCE_RATE = 24_000


def bundled_voices() -> dict[str, Path]:
    return {p.stem: p for p in sorted(VOICES_DIR.glob("*.wav"))}


def voice_path(name_or_path) -> Path:
    """A bundled voice by name ('alto', 'tenor') or any audio file path."""
    voices = bundled_voices()
    if str(name_or_path) in voices:
        return voices[str(name_or_path)]
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference audio {path} not found; bundled voices: {', '.join(voices) or 'none'}")
    return path


@dataclass(frozen=True, eq=False)
class Reference:
    """The used part of a reference recording: at most USED_SECONDS of mono float32 at
    REFERENCE_RATE, held in memory, so that nothing depends on the file afterwards."""
    samples: np.ndarray
    label: str

    @cached_property
    def key(self) -> str:
        """Same samples, same key: one recording under two names is prepared once."""
        return hashlib.sha256(self.samples.tobytes()).hexdigest()

    def wav_file(self) -> io.BytesIO:
        """The samples as an in-memory float32 WAV, the form upstream's preparation reads."""
        import soundfile as sf

        buffer = io.BytesIO()
        sf.write(buffer, self.samples, REFERENCE_RATE, format="WAV", subtype="FLOAT")
        buffer.seek(0)
        return buffer


def read_reference(voice, label: str | None = None) -> Reference:
    """Read and check the used seconds of `voice` (a bundled name, a path or a Reference);
    refuse audio that upstream would turn into garbage conditioning without a word.
    `label` names the audio in messages instead of its path (a server keeps its paths to itself)."""
    import librosa
    import soundfile as sf

    if isinstance(voice, Reference):
        return voice
    path = voice_path(voice)
    label = label or f"reference audio {path}"
    try:
        with sf.SoundFile(str(path)) as file:
            rate, frames = file.samplerate, file.frames
            wav = file.read(frames=min(frames, int(USED_SECONDS * rate)), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:  # soundfile's several kinds of refusal
        raise ValueError(f"cannot read {label} as audio ({getattr(exc, 'error_string', type(exc).__name__)}); "
                         f"give a WAV, FLAC or OGG file") from None
    seconds = frames / rate if rate else 0.0
    if seconds < MIN_SECONDS:
        raise ValueError(f"{label} is {seconds:.2f} s long; it must be at least "
                         f"{MIN_SECONDS:.0f} s of speech (6-10 s works best)")
    if seconds > MAX_REFERENCE_SECONDS:
        raise ValueError(f"{label} is {seconds:.0f} s long, over the limit of {MAX_REFERENCE_SECONDS:.0f} s; "
                         f"give 6-10 s of speech (only the first {USED_SECONDS:.0f} s are used)")
    mono = wav.mean(axis=1)
    if not np.isfinite(mono).all() or float(np.abs(mono).max()) < SILENCE_PEAK:
        raise ValueError(f"{label} is silent (or holds NaN); give a recording of speech")
    if seconds > USED_SECONDS:
        warnings.warn(f"{label} is {seconds:.1f} s long; only its first {USED_SECONDS:.0f} s "
                      f"are used", stacklevel=2)
    if rate != REFERENCE_RATE:
        # What upstream's librosa.load(sr=24000) does, on the used seconds only.
        mono = librosa.resample(mono, orig_sr=rate, target_sr=REFERENCE_RATE, res_type="soxr_hq")
    return Reference(samples=np.ascontiguousarray(mono, dtype=np.float32), label=label)


# Where an S3Gen step puts a context manager (taking the model) that every voice preparation runs
# inside: `voice_encoders_on_host` brings its encoders to the GPU there.
VOICE_PREPARATION = "_chatterbox_lab_voice_preparation"


def prepare_voice(tts, voice, exaggeration: float = 0.5):
    """Check `voice` and prepare upstream's conditionals from it; returns them."""
    exaggeration = check_number("exaggeration", exaggeration)
    reference = read_reference(voice)
    with getattr(tts, VOICE_PREPARATION, lambda _: contextlib.nullcontext())(tts):
        if getattr(tts.t3, "is_gpt", False):
            _prepare_turbo_voice(tts, reference)
        else:
            tts.prepare_conditionals(reference.wav_file(), exaggeration=exaggeration)
    return tts.conds


def _prepare_turbo_voice(tts, reference: Reference) -> None:
    """Turbo's preparation, its length assertion a clear error. Upstream's loudness step is run here
    and its result kept in float32: under NumPy 2 its float64 gain makes the clip float64, which the
    speech tokenizer then refuses. Turbo has no exaggeration input."""
    check_turbo_voice(len(reference.samples) / REFERENCE_RATE)
    louder = np.asarray(tts.norm_loudness(reference.samples, REFERENCE_RATE), dtype=np.float32)
    normalized = Reference(samples=louder, label=reference.label)
    tts.prepare_conditionals(normalized.wav_file(), exaggeration=0.0, norm_loudness=False)


def voice_or_prepared(tts, voice, exaggeration: float = 0.5):
    """`voice` prepared now, or with voice=None the one prepared last; returns its conditionals."""
    if voice is not None:
        return prepare_voice(tts, voice, exaggeration)
    if tts.conds is None:
        raise ValueError("no voice prepared yet: pass voice=<reference audio path>")
    return tts.conds


class VoiceCache:
    """Prepared conditionals for the last few voices; switching is an assignment, not a re-run."""

    def __init__(self, tts, capacity: int = 4):
        self.tts, self.capacity = tts, capacity
        self._prepared: OrderedDict = OrderedDict()
        self.prepared_count = 0

    def use(self, voice, exaggeration: float = 0.5):
        """`voice`: a bundled name, a path or a Reference. Keyed by content: a file rewritten
        in place is prepared again."""
        reference = read_reference(voice)
        key = (reference.key, float(check_number("exaggeration", exaggeration)))
        if key in self._prepared:
            self._prepared.move_to_end(key)
            self.tts.conds = self._prepared[key]
        else:
            self._prepared[key] = prepare_voice(self.tts, reference, exaggeration)
            self.prepared_count += 1
            if len(self._prepared) > self.capacity:
                self._prepared.popitem(last=False)
        return self.tts.conds
