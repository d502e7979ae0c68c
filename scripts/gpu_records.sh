#!/usr/bin/env bash
# The GPU records of the product's default path, in one call per part:
#   bash scripts/gpu_records.sh ladder   `bench --ladder` in one fresh process (wall time recorded)
#   bash scripts/gpu_records.sh soak     the HTTP soak with the default (recommended) steps, after two
#                                        fresh processes' start-up: from empty compile caches, then warm
#   bash scripts/gpu_records.sh say      `say` against upstream's loop, each a fresh process
#   bash scripts/gpu_records.sh startup  only the two fresh processes' start-up
#   bash scripts/gpu_records.sh eightbit the 8-bit record (`scripts/eightbit_record.py --no-profile`): our
#                                        8-bit steps and torchao's against bf16, with quality figures
#   bash scripts/gpu_records.sh batching the HTTP soak with 16 clients, the same unseeded requests served
#                                        one at a time and then up to 16 decoded together
#   bash scripts/gpu_records.sh corpus   the corpus job over data/corpus/example.jsonl at batch 32 and 64
#                                        (scripts/corpus_record.py; CORPUS_GPUS="1 2 4 8" runs it under
#                                        torchrun at each number of GPUs instead)
# Writes under $OUT (or ./gpu-out) and prints a short summary last. Wheels for packages the machine
# lacks may sit in .whl*/ folders (installed into /tmp/site first).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
wheels=$(ls .whl*/*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10 CHATTERBOX_LAB_CACHE=${CHATTERBOX_LAB_CACHE:-/tmp/cblab}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY' > "$OUT/build.log" 2>&1
from chatterbox_lab.loading.models import load_tts
load_tts(device="cuda")  # builds the synthetic checkpoint once, outside the timed runs
PY
wall() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$1" "$(date +%s.%N)"; }
case "${1:-ladder}" in
ladder)
    start=$(date +%s.%N)
    python3 -m chatterbox_lab bench --ladder --out "$OUT/ladder.json" > "$OUT/ladder.log" 2>&1
    echo "bench --ladder: exit $?, wall $(wall "$start") s" | tee "$OUT/ladder_wall.txt"
    grep -v "^\(bench\|profile\|Sampling\|USDT\)" "$OUT/ladder.log" | tail -30
    ;;
soak)
    python3 -m chatterbox_lab soak --requests 1000 --clients 4 --tokens 256 256 --lone 30 --startup \
        --time-limit "${SOAK_TIME_LIMIT:-330}" --out "$OUT/soak.json" > "$OUT/soak.log" 2>&1
    echo "soak: exit $?"; tail -2 "$OUT/soak.log" | cut -c1-2500
    ;;
batching)
    python3 -m chatterbox_lab soak --requests "${BATCHING_REQUESTS:-480}" --clients 16 --tokens 256 256 \
        --batch-requests 16 --time-limit "${SOAK_TIME_LIMIT:-240}" --out "$OUT/batching.json" > "$OUT/batching.log" 2>&1
    echo "batching soak: exit $?"; tail -2 "$OUT/batching.log" | cut -c1-2500
    ;;
startup)
    python3 -c "import json; from chatterbox_lab.measure.startup import cold_and_warm; print(json.dumps(cold_and_warm()))" \
        > "$OUT/startup.json" 2> "$OUT/startup.log"
    echo "startup: exit $?"; cat "$OUT/startup.json"
    ;;
corpus)
    # The WAVs (about 5,000 s of audio per run) stay on the machine; only the record comes back.
    speech=$(mktemp -d)
    python3 scripts/corpus_record.py "$speech" ${CORPUS_GPUS:+--gpus $CORPUS_GPUS} > "$OUT/corpus.log" 2>&1
    echo "corpus: exit $?"; cp "$speech/corpus.json" "$OUT/corpus.json"; tail -8 "$OUT/corpus.log"
    ;;
say)
    python3 scripts/say_vs_upstream.py "$OUT/say.json" "${SAY_REPEATS:-3}" > "$OUT/say.log" 2>&1
    echo "say vs upstream: exit $?"; tail -2 "$OUT/say.log"
    ;;
eightbit)
    OUT="$OUT" python3 scripts/eightbit_record.py --no-profile > "$OUT/eightbit.log" 2>&1
    echo "eightbit: exit $?"; grep -v "^\(bench\|batch\|profile\|Sampling\|USDT\)" "$OUT/eightbit.log" | tail -40
    ;;
esac
