#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: build what the GQSA CUDA check needs, run it, and
# write one report (docs: README "CUDA", native/README.md "CUDA").
#
#   bash scripts/gpu_check.sh --pack   on a machine with network (or the sdist in the cache) and the
#                                      project's venv: writes build/gpu-bundle/ (the llama.cpp
#                                      sources the build needs, ~6 MiB, and the 7B model's
#                                      tokenizer), to carry to a GPU machine that has no network
#   bash scripts/gpu_check.sh          on the GPU machine (python3 with numpy, cmake, ninja, nvcc,
#                                      cuBLAS, compute-sanitizer); report: build/gpu-check/report.md
#
# Steps: 1 environment; 2 the partition test (CPU); 3 the harness (nvcc, this GPU's architecture);
# then, only with a GPU: 4 harness check (NMSE at widths 576/4096/11008 x sparsity 25/50/75 %),
# 5 compute-sanitizer memcheck on the kernels, 6 GEMV timings (4096x4096, 11008x4096, 4096x11008),
# 7 the patched llama.cpp with CUDA (started in the background at step 4; ggml-cuda for this
# architecture only, llama-bench and the ggml check), 8 ggml_mul_mat on gqsa4 through the CUDA
# backend vs CPU, both decompositions, 9 llama-bench of a LLaMA-7B-shaped W4S50 vs Q4_0 model,
# all layers offloaded. Without a GPU it stops after step 3 and says so (exit 3).
# Env: GQSA_GPU_BUNDLE (default build/gpu-bundle), GQSA_GPU_OUT (default build/gpu-check), JOBS.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
bundle_dir=${GQSA_GPU_BUNDLE:-$root/build/gpu-bundle}
out=${GQSA_GPU_OUT:-$root/build/gpu-check}
jobs=${JOBS:-$(nproc)}
bundle_name=llama.cpp-0c1e570-bundle.tar.xz   # native/fetch_llama_cpp.py BUNDLE_NAME
tokenizer=$bundle_dir/tokenizer-llama-7b.json

if [ "${1:-}" = "--pack" ]; then
    set -e
    py=${PYTHON:-${GQSA_VENV:-.venv}/bin/python}
    mkdir -p "$bundle_dir"
    "$py" native/fetch_llama_cpp.py --pack-bundle "$bundle_dir/$bundle_name"
    "$py" -c 'import sys; from pathlib import Path; from gqsa_gguf import bench
bench.save_tokenizer(bench.PRESETS["llama-7b"], Path(sys.argv[1]))' "$tokenizer"
    echo "gpu_check: $(du -sh "$bundle_dir" | cut -f1) in $bundle_dir; carry it (device tool: carry [\"${bundle_dir#$root/}\"])"
    echo "gpu_check: then run on the GPU machine: bash scripts/gpu_check.sh"
    exit 0
fi
if [ $# -gt 0 ]; then
    echo "usage: bash scripts/gpu_check.sh [--pack]" >&2
    exit 2
fi

mkdir -p "$out"
report=$out/report.md
start=$(date +%s)
status=0
: >"$report"
say() { echo "$*" | tee -a "$report"; }
section() { say ""; say "## $* ($(( $(date +%s) - start )) s)"; say ""; }
fail() { say "**FAILED:** $*"; [ $status -eq 0 ] && status=1; }
run_logged() {  # run_logged NAME CMD...: output into the report as a code block, status kept
    local name=$1 rc=0
    shift
    say '```'
    "$@" 2>&1 | tee -a "$report" || rc=${PIPESTATUS[0]}
    say '```'
    [ $rc -eq 0 ] || fail "$name (exit $rc)"
    return $rc
}

say "# GQSA CUDA check"
say ""
say "Written by \`bash scripts/gpu_check.sh\` at $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."

section "1. Environment"
say '```'
{
    echo "cpus: $(nproc)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: no GPU answered"
    else
        echo "nvidia-smi: not installed"
    fi
    if command -v nvcc >/dev/null; then nvcc --version | tail -n 1; else echo "nvcc: not found"; fi
    echo "python3: $(python3 --version 2>&1)"
    command -v compute-sanitizer >/dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)" || echo "compute-sanitizer: not found"
    echo "bundle: $([ -f "$bundle_dir/$bundle_name" ] && echo "$bundle_dir/$bundle_name" || echo "none (the build downloads the sdist)")"
} 2>&1 | tee -a "$report"
say '```'
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
arch=${cc:-90}

section "2. Partition test (CPU): every (row, kept block) exactly once, any shape and SM count"
run_logged "partition test" bash native/cuda/build.sh --partition-test --out "$out"

section "3. Harness build (nvcc, sm_$arch)"
run_logged "harness build" bash native/cuda/build.sh --harness --arch "$arch" --out "$out" --jobs "$jobs"
harness=$out/gqsa_harness

section "Device"
if [ ! -x "$harness" ] || ! "$harness" info >"$out/info.txt" 2>&1; then
    say "**No NVIDIA GPU is present** ($(cat "$out/info.txt" 2>/dev/null || echo "no harness")): stopping before the first"
    say "step that needs one. Nothing below step 3 was run; the CUDA code is compiled, not measured."
    echo "gpu_check: report in $report"
    exit 3
fi
say "GPU: $(cat "$out/info.txt")"

