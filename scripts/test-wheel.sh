#!/usr/bin/env bash
# Builds the `lora-doctor` wheel (maturin, bindings = "bin": the wheel carries the compiled
# binary) and proves it works as users will get it: installed into a fresh virtualenv, run through
# the installed entry point (the venv's bin/lora-doctor, never the build tree's), `--version`
# matches Cargo.toml, and the README's first example passes (exit 0, verdict PASS). The example is
# read from the README itself, so the test follows it when it changes.
#
#   scripts/test-wheel.sh             # the wheel lands in target/wheels/
#   LD_TOOLS_VENV=/path/venv scripts/test-wheel.sh   # reuse a venv that has maturin
#
# Nothing is uploaded. CI never runs Python; people changing packaging run this.
set -euo pipefail
cd "$(dirname "$0")/.."

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

tools="${LD_TOOLS_VENV:-}"
if [[ -z "$tools" ]]; then
    tools="$work/tools"
    python3 -m venv "$tools"
    "$tools/bin/pip" install --quiet "maturin>=1.5,<2"
fi

echo "== build the wheel ($("$tools/bin/maturin" --version))"
out="${CARGO_TARGET_DIR:-target}/wheels"
rm -f "$out"/lora_doctor-*.whl
nice "$tools/bin/maturin" build --release --out "$out"
wheel="$(ls "$out"/lora_doctor-*.whl)"
echo "built $wheel ($(du -h "$wheel" | cut -f1))"
echo "contents:"
python3 -m zipfile -l "$wheel"

echo "== install into a fresh virtualenv"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet "$wheel"
"$work/venv/bin/pip" show lora-doctor | sed -n '1,3p'
bin="$work/venv/bin/lora-doctor"
[[ -x "$bin" ]] || { echo "error: the wheel installed no lora-doctor entry point" >&2; exit 1; }

echo "== lora-doctor --version"
expected="lora-doctor $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
version="$("$bin" --version)"
echo "$version"
[[ "$version" == "$expected" ]] || { echo "error: expected '$expected'" >&2; exit 1; }

echo "== the README's first example, through the installed entry point"
# The README opens with `cargo run --release -- check ...`; the installed tool is the same command.
example="$(grep -m1 '^cargo run --release -- check' README.md | sed 's/^cargo run --release -- //')"
[[ -n "$example" ]] || { echo "error: no 'cargo run --release -- check' line in README.md" >&2; exit 1; }
read -r -a example_args <<<"$example"
echo "+ lora-doctor ${example_args[*]}"
set +e
"$bin" "${example_args[@]}" >"$work/example.out" 2>"$work/example.err"
code=$?
set -e
cat "$work/example.out"
echo "exit status $code"
if [[ $code -ne 0 ]] || ! grep -q '^verdict: PASS' "$work/example.out"; then
    cat "$work/example.err" >&2
    echo "error: the README example did not pass" >&2
    exit 1
fi

echo "== completions through the entry point"
"$bin" completions bash | grep -q 'lora-doctor' && echo "bash completion script ok"
echo "wheel test passed: $(basename "$wheel")"
