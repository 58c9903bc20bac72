#!/usr/bin/env bash
# Build the real-model merged checkpoints for `check --merged` forensics (idempotent: existing folders are
# skipped). Needs the SmolLM2 base and the smollm2-r16 adapter from scripts/real-model.sh.
#
#   scripts/forensics-real.sh            # writes $CACHE/forensics/{peft-bf16,rslora-wrong-bf16,nf4-base-bf16}
#   scripts/forensics-real.sh OUT_DIR    # writes them under OUT_DIR instead
#
# Cache dir: ${LD_CACHE:-$HOME/.cache/lora-doctor}. Python: $LD_PYTHON, or the venv in the cache dir that
# scripts/real-model.sh creates from fixtures/requirements.txt (created here too if missing). Nothing is
# downloaded from a model hub.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${LD_CACHE:-$HOME/.cache/lora-doctor}"

if [[ -z "${LD_PYTHON:-}" ]]; then
    venv="$cache/venv"
    stamp="$venv/.requirements.sha256"
    want="$(sha256sum "$repo/fixtures/requirements.txt" | cut -d' ' -f1)"
    if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
        echo "creating venv $venv from fixtures/requirements.txt" >&2
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q -r "$repo/fixtures/requirements.txt"
        echo "$want" >"$stamp"
    fi
    LD_PYTHON="$venv/bin/python"
fi

args=(--cache "$cache")
if [[ $# -gt 0 ]]; then
    args+=(--out "$1")
    shift
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HOME="$cache/hf-home" TOKENIZERS_PARALLELISM=false
exec "$LD_PYTHON" "$here/forensics_real.py" "${args[@]}" "$@"
