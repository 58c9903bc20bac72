#!/usr/bin/env bash
# `check --each` benchmark (issue 12 §4): 50 small adapters against one base in one run vs one
# adapter, same flags. The adapters are written by scripts/make_each_adapters.py (seeded, r=RANK on
# MODULES of every layer, nothing committed). Prints wall time and peak RSS of both runs and their
# ratio; run on a quiet machine (uptime is printed).
#
#   scripts/bench-each.sh                                   # fixture model fixtures/models/tiny-llama
#   BASE=~/.cache/lora-doctor/smollm2-135m scripts/bench-each.sh
#   FLAGS="--weights-only" COUNT=50 RANK=4 MODULES=q_proj,v_proj scripts/bench-each.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-fixtures/models/tiny-llama}
COUNT=${COUNT:-50}
RANK=${RANK:-4}
MODULES=${MODULES:-q_proj,v_proj}
FLAGS=${FLAGS:---max-tokens 128 --generate 0}
PY=${LD_PYTHON:-$HOME/.cache/lora-doctor/venv/bin/python}
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 2; }

cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/lora-doctor
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$PY" scripts/make_each_adapters.py --base "$BASE" --out "$tmp/adapters" --count "$COUNT" \
    --rank "$RANK" --modules "$MODULES"
cat "$BASE"/*.safetensors > /dev/null   # the base read from memory in both runs

timed() { # $1 = label, rest = check arguments; prints "label wall_s peak_rss_mib cpu_s"
  local label=$1; shift
  # shellcheck disable=SC2086
  /usr/bin/time -f '%e %M %U %S' -o "$tmp/$label.time" \
      "$BIN" check --quiet --exit-zero --base "$BASE" $FLAGS "$@" > /dev/null
  read -r wall rss user sys < "$tmp/$label.time"
  echo "$label $wall $((rss / 1024)) $(echo "$user + $sys" | bc)"
}

uptime
echo "base $BASE; $COUNT adapters r=$RANK on $MODULES (every layer); flags: $FLAGS"
one=$(timed one --each "$tmp/adapters/a00")
all=$(timed all --each-dir "$tmp/adapters")
echo "$one" | awk '{printf "1 adapter:   %7.2f s wall %7.2f s CPU %6d MiB\n", $2, $4, $3}'
echo "$all" | awk -v n="$COUNT" '{printf "%d adapters: %7.2f s wall %7.2f s CPU %6d MiB\n", n, $2, $4, $3}'
echo "$one $all" | awk -v n="$COUNT" '{printf "ratio %d/1: %.2fx wall, %.2fx CPU (target <= 3x)\n", n, $6 / $2, $8 / $4}'
echo "$one $all" | awk -v n="$COUNT" '{printf "vs %d separate runs (%d x the one-adapter run): %.2f of their wall, %.2f of their CPU\n", n, n, $6 / ($2 * n), $8 / ($4 * n)}'
