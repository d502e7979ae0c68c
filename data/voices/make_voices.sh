#!/usr/bin/env bash
# Generate the two reference voices (alto.wav, tenor.wav) used as speaker
# prompts for Chatterbox TTS. Requires the Debian packages espeak-ng and sox:
#   apt-get install -y espeak-ng sox
# Deterministic: re-running produces byte-identical files.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

ALTO_TEXT="The morning train left the station on time. Along the river, the fields were green and quiet."
TENOR_TEXT="Please keep the kitchen window open while the bread is baking. It should be ready in about twenty minutes."

# make_voice NAME ESPEAK_VOICE PITCH SPEED TEXT
make_voice() {
    local name="$1" voice="$2" pitch="$3" speed="$4" text="$5"
    espeak-ng -v "$voice" -p "$pitch" -s "$speed" -w "$TMP/$name.raw.wav" "$text"
    # -D: no dither (keeps output deterministic).
    # Trim leading/trailing silence, pad 0.1 s each side, resample to 24 kHz
    # mono 16-bit, normalise peak to -3 dBFS.
    sox -D "$TMP/$name.raw.wav" -c 1 -b 16 -e signed-integer "$HERE/$name.wav" \
        silence 1 0.02 0.1% reverse silence 1 0.02 0.1% reverse \
        pad 0.1 0.1 \
        rate -v 24000 \
        gain -n -3
}

make_voice alto  en-us+f3 60 150 "$ALTO_TEXT"
make_voice tenor en-gb+m3 35 155 "$TENOR_TEXT"

for f in alto tenor; do
    printf '%s.wav\t%s s\n' "$f" "$(soxi -D "$HERE/$f.wav")"
done
