#!/usr/bin/env bash
# Set up (scripts/setup.sh: venv, dependencies, native build) and run the test suite.
# Extra arguments go to pytest. Running no test at all (pytest exit 5) is a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
PY="${GQSA_VENV:-.venv}/bin/python"

set +e
"$PY" -m pytest tests -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that counts as a failure" >&2
    exit 1
fi
exit "$rc"
