"""The NumPy reference codec against docs/FORMAT.md: exact round trips, the quantizer's special
cases against a scalar transcription of the spec, validation of every rule, and the matmul refs."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from gqsa_gguf import codec
from gqsa_gguf.codec import GQSAFormatError
from gqsa_gguf.format import (
    ACT_BLOCK_BYTES,
    BLOCK_BYTES,
    BLOCK_DTYPE,
    GROUP_SIZE,
    INDEX_BITS,
    MAX_GROUPS_PER_ROW,
    QMAX,
)


def random_tensor(rng, n_rows, n_groups, n_kept, d_std=None):
    """Random valid kept-group arrays: sorted unique indices, q, z, finite fp16 scales (any, or
    normal with standard deviation d_std, for sums that stay far from overflow)."""
    idx = np.sort(np.argsort(rng.random((n_rows, n_groups)), axis=1)[:, :n_kept], axis=1)
    q = rng.integers(0, QMAX + 1, (n_rows, n_kept, GROUP_SIZE))
    z = rng.integers(0, QMAX + 1, (n_rows, n_kept))
    bits = rng.integers(0, 0x7C00, (n_rows, n_kept), dtype=np.uint16)       # finite, positive
    sign = rng.integers(0, 2, (n_rows, n_kept), dtype=np.uint16) << 15
    d = (bits | sign).view(np.float16)
    if d_std is not None:
        d = (rng.standard_normal((n_rows, n_kept)) * d_std).astype(np.float16)
    return idx, q, z, d


def sparse_kept(rng, n_rows, n_groups, n_kept):
    return np.sort(np.argsort(rng.random((n_rows, n_groups)), axis=1)[:, :n_kept], axis=1)


# --- exact: packing ------------------------------------------------------------------------------

@pytest.mark.parametrize("n_rows,n_groups,n_kept", [(1, 1, 1), (3, 4, 2), (17, 37, 9), (5, 64, 64),
                                                    (2, MAX_GROUPS_PER_ROW, 1000)])
def test_pack_unpack_round_trip(n_rows, n_groups, n_kept):
    rng = np.random.default_rng(n_rows * 1000 + n_kept)
    idx, q, z, d = random_tensor(rng, n_rows, n_groups, n_kept)
    packed = codec.pack(idx, q, z, d)
    assert packed.dtype == np.uint8 and packed.shape == (n_rows, n_kept * BLOCK_BYTES)
    for data, n in ((packed, None), (packed.tobytes(), n_rows), (packed.reshape(-1), n_rows)):
        i2, q2, z2, d2 = codec.unpack(data, n)
        assert i2.dtype == np.int32 and q2.dtype == np.uint8 and z2.dtype == np.uint8 and d2.dtype == np.float16
        np.testing.assert_array_equal(i2, idx)
        np.testing.assert_array_equal(q2, q)
        np.testing.assert_array_equal(z2, z)
        np.testing.assert_array_equal(d2.view(np.uint16), d.view(np.uint16))   # bit-exact, signs too
    codec.validate(packed, n_groups * GROUP_SIZE, "t")


def test_block_bytes_follow_the_diagram():
    """One block built with struct from the FORMAT.md diagram, independently of BLOCK_DTYPE."""
    rng = np.random.default_rng(1)
    idx, q, z, d = random_tensor(rng, 4, 300, 7)
    packed = codec.pack(idx, q, z, d)
    for r in range(4):
        for b in range(7):
            nib = [int(q[r, b, j]) | (int(q[r, b, j + 8]) << 4) for j in range(8)]
            want = struct.pack("<eH8B", float(d[r, b]), int(idx[r, b]) | (int(z[r, b]) << INDEX_BITS), *nib)
            assert packed[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES].tobytes() == want


def test_pack_rounds_scale_to_fp16():
    rng = np.random.default_rng(2)
    idx, q, z, _ = random_tensor(rng, 3, 8, 4)
    d32 = rng.standard_normal((3, 4)).astype(np.float32) * 0.01
    _, _, _, d2 = codec.unpack(codec.pack(idx, q, z, d32))
    np.testing.assert_array_equal(d2, d32.astype(np.float16))


@pytest.mark.parametrize("field,value,msg", [
    ("q", 16, "outside 0..15"), ("q", -1, "outside 0..15"), ("q", 2.5, "not an integer"),
    ("z", 16, "outside 0..15"), ("idx", MAX_GROUPS_PER_ROW, "outside"), ("idx", -1, "outside"),
    ("d", 1e6, "not finite in fp16"), ("d", np.nan, "not finite"), ("d", np.inf, "not finite"),
])
def test_pack_rejects_out_of_range(field, value, msg):
    rng = np.random.default_rng(3)
    idx, q, z, d = random_tensor(rng, 2, 8, 3)
    arrays = {"idx": idx.astype(np.float64 if field == "idx" else idx.dtype), "q": q.astype(np.float64),
              "z": z.astype(np.float64), "d": d.astype(np.float64)}
    if field == "idx" and value == MAX_GROUPS_PER_ROW:
        arrays["idx"][1, 2] = value                      # last index: order stays valid
    else:
        arrays[field][(1, 0) if field != "q" else (1, 0, 5)] = value
    with pytest.raises(GQSAFormatError, match=msg):
        codec.pack(arrays["idx"], arrays["q"], arrays["z"], arrays["d"])


@pytest.mark.parametrize("row", [[3, 1, 5], [2, 2, 5]])
def test_pack_rejects_unsorted_or_duplicate_indices(row):
    idx = np.array([[0, 1, 2], row])
    with pytest.raises(GQSAFormatError, match="row 1 block 1"):
        codec.pack(idx, np.zeros((2, 3, 16)), np.zeros((2, 3)), np.ones((2, 3)))


# --- exact: the reference quantizer ----------------------------------------------------------------

def spec_quantize_one(x):
    """docs/FORMAT.md "Reference quantizer", transcribed line by line with float32 scalars and
    struct's binary16 conversion: a second code path, as a C scalar loop would be."""
    f32 = np.float32
    x = [f32(v) for v in x]
    lo = min(min(x), f32(0))
    hi = max(max(x), f32(0))
    with np.errstate(over="ignore"):                   # hi - lo may overflow to inf: d clamps below
        s = f32(hi - lo) / f32(15)
    try:
        d = struct.unpack("<e", struct.pack("<e", float(s)))[0]       # float32 -> fp16 exact via double
    except OverflowError:
        d = float("inf")
    if s > 0 and d == 0:
        d = 2.0 ** -24
    if d > 65504:
        d = 65504.0
    if d == 0:
        return [0] * 16, 0, 0.0
    df = f32(d)
    z = int(min(max(np.rint(f32(-lo) / df), 0), 15))
    q = [int(min(max(np.rint(v / df) + z, 0), 15)) for v in x]
    return q, z, d


