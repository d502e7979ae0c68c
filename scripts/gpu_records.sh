#!/usr/bin/env bash
# The GPU records of the step registry's product: `bench --ladder` in one fresh process (its wall
# time recorded), `say` against upstream's `generate` for one utterance, and the HTTP soak with
# the default (recommended) steps. Writes under $OUT (or ./gpu-out), prints a short table last.
# Wheels for packages the machine lacks may sit in .whl/ (installed into /tmp/site first).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5 CHATTERBOX_LAB_CACHE=/tmp/cblab
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 - <<'PY' > "$OUT/build.log" 2>&1
from chatterbox_lab.loading.models import load_tts
load_tts(device="cuda")  # builds the synthetic checkpoint once, outside the timed runs
PY
start=$(date +%s.%N)
python3 -m chatterbox_lab bench --ladder --out "$OUT/ladder.json" > "$OUT/ladder.log" 2>&1
echo "bench --ladder: exit $?, wall $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s" | tee "$OUT/ladder_wall.txt"
tail -25 "$OUT/ladder.log"
