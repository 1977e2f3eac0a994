"""GGUF writing and reading of gqsa4 tensors: bit-exact round trips, atomic writes, and hostile
files (handcrafted corruptions and a seeded byte-flip fuzz) that must raise GGUFError."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGUFValueType

from gqsa_gguf import __version__, codec
from gqsa_gguf.format import (
    BLOCK_DTYPE,
    FORMAT_VERSION,
    GGML_TYPE_GQSA4,
    GROUP_SIZE,
    INDEX_BITS,
    KEY_FORMAT_VERSION,
    KEY_TENSOR_SPARSITY,
    KEY_TENSOR_WIDTHS,
    KEY_TOOL_VERSION,
)
from gqsa_gguf.gguf_io import GGUFError, GQSAWriter, read_gguf

CONFIG = {"spec": "w4s50", "calibration": {"samples": 4}}


def make_packed(rng, n_rows, width, n_kept):
    w = rng.standard_normal((n_rows, width)).astype(np.float32)
    kept = np.sort(np.argsort(rng.random((n_rows, width // GROUP_SIZE)), axis=1)[:, :n_kept], axis=1)
    return codec.quantize(w, kept)


@pytest.fixture
def model(tmp_path):
    """A small GQSA file: F32 + F16 stock tensors, two gqsa4 tensors, assorted metadata."""
    rng = np.random.default_rng(0)
    tensors = {
        "token_embd.weight": rng.standard_normal((7, 32)).astype(np.float32),
        "output_norm.weight": rng.standard_normal(32).astype(np.float16),
    }
    gqsa = {
        "blk.0.attn_q.weight": (make_packed(rng, 32, 32, 1), 32, 0.5),       # 1 of 2 groups
        "blk.0.ffn_down.weight": (make_packed(rng, 32, 96, 4), 96, None),    # 4 of 6 groups
    }
    w = GQSAWriter("llama", json.dumps(CONFIG))
    w.gguf.add_block_count(1)
    w.gguf.add_array("tokenizer.ggml.tokens", ["<s>", "a", "\u00e9"])
    w.gguf.add_array("tokenizer.ggml.scores", [0.0, -1.5, 2.25])
    w.add_tensor("token_embd.weight", tensors["token_embd.weight"])
    w.add_gqsa_tensor("blk.0.attn_q.weight", *gqsa["blk.0.attn_q.weight"])
    w.add_tensor("output_norm.weight", tensors["output_norm.weight"])
    w.add_gqsa_tensor("blk.0.ffn_down.weight", *gqsa["blk.0.ffn_down.weight"])
    path = w.write(tmp_path / "model.gguf")
    return path, tensors, gqsa


# --- exact: round trip -----------------------------------------------------------------------------

def test_round_trip_is_bit_exact(model):
    path, tensors, gqsa = model
    f = read_gguf(path)
    assert f.version == 3 and list(f.tensors) == ["token_embd.weight", "blk.0.attn_q.weight",
                                                  "output_norm.weight", "blk.0.ffn_down.weight"]
    np.testing.assert_array_equal(f.tensor_array("token_embd.weight"), tensors["token_embd.weight"])
    got16 = f.tensor_bytes("output_norm.weight").view("<f2")
    np.testing.assert_array_equal(got16.view(np.uint16), tensors["output_norm.weight"].view(np.uint16))
    assert f.tensor_array("output_norm.weight").dtype == np.float32
    for name, (packed, width, _) in gqsa.items():
        info = f.tensors[name]
        assert info.type_id == GGML_TYPE_GQSA4 and info.type_name == "gqsa4"
        assert info.ne == (packed.shape[1] // 12 * GROUP_SIZE, packed.shape[0])   # ne0 = n_kept*16, ne1 = N
        assert info.offset % f.alignment == 0
        np.testing.assert_array_equal(f.gqsa_tensor(name), packed)
        np.testing.assert_array_equal(f.tensor_array(name), codec.dequantize(packed, width))
        assert f.gqsa[name].width == width
    assert f.gqsa["blk.0.attn_q.weight"].sparsity == 0.5
    assert f.gqsa["blk.0.ffn_down.weight"].sparsity == pytest.approx(1 / 3, abs=1e-7)
    assert f.metadata[KEY_FORMAT_VERSION] == FORMAT_VERSION
    assert f.metadata[KEY_TOOL_VERSION] == __version__
    assert f.gqsa_config == CONFIG
    assert f.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "\u00e9"]
    np.testing.assert_array_equal(f.metadata["tokenizer.ggml.scores"], [0.0, -1.5, 2.25])
    assert f.metadata["llama.block_count"] == 1


def test_reader_agrees_with_gguf_py_on_stock_files(tmp_path):
    """Our parser against gguf-py's on a file gguf-py can read (no gqsa4 tensors)."""
    path = tmp_path / "stock.gguf"
    w = GGUFWriter(path, "llama")
    values = {"u8": (7, GGUFValueType.UINT8), "i8": (-7, GGUFValueType.INT8), "u16": (700, GGUFValueType.UINT16),
              "i16": (-700, GGUFValueType.INT16), "u32": (7 << 20, GGUFValueType.UINT32),
              "i32": (-(7 << 20), GGUFValueType.INT32), "f32": (0.25, GGUFValueType.FLOAT32),
              "b": (True, GGUFValueType.BOOL), "s": ("hello", GGUFValueType.STRING),
              "u64": (7 << 40, GGUFValueType.UINT64), "i64": (-(7 << 40), GGUFValueType.INT64),
              "f64": (0.1, GGUFValueType.FLOAT64)}
    for k, (v, t) in values.items():
        w.add_key_value(k, v, t)
    w.add_key_value("arr_i32", [1, -2, 3], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    w.add_key_value("arr_bool", [True, False], GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)
    w.add_custom_alignment(64)
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    ours, theirs = read_gguf(path), GGUFReader(path)
    assert ours.alignment == 64
    for k, field in theirs.fields.items():
        if k.startswith("GGUF."):
            continue
        got = ours.metadata[k]
        want = field.contents()
        if isinstance(got, np.ndarray):
            got = got.tolist()
        assert got == want, k
        assert ours.value_types[k][0] == field.types[0]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert info.ne == tuple(int(n) for n in t.shape)
        np.testing.assert_array_equal(ours.tensor_array(t.name), np.asarray(t.data, np.float32).reshape(info.shape))


def test_bf16_and_q8_0_decode(tmp_path):
    from gguf.constants import GGMLQuantizationType as T
    from gguf.quants import quantize as gguf_quantize, dequantize as gguf_dequantize
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    q8 = gguf_quantize(x, T.Q8_0)
    bf = gguf_quantize(x, T.BF16)
    w = GQSAWriter("llama", "{}")
    w.add_tensor("q8", q8, raw_dtype=T.Q8_0)
    w.add_tensor("bf", bf, raw_dtype=T.BF16)
    w.add_gqsa_tensor("g", make_packed(rng, 2, 64, 2), 64)
    f = read_gguf(w.write(tmp_path / "m.gguf"))
    np.testing.assert_array_equal(f.tensor_array("q8"), gguf_dequantize(q8, T.Q8_0))
    np.testing.assert_array_equal(f.tensor_array("bf"), gguf_dequantize(bf, T.BF16))


# --- writer checks and atomicity -----------------------------------------------------------------

def test_writer_rejects_inconsistent_input(tmp_path):
    rng = np.random.default_rng(2)
    packed = make_packed(rng, 4, 64, 2)
    w = GQSAWriter("llama", "{}")
    with pytest.raises(ValueError, match="sparsity 0.25 disagrees"):
        w.add_gqsa_tensor("x", packed, 64, sparsity=0.25)
    with pytest.raises(codec.GQSAFormatError, match="exceed the 1 groups"):
        w.add_gqsa_tensor("x", packed, 16)
    with pytest.raises(ValueError, match="at most 63"):
        w.add_gqsa_tensor("x" * 64, packed, 64)
    with pytest.raises(ValueError, match="at least one"):
        GQSAWriter("llama", "{}").write(tmp_path / "empty.gguf")
    with pytest.raises(ValueError, match="JSON object"):
        bad = GQSAWriter("llama", "not json")
        bad.add_gqsa_tensor("x", packed, 64)
        bad.write(tmp_path / "bad.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_write_is_atomic(tmp_path, exc):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old contents")
    w = GQSAWriter("llama", "{}")
    w.add_gqsa_tensor("x", make_packed(np.random.default_rng(3), 4, 64, 2), 64)

    def fail_midway(**kw):
        w.gguf.fout[0].write(b"partial data")
        raise exc("disk on fire")

    w.gguf.write_tensors_to_file = fail_midway
    with pytest.raises(exc):
        w.write(target)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]     # no temporary left behind


