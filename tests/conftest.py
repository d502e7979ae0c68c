import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpreted(monkeypatch):
    """Our Triton kernels run on the CPU by Triton's interpreter (the switch lives in fused_matvec)."""
    from chatterbox_lab.kernels import fused_matvec

    if fused_matvec.triton is None or os.environ.get("TRITON_INTERPRET") != "1" or torch.cuda.is_available():
        pytest.skip("needs Triton's interpreter, on a machine without a GPU")
    monkeypatch.setattr(fused_matvec, "interpreter_on_cpu", True)
    return fused_matvec


@pytest.fixture(scope="session")
def tiny_tts():
    from chatterbox_lab.loading.models import load_tts

    tts = load_tts(preset="tiny", device="cpu")
    tts.prepare_conditionals(str(_voice("alto")))
    return tts


@pytest.fixture(scope="session")
def tiny_turbo():
    """Upstream's ChatterboxTurboTTS on the tiny synthetic checkpoint, a voice prepared without
    upstream's loudness step: under NumPy 2 its float64 gain makes the clip float64, which the
    speech tokenizer refuses."""
    from chatterbox_lab.loading.models import load_tts

    tts = load_tts(model="turbo", preset="tiny", device="cpu")
    tts.prepare_conditionals(str(_voice("alto")), norm_loudness=False)
    return tts


@pytest.fixture(scope="session")
def tiny_multilingual():
    from chatterbox_lab.loading.models import load_tts

    tts = load_tts(model="multilingual", preset="tiny", device="cpu")
    tts.prepare_conditionals(str(_voice("alto")))
    return tts


def _voice(name):
    from chatterbox_lab.pipeline.voices import voice_path

    return voice_path(name)
