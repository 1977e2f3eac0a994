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


@pytest.mark.parametrize("version,msg", [(1, "re-convert"), (4, "upgrade gqsa-gguf"), (0x03000000, "big-endian")])
def test_rejects_unsupported_gguf_version(model, tmp_path, version, msg):
    with pytest.raises(GGUFError, match=msg):
        read_gguf(write_variant(tmp_path, mutate(model[0], _4=("<I", version))))


def test_rejects_truncated_files(model, tmp_path):
    buf = model[0].read_bytes()
    cuts = sorted(set(range(0, 120)) | set(range(120, len(buf), 37)) | {len(buf) - 1})
    for n in cuts:
        with pytest.raises(GGUFError):
            read_gguf(write_variant(tmp_path, buf[:n]))


def test_rejects_huge_counts_and_lengths(model, tmp_path):
    path = model[0]
    with pytest.raises(GGUFError, match="cannot fit"):
        read_gguf(write_variant(tmp_path, mutate(path, _8=("<Q", 1 << 60))))
    buf = path.read_bytes()
    pos = kv_value_pos(buf, "tokenizer.ggml.tokens")                     # type, elem type, count
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{pos + 8}": ("<Q", 1 << 40)})))
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{pos + 12}": ("<Q", 1 << 40)})))


def test_rejects_unknown_value_type(model, tmp_path):
    pos = kv_value_pos(model[0].read_bytes(), "llama.block_count")
    with pytest.raises(GGUFError, match="unknown value type 13"):
        read_gguf(write_variant(tmp_path, mutate(model[0], **{f"_{pos}": ("<I", 13)})))


def test_rejects_offset_out_of_file_unaligned_and_overlapping(model, tmp_path):
    path = model[0]
    buf = path.read_bytes()
    # tensor info: n_dims u32, ne u64 * n_dims, type u32, offset u64 (2-D tensors here)
    off_pos = tensor_info_pos(buf, "blk.0.ffn_down.weight") + 4 + 16 + 4
    with pytest.raises(GGUFError, match="outside the file"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{off_pos}": ("<Q", 1 << 20)})))
    with pytest.raises(GGUFError, match="not a multiple of the alignment"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{off_pos}": ("<Q", 1)})))
    with pytest.raises(GGUFError, match="overlaps"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{off_pos}": ("<Q", 0)})))


def test_rejects_unknown_type_and_runtime_type(model, tmp_path):
    path = model[0]
    type_pos = tensor_info_pos(path.read_bytes(), "blk.0.attn_q.weight") + 4 + 16
    with pytest.raises(GGUFError, match="unknown ggml type id 77"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{type_pos}": ("<I", 77)})))
    with pytest.raises(GGUFError, match="runtime-only"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{type_pos}": ("<I", 129)})))


def test_rejects_bad_dims(model, tmp_path):
    path = model[0]
    pos = tensor_info_pos(path.read_bytes(), "blk.0.attn_q.weight")
    with pytest.raises(GGUFError, match="dimensions"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{pos}": ("<I", 5)})))
    with pytest.raises(GGUFError, match="negative"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{pos + 4}": ("<q", -16)})))
    with pytest.raises(GGUFError, match="not a multiple of its block size"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{pos + 4}": ("<Q", 8)})))
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


def test_rejects_future_format_version(model, tmp_path):
    pos = kv_value_pos(model[0].read_bytes(), KEY_FORMAT_VERSION) + 4      # after the type field
    with pytest.raises(GGUFError, match=f"version {FORMAT_VERSION + 1} is newer .* upgrade gqsa-gguf"):
        read_gguf(write_variant(tmp_path, mutate(model[0], **{f"_{pos}": ("<I", FORMAT_VERSION + 1)})))


def test_rejects_inconsistent_gqsa_metadata(model, tmp_path):
    path = model[0]
    buf = path.read_bytes()
    widths = kv_value_pos(buf, KEY_TENSOR_WIDTHS) + 4 + 4 + 8               # type, elem type, count
    with pytest.raises(GGUFError, match="ne0 = 64 .* logical width is 48"):       # ffn_down keeps 4 groups
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{widths + 4}": ("<I", 48)})))
    with pytest.raises(GGUFError, match="sparsity' says 0.5, but the tensor keeps 1 of 1 groups"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{widths}": ("<I", 16)})))
    with pytest.raises(GGUFError, match="not a positive multiple"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{widths}": ("<I", 40)})))
    sp = kv_value_pos(buf, KEY_TENSOR_SPARSITY) + 4 + 4 + 8
    with pytest.raises(GGUFError, match="sparsity"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{sp}": ("<f", 0.75)})))
    version = kv_value_pos(buf, KEY_FORMAT_VERSION)                         # same size, wrong type
    with pytest.raises(GGUFError, match="has type INT32, expected UINT32"):
        read_gguf(write_variant(tmp_path, mutate(path, **{f"_{version}": ("<I", int(GGUFValueType.INT32))})))


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
