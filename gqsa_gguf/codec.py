"""NumPy reference codec of the GQSA tensor format: the ground truth for every other implementation.

docs/FORMAT.md is the specification; this module implements it literally and vectorised. The C
scalar path (native/src/ggml/include/gqsa.h), the CPU SIMD paths and the PyTorch fake-quant are
tested against it. The CUDA kernels (native/src/ggml/src/ggml-cuda/gqsa.cu, gqsa-kernels.cuh)
are checked on a GPU against a C++ dense reference and ggml's CPU backend (native/cuda/
gqsa_harness.cu, gqsa_ggml_check.cpp), not against this module directly.

Vocabulary (one weight matrix W[N, K], N output rows, K = `width` input columns):

    group      16 consecutive weights of a row along K; a row has G = K/16 of them
    kept       every row keeps the same number n_kept of groups; the others are pruned (zero)
    block      one kept group on disk: 12 bytes = fp16 d, uint16 iz = g | z << 12, 8 bytes of nibbles
               (gqsa3: 10 bytes, the same header, then 4 bytes of 2-bit pairs and 2 of third bits)
    packed     uint8 [N, n_kept * 12]: the rows of a gqsa4 tensor exactly as stored in the GGUF

The type is the code width `bits` (4: gqsa4, the default; 3: gqsa3), an argument of every function
that reads or writes codes or packed rows: a packed row's bytes alone do not say which it is.

What goes in and out:

    quantize_groups(x[..., 16] f32)           -> q u8 [..., 16], z u8 [...], d f16 [...]
    pack(indices, q, z, d)                    -> packed          (validates ranges and order)
    unpack(packed)                            -> indices i32, q u8, z u8, d f16
    quantize(w[N, K], kept[N, n_kept])        -> packed          (min-max of the kept groups)
    quantize_dense(w[N, K])                   -> packed          (all groups kept: C's quantize_row_gqsa4_ref)
    dequantize(packed, width)                 -> f32 [N, width]  (zeros in pruned groups)
    dequantize_stored(packed)                 -> f32 [N, n_kept*16] (storage order: ggml's to_float)
    validate(packed, width, name)             -> None or GQSAFormatError (the rules of FORMAT.md)
    matmul_ref(packed, width, x[ncols, K])    -> f32 [ncols, N]  (x @ W.T accumulated in float64)
    quantize_act / pack_act / act_dot / matmul_q8_ref: the runtime gqsa_q8 activation path

Invariants: `unpack(pack(...))` returns its inputs exactly (d after rounding to fp16);
`quantize_groups` is bit-exact with the C `quantize_row_gqsa4_ref` (float32 arithmetic, rint =
round half to even); dequantization `(q - z) * d` is exact in float32 (a 5-bit integer times an
11-bit significand), so every implementation must produce identical weights.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .errors import GQSAError
from .format import (
    ACT_BLOCK_BYTES,
    FP16_MAX,
    FP16_MIN_SUBNORMAL,
    GROUP_SIZE,
    INDEX_MASK,
    MAX_GROUPS_PER_ROW,
    QMAX,
    ZERO_SHIFT,
    GQSA4,
    GQSAType,
    gqsa_type,
    qmax_of,
)

__all__ = [
    "GQSAFormatError",
    "ACT_BLOCK_DTYPE",
    "quantize_groups",
    "pack",
    "unpack",
    "quantize",
    "quantize_dense",
    "dequantize",
    "dequantize_stored",
    "validate",
    "matmul_ref",
    "quantize_act",
    "pack_act",
    "act_dot",
    "matmul_q8_ref",
]

_HALF = GROUP_SIZE // 2
_FP16_EXP_MASK = 0x7C00                                   # all-ones exponent: inf or NaN

# One gqsa_q8 activation block (runtime only, never in files): x[j] ~ d * qs[j], s = d * sum(qs).
ACT_BLOCK_DTYPE = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", (GROUP_SIZE,))])
assert ACT_BLOCK_DTYPE.itemsize == ACT_BLOCK_BYTES


class GQSAFormatError(GQSAError, ValueError):
    """A GQSA tensor (or the arrays meant to become one) breaks a rule of docs/FORMAT.md."""


def _type(bits: int) -> GQSAType:
    try:
        return gqsa_type(bits)
    except ValueError as e:
        raise GQSAFormatError(str(e)) from None


def _at(name: str | None, row: int | None = None, block: int | None = None) -> str:
    parts = []
    if name is not None:
        parts.append(f"tensor '{name}'")
    if row is not None:
        parts.append(f"row {row}")
    if block is not None:
        parts.append(f"block {block}")
    return (" ".join(parts) + ": ") if parts else ""


def _first(mask: np.ndarray) -> tuple[int, ...]:
    """Index of the first True of `mask` in C order."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask.reshape(-1))), mask.shape))


