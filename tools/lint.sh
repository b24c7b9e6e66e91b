#!/usr/bin/env bash
# The static checks CI runs (scripts/test) and .pre-commit-config.yaml mirrors, all configured in
# pyproject.toml: ruff's lint rules, ruff's formatter at 120 columns, and mypy on the typed core.
#
#   tools/lint.sh          check only (exit 1 on any finding)
#   tools/lint.sh --fix    first apply ruff's safe fixes and format the code, then check
#
# Run it with the venv that has the `test` extra active (or PYTHON=/path/to/python tools/lint.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python}"
if [[ "${1:-}" == "--fix" ]]; then
    "$py" -m ruff check --fix --quiet . || true  # what it cannot fix, the check below reports
    "$py" -m ruff format --quiet .
fi
"$py" -m ruff check .
"$py" -m ruff format --check .
"$py" -m mypy
