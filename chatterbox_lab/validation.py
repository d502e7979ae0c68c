"""Input checks that turn upstream's silent surprises into clear errors.

The one place a request's fields are checked: the CLI, the session and the
server all call these, so a value refused by one is refused by all, with the
same message.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

# T3's learned text positions end at 2048 tokens (one per character with the
# English tokenizer); past a few hundred characters quality drops, and the static
# cache must hold the whole prompt, so longer text must be split (chunking) first.
MAX_TEXT_CHARS = 600
# With chunking (pipeline.synthesize_long): a book chapter, not an unbounded upload.
MAX_LONG_TEXT_CHARS = 100_000
# T3 has learned positions for this many speech tokens (upstream T3Config.max_speech_tokens);
# the static cache is sized from the count, so a huge one would allocate before failing.
MAX_NEW_TOKENS = 4096


# Uploaded voice ids name in-memory voices and appear in URLs and messages; this is plenty.
MAX_VOICE_ID_CHARS = 64


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    low_open: bool = False  # the low end itself is excluded

    def __contains__(self, value) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


# Wide enough for any sensible request, narrow enough that the float32 sampling arithmetic
# stays finite: logits (up to about 1e4 in size) are divided by the temperature, scaled by
# the CFG weight and multiplied or divided by the repetition penalty, and a value near
# 0 or 1e300 overflows there into NaN probabilities. Exaggeration scales an input of
# T3's conditioning; upstream's own demo offers 0.25 to 2. Speed is OpenAI's range.
RANGES = {
    "temperature": Range(0.01, 10.0),
    "cfg_weight": Range(0.0, 10.0),
    "repetition_penalty": Range(0.1, 10.0),
    "min_p": Range(0.0, 1.0),
    "top_p": Range(0.0, 1.0, low_open=True),
    "exaggeration": Range(0.0, 2.0),
    "speed": Range(0.25, 4.0),
}


def check_number(name: str, value) -> float:
    """`value` for the field `name` of RANGES, refused unless it is a number in its range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value not in RANGES[name]:
        raise ValueError(f"{name} must be in {RANGES[name]}, got {value!r}")
    return value


def check_seed(seed) -> int | None:
    # torch.manual_seed takes 64 bits; checked here so a bad seed costs no model load.
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {str(seed)[:40]}")
    return seed


def check_representable(text: str, tokenizer) -> str:
    """Refuse characters the English tokenizer has no token for: upstream would map each
    to its unknown token and speak something else without a word."""
    from chatterbox.tts import punc_norm

    normalized = punc_norm(text).replace(" ", "[SPACE]")
    encoding = tokenizer.tokenizer.encode(normalized)
    unknown = tokenizer.tokenizer.token_to_id("[UNK]")
    missing = sorted({normalized[a:b] for token, (a, b) in zip(encoding.ids, encoding.offsets) if token == unknown})
    if missing:
        shown = ", ".join(f"{c!r} (U+{ord(c[0]):04X})" for c in missing[:8])
        raise ValueError(f"text holds {len(missing)} character(s) the English model cannot represent: {shown}"
                         f"{', ...' if len(missing) > 8 else ''}; remove them, or use Chatterbox's multilingual "
                         f"model for text in other scripts")
    return text


def check_tokenizer_file(path) -> Path:
    """A checkpoint's tokenizer.json, refused unless the tokenizers library can load it
    and it holds upstream's start and stop tokens (upstream asserts that, with no message)."""
    from tokenizers import Tokenizer

    path = Path(path)
    try:
        vocab = Tokenizer.from_file(str(path)).get_vocab()
    except Exception as exc:  # the Rust library raises a bare Exception for bad JSON
        raise ValueError(f"{path} is not a readable tokenizer file ({str(exc).splitlines()[0][:120]}): "
                         f"restore it from the checkpoint's source") from None
    missing = [t for t in ("[START]", "[STOP]") if t not in vocab]
    if missing:
        raise ValueError(f"{path} lacks the token(s) {', '.join(missing)}: it is not Chatterbox's English "
                         f"tokenizer; restore it from the checkpoint's source")
    return path


def check_text(text, max_chars: int = MAX_TEXT_CHARS) -> str:
    # Upstream replaces empty text with a stock sentence and speaks that instead.
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"text is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                             f"send UTF-8 encoded text") from None
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: give the sentence to speak (upstream would silently "
                         "speak 'You need to add some text for me to talk.' instead)")
    if len(text) > max_chars:
        hint = ("split it into sentences, or let the long-text path do it (`synthesize_long`, a session's "
                "`chunk=True`, the CLI's --chunk)" if max_chars < MAX_LONG_TEXT_CHARS else "split it into parts")
        raise ValueError(f"text is {len(text)} characters, over the limit of {max_chars}: {hint}; "
                         f"nothing was generated")
    return text


