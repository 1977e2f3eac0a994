"""The GQSA CUDA code on a machine without a GPU (native/README.md, "CUDA"): the work split the
kernels use is proven on the CPU, nvcc compiles the kernels' harness and ggml-cuda's gqsa.cu (inside
a freshly patched tree) for sm_80, sm_89 and sm_90, and scripts/gpu_check.sh runs up to the first
step that needs a GPU and says that none is present.

Without nvcc the compile tests skip on a developer machine and fail in CI (CI=true), where nvcc is
part of the image. What runs on a GPU (NMSE, sanitizer, timings) is scripts/gpu_check.sh's."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "native" / "cuda" / "build.sh"
ARCHS = ("80", "89", "90")
IN_CI = os.environ.get("CI") == "true"


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)


def _have_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return bool(smi) and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


needs_nvcc = pytest.mark.skipif(_nvcc() is None and not IN_CI,
                                reason="nvcc not found (CI requires it: CI=true makes this a failure)")


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd} exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_partition_covers_every_kept_block_exactly_once(tmp_path):
    # the same header the kernels include, compiled for the host: every (row, kept block) once for
    # any shape and part count, slots written once and read once, rows assembled exactly
    proc = run(["bash", str(BUILD), "--partition-test", "--out", str(tmp_path)])
    assert "each covered exactly once" in proc.stdout
    cases = int(proc.stdout.split("gqsa partition: ")[1].split()[0])
    assert cases > 5000


def test_partition_test_fails_on_a_broken_split(tmp_path):
    # the CPU test must catch a split that computes a block twice: a partition header whose parts
    # overlap by one unit
    hdr = (REPO / "native/src/ggml/src/ggml-cuda/gqsa-partition.h").read_text()
    broken = hdr.replace("return p * n_units / n_parts;", "return p * n_units / n_parts - (p > 0 && p < n_parts);")
    assert broken != hdr
    (tmp_path / "gqsa-partition.h").write_text(broken)
    cxx = os.environ.get("CXX", "c++")
    subprocess.run([cxx, "-std=c++17", "-O1", "-I", str(tmp_path), str(REPO / "native/cuda/test_partition.cpp"),
                    "-o", str(tmp_path / "t")], check=True)
    proc = subprocess.run([str(tmp_path / "t")], capture_output=True, text=True)
    assert proc.returncode == 1 and "FAIL" in proc.stderr


@pytest.fixture(scope="module")
def patched_tree(tmp_path_factory):
    """The llama.cpp tree the build would compile (pinned source + native/src + the patch)."""
    spec = importlib.util.spec_from_file_location("fetch_llama_cpp", REPO / "native" / "fetch_llama_cpp.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    tree = tmp_path_factory.mktemp("cuda") / "llama.cpp"
    cache = Path(os.environ["GQSA_GGUF_CACHE"]) if os.environ.get("GQSA_GGUF_CACHE") else fetch.default_cache_dir()
    fetch.prepare(tree, os.environ.get("GQSA_LLAMA_CPP_SOURCE", ""), cache, REPO / "native" / "src",
                  REPO / "native" / "llama.cpp.patch")
    return tree


def _assert_archs(binary: Path):
    data = binary.read_bytes()
    for arch in ARCHS:
        assert f"sm_{arch}".encode() in data, f"{binary.name} holds no sm_{arch} code"


@needs_nvcc
def test_harness_compiles_for_three_architectures(tmp_path):
    run(["bash", str(BUILD), "--harness", "--arch", " ".join(ARCHS), "--out", str(tmp_path), "--jobs", "2"])
    _assert_archs(tmp_path / "gqsa_harness")


@needs_nvcc
def test_ggml_cuda_gqsa_compiles_for_three_architectures(tmp_path, patched_tree):
    assert (patched_tree / "ggml/src/ggml-cuda/gqsa.cu").is_file()
    assert "ggml_cuda_gqsa_mul_mat" in (patched_tree / "ggml/src/ggml-cuda/ggml-cuda.cu").read_text()
    run(["bash", str(BUILD), "--ggml", str(patched_tree), "--arch", " ".join(ARCHS), "--out", str(tmp_path),
         "--jobs", "2"])
    _assert_archs(tmp_path / "gqsa.o")


def test_ggml_check_program_compiles(patched_tree):
    # native/cuda/gqsa_ggml_check.cpp links the CUDA build on a GPU machine; here: it compiles
    # against the patched headers (plain C++, no CUDA)
    cxx = os.environ.get("CXX", "c++")
    run([cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror", "-I", str(patched_tree / "ggml/include"),
         str(REPO / "native/cuda/gqsa_ggml_check.cpp")])


@needs_nvcc
@pytest.mark.skipif(_have_gpu(), reason="a GPU is present: scripts/gpu_check.sh would run the whole check")
def test_gpu_check_dry_run_stops_before_the_first_gpu_step(tmp_path):
    env = dict(os.environ, GQSA_GPU_OUT=str(tmp_path), JOBS="2")
    proc = subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh")], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No NVIDIA GPU is present" in report and "stopping before the first" in report
    assert "each covered exactly once" in report                  # step 2 ran
    assert (tmp_path / "gqsa_harness").is_file()                  # step 3 ran
    assert "FAILED" not in report
    assert "Harness check" not in report                          # nothing after the device step
