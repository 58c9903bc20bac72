#!/usr/bin/env bash
# Benchmark of the weight check on the real SmolLM2 case (built by scripts/real-model.sh), measured
# in one run against the baseline a user runs today: PEFT's merge_and_unload in f32, bf16 and f16
# on the same files (scripts/bench_peft_merge.py; skipped when torch is absent).
#
#   scripts/bench-weights.sh            # uses ${LD_CACHE:-~/.cache/lora-doctor}
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LD_CACHE:-$HOME/.cache/lora-doctor}
BASE=$CACHE/smollm2-135m
ADAPTER=${LD_BENCH_ADAPTER:-$CACHE/adapters/smollm2-r16}
PY=${LD_PYTHON:-$CACHE/venv/bin/python}
[ -d "$BASE" ] && [ -d "$ADAPTER" ] || { echo "run scripts/real-model.sh first" >&2; exit 2; }

cargo build --release --quiet
BIN=target/release/lora-doctor
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

run_ours() { # $1 = label, rest = precision list
  local label=$1; shift
  /usr/bin/time -f '%e %M' -o "$tmp/time" "$BIN" check --quiet --weights-only \
      --base "$BASE" --adapter "$ADAPTER" --precision "$1" --exit-zero >/dev/null
  read -r secs kib < "$tmp/time"
  echo "$label $secs $kib"
}
# Warm the page cache so both sides read from memory.
cat "$BASE"/*.safetensors "$ADAPTER"/*.safetensors > /dev/null

echo "== lora-doctor (release, $(nproc) cores)"
run_ours "f32,bf16,f16" "f32,bf16,f16" | tee "$tmp/ours_float"
run_ours "all(9)" "all" | tee "$tmp/ours_all"

if [ -x "$PY" ] && "$PY" -c "import torch, peft" 2>/dev/null; then
  echo "== PEFT merge_and_unload f32 + bf16 + f16 (torch, same files)"
  /usr/bin/time -f '%e %M' -o "$tmp/ptime" "$PY" scripts/bench_peft_merge.py \
      --base "$BASE" --adapter "$ADAPTER" | tee "$tmp/peft.json"
  read -r psecs pkib < "$tmp/ptime"
  echo "peft-process $psecs $pkib"
  read -r _ osecs okib < "$tmp/ours_float"
  read -r _ asecs akib < "$tmp/ours_all"
  python3 - "$psecs" "$pkib" "$osecs" "$okib" "$asecs" "$akib" <<'PY'
import sys
ps, pk, os_, ok, as_, ak = map(float, sys.argv[1:])
print(f"time  : lora-doctor f32+bf16+f16 {os_:.2f} s vs PEFT {ps:.2f} s -> {ps/os_:.1f}x faster")
print(f"time  : lora-doctor all 9 precisions {as_:.2f} s -> {ps/as_:.1f}x faster than PEFT's 3")
print(f"memory: lora-doctor {ok/1024:.0f} MiB vs PEFT {pk/1024:.0f} MiB peak RSS -> {pk/ok:.1f}x less")
PY
else
  echo "PEFT baseline skipped: no python with torch+peft at $PY (set LD_PYTHON)"
fi
