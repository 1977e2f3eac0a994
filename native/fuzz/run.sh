#!/usr/bin/env bash
# Build the libFuzzer target native/fuzz/fuzz_gqsa_validate.c and fuzz for SECONDS (default 60).
#
#   bash native/fuzz/run.sh 600                  # fuzz for 10 minutes
#   bash native/fuzz/run.sh 0                    # build, replay the seeds and regressions only
#   bash native/fuzz/run.sh 60 -jobs=2 -workers=2
#
# Needs clang with libFuzzer (Debian: apt-get install -y clang) and the pinned llama.cpp sources,
# which native/fetch_llama_cpp.py prepares (patched) in build/fuzz/llama.cpp from its cache or a
# download, as the main build does. The target is compiled straight from the GQSA sources (as
# copied into that tree) with native/fuzz/ggml_stubs.c, not linked against ggml.
#
# Every file in native/fuzz/regressions/ and native/fuzz/corpus/ is replayed first and must pass.
# New inputs go to build/fuzz/corpus (the seed corpus stays as committed); a crash is written to
# build/fuzz/crash-<sha1>: copy it to native/fuzz/regressions/ with the fix.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

SECS=${1:-60}
shift || true
OUT=build/fuzz
TREE=$OUT/llama.cpp
BIN=$OUT/fuzz_gqsa_validate
CC=${GQSA_FUZZ_CC:-clang}
if ! command -v "$CC" >/dev/null; then
    echo "run.sh: $CC not found; install clang (Debian: apt-get install -y clang)" >&2
    exit 1
fi

mkdir -p "$OUT/corpus"
"${PYTHON:-python3}" native/fetch_llama_cpp.py --tree "$TREE" >"$OUT/fetch.log" 2>&1 || {
    cat "$OUT/fetch.log" >&2
    exit 1
}
# the ISA kernels of this machine's architecture, as ggml-cpu's CMake adds them (none elsewhere)
arch_src=()
case "$(uname -m)" in
    x86_64 | i?86) arch_src=("$TREE/ggml/src/ggml-cpu/arch/x86/ggml-cpu-gqsa.c") ;;
    aarch64 | arm*) arch_src=("$TREE/ggml/src/ggml-cpu/arch/arm/ggml-cpu-gqsa.c") ;;
esac
"$CC" -g -O1 -march=native -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$TREE/ggml/include" -I"$TREE/ggml/src" -I"$TREE/ggml/src/ggml-cpu" \
    native/fuzz/fuzz_gqsa_validate.c native/fuzz/ggml_stubs.c \
    "$TREE/ggml/src/ggml-gqsa.c" "$TREE/ggml/src/ggml-cpu/ggml-cpu-gqsa.c" "${arch_src[@]}" \
    -o "$BIN" -lm
echo "run.sh: built $BIN"

export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
replay=(native/fuzz/corpus/* native/fuzz/regressions/*)
replay=("${replay[@]}")
files=()
for f in "${replay[@]}"; do [ -f "$f" ] && files+=("$f"); done
if [ "${#files[@]}" -gt 0 ]; then
    "$BIN" "${files[@]}" >"$OUT/replay.log" 2>&1 || { tail -n 60 "$OUT/replay.log" >&2; exit 1; }
    echo "run.sh: replayed ${#files[@]} seed and regression inputs"
fi
if [ "$SECS" -gt 0 ]; then
    "$BIN" -max_total_time="$SECS" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$OUT/crash-" "$@" "$OUT/corpus" native/fuzz/corpus
fi
