"""Start-up from a fresh process: the wall time from launching Python to a session ready for its
first request, once from empty compile caches and once with the caches that first start left.

Each start is its own process, as a user's would be, so the figure holds the imports, the model's
load, S3Gen's steps, the decoder's build and the warm-up's captures and compiles. The empty caches
are a fresh folder for Inductor's and Triton's caches, so the user's own are never touched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

# The child: a session made and warmed as `serve` makes it, then one request, timed apart.
CHILD = """
import json, sys, time
from chatterbox_lab.serving.session import TTSSession
session = TTSSession(preset={preset!r}, device={device!r}, s3gen_steps={s3gen_steps!r},
                     max_new_tokens={tokens})
session.warmup(progress=False)
print("READY", flush=True)
start = time.perf_counter()
speech = session.synthesize({text!r}, "alto", max_new_tokens={tokens})
first_request_s = time.perf_counter() - start
session.close()
print(json.dumps(dict(stages_s=session.startup_s, first_request_s=first_request_s)), flush=True)
"""
TEXT = "The first request after start-up, with the voice the warm-up prepared."


def start_once(cache_dir: str, preset=None, device=None, s3gen_steps="recommended", tokens: int = 256) -> dict:
    """One fresh process's start-up with its compile caches in `cache_dir`: `ready_s` from launch
    to ready, the session's seconds per stage, and the first request's seconds."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache_dir, "inductor"),
               TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"))
    code = CHILD.format(preset=preset, device=device, s3gen_steps=s3gen_steps, tokens=tokens, text=TEXT)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    ready_s, figures = None, None
    for line in child.stdout:
        if line.strip() == "READY":
            ready_s = time.perf_counter() - start
        elif line.startswith("{"):
            figures = json.loads(line)
    if child.wait() != 0 or ready_s is None or figures is None:
        raise RuntimeError(f"the start-up process failed (exit {child.returncode}); its error is above")
    return dict(ready_s=ready_s, **figures)


def cold_and_warm(preset=None, device=None, s3gen_steps="recommended", tokens: int = 256) -> dict:
    """`start_once` from empty compile caches, then again with the caches it filled."""
    with tempfile.TemporaryDirectory(prefix="chatterbox_lab-startup-") as cache_dir:
        cold = start_once(cache_dir, preset, device, s3gen_steps, tokens)
        warm = start_once(cache_dir, preset, device, s3gen_steps, tokens)
    return dict(cold=cold, warm=warm)
