"""Text of any length: split into sentence chunks that each fit one utterance, then
join their audio so the seams are inaudible.

T3 reads a bounded text (its prompt must fit the decoder's KV cache with the speech
after it) and upstream has no answer for longer text. Chunks follow sentence ends,
packed greedily up to `max_chars`; a sentence longer than that is cut at its last
clause mark, else its last space, before the limit, never inside a word. Each chunk
is synthesized on its own, and the joins fade every chunk in and out over a few
milliseconds (an abrupt cut between two non-zero samples is heard as a click) with a
short pause between sentences, as a reader would make.
"""
from __future__ import annotations

import re

import numpy as np

# After . ! ? or an ellipsis, and any closing quotes or brackets, where whitespace follows.
SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+")
CLAUSE_MARKS = ",;:—"
JOIN_PAUSE_S = 0.12
JOIN_FADE_S = 0.005


def split_text(text: str, max_chars: int) -> list[str]:
    """Chunks of `text` of at most `max_chars` characters, each ending at a sentence end
    where one fits; together they hold every word of `text` in order."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    sentences = [s for s in (part.strip() for part in _sentences(text)) if s]
    chunks: list[str] = []
    for sentence in sentences:
        for piece in _cut(sentence, max_chars):
            if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
                chunks[-1] += " " + piece
            else:
                chunks.append(piece)
    return chunks


def _sentences(text: str) -> list[str]:
    starts = [0] + [m.end() for m in SENTENCE_END.finditer(text)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def _cut(sentence: str, max_chars: int) -> list[str]:
    """A sentence over `max_chars` in pieces: at the last clause mark that fits, else the last space."""
    pieces = []
    while len(sentence) > max_chars:
        head = sentence[: max_chars + 1]
        cut = max(head.rfind(mark) for mark in CLAUSE_MARKS) + 1
        if cut <= 0:
            cut = head.rfind(" ")
        if cut <= 0:
            word = sentence.split()[0]
            raise ValueError(f"the word {word[:40]!r}{'...' if len(word) > 40 else ''} is {len(word)} characters, "
                             f"longer than a chunk may be ({max_chars}): check the text for run-together words")
        pieces.append(sentence[:cut].strip())
        sentence = sentence[cut:].strip()
    return pieces + ([sentence] if sentence else [])


def join_speech(waves: list[np.ndarray], sample_rate: int, pause_s: float = JOIN_PAUSE_S,
                fade_s: float = JOIN_FADE_S) -> np.ndarray:
    """One waveform from the chunks' waveforms: each faded in and out over `fade_s`, with
    `pause_s` of silence between two chunks."""
    fade = int(fade_s * sample_rate)
    ramp = np.linspace(0.0, 1.0, fade, endpoint=False, dtype=np.float32)
    pause = np.zeros(int(pause_s * sample_rate), dtype=np.float32)
    parts = []
    for i, wave in enumerate(waves):
        wave = np.array(wave, dtype=np.float32, copy=True)
        edge = min(fade, len(wave) // 2)
        wave[:edge] *= ramp[:edge]
        wave[len(wave) - edge:] *= ramp[:edge][::-1]
        parts += [pause, wave] if i else [wave]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
