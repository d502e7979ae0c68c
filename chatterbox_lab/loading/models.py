"""One call to a ready upstream model (`ChatterboxTTS`, `ChatterboxTurboTTS` or
`ChatterboxMultilingualTTS`): a local checkpoint, the hub, or the synthetic default."""
from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import torch

from chatterbox_lab.loading.architecture import check_preset, upstream_constructors, upstream_module
from chatterbox_lab.validation import CANGJIE_FILE, check_model, check_tokenizer_file
from chatterbox_lab.loading.checkpoint import check_checkpoint_dir, ensure_synthetic, read_marker, use_compile_caches

DEVICES = ("cpu", "cuda", "mps")

# Random weights sample the special speech tokens (6561 = start, 6562 = stop and
# the unused ids above) as often as any other, and upstream cuts its output at the
# first one. A synthetic model gets this logit bias on every id >= 6561 so that it
# always produces exactly the number of valid tokens a benchmark asks for. It is
# finite on purpose: -inf becomes NaN in the CFG combination cond + w*(cond - uncond).
SPECIAL_TOKEN_BIAS = -1.0e4
# The class of each model, in upstream's module of that model, and its name in messages.
CLASSES = {"original": "ChatterboxTTS", "turbo": "ChatterboxTurboTTS", "multilingual": "ChatterboxMultilingualTTS"}
FAMILY_NAMES = {"original": "Chatterbox", "turbo": "Chatterbox Turbo", "multilingual": "Chatterbox Multilingual"}


def resolve_device(device: str | None = None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but this torch sees no CUDA GPU: use device='cpu'")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but it is not available here: use device='cpu'")
    return device


def default_preset(device: str) -> str:
    return "full" if device.startswith("cuda") else "tiny"


