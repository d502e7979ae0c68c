"""The synthetic checkpoints: upstream classes, random weights, upstream file layouts.

No weights can be downloaded everywhere this workbook runs, so each model is
built here: the real `T3`, `S3Gen` and `VoiceEncoder` classes initialised from a
fixed seed and written as the files that model's `from_local` reads
(`ChatterboxTTS`, `ChatterboxTurboTTS` or `ChatterboxMultilingualTTS`). Their text
tokenizers are made offline too: a character-level one for the original, a GPT-2
style byte-level BPE for Turbo, a grapheme one with language tags for Multilingual.
Loading then goes through upstream's own code. A `synthetic.json` marker beside
the weights records how they were made and their hash; the loader uses it to
recognise synthetic checkpoints (and only those) for the speech-token guard.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from chatterbox_lab.loading.architecture import build_s3gen, build_t3, check_preset
from chatterbox_lab.validation import LANGUAGES, check_model

# Bump when the way synthetic weights are made changes, so old caches are rebuilt.
FORMAT_VERSION = 1
DEFAULT_SEED = 1234

# What each model's from_local reads: voice encoder, T3, S3Gen, then the tokenizer's file(s).
FILES = {
    "original": ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json"),
    "turbo": ("ve.safetensors", "t3_turbo_v1.safetensors", "s3gen_meanflow.safetensors", "tokenizer.json",
              "tokenizer_config.json"),
    "multilingual": ("ve.pt", "t3_mtl23ls_v2.safetensors", "s3gen.pt", "grapheme_mtl_merged_expanded_v1.json"),
}
REQUIRED_FILES = FILES["original"]
MARKER = "synthetic.json"

# Upstream's EnTokenizer needs [START] and [STOP]; T3Config fixes their ids
# (start_text_token=255, stop_text_token=0) and the vocabulary size (704).
TEXT_VOCAB_SIZE = 704
_SPECIAL = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[START]": 255}


def cache_root() -> Path:
    """Where built checkpoints live: $CHATTERBOX_LAB_CACHE, else the user cache dir."""
    if env := os.environ.get("CHATTERBOX_LAB_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatterbox_lab"


def use_compile_caches() -> Path:
    """Keep PyTorch's Inductor cache and Triton's kernel cache under the project's cache directory
    (unless the user set them), so a second process starts warm and `make clean` never drops them.
    Must run before the first compile; returns the folder."""
    folder = cache_root() / "compile"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return folder


def synthetic_dir(preset: str, seed: int = DEFAULT_SEED, model: str = "original") -> Path:
    name = "" if check_model(model) == "original" else f"{model}-"
    return cache_root() / f"synthetic-{name}{check_preset(preset)}-seed{seed}-v{FORMAT_VERSION}"


def _character_tokenizer(size: int, special: dict, chars: list) -> str:
    """A character-level tokenizer of exactly `size` ids: `special` at their ids, then `chars`."""
    from tokenizers import Tokenizer, models

    vocab = dict(special)
    free_ids = (i for i in range(size) if i not in special.values())
    for ch, idx in zip(chars, free_ids):
        vocab[ch] = idx
    for idx in free_ids:  # pad the vocabulary to its full size
        vocab[f"[UNUSED{idx}]"] = idx
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.add_special_tokens(list(special))
    return tokenizer.to_str()


_LATIN = [chr(c) for c in range(0x20, 0x7F) if chr(c) != " "] + [chr(c) for c in range(0xA1, 0x250)]


def _tokenizer_json() -> str:
    """The original's tokenizer: Latin characters, TEXT_VOCAB_SIZE ids."""
    return _character_tokenizer(TEXT_VOCAB_SIZE, _SPECIAL, _LATIN)


# Multilingual's grapheme tokenizer (T3Config.multilingual: 2,454 ids, the same start and stop ids).
MTL_VOCAB_SIZE = 2454
# Upstream lowercases and NFKD-decomposes text, so accents arrive as combining marks; Korean
# arrives as conjoining jamo, Chinese as Cangjie codes written [cj_x].
_MTL_RANGES = ((0x0300, 0x0370), (0x0370, 0x0400), (0x0400, 0x0500), (0x0590, 0x0600), (0x0600, 0x0700),
               (0x0900, 0x0980), (0x1100, 0x1200), (0x3040, 0x3100))


def _mtl_tokenizer_json() -> str:
    special = dict(_SPECIAL)
    names = ["[PAD]", "[SEP]", "[CLS]", "[MASK]", *(f"[{code}]" for code in LANGUAGES),
             *(f"[cj_{c}]" for c in "abcdefghijklmnopqrstuvwxyz0123456789.")]
    free = (i for i in range(3, MTL_VOCAB_SIZE) if i not in special.values())
    special.update(zip(names, free))
    chars = _LATIN + [chr(c) for low, high in _MTL_RANGES for c in range(low, high)]
    return _character_tokenizer(MTL_VOCAB_SIZE, special, chars)


# Turbo's GPT-2 tokenizer: 50,276 ids (T3's text table), end of text at GPT-2's 50256.
TURBO_VOCAB_SIZE = 50276
_END_OF_TEXT = "<|endoftext|>"
# What the byte-level merges are learnt from. Any fixed text gives a working tokenizer; this one gives
# common English words single tokens, as GPT-2's own merges do.
_MERGE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Every step is measured and checked against upstream. "
    "Speech tokens are written one at a time, and the audio follows from them. "
    "Hello, how are you today? I am fine, thank you, and you? We will see what the weather brings. "
    "This is a sentence with numbers like 1, 2, 3 and 2026, and with punctuation: commas, dashes - and quotes."
)


