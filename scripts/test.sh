#!/usr/bin/env bash
# Set up (scripts/setup.sh: venv, dependencies, native build) and run the test suite.
# --fast: only the fast tier (no native build, no training, < 1 min; tests/conftest.py).
# Extra arguments go to pytest. Running no test at all (pytest exit 5) is a failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${GQSA_VENV:-.venv}/bin/python"
if [ "${1:-}" = "--fast" ]; then
    # the fast tier: no native build (only the Python dependencies must be installed, e.g. by an
    # earlier scripts/setup.sh), no training; under a minute (tests/conftest.py lists its modules)
    shift
    set +e
    GQSA_GGUF_LIB_DIR="${GQSA_GGUF_LIB_DIR:-/nonexistent}" "$PY" -m pytest tests -q -m fast "$@"
    rc=$?
    set -e
else
    bash scripts/setup.sh
    set +e
    "$PY" -m pytest tests -q "$@"
    rc=$?
    set -e
fi
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that counts as a failure" >&2
    exit 1
fi
exit "$rc"
