#!/usr/bin/env bash
# Cross-compile the GQSA-patched llama.cpp's own programs, llama-cli and llama-server, for aarch64
# Linux: two statically linked files that run on an ARM board with no Python and no libraries
# beside them (README: "Deploying to an ARM board").
#
#   bash scripts/build_arm.sh                           # armv8-a: every 64-bit ARM board
#   bash scripts/build_arm.sh --arch armv8.2-a+dotprod  # Cortex-A55/A76 and newer (Pi 5, RK3588)
#   bash scripts/build_arm.sh --host                    # the same programs for this machine
#
# Prints the programs' paths on its last two lines. Builds incrementally in build/programs/<name>
# (aarch64-<arch>, or host), from the same patched tree as the Python package (the top-level
# CMakeLists.txt with -DGQSA_PROGRAMS=ON: static libraries, static -static executables, no
# OpenSSL, no curl, no web UI download). The build is cached: a rerun with nothing changed takes
# seconds.
#
# Needs CMake, Ninja or make, Python 3 (for the source tree; not on the board) and, for aarch64,
# the Debian packages g++-aarch64-linux-gnu and libc6-dev-arm64-cross. qemu-aarch64 (qemu-user)
# runs the result on x86: qemu-aarch64 build/programs/aarch64-armv8-a/bin/llama-cli --version.
# Env: GQSA_ARM_JOBS (parallel jobs, default 2), CROSS_PREFIX (default aarch64-linux-gnu-), and
# GQSA_LLAMA_CPP_SOURCE / GQSA_GGUF_CACHE as for the package build (native/README.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

arch=armv8-a
host=0
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch=${2:?--arch needs a value, e.g. armv8.2-a+dotprod}; shift 2 ;;
        --arch=*) arch=${1#--arch=}; shift ;;
        --host) host=1; shift ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build_arm.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ "$arch" =~ ^armv[0-9.]+-a(\+[a-z0-9]+)*$ ]]; then
    echo "build_arm.sh: --arch '$arch' is not an -march value like armv8-a or armv8.2-a+dotprod" >&2
    exit 2
fi

VENV=${GQSA_VENV:-.venv}
if [ -d "$VENV/bin" ]; then
    PATH="$PWD/$VENV/bin:$PATH"     # cmake/ninja that scripts/setup.sh installed there, if any
fi
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for c in "$VENV/bin/python" python3; do
        if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
    done
fi
for tool in cmake "$PY"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build_arm.sh: '$tool' not found (CMake >= 3.21 and Python 3 are needed to build)" >&2
        exit 2
    fi
done

args=(-DGQSA_PROGRAMS=ON -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")")
if [ "$host" -eq 1 ]; then
    name=host
    # as the package's own build: -march=native, llama.cpp's AMX path off (CMakeLists.txt)
else
    name=aarch64-$arch
    prefix=${CROSS_PREFIX:-aarch64-linux-gnu-}
    for tool in "${prefix}gcc" "${prefix}g++"; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "build_arm.sh: '$tool' not found: install the Debian packages g++-aarch64-linux-gnu and libc6-dev-arm64-cross" >&2
            exit 2
        fi
    done
    sysroot=$("${prefix}gcc" -print-sysroot)
    [ -n "$sysroot" ] && [ "$sysroot" != / ] || sysroot=/usr/${prefix%-}
    args+=(-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64
           -DCMAKE_C_COMPILER="${prefix}gcc" -DCMAKE_CXX_COMPILER="${prefix}g++"
           -DCMAKE_FIND_ROOT_PATH="$sysroot"
           -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER
           -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY
           -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY
           -DCMAKE_FIND_ROOT_PATH_MODE_PACKAGE=ONLY
           -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH="$arch")
fi
BUILD=build/programs/$name
gen=()
if [ ! -f "$BUILD/CMakeCache.txt" ] && command -v ninja >/dev/null 2>&1; then
    gen=(-G Ninja)                  # a configured build dir keeps its generator
fi

start=$(date +%s)
mkdir -p "$BUILD"
cmake -S . -B "$BUILD" "${gen[@]}" "${args[@]}" >"$BUILD/configure.log" 2>&1 || {
    tail -n 40 "$BUILD/configure.log" >&2
    echo "build_arm.sh: configure failed (log: $BUILD/configure.log)" >&2
    exit 1
}
cmake --build "$BUILD" -j "${GQSA_ARM_JOBS:-2}" --target llama-cli llama-server
echo "build_arm.sh: $name programs built in $(( $(date +%s) - start )) s"
for p in llama-cli llama-server; do
    echo "$PWD/$BUILD/bin/$p"
done