# --- hostile files -------------------------------------------------------------------------------

def tensor_info_pos(buf: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor `name` (tensor infos follow the metadata: rfind)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = buf.rfind(key)
    assert pos > 0
    return pos + len(key)


def kv_value_pos(buf: bytes, key: str) -> int:
    """Offset of the value type field of metadata `key`."""
    raw = struct.pack("<Q", len(key)) + key.encode()
    pos = buf.find(raw)
    assert pos > 0
    return pos + len(raw)


def write_variant(tmp_path: Path, buf: bytes | bytearray, name="bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(bytes(buf))
    return p


def mutate(path, **edits):
    """A copy of the file's bytes with fields overwritten: {'offset': (fmt, value)}."""
    buf = bytearray(Path(path).read_bytes())
    for pos, (fmt, value) in edits.items():
        struct.pack_into(fmt, buf, int(pos.lstrip("_")), value)
    return buf


def test_rejects_bad_magic(model, tmp_path):
    buf = bytearray(model[0].read_bytes())
    buf[:4] = b"GGML"
    with pytest.raises(GGUFError, match="bad magic"):
        read_gguf(write_variant(tmp_path, buf))


def test_rejects_truncated_files(model, tmp_path):
    buf = model[0].read_bytes()
    cuts = sorted(set(range(0, 120)) | set(range(120, len(buf), 37)) | {len(buf) - 1})
    for n in cuts:
        with pytest.raises(GGUFError):
            read_gguf(write_variant(tmp_path, buf[:n]))


def at(offset):
    return lambda buf: offset


def in_tensor_info(name, offset):
    """`offset` bytes into tensor `name`'s info (2-D here): n_dims u32 at 0, ne u64 at 4 and 12, type
    u32 at 20, data offset u64 at 24."""
    return lambda buf: tensor_info_pos(buf, name) + offset


def in_kv(key, offset):
    """`offset` bytes into metadata `key`: value type u32 at 0, the value at 4; of an array, the
    element type at 4, the count u64 at 8, the elements from 16."""
    return lambda buf: kv_value_pos(buf, key) + offset


ATTN_Q, FFN_DOWN = "blk.0.attn_q.weight", "blk.0.ffn_down.weight"

# Hostile files made by overwriting one field of the model: {case: (where, struct format, value,
# the GGUFError message it must raise)}
ONE_FIELD = {
    "gguf_version_1": (at(4), "<I", 1, "re-convert"),
    "gguf_version_4": (at(4), "<I", 4, "upgrade gqsa-gguf"),
    "gguf_version_big_endian": (at(4), "<I", 0x03000000, "big-endian"),
    "tensor_count_huge": (at(8), "<Q", 1 << 60, "cannot fit"),
    "array_count_huge": (in_kv("tokenizer.ggml.tokens", 8), "<Q", 1 << 40, "truncated or corrupt"),
    "array_count_high_half": (in_kv("tokenizer.ggml.tokens", 12), "<Q", 1 << 40, "truncated or corrupt"),
    "unknown_value_type": (in_kv("llama.block_count", 0), "<I", 13, "unknown value type 13"),
    "offset_outside_file": (in_tensor_info(FFN_DOWN, 24), "<Q", 1 << 20, "outside the file"),
    "offset_unaligned": (in_tensor_info(FFN_DOWN, 24), "<Q", 1, "not a multiple of the alignment"),
    "offset_overlapping": (in_tensor_info(FFN_DOWN, 24), "<Q", 0, "overlaps"),
    "unknown_ggml_type": (in_tensor_info(ATTN_Q, 20), "<I", 77, "unknown ggml type id 77"),
    "runtime_only_type": (in_tensor_info(ATTN_Q, 20), "<I", 129, "runtime-only"),
    "n_dims_5": (in_tensor_info(ATTN_Q, 0), "<I", 5, "dimensions"),
    "ne0_negative": (in_tensor_info(ATTN_Q, 4), "<q", -16, "negative"),
    "ne0_not_whole_blocks": (in_tensor_info(ATTN_Q, 4), "<Q", 8, "not a multiple of its block size"),
    "gqsa_format_version_future": (in_kv(KEY_FORMAT_VERSION, 4), "<I", FORMAT_VERSION + 1,
                                   f"version {FORMAT_VERSION + 1} is newer .* upgrade gqsa-gguf"),
    "gqsa_format_version_int32": (in_kv(KEY_FORMAT_VERSION, 0), "<I", int(GGUFValueType.INT32),
                                  "has type INT32, expected UINT32"),                # same size, wrong type
    # ffn_down (the second width) keeps 4 groups; attn_q (the first, sparsity 0.5) 1
    "gqsa_width_disagrees": (in_kv(KEY_TENSOR_WIDTHS, 20), "<I", 48, "ne0 = 64 .* logical width is 48"),
    "gqsa_width_vs_sparsity": (in_kv(KEY_TENSOR_WIDTHS, 16), "<I", 16,
                               "sparsity' says 0.5, but the tensor keeps 1 of 1 groups"),
    "gqsa_width_not_multiple": (in_kv(KEY_TENSOR_WIDTHS, 16), "<I", 40, "not a positive multiple"),
    "gqsa_sparsity_disagrees": (in_kv(KEY_TENSOR_SPARSITY, 16), "<f", 0.75, "sparsity"),
}


@pytest.mark.parametrize("case", list(ONE_FIELD))
def test_rejects_one_field(model, tmp_path, case):
    where, fmt, value, msg = ONE_FIELD[case]
    path = model[0]
    with pytest.raises(GGUFError, match=msg):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{where(path.read_bytes())}": (fmt, value)})))


def test_rejects_tensor_size_over_int64_max(model, tmp_path):
    path = model[0]
    pos = tensor_info_pos(path.read_bytes(), ATTN_Q)
    with pytest.raises(GGUFError, match="INT64_MAX"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{pos + 4}": ("<Q", 1 << 40),
                                                             f"_{pos + 12}": ("<Q", 1 << 40)})))


