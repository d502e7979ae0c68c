"""Tables for the README and notebooks, generated from committed results (never typed)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import results

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CATALOG = ROOT / "notebooks" / "catalog.json"
BLOCKS = {"results": lambda: results_section(), "notebooks": lambda: notebook_section()}
README_FIGURES = ("t3_decode_tok_s", "t3_speedup_vs_upstream", "t3_prefill_s", "e2e_s", "rtf",
                  "peak_vram_mib", "compile_s", "gpu_kernels_per_token", "host_launches_per_token")


def results_section() -> str:
    docs = results.committed(gpu_only=True)
    if not docs:
        return "No GPU results committed yet."
    path, doc = docs[-1]
    prov = doc["provenance"]
    rel = path.relative_to(ROOT)
    lines = [
        f"Latest GPU run: **{prov['gpu']}**, driver {prov['driver']}, CUDA {prov['cuda']}, torch {prov['torch']}, "
        f"transformers {prov['transformers']}, chatterbox-tts {prov['chatterbox_tts']}; "
        f"preset `{prov['preset']}`, {prov['tokens']} speech tokens ({prov['tokens'] / 25:.2f} s of audio), "
        f"median of {prov.get('repeats')} runs; commit `{str(prov['git_commit'])[:10]}`, {prov['date_utc']}. "
        f"Source: [`{rel}`]({rel}).",
        "",
        results.markdown_table(doc, README_FIGURES),
    ]
    checks = doc.get("checks") or {}
    if checks:
        identity = checks.get("fp32_token_identity", {})
        lines += ["", f"Checks in the same run: fp32 tokens identical to upstream for "
                      f"{sum(identity.values())}/{len(identity)} step combinations "
                      f"({checks.get('fp32_tokens_checked')} tokens); bf16 teacher-forced logits "
                      f"relative error {checks.get('bf16_logit_rel_error', float('nan')):.2e} "
                      f"(tolerance {checks.get('bf16_logit_tolerance')})."]
    others = [p.name for p, _ in docs[:-1]]
    if others:
        lines += ["", "Earlier runs: " + ", ".join(f"`{n}`" for n in others) + "."]
    return "\n".join(lines)


def notebook_catalog() -> list[dict]:
    return json.loads(CATALOG.read_text())["notebooks"]


def notebook_section() -> str:
    rows = ["| notebook | runner | CPU time | what it checks |", "|---|---|---|---|"]
    rows += [f"| [`{n['file']}`](notebooks/{n['file']}) | {n['runner']} | ~{n['cpu_minutes']} min | {n['checks']} |"
             for n in notebook_catalog()]
    return "\n".join(rows)


def render_readme(text: str) -> str:
    for name, make in BLOCKS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no {start} ... {end} block")
        text = pattern.sub(lambda _: f"{start}\n{make()}\n{end}", text)
    return text


def update_readme(path: Path = README) -> bool:
    """Rewrite the results block; returns whether anything changed."""
    old = path.read_text()
    new = render_readme(old)
    if new != old:
        path.write_text(new)
    return new != old
