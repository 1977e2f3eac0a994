#!/usr/bin/env bash
# Builds the GQSA CUDA pieces that need no full ggml-cuda build (native/README.md, "CUDA"):
#
#   --partition-test   compile native/cuda/test_partition.cpp with the host C++ compiler and run it
#                      (the Stream-K / data-centric work split; no CUDA needed)
#   --harness          compile native/cuda/gqsa_harness.cu with nvcc into OUT/gqsa_harness (with
#                      cuBLAS when the toolkit has it: the fp16 comparison)
#   --ggml TREE        compile-check ggml-cuda's gqsa.cu inside TREE, a patched llama.cpp tree
#                      (native/fetch_llama_cpp.py --tree TREE), against its ggml-cuda headers; where
#                      the toolkit has no cuBLAS, native/cuda/stub/cublas_v2.h stands in (declarations
#                      only: the object is never linked)
#
# Options: --arch "80 89 90" (compute capabilities, default those three; "native" for the GPU
# present), --out DIR (default build/cuda), --jobs N (nvcc --threads, default nproc). NVCC
# overrides the compiler (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc). Exit status:
# 0 on success, 1 when a compile or the partition test fails, 2 on a usage error, 3 when nvcc is
# needed and absent.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
kernels="$root/native/src/ggml/src/ggml-cuda"

arch="80 89 90"
out="$root/build/cuda"
jobs=$(nproc)
do_partition=0 do_harness=0 tree=""
while [ $# -gt 0 ]; do
    case "$1" in
        --partition-test) do_partition=1 ;;
        --harness) do_harness=1 ;;
        --ggml) tree=${2:?--ggml needs a tree}; shift ;;
        --arch) arch=${2:?}; shift ;;
        --out) out=${2:?}; shift ;;
        --jobs) jobs=${2:?}; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ $do_partition = 0 ] && [ $do_harness = 0 ] && [ -z "$tree" ]; then
    echo "build.sh: nothing to do (--partition-test, --harness, --ggml TREE)" >&2
    exit 2
fi
mkdir -p "$out"

if [ $do_partition = 1 ]; then
    cxx=${CXX:-c++}
    echo "build.sh: partition test ($cxx)"
    "$cxx" -std=c++17 -O2 -Wall -Wextra -Werror -I "$kernels" "$here/test_partition.cpp" -o "$out/test_partition"
    "$out/test_partition"
fi
[ $do_harness = 0 ] && [ -z "$tree" ] && exit 0

nvcc=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
if [ ! -x "$nvcc" ]; then
    echo "build.sh: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 3
fi
gencode=()
for a in $arch; do
    if [ "$a" = native ]; then gencode+=(-arch=native); else gencode+=(-gencode "arch=compute_$a,code=sm_$a"); fi
done
# cuBLAS: does the toolkit's include path have its header?
have_cublas=0
if echo '#include <cublas_v2.h>' | "$nvcc" -x cu -E - -o /dev/null >/dev/null 2>&1; then
    have_cublas=1
fi
flags=(-std=c++17 -O3 -use_fast_math --threads "$jobs" "${gencode[@]}" -Werror all-warnings)
echo "build.sh: $("$nvcc" --version | tail -n 1), arch: $arch, cuBLAS: $([ $have_cublas = 1 ] && echo yes || echo "no (compile checks use native/cuda/stub)")"

if [ $do_harness = 1 ]; then
    extra=()
    [ $have_cublas = 1 ] && extra=(-DGQSA_HARNESS_CUBLAS -lcublas)
    t0=$(date +%s)
    "$nvcc" "${flags[@]}" -lineinfo -I "$kernels" "$here/gqsa_harness.cu" -o "$out/gqsa_harness" "${extra[@]}"
    echo "build.sh: $out/gqsa_harness ($(( $(date +%s) - t0 )) s)"
fi

if [ -n "$tree" ]; then
    cu="$tree/ggml/src/ggml-cuda/gqsa.cu"
    if [ ! -f "$cu" ]; then
        echo "build.sh: $cu missing: is $tree a patched tree (native/fetch_llama_cpp.py --tree)?" >&2
        exit 1
    fi
    inc=(-I "$tree/ggml/include" -I "$tree/ggml/src" -I "$tree/ggml/src/ggml-cuda")
    [ $have_cublas = 0 ] && inc+=(-I "$here/stub")
    t0=$(date +%s)
    # ggml-cuda's own flags (ggml/src/ggml-cuda/CMakeLists.txt); its headers are not warning-clean
    # under -Werror, so only errors fail here
    "$nvcc" -std=c++17 -O3 -use_fast_math -extended-lambda --threads "$jobs" "${gencode[@]}" \
        -DGGML_USE_CUDA -DGGML_SCHED_MAX_COPIES=4 "${inc[@]}" -c "$cu" -o "$out/gqsa.o"
    echo "build.sh: $out/gqsa.o compiled ($(( $(date +%s) - t0 )) s)"
fi
