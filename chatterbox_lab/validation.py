"""Input checks that turn upstream's silent surprises into clear errors."""
from __future__ import annotations


def check_text(text) -> str:
    # Upstream replaces empty text with a stock sentence and speaks that instead.
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: give the sentence to speak (upstream would silently "
                         "speak 'You need to add some text for me to talk.' instead)")
    return text
