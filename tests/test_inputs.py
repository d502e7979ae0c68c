"""Input checks outside the session; the bad-input table itself is tests/test_bad_input.py."""
import pytest

from chatterbox_lab.pipeline.synthesis import synthesize
from chatterbox_lab.pipeline.voices import bundled_voices, read_reference


def test_bundled_voices_are_valid():
    voices = bundled_voices()
    assert {"alto", "tenor"} <= set(voices)
    for path in voices.values():
        read_reference(path)


def test_empty_text_through_pipeline(tiny_tts):
    with pytest.raises(ValueError, match="text is empty"):
        synthesize(tiny_tts, "")
