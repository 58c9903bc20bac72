#!/usr/bin/env bash
# Validates the repository's integration metadata with the ecosystem's own validators (Python
# tools from PyPI, so CI, which never runs Python, leaves this to people changing these files):
#   - action.yml against SchemaStore's GitHub Action schema: the copy committed in tests/data/
#     (reproducible) and the one the installed check-jsonschema ships (newer, when it moves on);
#   - a deliberately broken copy of action.yml, which must be rejected (the check is not vacuous);
#   - .pre-commit-hooks.yaml with `pre-commit validate-manifest`.
# Tools go into a throwaway virtualenv unless LD_TOOLS_VENV names one that has them.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${LD_TOOLS_VENV:-}"
if [[ -z "$venv" ]]; then
    venv="$(mktemp -d)/venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "check-jsonschema>=0.29" "pre-commit>=3"
fi

echo "== action.yml against tests/data/github-action.json"
"$venv/bin/check-jsonschema" --schemafile tests/data/github-action.json action.yml
echo "== action.yml against check-jsonschema's vendored SchemaStore schema"
"$venv/bin/check-jsonschema" --builtin-schema vendor.github-actions action.yml

echo "== a broken action.yml is rejected"
broken="$(mktemp --suffix=.yml)"
trap 'rm -f "$broken"' EXIT
sed 's/using: composite/using: compsite/' action.yml >"$broken"
if "$venv/bin/check-jsonschema" --schemafile tests/data/github-action.json "$broken" >/dev/null; then
    echo "error: the schema accepted a broken action.yml" >&2
    exit 1
fi
echo "rejected, as it should be"

echo "== .pre-commit-hooks.yaml"
"$venv/bin/pre-commit" validate-manifest .pre-commit-hooks.yaml
echo "all valid"