def _turbo_tokenizer_files() -> dict:
    """tokenizer.json and tokenizer_config.json, the files transformers' AutoTokenizer reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([_MERGE_TEXT] * 4, trainer=trainer)
    learnt = json.loads(tokenizer.to_str())
    vocab = learnt["model"]["vocab"]
    used = set(vocab.values())
    for idx in range(TURBO_VOCAB_SIZE):  # pad to T3's table; GPT-2's end of text keeps its id
        if idx not in used:
            vocab[_END_OF_TEXT if idx == 50256 else f"<|unused{idx}|>"] = idx
    full = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                      for m in learnt["model"]["merges"]]))
    full.pre_tokenizer = tokenizer.pre_tokenizer
    full.decoder = tokenizer.decoder
    full.add_special_tokens([_END_OF_TEXT])
    config = dict(tokenizer_class="GPT2TokenizerFast", bos_token=_END_OF_TEXT, eos_token=_END_OF_TEXT,
                  unk_token=_END_OF_TEXT, model_max_length=1024, add_prefix_space=False)
    return {"tokenizer.json": full.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def _tokenizer_files(model: str) -> dict:
    if model == "turbo":
        return _turbo_tokenizer_files()
    if model == "multilingual":
        return {"grapheme_mtl_merged_expanded_v1.json": _mtl_tokenizer_json()}
    return {"tokenizer.json": _tokenizer_json()}


def _state_dict_for_file(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; every entry gets its own.
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def weights_digest(directory: Path, model: str = "original") -> str:
    h = hashlib.sha256()
    for name in FILES[model]:
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _save(state: dict, path: Path) -> None:
    """A state dict in the format its file name says: safetensors, or a plain torch file (`.pt`, which
    Multilingual's from_local reads with weights_only=True)."""
    from safetensors.torch import save_file

    if path.suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))


def build_synthetic(preset: str, directory: Path, seed: int = DEFAULT_SEED, model: str = "original") -> Path:
    """Write a synthetic checkpoint of `model` at `preset` size into `directory` (must not exist)."""
    from chatterbox.models.voice_encoder import VoiceEncoder

    check_preset(preset)
    ve_file, t3_file, s3gen_file = FILES[check_model(model)][:3]
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; refusing to overwrite it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        steps = [
            (ve_file, VoiceEncoder),
            (t3_file, lambda: build_t3(preset, model)),
            (s3gen_file, lambda: build_s3gen(preset, meanflow=model == "turbo")),
        ]
        what = f"'{preset}' checkpoint" if model == "original" else f"'{preset}' {model} checkpoint"
        with tqdm(total=len(steps) + 1, desc=f"building synthetic {what}") as bar:
            for i, (name, construct) in enumerate(steps):
                bar.set_postfix_str(name)
                # One seed per file, so each file is reproducible on its own.
                torch.manual_seed(seed + i)
                with torch.device("cpu"):
                    module = construct()
                _save(_state_dict_for_file(module), staging / name)
                del module
                bar.update()
            for name, text in _tokenizer_files(model).items():
                (staging / name).write_text(text)
            bar.update()
        marker = dict(
            synthetic=True, model=model, preset=preset, seed=seed, format_version=FORMAT_VERSION,
            torch=torch.__version__, sha256=weights_digest(staging, model),
        )
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        # A rename is atomic: an interrupted build never leaves a half checkpoint behind.
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def ensure_synthetic(preset: str, seed: int = DEFAULT_SEED, model: str = "original") -> Path:
    """The cached synthetic checkpoint of `model` for `preset`, built on first use."""
    directory = synthetic_dir(preset, seed, model)
    if not (directory / MARKER).exists():
        try:
            build_synthetic(preset, directory, seed, model)
        except FileExistsError:
            if not (directory / MARKER).exists():
                raise
    return directory


def read_marker(directory: Path) -> dict | None:
    path = Path(directory) / MARKER
    return json.loads(path.read_text()) if path.exists() else None


def check_checkpoint_dir(directory: Path, model: str = "original") -> Path:
    directory = Path(directory).expanduser()
    required = FILES[check_model(model)]
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {directory} does not exist; pass a directory holding "
            f"{', '.join(required)} (the upstream layout of the {model} model)"
        )
    missing = [n for n in required if not (directory / n).is_file()]
    empty = [n for n in required if n not in missing and (directory / n).stat().st_size == 0]
    if missing or empty:
        problems = []
        if missing:
            problems.append("missing " + ", ".join(missing))
        if empty:
            problems.append("empty " + ", ".join(empty))
        raise FileNotFoundError(
            f"incomplete checkpoint in {directory}: {'; '.join(problems)}. A Chatterbox {model} "
            f"checkpoint needs {', '.join(required)} (conds.pt is optional)."
        )
    from safetensors import safe_open

    for name in required:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(directory / name), framework="pt") as f:
                    f.keys()
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise ValueError(f"{directory / name} is not a readable safetensors file ({exc}); "
                                 f"it may be truncated: download or copy it again") from None
    return directory