def _first_not_increasing(idx: np.ndarray) -> tuple[int, int] | None:
    """(row, block) of the first kept index [N, n_kept] not above the one before it, or None."""
    if idx.shape[1] < 2:
        return None
    bad = np.diff(idx, axis=1) <= 0
    return _first(bad) if bad.any() else None


def _check_width(width: int, name: str | None) -> int:
    """Rule 1 for the logical width; returns the number of groups K/16."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)):
        raise TypeError(f"{_at(name)}width must be an int, got {type(width).__name__}")
    width = int(width)
    if width <= 0 or width % GROUP_SIZE:
        raise GQSAFormatError(f"{_at(name)}logical width {width} is not a positive multiple of the "
                              f"group size {GROUP_SIZE} — GQSA needs K divisible by {GROUP_SIZE}")
    n_groups = width // GROUP_SIZE
    if n_groups > MAX_GROUPS_PER_ROW:
        raise GQSAFormatError(f"{_at(name)}logical width {width} has {n_groups} groups, more than the "
                              f"{MAX_GROUPS_PER_ROW} a 12-bit group index can address — keep this "
                              f"tensor in a stock type")
    return n_groups


def _as_packed(packed: np.ndarray, name: str | None, t: GQSAType = GQSA4) -> np.ndarray:
    """Checks the container shape of packed rows; returns them as a C-contiguous uint8 [N, row_bytes]."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise TypeError(f"{_at(name)}packed rows must be a uint8 array [N, n_kept*{t.block_bytes}], "
                        f"got {packed.dtype} with shape {packed.shape}")
    row_bytes = packed.shape[1]
    if row_bytes == 0 or row_bytes % t.block_bytes:
        raise GQSAFormatError(f"{_at(name)}a row has {row_bytes} bytes, not a positive multiple of the "
                              f"{t.block_bytes}-byte block — the data is truncated or not a {t.name} tensor")
    return np.ascontiguousarray(packed)


