"""The 8-bit record on a GPU: one bench process, then the 8-bit kernels' GPU tests.

    OUT=gpu-out python scripts/eightbit_record.py [--no-profile]

One process measures upstream's fp32 loop, the `compiled` rung, torchao's int8 and float8
weight-only rungs on it, each of our 8-bit steps on the recommended set, and the recommended set
(bf16). Batches of 64 and 256 utterances run with the recommended set and with it plus the int8
cache. Every 8-bit rung carries its quality figures (`measure/quality.py`). Writes
$OUT/eightbit.json (rewritten after each measurement, so a run cut short keeps what it measured)
and $OUT/gpu_tests.log, and prints a short table last. torchao's rungs are skipped, saying so,
where torchao is not installed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from chatterbox_lab.measure.bench import BenchConfig, run
from chatterbox_lab.records import results

RUNGS = ("upstream_fp32", "compiled", "torchao_int8", "torchao_float8", "int8_weights", "fp8_weights",
         "int8_kv_cache", "recommended")
BATCHES = (64, 256)


def table(doc: dict) -> str:
    """Per rung: decode rate, its floor and share, the formats; then quality and the batches."""
    lines = ["| rung | tok/s | floor tok/s | share of floor | weights | cache |", "|---|---|---|---|---|---|"]
    for name, r in doc["rungs"].items():
        lines.append(f"| {name} | {r['t3_decode_tok_s']:,.0f} | {r.get('floor_tok_s', 0):,.0f} | "
                     f"{r.get('fraction_of_floor', 0):.2f} | {r.get('weights_format', '-')} | "
                     f"{r.get('cache_format', '-')} |")
    lines += ["", "| 8-bit step | logit error vs bf16 | vs fp32 (bf16's) | same-draw agreement | mel | "
                  "waveform | within tolerance |", "|---|---|---|---|---|---|---|"]
    for name, q in doc.get("quality", {}).items():
        lines.append(f"| {name} | {q['logit_error_vs_bf16']:.3g} | {q['logit_error_vs_fp32']:.3g} "
                     f"({q['bf16_logit_error_vs_fp32']:.3g}) | {q['same_draw_agreement']:.3f} | "
                     f"{q.get('mel_difference', float('nan')):.3g} | {q.get('waveform_difference', float('nan')):.3g} | "
                     f"{q['within_tolerance']} |")
    batches = {"recommended": doc.get("batch", {}), **doc.get("batch_by_rung", {})}
    lines += ["", "| batch steps | utterances | aggregate tok/s | KV cache MiB |", "|---|---|---|---|"]
    for name, found in batches.items():
        for n, b in found.get("streams", {}).items():
            lines.append(f"| {name} | {n} | {b['aggregate_tok_s']:,.0f} | {b['kv_cache_mib']:,.0f} |")
    lines += [f"skipped {name}: {why}" for name, why in doc.get("skipped_rungs", {}).items()]
    return "\n".join(lines)


def main() -> int:
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eightbit.json"
    config = BenchConfig(rungs=RUNGS, batch_sizes=BATCHES, batch_rungs=("int8_kv_cache",),
                         profile="--no-profile" not in sys.argv[1:])
    doc = run(config, partial=path)
    results.write(doc, path, overwrite=True)
    with open(out / "gpu_tests.log", "w") as log:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_quantized.py"],
                               stdout=log, stderr=subprocess.STDOUT)
    print(f"wrote {path}; 8-bit GPU tests: exit {tests.returncode} ({out / 'gpu_tests.log'})")
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
