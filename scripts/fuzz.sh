#!/usr/bin/env bash
# Fuzzes lora-doctor's parsers of untrusted bytes with cargo-fuzz (libFuzzer). Needs the nightly
# toolchain; not part of CI. Seeds are committed under fuzz/seeds/<target>/; the growing corpus
# (fuzz/corpus), crash artifacts (fuzz/artifacts) and logs (fuzz/logs) stay out of git.
#
#   scripts/fuzz.sh                 # every target
#   scripts/fuzz.sh gate_toml       # one or more named targets
#   RUNS=100000 MAX_TIME=60 scripts/fuzz.sh prompts
#
# Each target runs until RUNS executions (default 1000000) or MAX_TIME seconds (default 900),
# whichever comes first. One input may take TIMEOUT seconds (default 10) and RSS_MB of memory
# (default 2048; a single allocation above MALLOC_MB, default 1024, is reported as an OOM). The
# exit code is 1 when any target found a crash, timeout or OOM: its input is in
# fuzz/artifacts/<target>/, and `cargo +nightly fuzz tmin <target> <file>` minimizes it.
set -euo pipefail

RUNS=${RUNS:-1000000}
MAX_TIME=${MAX_TIME:-900}
TIMEOUT=${TIMEOUT:-10}
RSS_MB=${RSS_MB:-2048}
MALLOC_MB=${MALLOC_MB:-1024}
SANITIZER=${SANITIZER:-address}

root=$(cd "$(dirname "$0")/.." && pwd)
fuzz="$root/fuzz"
cd "$root"

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

# The targets write each input to a file (most parsers take a path); keep those on tmpfs.
tmp_parent=/dev/shm
[ -w "$tmp_parent" ] || tmp_parent=${TMPDIR:-/tmp}
scratch=$(mktemp -d "$tmp_parent/lora-doctor-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

if [ "${#targets[@]}" -eq 1 ]; then
    nice -n 10 cargo +nightly fuzz build --sanitizer "$SANITIZER" "${targets[0]}"
else
    nice -n 10 cargo +nightly fuzz build --sanitizer "$SANITIZER"
fi

mkdir -p "$fuzz/logs"
summary=()
failed=0
for target in "${targets[@]}"; do
    if [ ! -d "$fuzz/seeds/$target" ]; then
        echo "unknown target \`$target\` (no fuzz/seeds/$target); targets: $(cargo +nightly fuzz list | tr '\n' ' ')" >&2
        exit 2
    fi
    corpus="$fuzz/corpus/$target"
    artifacts="$fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    cp -n "$fuzz/seeds/$target"/* "$corpus/" 2>/dev/null || true
    before=$(find "$artifacts" -type f | wc -l)
    log="$fuzz/logs/$target.log"
    start=$(date +%s)
    status=0
    TMPDIR=$scratch nice -n 10 cargo +nightly fuzz run --sanitizer "$SANITIZER" "$target" "$corpus" -- \
        -runs="$RUNS" -max_total_time="$MAX_TIME" -timeout="$TIMEOUT" \
        -rss_limit_mb="$RSS_MB" -malloc_limit_mb="$MALLOC_MB" -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    seconds=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    execs=${execs:-0}
    found=$(( $(find "$artifacts" -type f | wc -l) - before ))
    if [ "$status" -ne 0 ] || [ "$found" -gt 0 ]; then
        failed=1
        echo "$target: FAILED (exit $status), see $log and $artifacts/" >&2
        grep -m3 -E 'ERROR: libFuzzer|panicked at|deadly signal|SUMMARY' "$log" >&2 || true
    fi
    line=$(printf '%-18s %10s execs %6ss %8s exec/s  %s new artifacts  exit %s' \
        "$target" "$execs" "$seconds" "$(( execs / (seconds > 0 ? seconds : 1) ))" "$found" "$status")
    echo "$line"
    summary+=("$line")
done

echo
echo "summary (executions, wall time, rate, new crash/timeout/OOM inputs, libFuzzer exit code):"
printf '%s\n' "${summary[@]}"
exit "$failed"