def check_voice_id(voice_id) -> str:
    # Ids appear in URLs and messages, so they hold no path or control characters.
    if not isinstance(voice_id, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", voice_id):
        raise ValueError(f"voice id {str(voice_id)[:MAX_VOICE_ID_CHARS]!r} must be ASCII letters, digits, '-' or '_'")
    if len(voice_id) > MAX_VOICE_ID_CHARS:
        raise ValueError(f"voice id is {len(voice_id)} characters, over the limit of {MAX_VOICE_ID_CHARS}")
    return voice_id


def check_token_count(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens {max_new_tokens} is over T3's limit of {MAX_NEW_TOKENS} speech tokens: "
                         f"split the text and synthesize the parts one by one")
    return max_new_tokens


def check_output_path(path, overwrite: bool = False) -> Path:
    """Refuse a destination that would clobber a file or cannot be written, before any work is done."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name such as {path / 'speech.wav'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) or choose another name")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} is not an existing directory: create it first "
                                f"or choose another path")
    return path


def check_flow_steps(flow_steps: int | None) -> None:
    """None (upstream's count) or a whole number of Euler steps, at least 1."""
    if flow_steps is not None and (isinstance(flow_steps, bool) or not isinstance(flow_steps, int) or flow_steps < 1):
        raise ValueError(f"flow_steps must be a whole number >= 1 (upstream uses 10) or None, got {flow_steps!r}")


# The three models of chatterbox-tts 0.1.7, by the name every entry point takes: `ChatterboxTTS`,
# `ChatterboxTurboTTS` and `ChatterboxMultilingualTTS`.
TTS_MODELS = ("original", "turbo", "multilingual")
# Upstream's multilingual model speaks these (`chatterbox.mtl_tts.SUPPORTED_LANGUAGES`).
LANGUAGES = ("ar", "da", "de", "el", "en", "es", "fi", "fr", "he", "hi", "it", "ja", "ko", "ms", "nl", "no",
             "pl", "pt", "ru", "sv", "sw", "tr", "zh")
# Languages whose text upstream prepares with an optional package (import name, package name). Without
# it upstream logs a warning and speaks unprepared text (no readings for kanji, no stress marks), so
# such a language is refused here until its package is installed.
LANGUAGE_PACKAGES = {
    "ja": ("pykakasi", "pykakasi"),
    "he": ("dicta_onnx", "dicta-onnx"),
    "ru": ("russian_text_stresser", "russian-text-stresser"),
    "zh": ("spacy_pkuseg", "spacy-pkuseg"),
}
# Chinese text becomes Cangjie codes through this table, which upstream fetches from the hub beside its
# weights; here it must already be in the checkpoint directory.
CANGJIE_FILE = "Cangjie5_TC.json"
# Upstream Turbo asserts its reference clip is longer than this (its prompt is 375 tokens of 25 per second).
TURBO_MIN_VOICE_S = 5.0
# Sampling fields upstream Turbo accepts and ignores (it logs one warning); refused here instead.
TURBO_IGNORES = ("cfg_weight", "min_p")


def check_model(model) -> str:
    if model not in TTS_MODELS:
        raise ValueError(f"unknown model {model!r}: choose one of {', '.join(TTS_MODELS)}")
    return model


def check_language(model: str, language, checkpoint_dir: Path | None = None) -> str | None:
    """`language` for `model`: None for the English-only models, one of LANGUAGES for multilingual,
    refused where it needs an optional package that is missing (or, for Chinese, the Cangjie table)."""
    import importlib.util

    if check_model(model) != "multilingual":
        if language not in (None, "en"):
            raise ValueError(f"the {model} model speaks English only, got language {language!r}: "
                             f"use model 'multilingual' for other languages")
        return None
    if not isinstance(language, str) or language.lower() not in LANGUAGES:
        raise ValueError(f"unknown language {str(language)[:20]!r} for the multilingual model: "
                         f"choose one of {', '.join(LANGUAGES)}")
    language = language.lower()
    if language in LANGUAGE_PACKAGES:
        module, package = LANGUAGE_PACKAGES[language]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"language {language!r} needs the optional package {package!r}, which is not "
                             f"installed: install it (pip install {package}) or choose another language")
    if language == "zh" and (checkpoint_dir is None or not (Path(checkpoint_dir) / CANGJIE_FILE).is_file()):
        raise ValueError(f"language 'zh' needs {CANGJIE_FILE} (from ResembleAI/chatterbox) in the checkpoint "
                         f"directory; nothing is fetched over the network")
    return language


def check_turbo_sampling(**given) -> None:
    """Refuse the sampling fields Turbo has no use for, which upstream would silently ignore."""
    ignored = [name for name in TURBO_IGNORES if given.get(name) is not None]
    if ignored:
        raise ValueError(f"{' and '.join(ignored)} {'do' if len(ignored) > 1 else 'does'} not apply to the turbo "
                         f"model (it has no classifier-free guidance and no min-p, and upstream would ignore "
                         f"{'them' if len(ignored) > 1 else 'it'} without a word): leave it out; turbo samples "
                         f"with temperature, top_k, top_p and repetition_penalty")


def check_turbo_voice(seconds: float) -> float:
    if seconds <= TURBO_MIN_VOICE_S:
        raise ValueError(f"the reference clip is {seconds:.1f} s long; the turbo model needs one longer than "
                         f"{TURBO_MIN_VOICE_S:g} s (upstream asserts it): record or choose a longer clip")
    return seconds