def check_against_spec(groups):
    q, z, d = codec.quantize_groups(groups)
    assert q.dtype == np.uint8 and z.dtype == np.uint8 and d.dtype == np.float16
    for i, g in enumerate(groups):
        q_ref, z_ref, d_ref = spec_quantize_one(g)
        assert list(q[i]) == q_ref and z[i] == z_ref, f"group {i}: {g}"
        assert np.float16(d_ref).view(np.uint16) == d[i].view(np.uint16), f"group {i}: {g}"
    return q, z, d


def test_quantizer_matches_spec_transcription_on_random_scales():
    rng = np.random.default_rng(4)
    scales = 10.0 ** rng.uniform(-12, 6, (400, 1))
    groups = (rng.standard_normal((400, 16)) * scales).astype(np.float32)
    groups[::7] = np.abs(groups[::7])                    # all-positive groups
    groups[::11] = -np.abs(groups[::11])                 # all-negative groups
    check_against_spec(groups)


def test_quantizer_all_zero_group():
    q, z, d = check_against_spec(np.zeros((2, 16), np.float32) * np.array([[1.0], [-1.0]], np.float32))
    assert (q == 0).all() and (z == 0).all()
    assert (d.view(np.uint16) == 0).all()                # +0, never -0


def test_quantizer_all_positive_and_all_negative_groups():
    x = np.linspace(0.5, 3.0, 16, dtype=np.float32)
    q, z, d = check_against_spec(np.stack([x, -x]))
    assert z[0] == 0 and q[0, -1] == QMAX                # range [0, max]: zero point 0, max -> 15
    assert z[1] == QMAX and q[1, -1] == 0                # range [min, 0]: zero point 15, min -> 0
    assert d[0] == np.float16(np.float32(3.0) / np.float32(15))


def test_quantizer_rounds_half_to_even():
    # range [0, 15] gives s = d = 1 exactly, so x/d lands exactly on the .5 ties
    x = np.array([0, 15, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5, 10.5, 11.5, 12.5, 13.5], np.float32)
    q, z, d = check_against_spec(x[None])
    assert d[0] == 1 and z[0] == 0
    np.testing.assert_array_equal(q[0, 2:], [0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14])


def test_quantizer_tiny_scale_uses_smallest_subnormal():
    x = np.array([1e-10, -3e-10] + [0] * 14, np.float32)  # s ~ 2.7e-11 rounds to fp16 zero
    q, z, d = check_against_spec(x[None])
    assert d[0].view(np.uint16) == 0x0001                # 2^-24
    assert 0 <= z[0] <= QMAX and (q <= QMAX).all()


