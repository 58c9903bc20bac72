#!/usr/bin/env bash
# Issue 14 ("repair a lossy merge"): measure the repaired candidates on the real SmolLM2-135M adapters
# (scripts/real-model.sh, scripts/train_tiny_lr_adapter.py), on the built-in evaluation text, fitted on
# the built-in calibration text (or CALIBRATION=FILE, CALIBRATION_TOKENS=N), and time `merge` plain
# against `merge --repair` (paired runs, alternating, best of RUNS).
#
#   scripts/repair-real.sh [BINARY]     # BINARY defaults to target/release/lora-doctor
#
# Prints per adapter and candidate: mean KL to the unmerged reference, effect lost, same top-1, and the
# KL reduction of each repaired row against its plain row; then the merge timings. Reports go to $OUT.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${LD_CACHE:-$HOME/.cache/lora-doctor}"
bin="${1:-${CARGO_TARGET_DIR:-$repo/target}/release/lora-doctor}"
out="${OUT:-$cache/issue14}"
runs="${RUNS:-3}"
mkdir -p "$out"
base="$cache/smollm2-135m"
calibration=()
if [[ -n "${CALIBRATION:-}" ]]; then calibration+=(--calibration "$CALIBRATION"); fi
if [[ -n "${CALIBRATION_TOKENS:-}" ]]; then calibration+=(--calibration-tokens "$CALIBRATION_TOKENS"); fi

measure() {
    local name="$1" precisions="$2"
    local adapter="$cache/adapters/$name"
    if [[ ! -d "$adapter" ]]; then
        echo "== $name: missing ($adapter); run scripts/real-model.sh" >&2
        return
    fi
    local code=0
    "$bin" check --base "$base" --adapter "$adapter" --precision "$precisions" \
        --repair gptq,stochastic "${calibration[@]}" --generate 0 --quiet \
        --json "$out/$name.json" || code=$?
    echo "== $name ($precisions, exit $code)"
    python3 - "$out/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["adapter_effect"]
rep = r.get("repair") or {}
print(f"  adapter effect: mean KL {e['mean_kl']:.3e}; scored on {rep.get('evaluation_text')}, fitted on {rep.get('calibration_text')} ({rep.get('calibration_tokens')} tokens)")
for best in rep.get("best", []):
    print(f"  best for {best['format']}: {best['candidate']} (KL {best['mean_kl']:.3e})")
rows = {p["name"]: p["logits"] for p in r["precisions"] if p["logits"]}
for name, l in rows.items():
    plain = rows.get(name.split(":")[0])
    change = None if plain is None or plain is l else 100 * (1 - l['mean_kl'] / plain['mean_kl'])
    cut = "" if change is None else (f"  KL {change:.1f} % lower than plain" if change >= 0 else f"  KL {-change:.1f} % higher than plain")
    print(f"  {name:18} KL {l['mean_kl']:.3e}  effect lost {100 * l['effect_lost']:7.2f} %  same top-1 {100 * l['same_top1']:.1f} %{cut}")
PY
}

measure smollm2-tiny-lr bf16
measure smollm2-r16 bf16,q8_0,q4_0

# merge timing: plain vs --repair gptq, paired and alternating so load drifts hit both alike.
adapter="$cache/adapters/smollm2-r16"
for precision in bf16 q4_0; do
    format=safetensors
    [[ "$precision" == q4_0 ]] && format=gguf
    best_plain=999999 best_repair=999999
    for _ in $(seq "$runs"); do
        for mode in plain repair; do
            rm -rf "$out/merge-$mode"
            extra=()
            [[ "$mode" == repair ]] && extra=(--repair gptq "${calibration[@]}")
            start=$(date +%s.%N)
            "$bin" merge --base "$base" --adapter "$adapter" --precision "$precision" --format "$format" \
                --out "$out/merge-$mode" --quiet "${extra[@]}"
            t=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
            if [[ "$mode" == plain ]]; then
                best_plain=$(python3 -c "print(min($best_plain, $t))")
            else
                best_repair=$(python3 -c "print(min($best_repair, $t))")
            fi
            rm -rf "$out/merge-$mode"
        done
    done
    echo "== merge $precision ($format): plain ${best_plain}s, --repair gptq ${best_repair}s (best of $runs)"
done
# One forward pass for scale: check's logit comparison runs the reference, the base and bf16.
start=$(date +%s.%N)
"$bin" check --base "$base" --adapter "$adapter" --precision bf16 --generate 0 --quiet --json /dev/null || true
t=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
echo "== check --precision bf16 --generate 0 (three forward passes over 512 tokens): ${t}s"
