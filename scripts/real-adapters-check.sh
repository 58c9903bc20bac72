#!/usr/bin/env bash
# Issue 17 ("no false alarms on mainstream adapters"): check every real SmolLM2-135M adapter that
# scripts/real-model.sh and scripts/train_tiny_lr_adapter.py build with `--precision all` and the default
# logit comparison, write each JSON report to $OUT, and print per adapter: exit code, the findings
# (level, code, module, precision), the adapter's effect and, per module kind, the largest ‖ΔW‖ ratio to
# the kind's median and the largest |modified z| (what `delta-outlier`'s two thresholds are calibrated on).
#
#   scripts/real-adapters-check.sh [BINARY]     # BINARY defaults to target/release/lora-doctor
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${LD_CACHE:-$HOME/.cache/lora-doctor}"
bin="${1:-${CARGO_TARGET_DIR:-$repo/target}/release/lora-doctor}"
out="${OUT:-$cache/issue17}"
mkdir -p "$out"
base="$cache/smollm2-135m"

run() {
    local name="$1"
    shift
    local adapter="$cache/adapters/$name"
    if [[ ! -d "$adapter" ]]; then
        echo "== $name: missing ($adapter); run scripts/real-model.sh" >&2
        return
    fi
    local code=0
    "$bin" check --base "$base" --adapter "$adapter" --precision all --quiet \
        --json "$out/$name.json" "$@" || code=$?
    echo "== $name $* (exit $code)"
    python3 - "$out/$name.json" <<'EOF'
import json, re, statistics, sys
r = json.load(open(sys.argv[1]))
e = r["adapter_effect"] or {}
print(f"  adapter effect: KL {e.get('mean_kl')}, quantization shift KL {e.get('quantization_shift_kl')}")
for f in r["findings"]:
    print(f"  {f['level']:5} {f['code']:18} {f.get('precision') or '-':8} {f.get('module') or '-'}: {f['message'][:160]}")
kinds = {}
for row in r["layers"] or []:
    if row["precision"] == "f32" and row["delta_norm"] > 0:
        kinds.setdefault(re.sub(r"\.\d+\.", ".*.", row["module"]), []).append((row["delta_norm"], row["delta_outlier_z"]))
worst = []
for kind, rows in kinds.items():
    if len(rows) < 5:
        continue
    med = sorted(n for n, _ in rows)[len(rows) // 2]
    ratio = max(max(n / med, med / n) for n, _ in rows)
    z = max(abs(z) for _, z in rows if z is not None)
    worst.append((ratio, z, kind))
for ratio, z, kind in sorted(worst, reverse=True)[:3]:
    print(f"  spread {ratio:5.2f}x  max|z| {z:5.2f}  {kind}")
for p in r["precisions"] or []:
    lg = p.get("logits") or {}
    print(f"  {p['name']:6} {p['verdict']:4} KL {lg.get('mean_kl', float('nan')):.3e} lost {lg.get('effect_lost', float('nan')):.3f}")
EOF
}

# Extra flags for every run (e.g. GENERATE="--generate 0" on a busy CPU: the logit comparison still runs).
only="${ONLY:-smollm2-r16 smollm2-added-tokens smollm2-qlora-nf4 smollm2-tiny-lr smollm2-rslora smollm2-dora smollm2-patterns}"
for name in $only; do
    case "$name" in
        *qlora-nf4) run "$name" --trained-on nf4 ${GENERATE:-} ;;
        *) run "$name" ${GENERATE:-} ;;
    esac
done