@pytest.mark.parametrize("big", [1e6, 1e30, 3.0e38])
def test_quantizer_huge_values_clamp_scale(big):
    x = np.array([big, -big, 1.0] + [0] * 13, np.float32)   # at 3e38, hi - lo overflows to inf
    q, z, d = check_against_spec(x[None])
    assert d[0] == np.float16(65504)
    assert q[0, 0] == QMAX and q[0, 1] == 0


def test_quantizer_refuses_non_finite():
    x = np.zeros((1, 16), np.float32)
    x[0, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        codec.quantize_groups(x)


def test_quantize_error_is_bounded_by_the_scale():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 128)).astype(np.float32)
    packed = codec.quantize_dense(w)
    _, _, _, d = codec.unpack(packed)
    err = np.abs(codec.dequantize(packed, 128) - w).reshape(6, 8, 16)
    assert (err <= d.astype(np.float32)[..., None] * (1 + 1e-6)).all()
    assert err.mean() < 0.3 * d.astype(np.float32).mean()   # mostly half a step or less, not clipped


def test_sparse_quantize_equals_dense_at_the_kept_groups():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((9, 160)).astype(np.float32)
    kept = sparse_kept(rng, 9, 10, 4)
    sparse = codec.quantize(w, kept).reshape(9, 4, BLOCK_BYTES)
    dense = codec.quantize_dense(w).reshape(9, 10, BLOCK_BYTES)
    np.testing.assert_array_equal(sparse, np.take_along_axis(dense, kept[:, :, None], axis=1))
    assert (codec.unpack(codec.quantize_dense(w))[0] == np.arange(10)).all()


@pytest.mark.parametrize("bad", [[[0, 10]], [[-1, 3]], [[2, 1]]])
def test_quantize_rejects_bad_kept(bad):
    w = np.ones((1, 160), np.float32)
    with pytest.raises((GQSAFormatError, ValueError)):
        codec.quantize(w, np.array(bad))


# --- exact: dequantization ------------------------------------------------------------------------

def test_dequantize_matches_formula():
    rng = np.random.default_rng(7)
    n_rows, n_groups, n_kept = 5, 12, 5
    idx, q, z, d = random_tensor(rng, n_rows, n_groups, n_kept, d_std=0.05)
    packed = codec.pack(idx, q, z, d)
    dense = codec.dequantize(packed, n_groups * GROUP_SIZE)
    stored = codec.dequantize_stored(packed)
    assert dense.dtype == np.float32 and dense.shape == (n_rows, n_groups * GROUP_SIZE)
    assert stored.shape == (n_rows, n_kept * GROUP_SIZE)
    expect = np.zeros((n_rows, n_groups * GROUP_SIZE))
    for r in range(n_rows):
        for b in range(n_kept):
            for j in range(GROUP_SIZE):
                v = (int(q[r, b, j]) - int(z[r, b])) * float(d[r, b])   # exact in double
                expect[r, GROUP_SIZE * idx[r, b] + j] = v
                assert stored[r, GROUP_SIZE * b + j] == v
    np.testing.assert_array_equal(dense, expect)


# --- validation ----------------------------------------------------------------------------------

def valid_packed(n_rows=4, n_groups=10, n_kept=5, seed=8):
    rng = np.random.default_rng(seed)
    return codec.pack(*random_tensor(rng, n_rows, n_groups, n_kept)).copy()


def set_block(packed, row, block, **fields):
    blocks = packed.view(BLOCK_DTYPE).reshape(packed.shape[0], -1)
    for k, v in fields.items():
        blocks[k][row, block] = v


@pytest.mark.parametrize("width,msg", [(150, "not a positive multiple"), (0, "not a positive multiple"),
                                       (16 * (MAX_GROUPS_PER_ROW + 1), "12-bit group index"),
                                       (64, "exceed the 4 groups")])
def test_validate_rule1_widths(width, msg):
    with pytest.raises(GQSAFormatError, match=msg):
        codec.validate(valid_packed(), width, "w")


@pytest.mark.parametrize("cols", [0, 13, 25])
def test_validate_rule1_row_bytes(cols):
    with pytest.raises(GQSAFormatError, match="multiple of the 12-byte block"):
        codec.validate(np.zeros((2, cols), np.uint8), 160, "w")


def test_validate_rule2_index_out_of_range():
    packed = valid_packed()
    set_block(packed, 2, 4, iz=(7 << INDEX_BITS) | 10)   # last block of row 2: index 10 >= 10 groups
    with pytest.raises(GQSAFormatError) as e:
        codec.validate(packed, 160, "blk.3.ffn_down.weight")
    msg = str(e.value)
    for part in ("'blk.3.ffn_down.weight'", "row 2", "block 4", "group index 10", ">= 10 groups", "160"):
        assert part in msg


