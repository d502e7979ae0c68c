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