def test_rejects_gqsa_index_out_of_range(model, tmp_path):
    path, _, gqsa = model
    f = read_gguf(path)
    info = f.tensors["blk.0.ffn_down.weight"]
    row, block, n_kept = 5, 3, 4
    pos = info.offset + (row * n_kept + block) * BLOCK_DTYPE.itemsize + BLOCK_DTYPE.fields["iz"][1]
    bad = read_gguf(write_variant(tmp_path, mutate(path, **{f"_{pos}": ("<H", (2 << INDEX_BITS) | 6)})))
    with pytest.raises(GGUFError) as e:
        bad.gqsa_tensor("blk.0.ffn_down.weight")
    for part in ("'blk.0.ffn_down.weight'", "row 5 block 3", "group index 6 >= 6 groups", "width 96"):
        assert part in str(e.value)
    with pytest.raises(GGUFError):
        bad.tensor_array("blk.0.ffn_down.weight")
    np.testing.assert_array_equal(bad.gqsa_tensor("blk.0.attn_q.weight"), gqsa["blk.0.attn_q.weight"][0])


def test_fuzzed_files_raise_only_gguf_errors(model, tmp_path):
    """Random byte flips: every outcome is a parsed file or a GGUFError, never another exception."""
    path, _, gqsa = model
    clean = path.read_bytes()
    f = read_gguf(path)
    data_start = f.data_offset
    rng = np.random.default_rng(4)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(300):
        buf = bytearray(clean)
        # mostly the header/metadata/infos, sometimes the data section
        hi = data_start if rng.random() < 0.8 else len(buf)
        for pos in rng.integers(0, hi, rng.integers(1, 4)):
            buf[pos] = int(rng.integers(0, 256))
        p = write_variant(tmp_path, buf, "fuzz.gguf")
        try:
            g = read_gguf(p)
            for name in g.gqsa:
                g.tensor_array(name)
            outcomes["ok"] += 1
        except GGUFError:
            outcomes["error"] += 1
        finally:
            g = None
    assert outcomes["ok"] > 0 and outcomes["error"] > 0
