#!/usr/bin/env bash
# Whole-job benchmark on the real SmolLM2 case (built by scripts/real-model.sh), paired against the
# Python job a user runs today (scripts/bench-job-baseline.py: PEFT + torch, unmerged f32 reference,
# bf16 and f16 merges, KL over 512 tokens) on the same files (issue 12 §3). The two run in turn,
# A B A B ..., RUNS pairs; each run's wall, CPU (user + sys) and peak RSS come from /usr/bin/time,
# and the ratios are medians of the pair-by-pair ratios (pairing keeps them honest on a busy
# machine). Also times the default check (f32 + bf16, 3x32 generation) and `--precision all`
# against the same baseline, one pair each unless RUNS_ALL is set.
#
#   scripts/bench-job.sh                 # RUNS=3; ${LD_CACHE:-~/.cache/lora-doctor}; uptime printed
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LD_CACHE:-$HOME/.cache/lora-doctor}
BASE=$CACHE/smollm2-135m
ADAPTER=${LD_BENCH_ADAPTER:-$CACHE/adapters/smollm2-r16}
PY=${LD_PYTHON:-$CACHE/venv/bin/python}
RUNS=${RUNS:-3}
RUNS_ALL=${RUNS_ALL:-1}
[ -d "$BASE" ] && [ -d "$ADAPTER" ] || { echo "run scripts/real-model.sh first" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 2; }
"$PY" -c "import torch, peft, transformers" 2>/dev/null || { echo "needs torch+peft at $PY (LD_PYTHON)" >&2; exit 2; }

cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/lora-doctor
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cat "$BASE"/*.safetensors "$ADAPTER"/*.safetensors > /dev/null   # both sides read from memory

timed() { # $1 = output file for "wall user sys maxrss_kib", rest = command
  local out=$1; shift
  /usr/bin/time -f '%e %U %S %M' -o "$out" "$@" > /dev/null 2> "$out.err" || {
    echo "failed: $*" >&2; cat "$out.err" >&2; exit 2; }
}
PYJOB=("$PY" scripts/bench-job-baseline.py --base "$BASE" --adapter "$ADAPTER" --max-tokens 512)
OURS=("$BIN" check --quiet --exit-zero --base "$BASE" --adapter "$ADAPTER")

pairs() { # $1 = label, $2 = pair count, rest = lora-doctor check arguments
  local label=$1 n=$2; shift 2
  for i in $(seq "$n"); do
    timed "$tmp/$label.a.$i" "${OURS[@]}" "$@"
    timed "$tmp/$label.b.$i" "${PYJOB[@]}"
  done
  python3 - "$tmp" "$label" "$n" <<'PY'
import statistics, sys
tmp, label, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def read(side, i):
    wall, user, sys_, kib = map(float, open(f"{tmp}/{label}.{side}.{i}").read().split())
    return wall, user + sys_, kib / 1024
rows = [(read("a", i), read("b", i)) for i in range(1, n + 1)]
med = lambda xs: statistics.median(xs)
a = [r[0] for r in rows]; b = [r[1] for r in rows]
print(f"{label}: lora-doctor wall {med([x[0] for x in a]):.2f} s, cpu {med([x[1] for x in a]):.2f} s, "
      f"peak {med([x[2] for x in a]):.0f} MiB | python wall {med([x[0] for x in b]):.2f} s, "
      f"cpu {med([x[1] for x in b]):.2f} s, peak {med([x[2] for x in b]):.0f} MiB | ratios (median of {n} pairs) "
      f"wall {med([x[0] / y[0] for x, y in rows]):.2f}x, cpu {med([x[1] / y[1] for x, y in rows]):.2f}x, "
      f"peak {med([x[2] / y[2] for x, y in rows]):.2f}x")
PY
}

echo "== $(nproc) cores; load before: $(uptime | sed 's/.*load average/load average/')"
pairs "baseline-job(bf16,f16,512,no-gen)" "$RUNS" --precision bf16,f16 --generate 0 --max-tokens 512
pairs "default-check(f32+bf16,3x32-gen)" "$RUNS_ALL"
pairs "precision-all" "$RUNS_ALL" --precision all
echo "== load after: $(uptime | sed 's/.*load average/load average/')"
