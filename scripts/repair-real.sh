#!/usr/bin/env bash
# Issue 14 ("repair a lossy merge"): measure the repaired and mixed candidates on the real SmolLM2-135M
# adapters (scripts/real-model.sh, scripts/train_tiny_lr_adapter.py), on the built-in evaluation text,
# fitted on the built-in calibration text (or CALIBRATION=FILE, CALIBRATION_TOKENS=N), with
# `--keep-adapter $KEEP` (default `auto`; e.g. KEEP=auto:0.9) for the mixed rows; write each mixed merge
# to measure its files; and time `merge` plain against `merge --repair` and `merge --keep-adapter`
# (paired runs, alternating, best of RUNS). ONLY=check skips the merges.
#
#   scripts/repair-real.sh [BINARY]     # BINARY defaults to target/release/lora-doctor
#
# Prints per adapter and candidate: mean KL to the unmerged reference, effect lost, same top-1, and the
# KL reduction of each repaired/mixed row against its plain row, with the modules each mixed row keeps
# unmerged; then the written sizes and the merge timings. Reports go to $OUT.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${LD_CACHE:-$HOME/.cache/lora-doctor}"
bin="${1:-${CARGO_TARGET_DIR:-$repo/target}/release/lora-doctor}"
out="${OUT:-$cache/issue14}"
runs="${RUNS:-3}"
keep="${KEEP:-auto}"
only="${ONLY:-all}"
mkdir -p "$out"
base="$cache/smollm2-135m"
calibration=()
if [[ -n "${CALIBRATION:-}" ]]; then calibration+=(--calibration "$CALIBRATION"); fi
if [[ -n "${CALIBRATION_TOKENS:-}" ]]; then calibration+=(--calibration-tokens "$CALIBRATION_TOKENS"); fi

measure() {
    local name="$1" precisions="$2" repair="${3---repair gptq,stochastic}"
    local adapter="$cache/adapters/$name"
    if [[ ! -d "$adapter" ]]; then
        echo "== $name: missing ($adapter); run scripts/real-model.sh" >&2
        return
    fi
    local code=0
    local report="$out/$name-${precisions//,/-}.json"
    # shellcheck disable=SC2086 # $repair is a flag and its value, or empty
    "$bin" check --base "$base" --adapter "$adapter" --precision "$precisions" \
        $repair --keep-adapter "$keep" "${calibration[@]}" --generate 0 --quiet \
        --json "$report" || code=$?
    echo "== $name ($precisions, exit $code)"
    python3 - "$report" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
e = r["adapter_effect"]
rep = r.get("repair") or {}
print(f"  adapter effect: mean KL {e['mean_kl']:.3e}; scored on {rep.get('evaluation_text')}, fitted on {rep.get('calibration_text')} ({rep.get('calibration_tokens')} tokens); keep-adapter {rep.get('keep_adapter')}")
for m in rep.get("residual", []):
    print(f"  {m['candidate']}: {m['kept_modules']} of {m['modules']} modules unmerged, residual {m['adapter_bytes'] / 1e6:.2f} MB")
for best in rep.get("best", []):
    print(f"  best for {best['format']}: {best['candidate']} (KL {best['mean_kl']:.3e})")
rows = {p["name"]: p["logits"] for p in r["precisions"] if p["logits"]}
for name, l in rows.items():
    plain = rows.get(name.split(":")[0].split("+")[0])
    change = None if plain is None or plain is l else 100 * (1 - l['mean_kl'] / plain['mean_kl'])
    cut = "" if change is None else (f"  KL {change:.1f} % lower than plain" if change >= 0 else f"  KL {-change:.1f} % higher than plain")
    print(f"  {name:18} KL {l['mean_kl']:.3e}  effect lost {100 * l['effect_lost']:7.2f} %  same top-1 {100 * l['same_top1']:.1f} %{cut}")
PY
}

measure smollm2-tiny-lr bf16
measure smollm2-r16 bf16,q8_0,q4_0
# llama-quantize's Q4_K_M mix: each block linear repaired onto the type the mix stores it in.
measure smollm2-r16 q4_k_m
[[ "$only" == check ]] && exit 0

# What a mixed merge writes: the merged file and the residual adapter beside it.
for spec in smollm2-tiny-lr:bf16 smollm2-r16:bf16 smollm2-r16:q8_0 smollm2-r16:q4_0; do
    name="${spec%%:*}" precision="${spec##*:}"
    format=safetensors
    [[ "$precision" != bf16 ]] && format=gguf
    target="$out/mixed-$name-$precision"
    [[ "$format" == gguf ]] && target="$target.gguf"
    rm -rf "$out/mixed-$name-$precision" "$out/mixed-$name-$precision.gguf" "$out/mixed-$name-$precision-residual"
    "$bin" merge --base "$base" --adapter "$cache/adapters/$name" --precision "$precision" --format "$format" \
        --out "$target" --quiet --keep-adapter "$keep" "${calibration[@]}"
    residual="$out/mixed-$name-$precision-residual"
    modules=0 rbytes=0
    if [[ -d "$residual" ]]; then
        modules=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['target_modules']))" "$residual/adapter_config.json")
        rbytes=$(du -sb "$residual" | cut -f1)
    fi
    echo "== mixed $name $precision: merged $(du -sb "$target" | cut -f1) bytes, residual $rbytes bytes ($modules modules unmerged)"
    rm -rf "$target" "$residual"
done

# merge timing: plain vs --repair gptq, paired and alternating so load drifts hit both alike.
adapter="$cache/adapters/smollm2-r16"
for precision in bf16 q4_0 q4_k_m; do
    format=safetensors
    [[ "$precision" != bf16 ]] && format=gguf
    best_plain=999999 best_repair=999999 best_mixed=999999
    for _ in $(seq "$runs"); do
        for mode in plain repair mixed; do
            rm -rf "$out/merge-$mode" "$out/merge-$mode-residual"
            extra=()
            [[ "$mode" == repair ]] && extra=(--repair gptq "${calibration[@]}")
            [[ "$mode" == mixed ]] && extra=(--keep-adapter "$keep" "${calibration[@]}")
            start=$(date +%s.%N)
            "$bin" merge --base "$base" --adapter "$adapter" --precision "$precision" --format "$format" \
                --out "$out/merge-$mode" --quiet "${extra[@]}"
            t=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
            case "$mode" in
                plain) best_plain=$(python3 -c "print(min($best_plain, $t))") ;;
                repair) best_repair=$(python3 -c "print(min($best_repair, $t))") ;;
                mixed) best_mixed=$(python3 -c "print(min($best_mixed, $t))") ;;
            esac
            rm -rf "$out/merge-$mode" "$out/merge-$mode-residual"
        done
    done
    echo "== merge $precision ($format): plain ${best_plain}s, --repair gptq ${best_repair}s, --keep-adapter $keep ${best_mixed}s (best of $runs)"
done
# One forward pass for scale: check's logit comparison runs the reference, the base and bf16.
start=$(date +%s.%N)
"$bin" check --base "$base" --adapter "$adapter" --precision bf16 --generate 0 --quiet --json /dev/null || true
t=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
echo "== check --precision bf16 --generate 0 (three forward passes over 512 tokens): ${t}s"
