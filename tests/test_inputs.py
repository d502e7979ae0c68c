import numpy as np
import pytest
import soundfile as sf

from chatterbox_lab.pipeline import synthesize
from chatterbox_lab.sampling import SamplingParams
from chatterbox_lab.validation import check_text
from chatterbox_lab.voices import bundled_voices, check_reference_audio


def test_bundled_voices_are_valid():
    voices = bundled_voices()
    assert {"alto", "tenor"} <= set(voices)
    for path in voices.values():
        check_reference_audio(path)


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_empty_text(text):
    with pytest.raises(ValueError, match="text is empty"):
        check_text(text)


def test_empty_text_through_pipeline(tiny_tts):
    with pytest.raises(ValueError, match="text is empty"):
        synthesize(tiny_tts, "")


def test_unreadable_audio(tmp_path):
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    with pytest.raises(ValueError, match="cannot read"):
        check_reference_audio(bad)


def test_missing_audio(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled voices: alto, tenor"):
        check_reference_audio(tmp_path / "absent.wav")


def test_silent_audio(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(24000 * 3, dtype=np.float32), 24000)
    with pytest.raises(ValueError, match="silent"):
        check_reference_audio(path)


def test_short_audio(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, 0.1 * np.sin(np.arange(12000) / 10).astype(np.float32), 24000)
    with pytest.raises(ValueError, match="at least 1 s"):
        check_reference_audio(path)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", 0.0, "temperature must be > 0"),
    ("temperature", float("nan"), "finite"),
    ("top_p", 0.0, "top_p must be in"),
    ("cfg_weight", -1.0, "cfg_weight must be >= 0"),
    ("min_p", 1.5, "min_p must be in"),
])
def test_bad_sampling_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})
