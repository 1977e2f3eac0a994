"""The C kernel tests of native/tests/test_kernels.c: every SIMD path against its scalar reference.

test_kernels.c builds our kernel sources standalone (shims instead of a llama.cpp tree) and checks
the dispatched kernels (activation quantizer, row dot products, panels, the mul_mat driver on 1 and
2 threads) against the scalar references: integer sums exactly, float data to rounding and to
NMSE <= 5e-4 against float math.

- aarch64: native/tests/run_qemu.sh cross-compiles the NEON paths (armv8.2-a+dotprod and plain
  armv8-a) and runs them under qemu-aarch64. It needs the Debian packages gcc-aarch64-linux-gnu
  and qemu-user: the test skips without them on a developer machine, and fails in CI (CI=true),
  where .ci/run installs them.
- x86-64 host: -march=native, AVX2 without AVX-512, and the scalar build, run directly.
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


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds of the kernel tests")
@pytest.mark.parametrize("variant", ["native", "avx2", "scalar"])
def test_kernels_on_host(tmp_path, variant):
    if variant == "avx2" and not all(_cpu_has(f) for f in ("avx2", "fma", "f16c")):
        pytest.skip("this CPU has no AVX2/FMA/F16C")
    binary = tmp_path / f"test_kernels-{variant}"
    build = subprocess.run(["make", "-s", "-C", str(TESTS_DIR), f"OUT={tmp_path}", str(binary)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    r = subprocess.run([str(binary)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{_summary(r.stdout)}\n{_failures(r.stdout)}\n{r.stderr[-3000:]}"
    assert _summary(r.stdout).endswith(" 0 failed")