@pytest.mark.parametrize("prev", [0, 1])             # equal (duplicate) or larger than the next
def test_validate_rule2_order(prev):
    packed = valid_packed()
    idx = codec.unpack(packed)[0]
    set_block(packed, 1, 2, iz=int(idx[1, 3]) + prev)
    with pytest.raises(GQSAFormatError, match=r"row 1 block 3: .*strictly increasing"):
        codec.validate(packed, 160, "w")


@pytest.mark.parametrize("bits", [0x7C00, 0xFC00, 0x7E00, 0x7C01])
def test_validate_rule3_scale_finite(bits):
    packed = valid_packed()
    set_block(packed, 3, 0, d=np.uint16(bits).view(np.float16))
    with pytest.raises(GQSAFormatError, match=f"row 3 block 0: scale .*0x{bits:04x}"):
        codec.validate(packed, 160, "w")


def test_validate_accepts_zero_scale_and_full_row():
    packed = valid_packed(n_kept=10)
    set_block(packed, 0, 0, d=0.0)
    codec.validate(packed, 160, "w")


# --- tolerance: matmul references ------------------------------------------------------------------

def nmse(a, b):
    return float(np.sum((np.asarray(a, np.float64) - b) ** 2) / np.sum(np.asarray(b, np.float64) ** 2))


def test_matmul_refs_agree():
    rng = np.random.default_rng(9)
    n_rows, width = 24, 256
    w = rng.standard_normal((n_rows, width)).astype(np.float32)
    packed = codec.quantize(w, sparse_kept(rng, n_rows, width // 16, 8))
    x = rng.standard_normal((3, width)).astype(np.float32)
    y = codec.matmul_ref(packed, width, x)
    assert y.dtype == np.float32 and y.shape == (3, n_rows)
    y64 = x.astype(np.float64) @ codec.dequantize(packed, width).astype(np.float64).T
    np.testing.assert_allclose(y, y64, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(codec.matmul_ref(packed, width, x[1]), y[1])

    y8 = codec.matmul_q8_ref(packed, width, x)
    assert y8.shape == (3, n_rows)
    err = nmse(y8, y64)
    assert 0 < err < 5e-4                                # q8 activations: small but real error


def test_act_dot_is_the_kernel_formula():
    rng = np.random.default_rng(10)
    n_rows, n_groups, n_kept = 3, 6, 4
    idx, q, z, d = random_tensor(rng, n_rows, n_groups, n_kept, d_std=0.1)
    packed = codec.pack(idx, q, z, d)
    x = rng.standard_normal((2, n_groups * GROUP_SIZE)).astype(np.float32)
    d_x, s_x, qs_x = codec.quantize_act(x)
    got = codec.act_dot(packed, n_groups * GROUP_SIZE, (d_x, s_x, qs_x))
    for c in range(2):
        for r in range(n_rows):
            acc = 0.0
            for b in range(n_kept):
                g = idx[r, b]
                isum = sum(int(q[r, b, j]) * int(qs_x[c, g, j]) for j in range(GROUP_SIZE))
                acc += float(d[r, b]) * (float(d_x[c, g]) * isum - int(z[r, b]) * float(s_x[c, g]))
            assert got[c, r] == pytest.approx(acc, rel=1e-12, abs=1e-12)
    # the dequantized weights times the dequantized activations give the same product, up to the
    # float32 rounding of s_x = d_x * sum(qs) that the kernel uses
    x_deq = (d_x[..., None].astype(np.float64) * qs_x).reshape(2, -1)
    ref = x_deq @ codec.dequantize(packed, n_groups * GROUP_SIZE).astype(np.float64).T
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_quantize_act_formula_and_layout():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 48)).astype(np.float32)
    x[1, 16:32] = 0                                      # an all-zero group
    d, s, qs = codec.quantize_act(x)
    assert d.dtype == np.float32 and s.dtype == np.float32 and qs.dtype == np.int8
    assert d[1, 1] == 0 and s[1, 1] == 0 and (qs[1, 1] == 0).all()
    g = x.reshape(2, 3, 16)
    for c in range(2):
        for k in range(3):
            if d[c, k] == 0:
                continue
            assert d[c, k] == np.abs(g[c, k]).max() / np.float32(127)
            np.testing.assert_array_equal(qs[c, k], np.rint(g[c, k] / d[c, k]))
            assert np.abs(qs[c, k]).max() == 127
            assert s[c, k] == d[c, k] * np.float32(int(qs[c, k].astype(int).sum()))
    blob = codec.pack_act(d, s, qs)
    assert blob.shape == (2, 3 * ACT_BLOCK_BYTES)
    want = struct.pack("<ff16b", float(d[0, 2]), float(s[0, 2]), *qs[0, 2].tolist())
    assert blob[0, 2 * ACT_BLOCK_BYTES:3 * ACT_BLOCK_BYTES].tobytes() == want
