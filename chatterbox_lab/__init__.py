"""chatterbox_lab: Chatterbox TTS inference made fast one measured step at a time."""
import warnings as _warnings

# Upstream chatterbox-tts and its dependencies warn about their own deprecated
# calls on every import or step; none of it is actionable here, and it buries
# the measurements in notebook outputs. Only these exact messages are silenced.
for _message in (
    "pkg_resources is deprecated",
    "`LoRACompatibleLinear` is deprecated",
    r"`torch.backends.cuda.sdp_kernel\(\)` is deprecated",
    "`past_key_values` is deprecated",
    r"`torch.jit.script_method` is deprecated",
):
    _warnings.filterwarnings("ignore", message=_message)

__version__ = "0.1.0"

# The public API: what the notebooks, the README and a practitioner's code import from here. Each
# name loads its module on first use, so `import chatterbox_lab` stays cheap and every layer below
# may import this package without a cycle.
_PUBLIC = {
    "TTSSession": "chatterbox_lab.serving.session",
    "Speech": "chatterbox_lab.serving.session",
    "load_tts": "chatterbox_lab.loading.models",
    "T3Decoder": "chatterbox_lab.decode.decoder",
    "DecodePlan": "chatterbox_lab.decode.plan",
    "device_kind": "chatterbox_lab.decode.plan",
    "KernelPicks": "chatterbox_lab.kernels.picks",
    "shipped_for": "chatterbox_lab.kernels.picks",
    "SamplingParams": "chatterbox_lab.sampling",
    "synthesize": "chatterbox_lab.pipeline.synthesis",
    "synthesize_many": "chatterbox_lab.pipeline.synthesis",
    "voice_path": "chatterbox_lab.pipeline.voices",
    "stream_speech": "chatterbox_lab.pipeline.streaming",
    "preset": "chatterbox_lab.registry",
    "BenchConfig": "chatterbox_lab.measure.bench",
    "check_quality": "chatterbox_lab.measure.quality",
    "show_code": "chatterbox_lab.source",
}
__all__ = sorted(_PUBLIC) + ["registry"]


def __getattr__(name: str):
    import importlib

    if name == "registry":
        return importlib.import_module("chatterbox_lab.registry")
    if name not in _PUBLIC:
        raise AttributeError(f"module 'chatterbox_lab' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
