#!/usr/bin/env bash
# The one record the chapters past the guide (notebooks 06a-06e) read on a GPU: upstream's loop, the
# guide's last rung, every recommended step they teach and the experimental ones, timed in one
# process with the picks shipped for the card, then batches of 1, 8, 32 and 64 utterances, and a
# short trace per rung. Writes $OUT/chapters.json (with .md and .png beside it) and $OUT/traces/,
# and prints each step's gain over the rung before it in this one process, last.
#
#     OUT=/some/dir bash scripts/measure_chapters.sh
#
# Commit the JSON under data/results/beyond/ (with a line in its README); the chapters' plots then
# read it, since it holds every rung they show.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
rungs=$("$PY" -c "from chatterbox_lab.records import chapters; print(' '.join(chapters.bench_rungs()))")
# shellcheck disable=SC2086  # the rung names are words, split on purpose
"$PY" -m chatterbox_lab bench --rungs $rungs --experimental --batch 1 8 32 64 \
    --trace-dir "$OUT/traces" --out "$OUT/chapters.json" --overwrite
"$PY" - "$OUT/chapters.json" <<'PY'
import sys

from chatterbox_lab.records import chapters, results

doc = results.load(sys.argv[1])
print(f"\n{doc['provenance']['gpu']}, one process: each step over the rung before it")
print(chapters.record_gains_table(doc))
PY
