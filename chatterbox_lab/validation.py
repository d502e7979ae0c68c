"""Input checks that turn upstream's silent surprises into clear errors."""
from __future__ import annotations

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
    # Ids name files of uploaded voices, so they may hold no path characters.
    if not isinstance(voice_id, str) or not voice_id.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"voice id {voice_id!r} must be letters, digits, '-' or '_'")
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
