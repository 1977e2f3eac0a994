"""The patched ggml against the NumPy reference codec (the ground truth).

Exact level: C packing, activation quantization and dequantization are bit-exact with gqsa_gguf.codec.
Tolerance level: ggml_mul_mat on gqsa4 through the CPU backend (multi-threaded graph compute)
matches codec.matmul_ref with NMSE <= 5e-4 (ggml's test-backend-ops threshold for mul_mat), and the
kernel's own arithmetic (codec.matmul_q8_ref) to float rounding; the SIMD kernel matches the scalar one.
Hostile level: the load-time validator refuses every broken rule with the tensor, row, block and value.
These tests need the native build (scripts/setup.sh); they fail, not skip, without it.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from gqsa_gguf import codec, format as fmt, runtime

V, I64, C_INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
GQSA4 = fmt.GGML_TYPE_GQSA4


@pytest.fixture(scope="module")
def ggml():
    lib = ctypes.CDLL(str(runtime.lib_dir() / runtime.GGML_BASE_LIB_NAME))
    lib.ggml_gqsa_quantize_rows.argtypes = [V, I64, I64, V, I64, V]
    lib.ggml_gqsa_quantize_rows.restype = ctypes.c_size_t
    lib.ggml_gqsa_dequantize_rows.argtypes = [V, I64, I64, I64, V]
    lib.ggml_gqsa_dequantize_rows.restype = None
    lib.ggml_quantize_chunk.argtypes = [C_INT, V, V, I64, I64, I64, V]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [C_INT]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_blck_size.argtypes = [C_INT]
    lib.ggml_blck_size.restype = I64
    lib.ggml_type_name.argtypes = [C_INT]
    lib.ggml_type_name.restype = ctypes.c_char_p
    return lib


# A portable build (GQSA_PORTABLE) has one CPU backend per variant, each with its own kernels and
# its own copy of the hooks: every test that runs a kernel runs against each variant this CPU can
# run. A native build has one (None).
VARIANTS = [v.name for v in runtime.cpu_variants() if v.score > 0] or [None]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v or "native")
def hooks(request):
    lib = runtime.native_lib(request.param)
    lib.variant = request.param
    lib.gqsa_test_cpu_kernels.argtypes = []
    lib.gqsa_test_cpu_kernels.restype = ctypes.c_char_p
    # the hooks take the weight type (fmt.GGML_TYPE_GQSA4 here; tests/test_gqsa3_native.py: gqsa3)
    lib.gqsa_test_mul_mat_type.argtypes = [C_INT, V, I64, I64, I64, V, I64, C_INT, V]
    lib.gqsa_test_mul_mat_type.restype = C_INT
    lib.gqsa_test_vec_dot_type.argtypes = [C_INT, V, I64, V, I64, C_INT, V]
    lib.gqsa_test_vec_dot_type.restype = C_INT
    lib.gqsa_test_quantize_act.argtypes = [V, I64, V]
    lib.gqsa_test_quantize_act.restype = None
    lib.gqsa_test_validate_type.argtypes = [C_INT, V, I64, I64, I64, ctypes.c_char_p, ctypes.c_size_t]
    lib.gqsa_test_validate_type.restype = C_INT
    lib.gqsa_test_sb_kernel.argtypes = []
    lib.gqsa_test_sb_kernel.restype = ctypes.c_char_p
    lib.gqsa_test_mul_mat_repacked_type.argtypes = [C_INT, V, I64, I64, I64, V, I64, C_INT, V]
    lib.gqsa_test_mul_mat_repacked_type.restype = C_INT
    return lib


def _ptr(a: np.ndarray) -> int:
    assert a.flags.c_contiguous
    return a.ctypes.data


def random_kept(rng, n_rows: int, width: int, sparsity: float) -> np.ndarray:
    n_groups = width // fmt.GROUP_SIZE
    n_kept = fmt.kept_groups(width, sparsity)
    order = np.argsort(rng.random((n_rows, n_groups)), axis=1)[:, :n_kept]
    return np.sort(order, axis=1).astype(np.int32)


def random_weights(rng, n_rows: int, width: int) -> np.ndarray:
    w = rng.standard_normal((n_rows, width)).astype(np.float32)
    # groups that exercise the quantizer's edge cases: all zero, all positive, tiny, large
    g = w.reshape(n_rows, -1, fmt.GROUP_SIZE)
    g[:, 0::7] = 0.0
    g[:, 1::7] = np.abs(g[:, 1::7]) + 0.5
    g[:, 2::7] *= 1e-7
    g[:, 3::7] *= 3e3
    return w


def c_quantize(ggml, w: np.ndarray, kept: np.ndarray) -> np.ndarray:
    n_rows, width = w.shape
    out = np.zeros((n_rows, kept.shape[1] * fmt.BLOCK_BYTES), np.uint8)
    n = ggml.ggml_gqsa_quantize_rows(_ptr(w), n_rows, width, _ptr(kept), kept.shape[1], _ptr(out))
    assert n == out.nbytes
    return out


def test_library_registers_the_type(ggml):
    assert runtime.check_patched()
    assert ggml.ggml_type_name(fmt.GGML_TYPE_GQSA4) == fmt.TYPE_NAME.encode()
    assert ggml.ggml_type_size(fmt.GGML_TYPE_GQSA4) == fmt.BLOCK_BYTES
    assert ggml.ggml_blck_size(fmt.GGML_TYPE_GQSA4) == fmt.GROUP_SIZE
    assert ggml.ggml_type_size(fmt.GGML_TYPE_GQSA_Q8) == fmt.ACT_BLOCK_BYTES
    assert ggml.ggml_blck_size(fmt.GGML_TYPE_GQSA_Q8) == fmt.GROUP_SIZE


@pytest.mark.parametrize("seed", range(6))
def test_c_packing_is_bit_exact_with_numpy(ggml, seed):
    rng = np.random.default_rng(seed)
    width = int(rng.choice([16, 48, 576, 1536, 4096]))
    n_rows = int(rng.integers(1, 40))
    sparsity = float(rng.choice([0.0, 0.25, 0.5, 0.75, rng.random() * 0.9]))
    w = random_weights(rng, n_rows, width)
    kept = random_kept(rng, n_rows, width, sparsity)
    c = c_quantize(ggml, w, kept)
    np.testing.assert_array_equal(c, codec.quantize(w, kept))


def test_c_packing_refuses_bad_arguments(ggml):
    w = np.ones((2, 64), np.float32)
    out = np.zeros(2 * 2 * fmt.BLOCK_BYTES, np.uint8)
    for kept in ([[0, 4], [1, 2]], [[1, 1], [0, 1]], [[2, 1], [0, 1]], [[-1, 0], [0, 1]]):
        k = np.array(kept, np.int32)
        assert ggml.ggml_gqsa_quantize_rows(_ptr(w), 2, 64, _ptr(k), 2, _ptr(out)) == 0
    k = np.array([[0, 1], [2, 3]], np.int32)
    assert ggml.ggml_gqsa_quantize_rows(_ptr(w), 2, 60, _ptr(k), 2, _ptr(out)) == 0   # width % 16


def test_type_traits_quantizer_is_the_dense_codec(ggml):
    rng = np.random.default_rng(7)
    w = random_weights(rng, 5, 1536)
    out = np.zeros((5, 1536 // 16 * fmt.BLOCK_BYTES), np.uint8)
    n = ggml.ggml_quantize_chunk(fmt.GGML_TYPE_GQSA4, _ptr(w), _ptr(out), 0, 5, 1536, None)
    assert n == out.nbytes
    np.testing.assert_array_equal(out, codec.quantize_dense(w))


def test_c_dequantize_is_bit_exact_with_numpy(ggml):
    rng = np.random.default_rng(3)
    w = random_weights(rng, 9, 576)
    kept = random_kept(rng, 9, 576, 0.5)
    packed = codec.quantize(w, kept)
    dense = np.zeros((9, 576), np.float32)
    ggml.ggml_gqsa_dequantize_rows(_ptr(packed), 9, kept.shape[1], 576, _ptr(dense))
    np.testing.assert_array_equal(dense, codec.dequantize(packed, 576))


@pytest.mark.parametrize("width", [16, 576, 1536, 4096])
def test_activation_quantization_is_bit_exact(hooks, width):
    rng = np.random.default_rng(width)
    x = (rng.standard_normal(width) * rng.choice([1e-3, 1.0, 50.0], width)).astype(np.float32)
    x[:16] = 0.0                                               # an all-zero group
    out = np.zeros(width // 16 * fmt.ACT_BLOCK_BYTES, np.uint8)
    hooks.gqsa_test_quantize_act(_ptr(x), width, _ptr(out))
    np.testing.assert_array_equal(out, codec.pack_act(*codec.quantize_act(x)).reshape(-1))


def nmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(((a.astype(np.float64) - ref) ** 2).sum() / (ref.astype(np.float64) ** 2).sum())


@pytest.mark.parametrize("width", [576, 1536, 4096, 11008])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_mul_mat_matches_reference(hooks, width, sparsity):
    rng = np.random.default_rng(width + int(sparsity * 100))
    n_rows = 48
    w = rng.standard_normal((n_rows, width)).astype(np.float32)
    kept = random_kept(rng, n_rows, width, sparsity)
    packed = codec.quantize(w, kept)
    for ncols in (1, 7, 32):
        x = rng.standard_normal((ncols, width)).astype(np.float32)
        ref = codec.matmul_ref(packed, width, x)
        kernel_math = codec.matmul_q8_ref(packed, width, x)
        for threads in (1, 2):
            out = np.zeros((ncols, n_rows), np.float32)
            rc = hooks.gqsa_test_mul_mat_type(GQSA4, _ptr(packed), kept.shape[1], n_rows, width, _ptr(x), ncols,
                                              threads, _ptr(out))
            assert rc == 0
            assert nmse(out, ref) <= 5e-4, (ncols, threads)
            # the same arithmetic as the kernel, up to float summation order
            np.testing.assert_allclose(out, kernel_math, rtol=1e-4, atol=1e-4 * np.abs(kernel_math).max())


def test_kernels_are_the_ones_the_build_calls_for(hooks):
    # a portable build's variant runs the kernels its features call for (x64: scalar, haswell: AVX2,
    # icelake: AVX-512 VNNI, ...); a native (-march=native) x86 build those of this CPU's features
    import platform
    from pathlib import Path

    from test_neon_qemu import X86_VARIANTS, expected_kernels
    kernels = hooks.gqsa_test_cpu_kernels().decode()
    if hooks.variant is not None:
        assert kernels == expected_kernels(X86_VARIANTS[hooks.variant])
    elif platform.machine() in ("x86_64", "AMD64"):
        flags = tuple(Path("/proc/cpuinfo").read_text().split())
        assert kernels == expected_kernels(flags)
    else:
        assert kernels in ("neon-dotprod", "neon", "scalar")


def test_repacking_is_offered_where_the_build_has_superblock_kernels(hooks):
    # superblocks (the CPU_GQSA buffer type) come with the x86 AVX2 kernels; the 512-bit step only
    # with AVX-512 VNNI (and only where GQSA_SB_512 turns it on)
    kernels, sb = hooks.gqsa_test_cpu_kernels().decode(), hooks.gqsa_test_sb_kernel().decode()
    if kernels in ("avx2", "avxvnni"):
        assert sb == "avx2"
    elif kernels == "avx512vnni":
        assert sb in ("avx2", "avx512")
    else:
        assert sb == "none"


def _repacked_mul_mat(hooks, packed, n_kept, width, x, threads):
    out = np.zeros((x.shape[0], packed.shape[0]), np.float32)
    rc = hooks.gqsa_test_mul_mat_repacked_type(GQSA4, _ptr(packed), n_kept, packed.shape[0], width, _ptr(x),
                                               x.shape[0], threads, _ptr(out))
    if hooks.gqsa_test_sb_kernel().decode() == "none":
        assert rc == 3                  # no CPU_GQSA buffer type in this build
        pytest.skip(f"this build ({hooks.gqsa_test_cpu_kernels().decode()}) does not repack")
    assert rc == 0
    return out


# Rows of 8 (one superblock: the 512-bit step's one-superblock tail only), 48 (6), 128 (16), 192
# (24) and 344 (43: pairs and a tail) blocks, and rows with a tail of blocks after their
# superblocks: 18 (SmolLM2's 576 at 50 %: 2 + 2) and 516 (LLaMA-7B's ffn_down at 25 %: 64 + 4),
# through the CPU_GQSA buffer type as llama.cpp loads weights: repacked at set_tensor, run by the
# superblock kernels (decode step for 1 column, panels for 9).
REPACKED_SHAPES = [(256, 0.5), (576, 0.5), (1536, 0.5), (4096, 0.5), (4096, 0.25), (11008, 0.5), (11008, 0.25)]


@pytest.mark.parametrize("width,sparsity", REPACKED_SHAPES)
def test_repacked_mul_mat_is_exact_on_integer_data(hooks, width, sparsity):
    # scales 1 and activation groups whose max |x| is 127: every product and partial sum is an exact
    # integer in float, so the kernel must equal the integer sum exactly — any block paired with the
    # wrong activation group, zero point or s_x shows
    rng = np.random.default_rng(width + int(sparsity * 100))
    n_rows, n_kept = 40, fmt.kept_groups(width, sparsity)
    kept = random_kept(rng, n_rows, width, sparsity)
    q = rng.integers(0, 16, (n_rows, n_kept, fmt.GROUP_SIZE))
    z = rng.integers(0, 16, (n_rows, n_kept))
    packed = codec.pack(kept, q, z, np.ones((n_rows, n_kept), np.float32))
    x = rng.integers(-127, 128, (1, width)).astype(np.float32)
    x[0, ::fmt.GROUP_SIZE] = rng.choice([-127.0, 127.0], width // fmt.GROUP_SIZE)   # d_x = 1 exactly
    out = _repacked_mul_mat(hooks, packed, n_kept, width, x, 1)
    xg = x[0].reshape(-1, fmt.GROUP_SIZE).astype(np.int64)
    want = ((q * xg[kept]).sum(-1) - z * xg[kept].sum(-1)).sum(-1)
    assert np.abs(want).max() < 2 ** 24
    np.testing.assert_array_equal(out[0], want.astype(np.float32))


@pytest.mark.parametrize("width,sparsity", REPACKED_SHAPES)
def test_repacked_mul_mat_matches_reference(hooks, width, sparsity):
    rng = np.random.default_rng(width + int(sparsity * 100) + 1)
    n_rows = 40
    kept = random_kept(rng, n_rows, width, sparsity)
    packed = codec.quantize(random_weights(rng, n_rows, width), kept)
    for ncols in (1, 9):
        x = rng.standard_normal((ncols, width)).astype(np.float32)
        kernel_math = codec.matmul_q8_ref(packed, width, x)
        for threads in (1, 2):
            out = _repacked_mul_mat(hooks, packed, kept.shape[1], width, x, threads)
            assert nmse(out, codec.matmul_ref(packed, width, x)) <= 5e-4, (ncols, threads)
            # per-block scales in the right lanes: the kernel's arithmetic up to float summation order
            np.testing.assert_allclose(out, kernel_math, rtol=1e-4, atol=1e-5 * np.abs(kernel_math).max())


@pytest.mark.parametrize("n_kept", [1, 2, 3, 7, 8, 9, 15, 16, 17, 18, 48, 344])
def test_simd_kernel_matches_scalar_reference(hooks, n_kept):
    rng = np.random.default_rng(n_kept)
    width = max(n_kept, 40) * 16
    w = rng.standard_normal((4, width)).astype(np.float32)
    kept = np.sort(np.argsort(rng.random((4, width // 16)), axis=1)[:, :n_kept], axis=1).astype(np.int32)
    packed = codec.quantize(w, kept)
    x = rng.standard_normal(width).astype(np.float32)
    for r in range(4):
        row = np.ascontiguousarray(packed[r])
        simd, scalar = ctypes.c_float(), ctypes.c_float()
        assert hooks.gqsa_test_vec_dot_type(GQSA4, _ptr(row), n_kept, _ptr(x), width, 0, ctypes.byref(simd)) == 0
        assert hooks.gqsa_test_vec_dot_type(GQSA4, _ptr(row), n_kept, _ptr(x), width, 1, ctypes.byref(scalar)) == 0
        exact = codec.matmul_q8_ref(packed[r:r + 1], width, x[None])[0, 0]
        scale = np.abs(codec.dequantize(packed[r:r + 1], width)).sum() * np.abs(x).max()
        assert abs(scalar.value - exact) <= 1e-5 * scale
        assert abs(simd.value - exact) <= 1e-5 * scale


def _validate(hooks, packed: np.ndarray, ne0: int, width: int) -> tuple[bool, str]:
    err = ctypes.create_string_buffer(512)
    ok = hooks.gqsa_test_validate_type(GQSA4, _ptr(packed), ne0, packed.shape[0], width, err, len(err))
    return bool(ok), err.value.decode()


def _set_iz(packed: np.ndarray, row: int, block: int, index: int, zero: int) -> None:
    blocks = packed.reshape(packed.shape[0], -1, fmt.BLOCK_BYTES)
    blocks[row, block, 2:4] = np.frombuffer(np.uint16(index | (zero << 12)).tobytes(), np.uint8)


def test_validator_accepts_valid_and_names_each_broken_rule(hooks):
    rng = np.random.default_rng(11)
    width, n_rows = 576, 6
    kept = random_kept(rng, n_rows, width, 0.5)
    good = codec.quantize(rng.standard_normal((n_rows, width)).astype(np.float32), kept)
    ne0 = kept.shape[1] * 16
    assert _validate(hooks, good, ne0, width) == (True, "")

    bad = good.copy()
    _set_iz(bad, 3, 5, 36, 0)                                   # 36 groups in a row of 576
    ok, msg = _validate(hooks, bad, ne0, width)
    assert not ok and "test.weight" in msg and "row 3" in msg and "block 5" in msg and "36" in msg

    bad = good.copy()
    _set_iz(bad, 2, 4, int(kept[2, 3]), 0)                      # duplicate of the previous index
    ok, msg = _validate(hooks, bad, ne0, width)
    assert not ok and "row 2" in msg and "strictly increase" in msg

    bad = good.copy()
    _set_iz(bad, 1, 0, int(kept[1, 1]) + 0, 0)                   # first index after the second: unsorted
    ok, msg = _validate(hooks, bad, ne0, width)
    assert not ok and "row 1" in msg

    for bits in (0x7C00, 0xFC00, 0x7E00):                       # +inf, -inf, NaN scale
        bad = good.copy()
        bad.reshape(n_rows, -1, fmt.BLOCK_BYTES)[4, 2, 0:2] = np.frombuffer(np.uint16(bits).tobytes(), np.uint8)
        ok, msg = _validate(hooks, bad, ne0, width)
        assert not ok and "row 4" in msg and "not finite" in msg

    # the tensor's stored width does not fit the model's width
    ok, msg = _validate(hooks, good, ne0, ne0 - 16)
    assert not ok and "does not fit" in msg
    ok, msg = _validate(hooks, good, ne0, 100)                  # width not a multiple of 16
    assert not ok and "100" in msg
