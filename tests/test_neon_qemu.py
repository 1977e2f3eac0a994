"""The C kernel tests of native/tests/test_kernels.c: every SIMD path against its scalar reference.

test_kernels.c builds our kernel sources standalone (shims instead of a llama.cpp tree) and checks
the dispatched kernels (activation quantizer, row dot products, panels, the mul_mat driver on 1 and
2 threads) against the scalar references: integer sums exactly, float data to rounding and to
NMSE <= 5e-4 against float math.

- aarch64: native/tests/run_qemu.sh cross-compiles the NEON paths (armv8.2-a+dotprod and plain
  armv8-a) and runs them under qemu-aarch64. It needs the Debian packages gcc-aarch64-linux-gnu
  and qemu-user: the test skips without them on a developer machine, and fails in CI (CI=true),
  where .ci/run installs them.
- x86-64 host: -march=native, and the flags of each of ggml's x86 CPU variants (the portable
  build's libggml-cpu-<variant>.so) this CPU can run, run directly.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = ROOT / "native" / "tests"
IN_CI = os.environ.get("CI") == "true"


def _summary(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _failures(output: str) -> str:
    return "\n".join(line for line in output.splitlines() if "FAILED" in line or line.startswith("    "))


def _have_cross_tools() -> bool:
    return shutil.which("aarch64-linux-gnu-gcc") is not None and shutil.which("qemu-aarch64") is not None


@pytest.mark.skipif(not _have_cross_tools() and not IN_CI,
                    reason="needs gcc-aarch64-linux-gnu and qemu-user (apt-get install gcc-aarch64-linux-gnu qemu-user)")
def test_neon_kernels_under_qemu(tmp_path):
    r = subprocess.run(["bash", str(TESTS_DIR / "run_qemu.sh"), str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{_summary(r.stdout)}\n{_failures(out)}\n{r.stderr[-3000:]}"
    assert _summary(r.stdout).startswith("aarch64 (qemu): ") and _summary(r.stdout).endswith(" 0 failed")


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


# ggml's x86 CPU variants (GGML_CPU_ALL_VARIANTS, the portable build) with the /proc/cpuinfo flags
# each needs, as its ggml_backend_score asks them; native/tests/Makefile compiles the kernels with
# each variant's -m flags (test_kernels-variant-<tag>), as ggml-cpu's CMake does
_HASWELL = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
_AVX512 = _HASWELL + ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
X86_VARIANTS = {
    "x64": (), "sse42": ("sse4_2",), "sandybridge": ("sse4_2", "avx"), "ivybridge": ("sse4_2", "avx", "f16c"),
    "piledriver": ("sse4_2", "avx", "f16c", "fma"), "haswell": _HASWELL, "skylakex": _AVX512,
    "cannonlake": _AVX512 + ("avx512vbmi",), "cascadelake": _AVX512 + ("avx512_vnni",),
    "icelake": _AVX512 + ("avx512vbmi", "avx512_vnni"), "cooperlake": _AVX512 + ("avx512_vnni", "avx512_bf16"),
    "zen4": _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16"), "alderlake": _HASWELL + ("avx_vnni",),
    "sapphirerapids": _AVX512 + ("avx512vbmi", "avx512_vnni", "avx512_bf16"),
}


def expected_kernels(features: tuple[str, ...]) -> str:
    """The GQSA kernels a build with these features runs (ggml-cpu-gqsa-arch.h's choice)."""
    if "avx2" not in features:
        return "scalar"
    if "avx512_vnni" in features and "avx512vl" in features:
        return "avx512vnni"
    return "avxvnni" if "avx_vnni" in features else "avx2"


def _run_kernel_tests(tmp_path, target: str) -> str:
    binary = tmp_path / f"test_kernels-{target}"
    build = subprocess.run(["make", "-s", "-C", str(TESTS_DIR), f"OUT={tmp_path}", str(binary)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    r = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{_summary(r.stdout)}\n{_failures(r.stdout)}\n{r.stderr[-3000:]}"
    assert _summary(r.stdout).endswith(" 0 failed")
    return r.stdout.splitlines()[0]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds of the kernel tests")
def test_kernels_on_host_native(tmp_path):
    _run_kernel_tests(tmp_path, "native")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds of the kernel tests")
def test_kernels_with_the_512_bit_superblock_step(tmp_path):
    # GQSA_SB_512 is off in every default build (measured no faster): a build that turns it on on
    # the icelake flags runs it, and it passes the superblock tests against the scalar reference
    missing = [f for f in X86_VARIANTS["icelake"] if not _cpu_has(f)]
    if missing:
        pytest.skip(f"this CPU cannot run AVX-512 VNNI code (no {', '.join(missing)})")
    binary = tmp_path / "test_kernels-sb512"
    _run_kernel_tests(tmp_path, "sb512")
    out = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600).stdout.splitlines()
    assert out[1] == "superblock decode step: avx512"
    assert any("sb_rows_match_scalar[n_kept=344,nrows=5] PASSED" in line for line in out)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds of the kernel tests")
@pytest.mark.parametrize("variant", list(X86_VARIANTS))
def test_kernels_of_each_cpu_variant(tmp_path, variant):
    # every variant of the portable build this CPU can run, compiled with that variant's flags:
    # its kernels pass, and they are the ones its features call for (x64: scalar, haswell: AVX2, ...)
    features = X86_VARIANTS[variant]
    missing = [f for f in features if not _cpu_has(f)]
    if missing:
        pytest.skip(f"this CPU cannot run the {variant} variant (no {', '.join(missing)})")
    header = _run_kernel_tests(tmp_path, f"variant-{variant}")
    assert header == f"GQSA kernel tests ({expected_kernels(features)})"
