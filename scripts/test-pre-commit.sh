#!/usr/bin/env bash
# Runs a pre-commit hook of .pre-commit-hooks.yaml for real: a throwaway git repository that keeps
# a LoRA adapter, configured to use this repository's hooks at HEAD; the commit of a clean adapter
# passes, the commit of an adapter with NaNs is blocked, and a commit that touches no adapter file
# does not run the gate. pre-commit comes from LD_TOOLS_VENV or a throwaway venv.
# Commit first: pre-commit clones the hook repository at HEAD.
#
#   LD_BIN_DIR=target/release scripts/test-pre-commit.sh      # lora-doctor-system, binary on PATH
#   LD_HOOK=lora-doctor scripts/test-pre-commit.sh            # the rust hook: pre-commit runs
#                                                             # cargo install (export
#                                                             # CARGO_TARGET_DIR to reuse a build)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
hook="${LD_HOOK:-lora-doctor-system}"
[[ -n "${LD_BIN_DIR:-}" ]] && export PATH="$(cd "$LD_BIN_DIR" && pwd):$PATH"
if [[ "$hook" == "lora-doctor-system" ]]; then
    command -v lora-doctor >/dev/null || { echo "error: no lora-doctor on PATH" >&2; exit 1; }
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
tools="${LD_TOOLS_VENV:-}"
if [[ -z "$tools" ]]; then
    tools="$work/tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet "pre-commit>=3"
fi
export PRE_COMMIT_HOME="$work/pre-commit-cache"

cd "$work"
git init --quiet project && cd project
git config user.email test@example.invalid && git config user.name test
mkdir -p models adapters
cp -r "$repo/fixtures/models/tiny-llama" models/base
cat >.pre-commit-config.yaml <<YAML
repos:
  - repo: $repo
    rev: $(git -C "$repo" rev-parse HEAD)
    hooks:
      - id: $hook
        args: [--base, models/base, --adapter, adapters/bot]
YAML
git add -A && git commit --quiet --no-verify -m "base and hook config"
"$tools/bin/pre-commit" install >/dev/null

echo "== a clean adapter commits"
cp -r "$repo/fixtures/adapters/llama-lora" adapters/bot
git add -A
git commit -m "clean adapter" || { echo "error: the clean adapter was blocked" >&2; exit 1; }

echo "== an adapter with NaN weights is blocked"
cp "$repo/fixtures/adapters/nonfinite/adapter_model.safetensors" adapters/bot/
cp "$repo/fixtures/adapters/nonfinite/adapter_config.json" adapters/bot/
git add -A
if git commit -m "broken adapter"; then
    echo "error: the broken adapter was committed" >&2
    exit 1
fi
echo "blocked, as it should be"

echo "== a commit that touches no adapter file skips the gate"
git reset --quiet --hard HEAD
echo "notes" >NOTES.md && git add NOTES.md
git commit -m "notes" 2>&1 | tee "$work/skip.log"
grep -q "Skipped" "$work/skip.log" || { echo "error: the gate ran without adapter changes" >&2; exit 1; }
echo "pre-commit hook test passed"
