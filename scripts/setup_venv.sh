#!/usr/bin/env bash
# Project-local virtual environment for `make test` and `make bench`.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

# torch first and pinned: an open range (torch>=2.6, as pyproject says) resolves to
# the newest CUDA build, several GB, even on a machine with no GPU. A torch already
# in the venv (a CUDA build a user installed on purpose) is kept.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    $PIP install --quiet "torch==${TORCH_VERSION:-2.13.0}"
fi

$PIP install --quiet -e ".[notebooks,serve,test]"

# chatterbox-tts pins torch==2.6.0, transformers==5.2.0, numpy<2, gradio and more;
# pyproject.toml lists what it really imports, so it goes in without its pins.
$PIP install --quiet --no-deps "chatterbox-tts==0.1.7"

# torchaudio: chatterbox imports it (for Resample and kaldi.fbank), and transformers
# imports it whenever it is installed. The package index only has CUDA builds, whose
# compiled libraries fail to load next to a CPU-only torch (libc10_cuda.so), which
# breaks even `import chatterbox`. Both functions it needs are pure Python, and
# torchaudio falls back to pure-Python mode when its libraries are absent, so on a
# CPU-only torch we install it without dependencies and remove those libraries.
$PIP install --quiet --no-deps "torchaudio==${TORCHAUDIO_VERSION:-2.11.0}"
"$VENV/bin/python" - <<'PY'
import importlib.util, pathlib, torch
if torch.version.cuda is None:
    lib = pathlib.Path(importlib.util.find_spec("torchaudio").origin).parent / "lib"
    removed = [p.name for p in lib.glob("*.so")]
    for name in removed:
        (lib / name).unlink()
    if removed:
        print("torchaudio: CPU-only torch, using pure-Python mode (removed " + ", ".join(removed) + ")")
PY

# resemble-perth needs pkg_resources (setuptools < 82, pinned in pyproject.toml);
# without it perth sets its watermarker to None and ChatterboxTTS() fails later.
"$VENV/bin/python" -c "import perth, sys; sys.exit(perth.PerthImplicitWatermarker is None)" \
    || { echo "resemble-perth lost pkg_resources: is setuptools >= 82 installed?"; exit 1; }
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
bash "$(dirname "$0")/setup_browser.sh"
"$VENV/bin/python" -c "import chatterbox, chatterbox_lab; print('environment ready:', chatterbox.__version__)"
