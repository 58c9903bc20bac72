#!/usr/bin/env bash
# The run step of the GitHub Action (action.yml): turns the action's inputs into one
# `lora-doctor check --github --report-dir DIR` call, then publishes what GitHub needs: the step
# summary (written by `--github` itself; this script adds a section only when the check could not
# run), the outputs `verdict`, `exit-code` and `report-dir` in $GITHUB_OUTPUT, and lora-doctor's own
# exit status (0 pass, 1 deny findings, 2 could not run) so a deny fails the job.
#
# It lives in a script, not inline in action.yml, so tests/action.rs can run it with a fake GitHub
# environment. Inputs arrive as environment variables (never interpolated into shell text, so a
# hostile input cannot inject commands):
#   LD_BASE         base model: folder, .safetensors file or hub name (required)
#   LD_ADAPTERS     adapter folders or hub names, separated by whitespace or newlines (required)
#   LD_MERGED       an already-merged checkpoint to examine (optional)
#   LD_PRECISION    comma-separated precisions, or `all` (optional)
#   LD_REVISION     hub revision for hub-name inputs (optional)
#   LD_CONFIG       a lora-doctor.toml (optional)
#   LD_THRESHOLDS   NAME[.CLASS]=VALUE overrides, separated by whitespace or newlines (optional)
#   LD_WEIGHTS_ONLY `true` for the weight gate only (optional)
#   LD_ARGS         extra arguments for `check`, split on whitespace (optional)
#   LD_REPORT_DIR   where the reports go (default: lora-doctor-report)
#   LD_BIN          the executable (default: lora-doctor on PATH)
set -uo pipefail
# Lists are split on whitespace; globbing stays off so `*` in an argument stays literal.
set -f

report_dir="${LD_REPORT_DIR:-lora-doctor-report}"
bin="${LD_BIN:-lora-doctor}"

args=(check --github --report-dir "$report_dir")
if [[ -n "${LD_BASE:-}" ]]; then
    args+=(--base "$LD_BASE")
fi
for adapter in ${LD_ADAPTERS:-}; do
    args+=(--adapter "$adapter")
done
[[ -n "${LD_MERGED:-}" ]] && args+=(--merged "$LD_MERGED")
[[ -n "${LD_PRECISION:-}" ]] && args+=(--precision "$LD_PRECISION")
[[ -n "${LD_REVISION:-}" ]] && args+=(--revision "$LD_REVISION")
[[ -n "${LD_CONFIG:-}" ]] && args+=(--config "$LD_CONFIG")
for threshold in ${LD_THRESHOLDS:-}; do
    args+=(--threshold "$threshold")
done
[[ "${LD_WEIGHTS_ONLY:-false}" == "true" ]] && args+=(--weights-only)
for extra in ${LD_ARGS:-}; do
    args+=("$extra")
done

# stderr is kept for the summary when the check cannot run, then replayed into the log.
stderr_log="$(mktemp)"
trap 'rm -f "$stderr_log"' EXIT
echo "+ $bin ${args[*]}" >&2
"$bin" "${args[@]}" 2>"$stderr_log"
code=$?
cat "$stderr_log" >&2

# The verdict comes from the report itself (so --exit-zero cannot hide a fail); exit 2 wrote none.
verdict="error"
if [[ $code -ne 2 && -f "$report_dir/report.json" ]]; then
    found="$(grep -o -m1 '"verdict": *"[a-z]*"' "$report_dir/report.json" | sed 's/.*"\([a-z]*\)"$/\1/')"
    verdict="${found:-error}"
fi

if [[ $code -eq 2 && -n "${GITHUB_STEP_SUMMARY:-}" ]]; then
    {
        echo "## lora-doctor could not run"
        echo
        echo "Exit status 2: bad inputs or flags, unreadable files, or an unwritable report folder."
        echo
        echo '```'
        tail -n 20 "$stderr_log"
        echo '```'
    } >>"$GITHUB_STEP_SUMMARY"
fi

if [[ -n "${GITHUB_OUTPUT:-}" ]]; then
    {
        echo "verdict=$verdict"
        echo "exit-code=$code"
        echo "report-dir=$report_dir"
    } >>"$GITHUB_OUTPUT"
fi
exit "$code"
