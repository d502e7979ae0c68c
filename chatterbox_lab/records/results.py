"""The results format: one JSON document per run, with its provenance and raw timings.

    {"schema": 1,
     "provenance": {gpu, driver, cuda, torch, transformers, chatterbox_tts, git_commit,
                    command, date_utc, preset, text, tokens, device, ...},
     "rungs": {"upstream_fp32": {"t3_decode_tok_s": ..., "raw": {...}}, ...},
     "checks": {...}}

Rung figures use these names where they apply (later rungs may add more):
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

SCHEMA = 1
RUNG_FIGURES = ("t3_decode_tok_s", "t3_prefill_s", "e2e_s", "audio_s", "rtf", "peak_vram_mib",
                "compile_s", "gpu_kernels_per_token", "host_launches_per_token")
PROVENANCE_KEYS = ("gpu", "driver", "cuda", "torch", "transformers", "chatterbox_tts", "git_commit",
                   "command", "date_utc", "preset", "text", "tokens")
RESULTS_DIR = Path(__file__).resolve().parents[2] / "data" / "results"

__doc__ += "\n".join(f"    {name}" for name in RUNG_FIGURES)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    # A copy of the tree without .git (a container build, say) can name its commit here.
    if env := os.environ.get("CHATTERBOX_LAB_GIT_COMMIT"):
        return env
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py":
        argv[0:1] = ["-m", Path(argv[0]).parent.name]
    return " ".join(["python", *argv])


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(*, device: str, preset: str, text: str, tokens: int, **extra) -> dict:
    on_gpu = device.startswith("cuda")
    return dict(
        gpu=torch.cuda.get_device_name(device) if on_gpu else None,
        driver=_driver() if on_gpu else None,
        cuda=torch.version.cuda,
        torch=torch.__version__,
        transformers=_version("transformers"),
        chatterbox_tts=_version("chatterbox-tts"),
        git_commit=_git_commit(),
        command=_command_line(),
        date_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        preset=preset,
        text=text,
        tokens=tokens,
        device=device,
        cpu=platform.processor() or platform.machine(),
        python=platform.python_version(),
        **extra,
    )


def validate(doc: dict) -> dict:
    """Raise ValueError naming what is missing or malformed; return doc."""
    problems = []
    if doc.get("schema") != SCHEMA:
        problems.append(f"schema must be {SCHEMA}")
    prov = doc.get("provenance", {})
    problems += [f"provenance.{k} missing" for k in PROVENANCE_KEYS if k not in prov]
    rungs = doc.get("rungs")
    if not isinstance(rungs, dict) or not rungs:
        problems.append("rungs must be a non-empty mapping")
    else:
        for name, figures in rungs.items():
            for key, value in figures.items():
                if key in RUNG_FIGURES and value is not None and not isinstance(value, (int, float)):
                    problems.append(f"rungs.{name}.{key} must be a number")
    if problems:
        raise ValueError("invalid results document: " + "; ".join(problems))
    return doc


def write(doc: dict, path: Path, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) or choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(validate(doc), indent=2, sort_keys=False) + "\n")
    return path


def load(path: Path) -> dict:
    return validate(json.loads(Path(path).read_text()))


def committed(gpu_only: bool = True, folder: str = "") -> list[tuple[Path, dict]]:
    """Committed result documents, oldest first: the full-ladder runs of `data/results/`, or
    those of one of its folders (`soak`, `beyond`)."""
    docs = [(p, load(p)) for p in sorted((RESULTS_DIR / folder).glob("*.json"))]
    if gpu_only:
        docs = [(p, d) for p, d in docs if d["provenance"].get("gpu")]
    return sorted(docs, key=lambda pd: pd[1]["provenance"]["date_utc"])


def all_with(folder: str = "", rungs=(), batch: bool = False, section: str | None = None,
             traced: bool = False) -> list[tuple[Path, dict]]:
    """Every committed GPU document of `folder` that measured every rung in `rungs` (and batched
    decoding, with `batch`; and has `section`, e.g. "chain_sweep"; and, with `traced`, a committed
    trace of each of those rungs), oldest first: the runs to compare when one rung's records spread."""
    matching = [(p, d) for p, d in committed(gpu_only=True, folder=folder)
                if set(rungs) <= set(d["rungs"]) and (not batch or d.get("batch")) and (not section or section in d)
                and (not traced or all(d["rungs"][rung].get("trace") for rung in rungs))]
    if not matching:
        raise LookupError(f"no committed GPU result in data/results/{folder} has rungs {list(rungs)}"
                          + (" and a batch section" if batch else "") + (f" and {section}" if section else "")
                          + (" with their traces" if traced else ""))
    return matching


def latest_with(folder: str = "", rungs=(), batch: bool = False, section: str | None = None,
                traced: bool = False) -> tuple[Path, dict]:
    """The latest of `all_with`: a later run of only some rungs does not hide it."""
    return all_with(folder, rungs, batch, section, traced)[-1]


def cold_starts(folder: str = "beyond") -> dict[tuple[str, str], tuple[Path, dict]]:
    """Per (GPU, rung), the latest record of the rung measured from empty compile caches: a run
    whose command gives Triton a fresh cache directory (`TRITON_CACHE_DIR=$(mktemp -d) ...`, see
    the folder's README), so its `compile_s` is a cold start-up's."""
    found = {}
    for path, doc in committed(gpu_only=True, folder=folder):
        if "TRITON_CACHE_DIR=" in doc["provenance"].get("command", ""):
            for rung in doc["rungs"]:
                found[doc["provenance"]["gpu"], rung] = (path, doc)
    return found


def latest_gpu_result() -> dict | None:
    docs = committed(gpu_only=True)
    return docs[-1][1] if docs else None


def latest_gpu_checks(folder: str = "") -> dict | None:
    """The equivalence checks of the latest committed GPU run (of `folder`) made with --checks: the
    one with fp32 token identity (other runs record only their own checks, such as the half flow's)."""
    checked = [d for _, d in committed(gpu_only=True, folder=folder) if "fp32_token_identity" in d.get("checks", {})]
    return checked[-1]["checks"] if checked else None


def fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(doc: dict, figures=RUNG_FIGURES) -> str:
    head = "| rung | " + " | ".join(figures) + " |"
    rule = "|---|" + "---|" * len(figures)
    # An experimental rung says so: it is measured, not recommended.
    rows = [f"| {name}{' (experimental)' if r.get('status') == 'experimental' else ''} | "
            + " | ".join(fmt(r.get(f)) for f in figures) + " |"
            for name, r in doc["rungs"].items()]
    return "\n".join([head, rule, *rows])


def comparison_table(docs: dict[str, dict], rungs, figure: str = "t3_decode_tok_s") -> str:
    """One row per labelled document (runs of other commits, say), one column per rung: its `figure`."""
    head = f"| {figure} | " + " | ".join(rungs) + " |"
    rule = "|---|" + "---|" * len(rungs)
    rows = [f"| {label} | " + " | ".join(fmt(doc["rungs"].get(rung, {}).get(figure)) for rung in rungs) + " |"
            for label, doc in docs.items()]
    return "\n".join([head, rule, *rows])
