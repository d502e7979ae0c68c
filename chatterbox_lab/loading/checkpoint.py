"""The synthetic checkpoint: upstream classes, random weights, upstream file layout.

No weights can be downloaded everywhere this workbook runs, so the default model
is built here: the real `T3`, `S3Gen` and `VoiceEncoder` classes initialised
from a fixed seed and written as the files `ChatterboxTTS.from_local` reads.
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

# Bump when the way synthetic weights are made changes, so old caches are rebuilt.
FORMAT_VERSION = 1
DEFAULT_SEED = 1234

REQUIRED_FILES = ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors", "tokenizer.json")
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


def synthetic_dir(preset: str, seed: int = DEFAULT_SEED) -> Path:
    return cache_root() / f"synthetic-{check_preset(preset)}-seed{seed}-v{FORMAT_VERSION}"


def _tokenizer_json() -> str:
    """A character-level tokenizer with exactly TEXT_VOCAB_SIZE ids."""
    from tokenizers import Tokenizer, models

    chars = [chr(c) for c in range(0x20, 0x7F) if chr(c) != " "]
    chars += [chr(c) for c in range(0xA1, 0x250)]  # Latin-1 and Latin Extended letters
    vocab = dict(_SPECIAL)
    free_ids = (i for i in range(TEXT_VOCAB_SIZE) if i not in _SPECIAL.values())
    for ch, idx in zip(chars, free_ids):
        vocab[ch] = idx
    for idx in free_ids:  # pad the vocabulary to its full size
        vocab[f"[UNUSED{idx}]"] = idx
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tokenizer.add_special_tokens(list(_SPECIAL))
    return tokenizer.to_str()


def _state_dict_for_file(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; every entry gets its own.
    return {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}


def weights_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for name in REQUIRED_FILES:
        with open(directory / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def build_synthetic(preset: str, directory: Path, seed: int = DEFAULT_SEED) -> Path:
    """Write a synthetic checkpoint of `preset` size into `directory` (must not exist)."""
    from chatterbox.models.voice_encoder import VoiceEncoder
    from safetensors.torch import save_file

    check_preset(preset)
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists; refusing to overwrite it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        steps = [
            ("ve.safetensors", VoiceEncoder),
            ("t3_cfg.safetensors", lambda: build_t3(preset)),
            ("s3gen.safetensors", lambda: build_s3gen(preset)),
        ]
        with tqdm(total=len(steps) + 1, desc=f"building synthetic '{preset}' checkpoint") as bar:
            for i, (name, construct) in enumerate(steps):
                bar.set_postfix_str(name)
                # One seed per file, so each file is reproducible on its own.
                torch.manual_seed(seed + i)
                with torch.device("cpu"):
                    module = construct()
                save_file(_state_dict_for_file(module), str(staging / name))
                del module
                bar.update()
            (staging / "tokenizer.json").write_text(_tokenizer_json())
            bar.update()
        marker = dict(
            synthetic=True, preset=preset, seed=seed, format_version=FORMAT_VERSION,
            torch=torch.__version__, sha256=weights_digest(staging),
        )
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        # A rename is atomic: an interrupted build never leaves a half checkpoint behind.
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def ensure_synthetic(preset: str, seed: int = DEFAULT_SEED) -> Path:
    """The cached synthetic checkpoint for `preset`, built on first use."""
    directory = synthetic_dir(preset, seed)
    if not (directory / MARKER).exists():
        try:
            build_synthetic(preset, directory, seed)
        except FileExistsError:
            if not (directory / MARKER).exists():
                raise
    return directory


def read_marker(directory: Path) -> dict | None:
    path = Path(directory) / MARKER
    return json.loads(path.read_text()) if path.exists() else None


def check_checkpoint_dir(directory: Path) -> Path:
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {directory} does not exist; pass a directory holding "
            f"{', '.join(REQUIRED_FILES)} (the upstream ResembleAI/chatterbox layout)"
        )
    missing = [n for n in REQUIRED_FILES if not (directory / n).is_file()]
    empty = [n for n in REQUIRED_FILES if n not in missing and (directory / n).stat().st_size == 0]
    if missing or empty:
        problems = []
        if missing:
            problems.append("missing " + ", ".join(missing))
        if empty:
            problems.append("empty " + ", ".join(empty))
        raise FileNotFoundError(
            f"incomplete checkpoint in {directory}: {'; '.join(problems)}. A Chatterbox "
            f"checkpoint needs {', '.join(REQUIRED_FILES)} (conds.pt is optional)."
        )
    from safetensors import safe_open

    for name in REQUIRED_FILES:
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(directory / name), framework="pt") as f:
                    f.keys()
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise ValueError(f"{directory / name} is not a readable safetensors file ({exc}); "
                                 f"it may be truncated: download or copy it again") from None
    return directory
