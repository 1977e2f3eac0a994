#!/usr/bin/env bash
# Cross-compiles native/tests/test_kernels.c for aarch64 (armv8.2-a+dotprod and plain armv8-a: the
# NEON kernels with and without the dot-product instructions) and runs it under qemu-aarch64.
# Needs the Debian packages gcc-aarch64-linux-gnu and qemu-user. Usage: run_qemu.sh [OUT_DIR]
# Prints each test case and "N passed, M failed" per build, then a total; exits non-zero on any
# failure or a missing tool.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/build}"
cross="${CROSS_CC:-aarch64-linux-gnu-gcc}"
sysroot="${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu}"

for tool in "$cross" qemu-aarch64 make; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "run_qemu.sh: '$tool' not found — install the Debian packages gcc-aarch64-linux-gnu and qemu-user" >&2
        exit 2
    fi
done

make -s -C "$here" OUT="$out" CROSS_CC="$cross" aarch64

passed=0
failed=0
status=0
for variant in armv8.2-dotprod armv8; do
    echo "== qemu-aarch64: test_kernels-$variant"
    set +e
    log="$(qemu-aarch64 -L "$sysroot" "$out/test_kernels-$variant" 2>&1)"
    rc=$?
    set -e
    echo "$log"
    summary="$(echo "$log" | tail -n 1)"
    if [[ "$summary" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
        passed=$((passed + BASH_REMATCH[1]))
        failed=$((failed + BASH_REMATCH[2]))
    else
        echo "run_qemu.sh: test_kernels-$variant exited $rc without a summary" >&2
        failed=$((failed + 1))
    fi
    if [ "$rc" -ne 0 ]; then
        status=1
    fi
done
echo "aarch64 (qemu): $passed passed, $failed failed"
if [ "$failed" -ne 0 ]; then
    status=1
fi
exit "$status"
