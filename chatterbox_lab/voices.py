"""Reference voices: the bundled ones, checks on user audio, and a cache of prepared voices."""
from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

VOICES_DIR = Path(__file__).resolve().parent.parent / "data" / "voices"
MIN_SECONDS = 1.0
# Upstream conditions S3Gen on the first 10 s of the reference and T3 on the first 6 s.
USED_SECONDS = 10.0
SILENCE_PEAK = 1e-4  # about -80 dBFS


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


def check_reference_audio(path, label: str | None = None) -> Path:
    """Refuse audio that upstream would turn into garbage conditioning without a word. `label`
    names the audio in messages instead of its path (a server keeps its paths to itself)."""
    import soundfile as sf

    path = voice_path(path)
    label = label or f"reference audio {path}"
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for bad files
        raise ValueError(f"cannot read {label} as audio ({getattr(exc, 'error_string', type(exc).__name__)}); give a WAV, FLAC or OGG file") from exc
    seconds = len(wav) / sr if sr else 0.0
    if seconds < MIN_SECONDS:
        raise ValueError(f"{label} is {seconds:.2f} s long; it must be at least "
                         f"{MIN_SECONDS:.0f} s of speech (6-10 s works best)")
    if not np.isfinite(wav).all() or float(np.abs(wav).max()) < SILENCE_PEAK:
        raise ValueError(f"{label} is silent (or holds NaN); give a recording of speech")
    if seconds > USED_SECONDS:
        warnings.warn(f"{label} is {seconds:.1f} s long; only its first {USED_SECONDS:.0f} s "
                      f"are used", stacklevel=2)
    return path


def prepare_voice(tts, voice, exaggeration: float = 0.5):
    """Check `voice` and prepare upstream's conditionals from it; returns them."""
    from .s3gen_steps import voice_encoders_on_device

    path = check_reference_audio(voice)
    with voice_encoders_on_device(tts):
        tts.prepare_conditionals(str(path), exaggeration=exaggeration)
    return tts.conds


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
        path = voice_path(voice)
        # Keyed by content: the same recording under two names is prepared once, and a
        # file rewritten in place is prepared again.
        key = (hashlib.sha256(path.read_bytes()).hexdigest(), float(exaggeration))
        if key in self._prepared:
            self._prepared.move_to_end(key)
            self.tts.conds = self._prepared[key]
        else:
            self._prepared[key] = prepare_voice(self.tts, path, exaggeration)
            self.prepared_count += 1
            if len(self._prepared) > self.capacity:
                self._prepared.popitem(last=False)
        return self.tts.conds