# the llama.cpp CUDA build runs in the background while the harness runs
build=$out/llama-cuda
src_env=()
[ -f "$bundle_dir/$bundle_name" ] && src_env=(GQSA_LLAMA_CPP_SOURCE="$bundle_dir/$bundle_name")
(
    env "${src_env[@]}" GQSA_GGUF_CACHE="$out/cache" cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_FA=OFF \
        -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON &&
    cmake --build "$build" -j "$jobs" --target llama-bench ggml-cuda ggml-cpu
) >"$out/llama-build.log" 2>&1 &
build_pid=$!
# and so does the model writer (CPU and disk): LLaMA-7B shape, random weights, Q4_0 and W4S50
models=$out/models
(
    set -e
    mkdir -p "$models"
    tree_py=$build/llama.cpp/gguf-py
    while [ ! -d "$tree_py" ] && kill -0 $build_pid 2>/dev/null; do sleep 2; done   # gguf-py from the tree
    PYTHONPATH="$root:$tree_py" python3 - "$tokenizer" "$models" <<'EOF'
import sys
from pathlib import Path
from gqsa_gguf import bench
shape = bench.PRESETS["llama-7b"]
tok_file = Path(sys.argv[1])
tok = bench.load_tokenizer(tok_file, shape) if tok_file.is_file() else None   # else: the embedded model
weights = bench._RandomWeights(seed=0)
for fmt in ("q4_0", "w4s50"):
    info = bench.write_model(shape, fmt, Path(sys.argv[2]) / f"llama-7b-{fmt}.gguf", weights, tokenizer=tok)
    print(f"llama-7b-{fmt}.gguf: {info['linear_bytes'] / 1e9:.2f} GB of linear weights")
EOF
) >"$out/models.log" 2>&1 &
models_pid=$!

section "4. Harness check: NMSE against the CPU reference (limit 5e-4)"
run_logged "harness check" "$harness" check

section "5. compute-sanitizer memcheck (small shapes)"
if command -v compute-sanitizer >/dev/null; then
    run_logged "compute-sanitizer" compute-sanitizer --tool memcheck --error-exitcode 9 "$harness" check --quick
else
    fail "compute-sanitizer not found"
fi

section "6. GEMV timings (W4S50 vs Q4_0-style and cuBLAS fp16)"
run_logged "harness bench" "$harness" bench

section "7. llama.cpp with CUDA (sm_$arch, ggml-cuda + llama-bench)"
t0=$(date +%s)
if wait $build_pid; then
    say "built in $(( $(date +%s) - t0 )) s after the harness steps (log: $out/llama-build.log)"
else
    tail -n 40 "$out/llama-build.log" | tee -a "$report"
    fail "llama.cpp CUDA build (log: $out/llama-build.log)"
fi
bin=$build/bin

section "8. ggml_mul_mat on gqsa4 through the CUDA backend"
if [ -f "$bin/libggml-cuda.so" ]; then
    c++ -std=c++17 -O2 -I "$build/llama.cpp/ggml/include" native/cuda/gqsa_ggml_check.cpp -o "$out/gqsa_ggml_check" \
        -L "$bin" -lggml -lggml-base -lggml-cpu -lggml-cuda -Wl,-rpath,"$bin" 2>&1 | tee -a "$report"
    for d in task data; do
        run_logged "ggml check ($d)" env GGML_CUDA_GQSA_DECOMP=$d "$out/gqsa_ggml_check"
    done
else
    fail "no libggml-cuda.so in $bin"
fi

section "9. llama-bench: LLaMA-7B shape, all layers offloaded, W4S50 vs Q4_0"
if ! wait $models_pid; then
    cat "$out/models.log" | tee -a "$report"
    fail "writing the benchmark models (log: $out/models.log)"
fi
cat "$out/models.log" >>"$report"
lb=$(find "$build" -name llama-bench -type f -perm -u+x | head -n 1)
if [ -n "$lb" ] && [ -f "$models/llama-7b-w4s50.gguf" ]; then
    for d in task data; do
        say "GGML_CUDA_GQSA_DECOMP=$d: \`llama-bench -ngl 99 -p 512 -n 128 -r 3\` (log: $out/llama-bench-$d.log)"
        if ! GGML_CUDA_GQSA_DECOMP=$d "$lb" -ngl 99 -p 512 -n 128 -r 3 -o json -m "$models/llama-7b-q4_0.gguf" \
                -m "$models/llama-7b-w4s50.gguf" >"$out/llama-bench-$d.json" 2>"$out/llama-bench-$d.log"; then
            tail -n 30 "$out/llama-bench-$d.log" | tee -a "$report"
            fail "llama-bench ($d)"
            continue
        fi
        python3 - "$out/llama-bench-$d.json" <<'EOF' | tee -a "$report"
import json, sys
speed = {}
for r in json.load(open(sys.argv[1])):
    fmt = "w4s50" if "w4s50" in r["model_filename"] else "q4_0"
    speed[(fmt, "prompt" if r["n_prompt"] > 0 else "decode")] = r["avg_ts"]
print("\n| format | prompt 512 tok/s | decode 128 tok/s |\n|---|---|---|")
for fmt in ("q4_0", "w4s50"):
    print(f"| {fmt} | {speed.get((fmt, 'prompt'), 0):.1f} | {speed.get((fmt, 'decode'), 0):.1f} |")
if all((f, k) in speed for f in ("q4_0", "w4s50") for k in ("prompt", "decode")):
    print(f"\nW4S50 / Q4_0: decode {speed[('w4s50', 'decode')] / speed[('q4_0', 'decode')]:.2f}x, "
          f"prompt {speed[('w4s50', 'prompt')] / speed[('q4_0', 'prompt')]:.2f}x\n")
EOF
    done
else
    fail "llama-bench or the models missing"
fi

section "Done"
say "exit status $status; report $report"
exit $status
