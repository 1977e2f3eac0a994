"""Replays the fuzz target's inputs (native/fuzz/corpus, native/fuzz/regressions) through the
shipped library, without clang: the C validator (ggml_gqsa_validate, via libgqsa_native) and the
NumPy one (codec.validate) must agree on every input, and on the valid ones the C kernels (SIMD and
scalar) must match the NumPy model of the kernel's arithmetic (codec.act_dot) to float rounding.

The input layout is the one native/fuzz/fuzz_gqsa_validate.c documents: bit 15 of the n_kept field
selects the type (0: gqsa4, 1: gqsa3), and each input is checked as its type. Needs the native build.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest

from gqsa_gguf import codec, format as fmt, runtime

FUZZ = Path(__file__).resolve().parent.parent / "native" / "fuzz"
INPUTS = sorted(p for d in ("corpus", "regressions") for p in (FUZZ / d).glob("*") if p.is_file()
                and not p.name.startswith("."))
V, I64 = ctypes.c_void_p, ctypes.c_int64


@pytest.fixture(scope="module")
def hooks():
    lib = runtime.native_lib()
    lib.gqsa_test_validate_type.argtypes = [ctypes.c_int, V, I64, I64, I64, ctypes.c_char_p, ctypes.c_size_t]
    lib.gqsa_test_validate_type.restype = ctypes.c_int
    lib.gqsa_test_vec_dot_type.argtypes = [ctypes.c_int, V, I64, V, I64, ctypes.c_int, V]
    lib.gqsa_test_vec_dot_type.restype = ctypes.c_int
    return lib


def decode(raw: bytes):
    """(bits, width, ne0, packed rows uint8 [nrows, ne0/16*block bytes], activation seed) as the fuzz
    target reads it; bits: 4 (gqsa4) or 3 (gqsa3, bit 15 of the n_kept field)."""
    groups, n_field, rem, rows_m1, seed = struct.unpack_from("<HHBBH", raw)
    bits = 3 if n_field & 0x8000 else 4
    groups, n_kept = groups & 0x1FFF, n_field & 0x1FFF
    width, ne0 = groups * fmt.GROUP_SIZE + (rem & 15), n_kept * fmt.GROUP_SIZE + (rem >> 4)
    row_bytes = ne0 // fmt.GROUP_SIZE * fmt.gqsa_type(bits).block_bytes
    data = raw[8:]
    nrows = min(rows_m1 + 1, len(data) // row_bytes) if row_bytes else rows_m1 + 1
    packed = np.frombuffer(data[:nrows * row_bytes], np.uint8).reshape(nrows, row_bytes).copy()
    return bits, width, ne0, packed, seed


def test_corpus_exists():
    corpus = [p for p in INPUTS if p.parent.name == "corpus"]
    assert len(corpus) >= 10
    assert len([p for p in corpus if decode(p.read_bytes())[0] == 3]) >= 5


@pytest.mark.parametrize("path", INPUTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_c_and_numpy_validators_agree_and_kernels_match(hooks, path):
    raw = path.read_bytes()
    if len(raw) < 8:
        return                                        # the target ignores inputs this short
    bits, width, ne0, packed, seed = decode(raw)
    gtype = fmt.gqsa_type(bits).type_id
    if ne0 % fmt.GROUP_SIZE:
        # gguf.cpp and gguf_io refuse these before a tensor exists; ggml cannot even create one
        # (ggml_row_size asserts), so only the fuzz target, which builds the struct itself, sees them
        return
    err = ctypes.create_string_buffer(512)
    c_ok = bool(hooks.gqsa_test_validate_type(gtype, packed.ctypes.data if packed.size else None, ne0,
                                              packed.shape[0], width, err, len(err)))
    try:
        codec.validate(packed, width, "fuzz.weight", bits=bits)
        py_ok = True
    except codec.GQSAFormatError as e:
        py_ok, py_err = False, str(e)
    assert c_ok == py_ok, (err.value.decode(), None if py_ok else py_err)
    if not c_ok:
        assert err.value.decode().startswith("tensor 'test.weight'")
        return

    n_kept = ne0 // fmt.GROUP_SIZE
    x = np.random.default_rng(seed).standard_normal(width).astype(np.float32)
    want = codec.act_dot(packed, width, codec.quantize_act(x[None]), bits=bits)[0]
    for r in range(packed.shape[0]):
        row = np.ascontiguousarray(packed[r])
        got = []
        for generic in (0, 1):
            out = ctypes.c_float()
            assert hooks.gqsa_test_vec_dot_type(gtype, row.ctypes.data, n_kept, x.ctypes.data, width,
                                                generic, ctypes.byref(out)) == 0
            got.append(out.value)
        scale = np.abs(codec.dequantize(packed[r:r + 1], width, bits=bits)).sum() * np.abs(x).max() + 1e-30
        assert abs(got[0] - want[r]) <= 1e-5 * scale and abs(got[1] - want[r]) <= 1e-5 * scale, (r, got, want[r])
