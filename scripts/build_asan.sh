#!/usr/bin/env bash
# Build the patched llama.cpp libraries with AddressSanitizer + UndefinedBehaviorSanitizer into
# build/asan/bin, and (with --test) run the native kernel tests and the hostile-file suite on them.
#
#   bash scripts/build_asan.sh            # build only (incremental)
#   bash scripts/build_asan.sh --test     # build, then pytest the sanitizer-relevant tests
#   eval "$(bash scripts/build_asan.sh --env)"   # the environment for running anything on them
#
# The libraries are ordinary shared objects linked against gcc's shared libasan/libubsan, so they
# can be loaded into the stock (non-instrumented) Python interpreter only if the ASan runtime is
# the first library of the process: LD_PRELOAD=$(gcc -print-file-name=libasan.so). Python itself
# "leaks" at exit, so leak detection is off; every sanitizer report aborts the process (SIGABRT),
# which the tests see as a crash, and is written to stderr with a symbolized stack.
#
# Only the targets llama-cpp-python and the tests load are built (llama, ggml, ggml-base,
# ggml-cpu, gqsa_native). -O1 with asserts on (no NDEBUG): the kernels' debug asserts are live.
# Env: PYTHON / GQSA_VENV as scripts/setup.sh (the tests need the venv it made), GQSA_ASAN_JOBS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUILD=build/asan
# vptr is left out: it needs RTTI of every class crossing the library boundary (and the
# interpreter has none); address + the rest of undefined catch what matters for file data.
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize=vptr"

asan_env() {
    local libasan libubsan
    libasan=$(gcc -print-file-name=libasan.so)
    libubsan=$(gcc -print-file-name=libubsan.so)
    if [ ! -e "$libasan" ] || [ "$libasan" = libasan.so ]; then
        echo "build_asan.sh: gcc has no libasan.so (Debian: apt-get install -y libasan8 libubsan1)" >&2
        return 1
    fi
    echo "export GQSA_GGUF_LIB_DIR=$PWD/$BUILD/bin"
    echo "export LD_PRELOAD='$libasan $libubsan'"
    # abort_on_error: a report ends in SIGABRT, never a plain non-zero exit that a test could take
    # for a clean refusal. detect_leaks=0: the interpreter leaks by design.
    echo "export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1:detect_odr_violation=0"
    # scripts/ubsan.supp: known upstream findings (each one explained there)
    echo "export UBSAN_OPTIONS=halt_on_error=1:abort_on_error=1:print_stacktrace=1:suppressions=$PWD/scripts/ubsan.supp"
}

case "${1:-}" in
    --env) asan_env; exit 0 ;;
    --test|"") ;;
    *) echo "usage: $0 [--test | --env]" >&2; exit 2 ;;
esac

start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
    -DCMAKE_C_FLAGS="$SAN" \
    -DCMAKE_CXX_FLAGS="$SAN" \
    -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
    -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
    >"$BUILD.configure.log" 2>&1 || {
        tail -n 40 "$BUILD.configure.log" >&2
        echo "build_asan.sh: configure failed (log: $BUILD.configure.log)" >&2
        exit 1
    }
cmake --build "$BUILD" -j "${GQSA_ASAN_JOBS:-$(nproc)}" --target llama ggml ggml-base ggml-cpu gqsa_native
echo "build_asan.sh: ASan/UBSan libraries in $BUILD/bin after $(( $(date +%s) - start )) s"

if [ "${1:-}" = --test ]; then
    PY="${GQSA_VENV:-.venv}/bin/python"
    eval "$(asan_env)"
    t0=$(date +%s)
    "$PY" -m pytest -q -p no:cacheprovider tests/test_native_kernels.py tests/test_gqsa3_native.py \
        tests/test_hostile_files.py tests/test_load_errors.py tests/test_fuzz_corpus.py
    echo "build_asan.sh: sanitizer tests passed in $(( $(date +%s) - t0 )) s"
fi
