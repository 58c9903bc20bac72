#!/usr/bin/env bash
# The scale benchmark (issue 12 §1): a Llama-2-7B-shape checkpoint with random weights (13.5 GB
# bf16, sharded, with an index) and an r16 all-linear adapter, written by scripts/synth-llama.py
# into ${LD_CACHE:-~/.cache/lora-doctor}/synth-SHAPE when absent; then, each under /usr/bin/time -v:
#   check --weights-only                              (target: peak RSS < 2 GiB)
#   check --max-tokens 128 --generate 16              (default precisions; peak RSS < 4 GiB,
#                                                      wall < 20 min on 2 cores)
# Prints wall time and peak RSS of each, and the machine's load before and after.
#
#   scripts/bench-7b.sh               # SHAPE=7b (1b: the 2.2 GB shape, for a quicker look)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LD_CACHE:-$HOME/.cache/lora-doctor}
SHAPE=${SHAPE:-7b}
DIR=$CACHE/synth-$SHAPE
PY=${LD_PYTHON:-$CACHE/venv/bin/python}
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 2; }
if [ ! -f "$DIR/adapter/adapter_config.json" ]; then
  "$PY" scripts/synth-llama.py --shape "$SHAPE" --out "$DIR"
fi
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/lora-doctor
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

run() { # $1 = label, rest = extra check arguments
  local label=$1; shift
  /usr/bin/time -v -o "$tmp/time" "$BIN" check --exit-zero --base "$DIR/base" \
      --adapter "$DIR/adapter" --json "$tmp/report.json" "$@" > "$tmp/out" 2>&1 || {
    cat "$tmp/out" >&2; exit 1; }
  python3 - "$tmp/time" "$label" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", text).group(1)
parts = [float(p) for p in wall.split(":")]
secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
cpu = float(re.search(r"User time \(seconds\): (.*)", text).group(1)) + \
      float(re.search(r"System time \(seconds\): (.*)", text).group(1))
print(f"{sys.argv[2]}: wall {secs:.0f} s ({secs / 60:.1f} min), cpu {cpu:.0f} s, peak RSS {kib / 2**20:.2f} GiB")
PY
}
echo "== synth-$SHAPE, $(nproc) cores; load before: $(uptime | sed 's/.*load average/load average/')"
run "weights-only" --weights-only
run "check --max-tokens 128 --generate 16" --max-tokens 128 --generate 16
echo "== load after: $(uptime | sed 's/.*load average/load average/')"
