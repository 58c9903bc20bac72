#!/usr/bin/env bash
# Issue 13 §1 real check: `lora-doctor check --base <SmolLM2 Q4_1 GGUF> --adapter <real PEFT adapter>`
# against transformers + PEFT loading the same GGUF (scripts/gguf_real_check.py).
#
#   scripts/gguf-real-check.sh [GGUF] [ADAPTER]
#
# Defaults: the GGUF and adapter that scripts/real-model.sh puts in ${LD_CACHE:-~/.cache/lora-doctor}.
# Prints both tools' adapter effect and candidate KLs and fails when they disagree by more than the
# usual tolerance (KL within 10% relative or 1e-5 nats absolute, same-top-1 within 2 points).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${LD_CACHE:-$HOME/.cache/lora-doctor}"
gguf="${1:-$cache/gguf/SmolLM2-135M-Instruct.Q4_1.gguf}"
adapter="${2:-$cache/adapters/smollm2-r16}"
python="${LD_PYTHON:-$cache/venv/bin/python}"
bin="${LORA_DOCTOR:-${CARGO_TARGET_DIR:-$repo/target}/release/lora-doctor}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

"$bin" check --base "$gguf" --adapter "$adapter" --max-tokens 256 --generate 0 --recipe peft \
    --precision f32,bf16,f16 --json "$out/ld.json" --quiet || test $? -eq 1
"$python" "$here/gguf_real_check.py" --gguf "$gguf" --adapter "$adapter" --max-tokens 256 \
    >"$out/tf.json" 2>"$out/tf.log" || { cat "$out/tf.log" >&2; exit 2; }
"$python" - "$out/ld.json" "$out/tf.json" <<'PY'
import json, sys
ld, tf = (json.load(open(p)) for p in sys.argv[1:3])
rows = [("effect (ref||base)", ld["adapter_effect"], tf["base"])]
for p in ld["precisions"]:
    if p["name"] in tf and p.get("logits"):
        rows.append((p["name"], p["logits"], tf[p["name"]]))
bad = []
print(f"tokens: lora-doctor {ld['adapter_effect']['tokens']}, transformers {tf['tokens']}")
print(f"{'model':20} {'KL lora-doctor':>15} {'KL transformers':>16} {'top1 ld':>8} {'top1 tf':>8}")
for name, a, b in rows:
    print(f"{name:20} {a['mean_kl']:15.4e} {b['mean_kl']:16.4e} {a['same_top1']:8.4f} {b['same_top1']:8.4f}")
    if abs(a["mean_kl"] - b["mean_kl"]) > max(0.10 * b["mean_kl"], 1e-5) \
            or abs(a["same_top1"] - b["same_top1"]) > 0.02:
        bad.append(name)
sys.exit(f"disagree: {bad}" if bad else 0)
PY