def guard_special_tokens(t3) -> None:
    """Give T3's speech head a bias that keeps a synthetic model off the special tokens: a new
    one for the Llama T3s, added to the bias Turbo's GPT-2 head has of its own."""
    if is_guarded(t3):
        raise ValueError("speech head is already guarded; refusing to guard it twice")
    head = t3.speech_head
    first_special = t3.hp.start_speech_token
    if head.bias is None:
        guarded = torch.nn.Linear(head.in_features, head.out_features, bias=True,
                                  device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            guarded.weight.copy_(head.weight)
            guarded.bias.zero_()
        t3.speech_head = head = guarded
    with torch.no_grad():
        head.bias[first_special:] += SPECIAL_TOKEN_BIAS


def is_guarded(t3) -> bool:
    bias = t3.speech_head.bias
    return bias is not None and bool((bias[t3.hp.start_speech_token:] <= SPECIAL_TOKEN_BIAS / 2).all())


@contextlib.contextmanager
def cangjie_from(directory: Path):
    """Multilingual's tokenizer fetches its Cangjie table from the hub as it is built; this hands it the
    copy in the checkpoint `directory` instead, or nothing (then Chinese is refused by
    `validation.check_language`), so loading never reaches the network."""
    from chatterbox.models.tokenizers import tokenizer

    def local_only(repo_id, filename, cache_dir=None, **_):
        path = Path(directory) / filename
        if filename != CANGJIE_FILE or not path.is_file():
            raise FileNotFoundError(f"{filename} is not in {directory}, and nothing is fetched")
        return str(path)

    saved = tokenizer.hf_hub_download
    tokenizer.hf_hub_download = local_only
    try:
        yield
    finally:
        tokenizer.hf_hub_download = saved


@contextlib.contextmanager
def weights_left_for_the_checkpoint():
    """Build modules without drawing the random weights that `from_local` overwrites at once.

    Upstream's modules draw every weight at construction (torch.nn.init, and transformers'
    `init_weights` once more for the Llama): most of a load's time on the host, seconds for T3
    and S3Gen. Here those draws are skipped, leaving each tensor's memory as allocated. Every
    `load_state_dict` in the block is watched instead: the list this yields collects the keys
    the loads left missing (upstream loads S3Gen with strict=False), each a weight left unset.
    """
    from transformers.modeling_utils import PreTrainedModel

    missing = []
    load_state_dict = torch.nn.Module.load_state_dict

    def load_and_watch(module, state_dict, strict=True, assign=False):
        loaded = load_state_dict(module, state_dict, strict=strict, assign=assign)
        missing.extend(f"{type(module).__name__}.{key}" for key in loaded.missing_keys)
        return loaded

    def left_for_the_checkpoint(tensor, *args, **kwargs):
        return tensor

    init_functions = {name: f for name, f in vars(torch.nn.init).items()
                      if name.endswith("_") and not name.startswith("_") and callable(f)}
    init_weights = PreTrainedModel.init_weights
    try:
        for name in init_functions:
            setattr(torch.nn.init, name, left_for_the_checkpoint)
        PreTrainedModel.init_weights = lambda self: None
        torch.nn.Module.load_state_dict = load_and_watch
        yield missing
    finally:
        for name, f in init_functions.items():
            setattr(torch.nn.init, name, f)
        PreTrainedModel.init_weights = init_weights
        torch.nn.Module.load_state_dict = load_state_dict


def load_tts(source: str | Path = "synthetic", *, model: str = "original", preset: str | None = None,
             device: str | None = None, skip_init: bool = True):
    """Return a ready upstream model: `chatterbox.tts.ChatterboxTTS` (model "original"),
    `ChatterboxTurboTTS` ("turbo") or `ChatterboxMultilingualTTS` ("multilingual").

    source: "synthetic" (default; built once and cached, see `checkpoint.py`),
            "hub" (downloads the model's ResembleAI repository; needs network), or the path
            of a checkpoint directory in that model's upstream layout.
    preset: "full" or "tiny", synthetic only; defaults to full on a GPU, tiny on a CPU.
    device: "cuda", "cpu", "mps" or "cuda:N"; defaults to the GPU when there is one.
    skip_init: build the modules without their random initial weights, which the checkpoint
            replaces (`weights_left_for_the_checkpoint`); should a load leave any weight unset,
            the model is built again as upstream builds it. False: upstream's way only.
    """
    use_compile_caches()
    upstream = getattr(upstream_module(check_model(model)), CLASSES[model])

    device = resolve_device(device)
    if source == "hub":
        if preset not in (None, "full"):
            raise ValueError("the hub checkpoint is the full model; preset applies to 'synthetic' only")
        return upstream.from_pretrained(device)

    if source == "synthetic":
        preset = check_preset(preset or default_preset(device))
        directory = ensure_synthetic(preset, model=model)
    else:
        directory = check_checkpoint_dir(Path(source), model)
        if model == "original":  # upstream would stop at a bad one with a traceback
            check_tokenizer_file(directory / "tokenizer.json")
    marker = read_marker(directory)
    if marker is None and preset not in (None, "full"):
        raise ValueError(f"{directory} is a real checkpoint; it only comes in the 'full' size")
    model_preset = marker["preset"] if marker else "full"

    with warnings.catch_warnings():
        # Upstream asks for output_attentions=True and newer transformers warn on every call.
        warnings.filterwarnings("ignore", message=".*output_attentions.*")
        with upstream_constructors(model_preset, model), cangjie_from(directory):
            try:
                tts = None
                if skip_init:
                    with weights_left_for_the_checkpoint() as unset:
                        tts = upstream.from_local(directory, device)
                    if unset:
                        warnings.warn(f"{directory} leaves {len(unset)} weights unset (first: {unset[0]}); "
                                      f"building the model again with upstream's initial weights for them")
                        tts = None
                if tts is None:
                    tts = upstream.from_local(directory, device)
            except RuntimeError as exc:
                if "size mismatch" not in str(exc) and "Missing key" not in str(exc):
                    raise
                raise ValueError(f"the weights in {directory} do not fit the {model_preset} {FAMILY_NAMES[model]} "
                                 f"architecture (wrong-shape or missing tensors): "
                                 f"{str(exc).splitlines()[0]}") from None
            except pickle.UnpicklingError as exc:
                raise ValueError(f"{directory / 'conds.pt'} is not a plain tensor file and was refused "
                                 f"(loaded with weights_only=True): {str(exc).splitlines()[0]}") from None
    tts.checkpoint_dir = Path(directory)
    tts.model = model
    tts.preset = model_preset
    tts.synthetic = marker is not None
    if tts.synthetic:
        guard_special_tokens(tts.t3)
    return tts