def _blocks(packed: np.ndarray, t: GQSAType = GQSA4) -> np.ndarray:
    """View of C-contiguous packed rows as the type's block dtype [N, n_kept] (no copy)."""
    return packed.view(t.block_dtype).reshape(packed.shape[0], packed.shape[1] // t.block_bytes)


def _integers(a, what: str, shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    """Checks that `a` has `shape` and holds integers in [lo, hi]; returns it as int64."""
    a = np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{what} has shape {a.shape}, expected {shape}")
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TypeError(f"{what} must hold integers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a) | (a != np.rint(a))
        if bad.any():
            at = _first(bad)
            raise GQSAFormatError(f"{what}{list(at)} = {a[at]!r} is not an integer — round before packing")
    bad = (a < lo) | (a > hi)
    if bad.any():
        at = _first(bad)
        raise GQSAFormatError(f"{what}{list(at)} = {a[at]!r} is outside {lo}..{hi}")
    return a.astype(np.int64)


# --- min-max quantizer -------------------------------------------------------------------------

def quantize_groups(x, bits: int = 4) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max quantizes groups of 16 to `bits`-bit codes (docs/FORMAT.md "Reference quantizer"),
    bit-exact with C.

    x: float32 [..., 16] (other float dtypes are converted to float32 first; non-finite values are
    refused). Returns q uint8 [..., 16], z uint8 [...], d float16 [...]. An all-zero group gets
    d = +0, z = 0, q = 0.
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] != GROUP_SIZE:
        raise ValueError(f"quantize_groups needs groups of {GROUP_SIZE} in the last axis, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        at = _first(~np.isfinite(x))
        raise ValueError(f"non-finite weight {x[at]} at {list(at)} — the model has NaN/inf weights")

    _type(bits)                                           # a width the format stores, else GQSAFormatError
    with np.errstate(over="ignore"):                      # hi - lo may overflow to inf: d clamps below
        return minmax_groups(x, _NumPyOps, qmax_of(bits))


# The rule itself, written once for both array libraries: the NumPy reference above and the torch
# path of the one-shot pass (`oneshot.quantize_groups_torch`) pass their own primitives, so both run
# the same float32 operations in the same order and agree bit for bit.

class _NumPyOps:
    f32, f16, u8 = np.float32, np.float16, np.uint8
    const = staticmethod(lambda v, dtype: dtype(v))
    amin = staticmethod(lambda x: x.min(axis=-1))
    amax = staticmethod(lambda x: x.max(axis=-1))
    minimum, maximum, where, clip = np.minimum, np.maximum, np.where, np.clip
    rint = np.rint                                        # half to even
    cast = staticmethod(lambda x, dtype: x.astype(dtype))


def minmax_groups(x, ops=_NumPyOps, qmax: int | None = None):
    """(q, z, d) of finite float32 groups x [..., 16] (docs/FORMAT.md "Reference quantizer"), with
    `ops` the array library's primitives (`_NumPyOps`, or oneshot's torch ones) and codes 0..qmax
    (default gqsa4's 15). An all-zero group gets d = +0, z = 0, q = 0."""
    qmax = QMAX if qmax is None else qmax
    f32, f16 = ops.f32, ops.f16
    lo = ops.minimum(ops.amin(x), ops.const(0, f32))      # the range always contains 0
    hi = ops.maximum(ops.amax(x), ops.const(0, f32))
    s = (hi - lo) / ops.const(qmax, f32)                  # float32 subtract and divide, as in C
    d = ops.cast(s, f16)                                  # round to nearest even; overflow -> inf
    d = ops.where((s > 0) & (d == 0), ops.const(FP16_MIN_SUBNORMAL, f16), d)
    d = ops.where(d > FP16_MAX, ops.const(FP16_MAX, f16), d)
    d = ops.cast(ops.where(s == 0, ops.const(0.0, f16), d), f16)   # all-zero group: d = +0 (never -0)

    df = ops.cast(d, f32)
    zero = df == 0
    safe = ops.where(zero, ops.const(1, f32), df)         # avoid 0/0; those groups are zeroed below
    z = ops.clip(ops.rint(-lo / safe), 0, qmax)
    z = ops.where(zero, ops.const(0, f32), z)
    q = ops.clip(ops.rint(x / safe[..., None]) + z[..., None], 0, qmax)   # clamp in float, then convert
    q = ops.where(zero[..., None], ops.const(0, f32), q)
    return ops.cast(q, ops.u8), ops.cast(z, ops.u8), d


# --- packing -----------------------------------------------------------------------------------

def pack(indices, q, z, d, bits: int = 4) -> np.ndarray:
    """Packs kept groups into gqsa4 rows, uint8 [N, n_kept*12] (bits=3: gqsa3, [N, n_kept*10]).

    indices: ints [N, n_kept], strictly increasing per row, < 4096; q: ints 0..15 [N, n_kept, 16]
    and z: ints 0..15 [N, n_kept] (gqsa3: both 0..7); d: floats [N, n_kept], rounded here to fp16
    (round to nearest even from the precision given) and required finite. Integral float arrays are
    accepted for the ints.
    """
    indices = np.asarray(indices)
    if indices.ndim != 2 or indices.shape[1] == 0:
        raise ValueError(f"indices must be [N, n_kept] with n_kept >= 1, got shape {indices.shape}")
    n_rows, n_kept = indices.shape
    idx = _integers(indices, "indices", (n_rows, n_kept), 0, MAX_GROUPS_PER_ROW - 1)
    unsorted = _first_not_increasing(idx)
    if unsorted is not None:
        r, b = unsorted
        raise GQSAFormatError(f"row {r} block {b + 1}: group index {idx[r, b + 1]} does not follow "
                              f"{idx[r, b]} — the kept indices of a row must be sorted and unique")
    t = _type(bits)
    qi = _integers(q, "q", (n_rows, n_kept, GROUP_SIZE), 0, qmax_of(t.bits))
    zi = _integers(z, "z", (n_rows, n_kept), 0, qmax_of(t.bits))

    d = np.asarray(d)
    if d.shape != (n_rows, n_kept):
        raise ValueError(f"d has shape {d.shape}, expected {(n_rows, n_kept)}")
    if not np.issubdtype(d.dtype, np.floating):
        raise TypeError(f"d must be floating point, got dtype {d.dtype}")
    with np.errstate(over="ignore"):
        d16 = d.astype(np.float16)
    bad = ~np.isfinite(d16)
    if bad.any():
        r, b = _first(bad)
        raise GQSAFormatError(f"row {r} block {b}: scale {d[r, b]!r} is not finite in fp16 (|d| <= "
                              f"{FP16_MAX:g}) — rescale the weights or keep this tensor in a stock type")

    blocks = np.empty((n_rows, n_kept), dtype=t.block_dtype)
    blocks["d"] = d16
    blocks["iz"] = (idx | (zi << ZERO_SHIFT)).astype(np.uint16)
    if t is GQSA4:
        blocks["qs"] = (qi[..., :_HALF] | (qi[..., _HALF:] << 4)).astype(np.uint8)
    else:                                                 # ql[j]: codes j, j+4, j+8, j+12, 2 bits each
        low = (qi & 3).reshape(n_rows, n_kept, 4, 4)      # [.., s, j] = code 4s + j
        blocks["ql"] = (low << (2 * np.arange(4))[:, None]).sum(axis=2).astype(np.uint8)
        blocks["qh"] = ((qi >> 2) << np.arange(GROUP_SIZE)).sum(axis=-1).astype(np.uint16)
    return blocks.view(np.uint8).reshape(n_rows, n_kept * t.block_bytes)


def unpack(data, n_rows: int | None = None, bits: int = 4):
    """Splits packed rows of the `bits`-bit type into (indices int32 [N, n_kept], q uint8 [N, n_kept, 16],
    z uint8 [N, n_kept], d float16 [N, n_kept]). `data` is uint8 [N, row_bytes], or raw bytes / 1-D
    uint8 with `n_rows`.

    Checks only the container (row length a multiple of the block); use `validate` for the content rules.
    """
    t = _type(bits)
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise TypeError(f"packed data must be uint8, got {data.dtype}")
    if data.ndim == 1:
        if n_rows is None or n_rows <= 0 or data.size % n_rows:
            raise ValueError(f"{data.size} bytes of flat data need n_rows dividing them, got n_rows={n_rows}")
        data = data.reshape(n_rows, data.size // n_rows)
    elif data.ndim != 2 or (n_rows is not None and n_rows != data.shape[0]):
        raise ValueError(f"packed data has shape {data.shape}, expected [{n_rows or 'N'}, row_bytes]")
    blocks = _blocks(_as_packed(data, None, t), t)
    iz = blocks["iz"]
    indices = (iz & INDEX_MASK).astype(np.int32)
    z = (iz >> ZERO_SHIFT).astype(np.uint8)
    if t is GQSA4:
        qs = blocks["qs"]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.uint8)
    else:
        ql = blocks["ql"].astype(np.uint16)[..., None, :]              # [.., 1, j]
        low = (ql >> (2 * np.arange(4, dtype=np.uint16))[:, None]) & 3    # [.., s, j] = code 4s + j
        high = (blocks["qh"][..., None] >> np.arange(GROUP_SIZE, dtype=np.uint16)) & 1
        q = (low.reshape(*low.shape[:-2], GROUP_SIZE) | (high << 2)).astype(np.uint8)
    d = blocks["d"].astype(np.float16)                    # native-endian copy
    return indices, q, z, d


def quantize(w, kept, bits: int = 4) -> np.ndarray:
    """Min-max quantizes the kept groups of w float32 [N, K] to `bits`-bit codes; kept: sorted group
    indices [N, n_kept]."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got shape {w.shape}")
    n_groups = _check_width(w.shape[1], None)
    kept = np.asarray(kept)
    if kept.ndim != 2 or kept.shape[0] != w.shape[0] or not 0 < kept.shape[1] <= n_groups:
        raise ValueError(f"kept must be [N={w.shape[0]}, n_kept] with 1 <= n_kept <= {n_groups}, "
                         f"got shape {kept.shape}")
    kept = _integers(kept, "kept", kept.shape, 0, n_groups - 1)   # before gathering: no wrap-around
    groups = w.reshape(w.shape[0], n_groups, GROUP_SIZE)
    sel = np.take_along_axis(groups, kept[:, :, None], axis=1)
    q, z, d = quantize_groups(sel, bits)
    return pack(kept, q, z, d, bits)


def quantize_dense(w, bits: int = 4) -> np.ndarray:
    """All groups kept: block j of a row holds group j (what C's quantize_row_gqsa4_ref writes)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be [N, K], got shape {w.shape}")
    n_groups = _check_width(w.shape[1], None)
    kept = np.broadcast_to(np.arange(n_groups), (w.shape[0], n_groups))
    return quantize(w, kept, bits)


# --- validation and dequantization ---------------------------------------------------------------

def validate(packed, width: int, name: str = "?", bits: int = 4) -> None:
    """Checks every rule of docs/FORMAT.md "Rules a valid tensor obeys" (gqsa3: and z <= 7);
    raises GQSAFormatError."""
    t = _type(bits)
    n_groups = _check_width(width, name)
    packed = _as_packed(packed, name, t)
    n_kept = packed.shape[1] // t.block_bytes
    if n_kept > n_groups:
        raise GQSAFormatError(f"{_at(name)}{n_kept} stored groups per row (ne0 = {n_kept * GROUP_SIZE}) "
                              f"exceed the {n_groups} groups of the logical width {width} — the file is "
                              f"corrupt or gqsa.tensor_widths is wrong")
    blocks = _blocks(packed, t)
    idx = (blocks["iz"] & INDEX_MASK).astype(np.int64)
    bad = idx >= n_groups
    if bad.any():
        r, b = _first(bad)
        raise GQSAFormatError(f"{_at(name, r, b)}group index {idx[r, b]} >= {n_groups} groups in a row of "
                              f"width {width} — the file is corrupt or was written by a newer version")
    unsorted = _first_not_increasing(idx)
    if unsorted is not None:
        r, b = unsorted
        raise GQSAFormatError(f"{_at(name, r, b + 1)}group index {idx[r, b + 1]} after {idx[r, b]}: "
                              f"indices in a row must be strictly increasing — the file is corrupt")
    d_bits = blocks["d"].view("<u2")                     # same bytes, read as the fp16 bit pattern
    bad = (d_bits & _FP16_EXP_MASK) == _FP16_EXP_MASK
    if bad.any():
        r, b = _first(bad)
        raise GQSAFormatError(f"{_at(name, r, b)}scale d = {float(blocks['d'][r, b])} (fp16 bits "
                              f"0x{int(d_bits[r, b]):04x}) is not finite — the file is corrupt")
    z = blocks["iz"] >> ZERO_SHIFT
    bad = z > t.qmax
    if bad.any():
        r, b = _first(bad)
        raise GQSAFormatError(f"{_at(name, r, b)}zero point {int(z[r, b])} > {t.qmax}, the largest "
                              f"{t.bits}-bit code of {t.name} — the file is corrupt")


def dequantize_stored(packed, bits: int = 4) -> np.ndarray:
    """The kept weights in storage order, float32 [N, n_kept*16] (ggml's to_float of the tensor).

    Exact: (q - z) is an integer in -15..15 and d an fp16, so their float32 product never rounds.
    """
    _, q, z, d = unpack(packed, bits=bits)
    w = (q.astype(np.float32) - z.astype(np.float32)[..., None]) * d.astype(np.float32)[..., None]
    return w.reshape(q.shape[0], -1)


def dequantize(packed, width: int, name: str = "?", bits: int = 4) -> np.ndarray:
    """The dense matrix float32 [N, width], zeros in the pruned groups. Validates first."""
    validate(packed, width, name, bits)
    indices, _, _, _ = unpack(packed, bits=bits)
    stored = dequantize_stored(packed, bits).reshape(indices.shape[0], indices.shape[1], GROUP_SIZE)
    out = np.zeros((indices.shape[0], width // GROUP_SIZE, GROUP_SIZE), dtype=np.float32)
    np.put_along_axis(out, indices[:, :, None].astype(np.intp), stored, axis=1)
    return out.reshape(indices.shape[0], width)


def _activations(x, width: int) -> tuple[np.ndarray, bool]:
    x = np.asarray(x)
    vector = x.ndim == 1
    x2 = x[None, :] if vector else x
    if x2.ndim != 2 or x2.shape[1] != width:
        raise ValueError(f"x must be [ncols, {width}] (or [{width}]), got shape {x.shape}")
    return x2, vector


def matmul_ref(packed, width: int, x, bits: int = 4) -> np.ndarray:
    """The "true" product: x float32 [ncols, K] -> float32 [ncols, N] = x @ dequantize(packed).T,
    accumulated in float64 and rounded once to float32. A 1-D x gives a 1-D [N] result."""
    x2, vector = _activations(x, width)
    w = dequantize(packed, width, bits=bits).astype(np.float64)
    y = (x2.astype(np.float32).astype(np.float64) @ w.T).astype(np.float32)
    return y[0] if vector else y


# --- runtime activation type gqsa_q8 -------------------------------------------------------------

def quantize_act(x):
    """Models the gqsa_q8 activation quantization, bit-exact with C (float32 arithmetic).

    x: float32 [..., K] with K % 16 == 0. Per group of 16: d = max|x| / 127, qs = rint(x / d)
    (division, not multiplication by 1/d; d == 0 gives qs = 0), s = d * sum(qs).
    Returns d float32 [..., K/16], s float32 [..., K/16], qs int8 [..., K/16, 16].
    """
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] % GROUP_SIZE:
        raise ValueError(f"activations need a last axis divisible by {GROUP_SIZE}, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        at = _first(~np.isfinite(x))
        raise ValueError(f"non-finite activation {x[at]} at {list(at)}")
    g = x.reshape(*x.shape[:-1], x.shape[-1] // GROUP_SIZE, GROUP_SIZE)
    d = np.abs(g).max(axis=-1) / np.float32(127)
    safe = np.where(d == 0, np.float32(1), d)
    qs = np.where(d[..., None] == 0, np.float32(0), np.rint(g / safe[..., None]))
    assert np.abs(qs).max(initial=0) <= 127          # |x| <= max|x| = 127 d up to one rounding
    qs = qs.astype(np.int8)
    s = d * qs.astype(np.int32).sum(axis=-1).astype(np.float32)   # the integer sum is exact in float32
    return d.astype(np.float32), s.astype(np.float32), qs


def pack_act(d, s, qs) -> np.ndarray:
    """gqsa_q8 blocks as bytes, uint8 [..., K/16 * 24] (for byte comparisons with the C quantizer)."""
    qs = np.asarray(qs)
    blocks = np.empty(qs.shape[:-1], dtype=ACT_BLOCK_DTYPE)
    blocks["d"], blocks["s"], blocks["qs"] = d, s, qs
    return blocks.view(np.uint8).reshape(*qs.shape[:-2], -1)


def act_dot(packed, width: int, act, bits: int = 4) -> np.ndarray:
    """The CPU kernel's math (ggml-cpu-gqsa.c) on quantized activations, in float64: float64 [ncols, N].

    act = quantize_act(x) for x [ncols, K]. For each stored block (index g, q, z, d_w) of a row:
        d_w * (d_x[g] * sum_j q[j] * qs[g, j] - z * s_x[g])
    with the integer sum exact, summed over the row's blocks. A C kernel accumulating in float32
    differs from this only by float rounding.
    """
    d_x, s_x, qs_x = act
    d_x, s_x, qs_x = np.asarray(d_x), np.asarray(s_x), np.asarray(qs_x)
    n_groups = _check_width(width, None)
    if qs_x.ndim == 2:                                   # a single activation row
        d_x, s_x, qs_x = d_x[None], s_x[None], qs_x[None]
    if qs_x.shape[1:] != (n_groups, GROUP_SIZE) or d_x.shape != qs_x.shape[:2] or s_x.shape != d_x.shape:
        raise ValueError(f"activation blocks have shapes d {d_x.shape}, s {s_x.shape}, qs {qs_x.shape}; "
                         f"expected [ncols, {n_groups}] and [ncols, {n_groups}, {GROUP_SIZE}]")
    validate(packed, width, bits=bits)
    indices, q, z, d_w = unpack(packed, bits=bits)
    n_rows, n_kept = indices.shape
    ncols = qs_x.shape[0]
    qi = q.astype(np.int64)
    qs64 = qs_x.astype(np.int64)
    out = np.empty((ncols, n_rows), dtype=np.float64)
    # gather activation groups per stored block, a slab of rows at a time to bound memory
    step = max(1, (1 << 22) // max(1, ncols * n_kept * GROUP_SIZE))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        idx = indices[r0:r1]                                              # [R, B]
        isum = np.einsum("rbj,crbj->crb", qi[r0:r1], qs64[:, idx, :])    # exact integer dot products
        dxg = d_x.astype(np.float64)[:, idx]                              # [C, R, B]
        sxg = s_x.astype(np.float64)[:, idx]
        blk = d_w[r0:r1].astype(np.float64) * (dxg * isum - z[r0:r1].astype(np.float64) * sxg)
        out[:, r0:r1] = blk.sum(axis=-1)
    return out


def matmul_q8_ref(packed, width: int, x, bits: int = 4) -> np.ndarray:
    """x float32 [ncols, K] -> float64 [ncols, N] computed as the CPU kernel does: activations
    quantized to gqsa_q8, then act_dot. A 1-D x gives a 1-D [N] result."""
    x2, vector = _activations(x, width)
    y = act_dot(packed, width, quantize_act(x2), bits)
    return y[0] if vector else y
