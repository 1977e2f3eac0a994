"""The patched ggml's gqsa3 type (3-bit codes, docs/FORMAT.md "The 3-bit type gqsa3") against the
NumPy reference codec (codec.*(..., bits=3)), the ground truth.

Exact level: the C quantizer (the type traits' and the row packer), dequantization and the
repacking buffer's write/read round trip are bit-exact with gqsa_gguf.codec.
Tolerance level: ggml_mul_mat on gqsa3 weights through the CPU backend, in the file layout (plain
buffer: short rows, mmap) and repacked (CPU_GQSA: gqsa3 superblocks in the file's bytes, run by
their own kernels), matches codec.matmul_ref with NMSE <= 5e-4, the kernel's own arithmetic
(codec.matmul_q8_ref) to float rounding, and the gqsa4 result of the same weights widened (repacked:
bit for bit, the gqsa3 kernels decoding the same codes into the gqsa4 kernels' arithmetic); on
integer data exactly.
Hostile level: the load-time validator refuses each broken rule of a gqsa3 tensor, zero points
8..15 included, naming the tensor, row, block and value.
These tests need the native build (scripts/setup.sh); they fail, not skip, without it.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from gqsa_gguf import codec, format as fmt, runtime
from test_native_kernels import VARIANTS, _ptr, nmse, random_kept, random_weights

V, I64, C_INT, SIZE = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
GQSA3, GQSA4 = fmt.GGML_TYPE_GQSA3, fmt.GGML_TYPE_GQSA4
B3 = fmt.GQSA3_BLOCK_BYTES


@pytest.fixture(scope="module")
def ggml():
    lib = ctypes.CDLL(str(runtime.lib_dir() / runtime.GGML_BASE_LIB_NAME))
    lib.ggml_gqsa3_quantize_rows.argtypes = [V, I64, I64, V, I64, V]
    lib.ggml_gqsa3_quantize_rows.restype = SIZE
    lib.ggml_gqsa3_dequantize_rows.argtypes = [V, I64, I64, I64, V]
    lib.ggml_gqsa3_dequantize_rows.restype = None
    lib.ggml_quantize_chunk.argtypes = [C_INT, V, V, I64, I64, I64, V]
    lib.ggml_quantize_chunk.restype = SIZE
    lib.ggml_type_size.argtypes = [C_INT]
    lib.ggml_type_size.restype = SIZE
    lib.ggml_blck_size.argtypes = [C_INT]
    lib.ggml_blck_size.restype = I64
    lib.ggml_type_name.argtypes = [C_INT]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_validate_row_data.argtypes = [C_INT, V, SIZE]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    return lib


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: v or "native")
def hooks(request):
    lib = runtime.native_lib(request.param)
    lib.gqsa_test_sb_kernel.argtypes = []
    lib.gqsa_test_sb_kernel.restype = ctypes.c_char_p
    lib.gqsa_test_cpu_kernels.argtypes = []
    lib.gqsa_test_cpu_kernels.restype = ctypes.c_char_p
    for f in (lib.gqsa_test_mul_mat_type, lib.gqsa_test_mul_mat_repacked_type):
        f.argtypes = [C_INT, V, I64, I64, I64, V, I64, C_INT, V]
        f.restype = C_INT
    lib.gqsa_test_vec_dot_type.argtypes = [C_INT, V, I64, V, I64, C_INT, V]
    lib.gqsa_test_vec_dot_type.restype = C_INT
    lib.gqsa_test_validate_type.argtypes = [C_INT, V, I64, I64, I64, ctypes.c_char_p, SIZE]
    lib.gqsa_test_validate_type.restype = C_INT
    lib.gqsa_test_repacked_roundtrip.argtypes = [C_INT, V, I64, I64, V, ctypes.POINTER(SIZE), ctypes.POINTER(SIZE)]
    lib.gqsa_test_repacked_roundtrip.restype = C_INT
    return lib


def widened(packed3: np.ndarray) -> np.ndarray:
    """gqsa3 rows as the gqsa4 rows of the same weights (what the CPU backend repacks)."""
    idx, q, z, d = codec.unpack(packed3, bits=3)
    return codec.pack(idx, q, z, d, bits=4)


def repacks(hooks) -> bool:
    return hooks.gqsa_test_sb_kernel().decode() != "none"


# --- exact ---------------------------------------------------------------------------------------

def test_library_registers_gqsa3(ggml):
    assert ggml.ggml_type_name(GQSA3) == b"gqsa3"
    assert ggml.ggml_type_size(GQSA3) == B3 == 10
    assert ggml.ggml_blck_size(GQSA3) == fmt.GROUP_SIZE


@pytest.mark.parametrize("seed", range(5))
def test_c_packing_is_bit_exact_with_numpy(ggml, seed):
    rng = np.random.default_rng(100 + seed)
    width = int(rng.choice([16, 48, 576, 1536, 4096]))
    n_rows = int(rng.integers(1, 40))
    sparsity = float(rng.choice([0.0, 0.2, 0.4, 0.6, rng.random() * 0.9]))
    w = random_weights(rng, n_rows, width)
    kept = random_kept(rng, n_rows, width, sparsity)
    out = np.zeros((n_rows, kept.shape[1] * B3), np.uint8)
    assert ggml.ggml_gqsa3_quantize_rows(_ptr(w), n_rows, width, _ptr(kept), kept.shape[1], _ptr(out)) == out.nbytes
    np.testing.assert_array_equal(out, codec.quantize(w, kept, bits=3))


def test_type_traits_quantizer_is_the_dense_codec(ggml):
    rng = np.random.default_rng(17)
    w = random_weights(rng, 5, 1536)
    out = np.zeros((5, 1536 // 16 * B3), np.uint8)
    assert ggml.ggml_quantize_chunk(GQSA3, _ptr(w), _ptr(out), 0, 5, 1536, None) == out.nbytes
    np.testing.assert_array_equal(out, codec.quantize_dense(w, bits=3))


def test_c_dequantize_is_bit_exact_with_numpy(ggml):
    rng = np.random.default_rng(13)
    w = random_weights(rng, 9, 576)
    kept = random_kept(rng, 9, 576, 0.4)
    packed = codec.quantize(w, kept, bits=3)
    dense = np.zeros((9, 576), np.float32)
    ggml.ggml_gqsa3_dequantize_rows(_ptr(packed), 9, kept.shape[1], 576, _ptr(dense))
    np.testing.assert_array_equal(dense, codec.dequantize(packed, 576, bits=3))


@pytest.mark.parametrize("n_kept", [8, 9, 18, 128, 154, 413, 516])
def test_repacking_buffer_keeps_the_file_bytes_and_reads_back(hooks, n_kept):
    """CPU_GQSA allocates a gqsa3 weight's own bytes (superblocks of 80 bytes for 8 blocks, the
    tail as stored: 10 bytes a block, not a gqsa4 widening's 12) and reads back the gqsa3 bytes it
    was given."""
    rng = np.random.default_rng(n_kept)
    width, n_rows = (n_kept + 3) * 16, 7
    kept = np.sort(np.argsort(rng.random((n_rows, width // 16)), axis=1)[:, :n_kept], axis=1).astype(np.int32)
    packed = codec.quantize(random_weights(rng, n_rows, width), kept, bits=3)
    back = np.zeros_like(packed)
    alloc, size = SIZE(), SIZE()
    rc = hooks.gqsa_test_repacked_roundtrip(GQSA3, _ptr(packed), n_kept, n_rows, _ptr(back), ctypes.byref(alloc),
                                            ctypes.byref(size))
    if not repacks(hooks):
        assert rc == 3
        pytest.skip("this build does not repack")
    assert rc == 0
    assert alloc.value == n_rows * n_kept * B3 == packed.nbytes
    assert alloc.value < n_rows * n_kept * fmt.BLOCK_BYTES
    assert size.value >= alloc.value
    np.testing.assert_array_equal(back, packed)


def test_repacking_buffer_refuses_short_rows(hooks):
    packed = codec.quantize_dense(np.ones((3, 112), np.float32), bits=3)         # 7 blocks per row
    back = np.zeros_like(packed)
    alloc, size = SIZE(), SIZE()
    rc = hooks.gqsa_test_repacked_roundtrip(GQSA3, _ptr(packed), 7, 3, _ptr(back), ctypes.byref(alloc),
                                            ctypes.byref(size))
    assert rc == (4 if repacks(hooks) else 3)


# --- tolerance (and exact on integers) -------------------------------------------------------------

def _mul_mat(hooks, type_id, packed, n_kept, width, x, threads, repacked=False):
    out = np.zeros((x.shape[0], packed.shape[0]), np.float32)
    f = hooks.gqsa_test_mul_mat_repacked_type if repacked else hooks.gqsa_test_mul_mat_type
    rc = f(type_id, _ptr(packed), n_kept, packed.shape[0], width, _ptr(x), x.shape[0], threads, _ptr(out))
    if repacked and not repacks(hooks):
        assert rc == 3
        pytest.skip(f"this build ({hooks.gqsa_test_cpu_kernels().decode()}) does not repack")
    assert rc == 0
    return out


# (width, kept fraction): short rows (2, 5 blocks: never repacked), rows of whole superblocks
# (8, 48, 128) and rows with a tail after them (18, 60, 154 and 413: LLaMA-7B's at w3s40, 516)
SHAPES = [(64, 0.5), (576, 5 / 36), (256, 0.5), (1536, 0.5), (4096, 0.5), (576, 0.5), (1536, 0.625), (4096, 0.6),
          (11008, 0.6), (11008, 0.75)]


@pytest.mark.parametrize("width,keep", SHAPES)
@pytest.mark.parametrize("repacked", [False, True], ids=["file_layout", "repacked"])
def test_mul_mat_matches_reference_and_gqsa4(hooks, width, keep, repacked):
    rng = np.random.default_rng(width + int(keep * 1000))
    n_rows = 40
    n_kept = max(1, round(width // 16 * keep))
    if repacked and n_kept < 8:
        pytest.skip("rows of fewer than 8 blocks stay in the plain CPU buffer")
    kept = np.sort(np.argsort(rng.random((n_rows, width // 16)), axis=1)[:, :n_kept], axis=1).astype(np.int32)
    packed = codec.quantize(random_weights(rng, n_rows, width), kept, bits=3)
    packed4 = widened(packed)
    for ncols in (1, 9, 35):
        x = rng.standard_normal((ncols, width)).astype(np.float32)
        kernel_math = codec.matmul_q8_ref(packed, width, x, bits=3)
        for threads in (1, 2):
            out = _mul_mat(hooks, GQSA3, packed, n_kept, width, x, threads, repacked)
            out4 = _mul_mat(hooks, GQSA4, packed4, n_kept, width, x, threads, repacked)
            assert nmse(out, codec.matmul_ref(packed, width, x, bits=3)) <= 5e-4, (ncols, threads)
            tol = 1e-5 * np.abs(kernel_math).max()
            np.testing.assert_allclose(out, kernel_math, rtol=1e-4, atol=tol)
            np.testing.assert_allclose(out, out4, rtol=1e-5, atol=tol)
            if repacked and hooks.gqsa_test_sb_kernel().decode() == "avx2":
                # the same 256-bit decode step and panel kernel as gqsa4's (GQSA_SB_512 builds: a
                # 512-bit gqsa4 step, a different summation order)
                np.testing.assert_array_equal(out, out4)


@pytest.mark.parametrize("width,keep", [(64, 0.5), (576, 0.5), (4096, 0.6), (11008, 0.75)])
@pytest.mark.parametrize("repacked", [False, True], ids=["file_layout", "repacked"])
def test_mul_mat_is_exact_on_integer_data(hooks, width, keep, repacked):
    # scales 1, activation groups with max |x| = 127: every path must give the integer sum exactly
    rng = np.random.default_rng(width + 7)
    n_rows, n_kept = 24, max(1, round(width // 16 * keep))
    kept = np.sort(np.argsort(rng.random((n_rows, width // 16)), axis=1)[:, :n_kept], axis=1).astype(np.int32)
    q = rng.integers(0, 8, (n_rows, n_kept, fmt.GROUP_SIZE))
    z = rng.integers(0, 8, (n_rows, n_kept))
    packed = codec.pack(kept, q, z, np.ones((n_rows, n_kept), np.float32), bits=3)
    x = rng.integers(-127, 128, (1, width)).astype(np.float32)
    x[0, ::fmt.GROUP_SIZE] = rng.choice([-127.0, 127.0], width // fmt.GROUP_SIZE)
    if repacked and n_kept < 8:
        pytest.skip("rows of fewer than 8 blocks stay in the plain CPU buffer")
    out = _mul_mat(hooks, GQSA3, packed, n_kept, width, x, 1, repacked)
    xg = x[0].reshape(-1, fmt.GROUP_SIZE).astype(np.int64)
    want = ((q * xg[kept]).sum(-1) - z * xg[kept].sum(-1)).sum(-1)
    np.testing.assert_array_equal(out[0], want.astype(np.float32))


@pytest.mark.parametrize("n_kept", [1, 7, 8, 17, 64, 65, 200])
def test_vec_dot_matches_scalar_reference(hooks, n_kept):
    rng = np.random.default_rng(n_kept + 50)
    width = max(n_kept, 40) * 16
    kept = np.sort(np.argsort(rng.random((3, width // 16)), axis=1)[:, :n_kept], axis=1).astype(np.int32)
    packed = codec.quantize(rng.standard_normal((3, width)).astype(np.float32), kept, bits=3)
    x = rng.standard_normal(width).astype(np.float32)
    for r in range(3):
        row = np.ascontiguousarray(packed[r])
        simd, scalar = ctypes.c_float(), ctypes.c_float()
        assert hooks.gqsa_test_vec_dot_type(GQSA3, _ptr(row), n_kept, _ptr(x), width, 0, ctypes.byref(simd)) == 0
        assert hooks.gqsa_test_vec_dot_type(GQSA3, _ptr(row), n_kept, _ptr(x), width, 1, ctypes.byref(scalar)) == 0
        exact = codec.matmul_q8_ref(packed[r:r + 1], width, x[None], bits=3)[0, 0]
        scale = np.abs(codec.dequantize(packed[r:r + 1], width, bits=3)).sum() * np.abs(x).max()
        assert abs(scalar.value - exact) <= 1e-5 * scale
        assert abs(simd.value - exact) <= 1e-5 * scale


# --- hostile ---------------------------------------------------------------------------------------

def _validate(hooks, packed, width):
    err = ctypes.create_string_buffer(512)
    ne0 = packed.shape[1] // B3 * 16
    ok = hooks.gqsa_test_validate_type(GQSA3, _ptr(packed), ne0, packed.shape[0], width, err, len(err))
    return bool(ok), err.value.decode()


def _set(packed, row, block, *, index=None, zero=None, d_bits=None):
    b = packed.reshape(packed.shape[0], -1, B3)
    iz = int(b[row, block, 2]) | int(b[row, block, 3]) << 8
    if index is not None:
        iz = (iz & 0xF000) | index
    if zero is not None:
        iz = (iz & 0x0FFF) | zero << 12
    b[row, block, 2:4] = (iz & 0xFF, iz >> 8)
    if d_bits is not None:
        b[row, block, 0:2] = (d_bits & 0xFF, d_bits >> 8)


def test_validator_names_each_broken_rule(hooks, ggml):
    rng = np.random.default_rng(21)
    width, n_rows = 576, 6
    kept = random_kept(rng, n_rows, width, 0.5)
    good = codec.quantize(rng.standard_normal((n_rows, width)).astype(np.float32), kept, bits=3)
    assert _validate(hooks, good, width) == (True, "")
    assert ggml.ggml_validate_row_data(GQSA3, _ptr(good), good.nbytes)

    for z in range(8, 16):                                      # zero points only gqsa4 has
        bad = good.copy()
        _set(bad, 2, 3, zero=z)
        ok, msg = _validate(hooks, bad, width)
        assert not ok and "test.weight" in msg and "row 2 block 3" in msg and f"zero point {z} > 7" in msg
        assert not ggml.ggml_validate_row_data(GQSA3, _ptr(bad), bad.nbytes)
        with pytest.raises(codec.GQSAFormatError):
            codec.validate(bad, width, bits=3)
    for index, what in ((36, "group index 36 >= 36"), (int(kept[1, 3]), "strictly increase")):
        bad = good.copy()
        _set(bad, 1, 4, index=index)
        ok, msg = _validate(hooks, bad, width)
        assert not ok and "row 1 block 4" in msg and what in msg
        with pytest.raises(codec.GQSAFormatError):
            codec.validate(bad, width, bits=3)
    for d_bits in (0x7C00, 0xFC00, 0x7E00):
        bad = good.copy()
        _set(bad, 4, 0, d_bits=d_bits)
        ok, msg = _validate(hooks, bad, width)
        assert not ok and "row 4 block 0" in msg and "not finite" in msg
        assert not ggml.ggml_validate_row_data(GQSA3, _ptr(bad), bad.nbytes)
    ok, msg = _validate(hooks, good, kept.shape[1] * 16 - 16)
    assert not ok and "does not fit" in msg
