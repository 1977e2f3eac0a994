#!/usr/bin/env bash
# Set up (scripts/setup.sh: venv, dependencies, native build) and run the test suite.
# --fast: only the fast tier (no native build, no training, < 1 min; tests/conftest.py).
# --portable: after the default build, the portable libraries (GQSA_PORTABLE: one CPU backend per
#   ggml CPU variant) in build/portable, then the tests that load libraries against them
#   (GQSA_GGUF_LIB_DIR=build/portable/bin): kernels (gqsa4 and gqsa3) once per variant this CPU
#   runs, runtime, stock files, the portable loader. GQSA_CPU_VARIANTS (a ;-list, default all)
#   builds a subset.
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
elif [ "${1:-}" = "--portable" ]; then
    shift
    bash scripts/setup.sh
    CMAKE="${GQSA_VENV:-.venv}/bin/cmake"
    command -v "$CMAKE" >/dev/null || CMAKE=cmake
    PATH="$(dirname "$PY"):$PATH" "$CMAKE" -S . -B build/portable -G Ninja -DGQSA_PORTABLE=ON \
        "-DGQSA_CPU_VARIANTS=${GQSA_CPU_VARIANTS:-}" >build/portable-configure.log
    PATH="$(dirname "$PY"):$PATH" "$CMAKE" --build build/portable -j"$(nproc)"
    set +e
    GQSA_GGUF_LIB_DIR="$PWD/build/portable/bin" "$PY" -m pytest -q tests/test_portable.py \
        tests/test_native_kernels.py tests/test_gqsa3_native.py tests/test_runtime.py tests/test_stock_files.py "$@"
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
