"""Hostile GGUF files: a catalogue of crafted corruptions of small valid GQSA models.

In:  nothing but this repository: `write_base(path, name)` writes a tiny llama model (its own
     292-token SentencePiece-style vocabulary, gqsa4 linear weights) that the patched llama.cpp
     loads and runs.
Out: `CASES`, each a `Case` whose `make(layout)` returns the bytes of one hostile file, built byte by
     byte from a base: `Layout` records where every header field, metadata entry, tensor info and
     tensor block of the base lies (a walk of the trusted base, cross-checked with read_gguf), and
     `Model` re-serializes a decoded copy for edits that change sizes (shapes, added or removed keys).
     `python_read(path)` is "our reader, all the way": parse and validate every gqsa4 tensor.
     `load_files(paths)` runs the patched llama.cpp loader on files in child processes (a crash
     ends only its child; the rest go on in a new one) and reports per file what happened.

Each case states what both readers must do: the Python reader raises GGUFError/GQSAFormatError
matching `python` (or accepts the file, when `python` is None: it does not know the model's
shapes); llama.cpp refuses with a log or error matching `llama` (or may load the file, when
`llama` is None: it ignores that metadata). Neither may ever crash.

Run as a script, the module is that child: `python tests/hostile.py RESULTS.jsonl FILE...`.
"""

from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:       # the child runs as a script, maybe outside an installed package
    sys.path.insert(0, str(REPO))

from gguf.constants import GGUFValueType as VT  # noqa: E402

from gqsa_gguf import arch, codec  # noqa: E402
from gqsa_gguf import format as fmt  # noqa: E402
from gqsa_gguf.gguf_io import GQSAWriter, read_gguf  # noqa: E402

# --- the base files: tiny valid llama models ------------------------------------------------------

N_EMBD, N_FF, N_LAYER, N_HEAD, N_HEAD_KV = 64, 128, 2, 4, 2
LAYOUT = arch.for_gguf("llama")
HPARAMS = arch.Hparams(n_layers=N_LAYER, hidden_size=N_EMBD, intermediate_size=N_FF, n_head=N_HEAD,
                       n_head_kv=N_HEAD_KV, head_dim=N_EMBD // N_HEAD, context_length=256)
LINEAR = {name: (rows, width) for name, rows, width in LAYOUT.gguf_linears(HPARAMS)}  # (rows, logical width)
BASES = {
    # every linear weight at 50 % sparsity, F32 embeddings, default alignment (32)
    "w4s50": {"sparsity": {k: 0.5 for k in LINEAR}, "embd": "f32", "alignment": None},
    # attention 25 %, MLP 75 %, F16 embeddings, general.alignment = 64
    "mixed": {"sparsity": {k: (0.25 if k.startswith("attn") else 0.75) for k in LINEAR},
              "embd": "f16", "alignment": 64},
    # as w4s50 with gqsa3 linear weights (gqsa.bits = 3)
    "w3s50": {"sparsity": {k: 0.5 for k in LINEAR}, "embd": "f32", "alignment": None, "bits": 3},
}
PROMPT = "the cat " * 6     # 13 tokens with <s>: a batch (gqsa4 panel kernels), then one decode step
SELFTEST_CRASH_ENV = "GQSA_HOSTILE_SELFTEST_CRASH"   # the child kills itself on the file of that name
FILE_TIMEOUT = 120.0        # seconds one file may take in the child (ASan builds are slow) before it is a hang


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """<unk> <s> </s>, the 256 byte tokens, '▁', letters, and a few whole words (SentencePiece style)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256                       # unknown, control, byte
    words = ["\u2581"] + list("abcdefghijklmnopqrstuvwxyz") + ["\u2581t", "\u2581th", "\u2581the",
                                                               "\u2581c", "\u2581ca", "\u2581cat"]
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    scores[259 + len(words) - 6:] = [-1.0, -0.5, 0.0, -1.0, -0.5, 0.0]    # words beat letters
    return tokens, scores, types


def write_base(path: Path, name: str = "w4s50", seed: int = 0) -> Path:
    """Writes base model `name` (a key of BASES) to `path`."""
    spec = BASES[name]
    rng = np.random.default_rng(seed)
    bits = spec.get("bits", 4)
    w = GQSAWriter(LAYOUT.gguf_arch, json.dumps({"hostile-test-base": name}), bits=bits)
    g = w.gguf
    LAYOUT.write_hparams(g, HPARAMS, name=f"gqsa-gguf hostile-file base {name}")
    if spec["alignment"]:
        g.add_custom_alignment(spec["alignment"])
    tokens, scores, types = tiny_vocab()
    g.add_tokenizer_model("llama")
    g.add_token_list(tokens)
    g.add_token_scores(scores)
    g.add_token_types(types)
    g.add_bos_token_id(1)
    g.add_eos_token_id(2)
    g.add_unk_token_id(0)
    g.add_add_bos_token(True)

    embd = (rng.standard_normal((len(tokens), N_EMBD)) * 0.5).astype(np.float32)
    w.add_tensor("token_embd.weight", embd if spec["embd"] == "f32" else embd.astype(np.float16))
    ones = np.ones(N_EMBD, np.float32)
    w.add_tensor("output_norm.weight", ones)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        for lin, (rows, width) in LINEAR.items():
            n_groups = width // fmt.GROUP_SIZE
            n_kept = fmt.kept_groups(width, spec["sparsity"][lin])
            kept = np.sort(np.argsort(rng.random((rows, n_groups)), axis=1)[:, :n_kept], axis=1)
            dense = (rng.standard_normal((rows, width)) * 0.2).astype(np.float32)
            w.add_gqsa_tensor(f"blk.{i}.{lin}.weight", codec.quantize(dense, kept, bits=bits), width)
    return w.write(path)


# --- where everything is: a walk of the (trusted) base file ---------------------------------------

_SCALAR_SIZE = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4,
                VT.FLOAT32: 4, VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}


@dataclass
class KV:
    key: str
    pos: int            # the key's uint64 length
    type_pos: int       # the value type (uint32)
    value_pos: int      # the value; for arrays: element type (u32), count (u64), elements
    end: int
    vtype: int


@dataclass
class TensorField:
    name: str
    pos: int            # the name's uint64 length
    ndims_pos: int
    ne_pos: int         # ne[0]; ne[j] at ne_pos + 8*j
    type_pos: int
    offset_pos: int
    ne: tuple[int, ...]
    type_id: int
    offset: int         # relative to the data section
    data_pos: int       # absolute
    nbytes: int


@dataclass
class Layout:
    """Byte positions of every field of a valid GGUF file."""
    path: Path
    buf: bytes
    kv: dict[str, KV]
    tensors: dict[str, TensorField]
    info_end: int       # end of the last tensor info
    data_offset: int
    alignment: int
    gqsa_width: dict[str, int]

    def block_pos(self, tensor: str, row: int, block: int) -> int:
        t = self.tensors[tensor]
        n_kept = t.ne[0] // fmt.GROUP_SIZE
        assert 0 <= row < t.ne[1] and 0 <= block < n_kept
        return t.data_pos + (row * n_kept + block) * fmt.TYPE_IDS[t.type_id].block_bytes

    def block_index(self, tensor: str, row: int, block: int) -> int:
        (iz,) = struct.unpack_from("<H", self.buf, self.block_pos(tensor, row, block) + 2)
        return iz & fmt.INDEX_MASK


def layout(path: Path) -> Layout:
    buf = Path(path).read_bytes()
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, p)
        return buf[p + 8:p + 8 + n].decode(), p + 8 + n

    def skip_value(p: int, vt: int) -> int:
        if vt == VT.STRING:
            return string(p)[1]
        if vt == VT.ARRAY:
            et, n = struct.unpack_from("<IQ", buf, p)
            p += 12
            if et == VT.STRING:
                for _ in range(n):
                    p = string(p)[1]
                return p
            return p + n * _SCALAR_SIZE[VT(et)]
        return p + _SCALAR_SIZE[VT(vt)]

    kvs: dict[str, KV] = {}
    for _ in range(n_kv):
        key, p = string(pos)
        (vt,) = struct.unpack_from("<I", buf, p)
        end = skip_value(p + 4, vt)
        kvs[key] = KV(key, pos, p, p + 4, end, vt)
        pos = end
    alignment = 32
    if "general.alignment" in kvs:
        (alignment,) = struct.unpack_from("<I", buf, kvs["general.alignment"].value_pos)
    raw = []
    for _ in range(n_tensors):
        name, p = string(pos)
        (nd,) = struct.unpack_from("<I", buf, p)
        ne = struct.unpack_from(f"<{nd}Q", buf, p + 4)
        type_pos = p + 4 + 8 * nd
        (tid,) = struct.unpack_from("<I", buf, type_pos)
        (off,) = struct.unpack_from("<Q", buf, type_pos + 4)
        raw.append((name, pos, p, p + 4, type_pos, type_pos + 4, tuple(ne), tid, off))
        pos = type_pos + 12
    data_offset = -(-pos // alignment) * alignment

    f = read_gguf(path)                 # the base must be valid; its view must agree with the walk
    assert f.data_offset == data_offset and f.alignment == alignment
    tensors = {}
    for name, p, ndp, nep, tp, op, ne, tid, off in raw:
        info = f.tensors[name]
        assert info.ne == ne and info.type_id == tid and info.offset == data_offset + off
        tensors[name] = TensorField(name, p, ndp, nep, tp, op, ne, tid, off, info.offset, info.nbytes)
    return Layout(Path(path), buf, kvs, tensors, pos, data_offset, alignment,
                  {n: r.width for n, r in f.gqsa.items()})


def patched(buf: bytes, *edits: tuple[int, str, object]) -> bytes:
    """A copy of `buf` with struct fields overwritten: (position, struct format, value)."""
    out = bytearray(buf)
    for pos, f, value in edits:
        struct.pack_into(f, out, pos, value)
    return bytes(out)


# --- re-serialization, for edits that change sizes -------------------------------------------------

def gguf_string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class Tensor:
    name: bytes
    ne: list[int]
    type_id: int
    data: bytes


@dataclass
class Model:
    """A decoded copy of a file: raw metadata entries and tensors, written back with fresh offsets."""
    version: int
    kv: list[tuple[bytes, bytes]]           # (key, value type + value bytes)
    tensors: list[Tensor]
    alignment: int

    @classmethod
    def of(cls, lay: Layout) -> "Model":
        (version,) = struct.unpack_from("<I", lay.buf, 4)
        kv = [(k.encode(), lay.buf[e.type_pos:e.end]) for k, e in lay.kv.items()]
        tensors = [Tensor(t.name.encode(), list(t.ne), t.type_id, lay.buf[t.data_pos:t.data_pos + t.nbytes])
                   for t in lay.tensors.values()]
        return cls(version, kv, tensors, lay.alignment)

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name.encode())

    def set_kv(self, key: str, value: bytes) -> None:
        """Replaces (or appends) entry `key`; `value` is the type field + value bytes."""
        for i, (k, _) in enumerate(self.kv):
            if k == key.encode():
                self.kv[i] = (k, value)
                return
        self.kv.append((key.encode(), value))

    def drop_kv(self, key: str) -> None:
        self.kv = [(k, v) for k, v in self.kv if k != key.encode()]

    def to_bytes(self) -> bytes:
        pad = lambda n: -n % self.alignment  # noqa: E731
        head = [b"GGUF", struct.pack("<IQQ", self.version, len(self.tensors), len(self.kv))]
        head += [gguf_string(k) + v for k, v in self.kv]
        data, offset = [], 0
        for t in self.tensors:
            head.append(gguf_string(t.name) + struct.pack(f"<I{len(t.ne)}QIQ", len(t.ne), *t.ne, t.type_id, offset))
            data += [t.data, b"\0" * pad(len(t.data))]
            offset += len(t.data) + pad(len(t.data))
        h = b"".join(head)
        return h + b"\0" * pad(len(h)) + b"".join(data)


def kv_u32(v: int) -> bytes:
    return struct.pack("<II", VT.UINT32, v)


def kv_string(s: str) -> bytes:
    return struct.pack("<I", VT.STRING) + gguf_string(s)


# --- the catalogue ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    what: str
    make: Callable[[Layout], bytes]
    python: str | None              # regex the reader's error must match; None: it accepts the file
    llama: str | None               # regex the loader's refusal must match; None: it may load the file
    gqsa: bool = False              # a GQSA-specific case (the loader must name the tensor)
    base: str = "w4s50"
    note: str = ""


CASES: list[Case] = []


def case(name: str, what: str, python: str | None, llama: str | None, gqsa: bool = False,
         base: str = "w4s50", note: str = ""):
    def register(make: Callable[[Layout], bytes]):
        CASES.append(Case(name, what, make, python, llama, gqsa, base, note))
        return make
    return register


def set_block(lay: Layout, tensor: str, row: int, block: int, *, index: int | None = None,
              d_bits: int | None = None) -> bytes:
    """Overwrites the group index (keeping the zero point) and/or the scale bits of one block."""
    pos = lay.block_pos(tensor, row, block)
    edits = []
    if index is not None:
        (iz,) = struct.unpack_from("<H", lay.buf, pos + 2)
        edits.append((pos + 2, "<H", (iz & ~fmt.INDEX_MASK & 0xFFFF) | index))
    if d_bits is not None:
        edits.append((pos, "<H", d_bits))
    return patched(lay.buf, *edits)


# GQSA-specific: block contents

FFN_DOWN = "blk.1.ffn_down.weight"          # 64 rows, width 128: 8 groups, 4 kept at 50 %


@case("gqsa_index_out_of_range", "group index == groups per row (8) in the last block of a row",
      python=rf"'{FFN_DOWN}'.*row 5 block 3.*group index 8 >= 8 groups", gqsa=True,
      llama=rf"tensor '{FFN_DOWN}': row 5 block 3: group index 8 >= 8 groups")
def _(lay):
    return set_block(lay, FFN_DOWN, 5, 3, index=8)


@case("gqsa_index_12bit_max", "group index 4095 (the field's maximum) in a row of 4 groups",
      python=r"'blk.0.attn_q.weight'.*row 0 block 1.*group index 4095 >= 4", gqsa=True,
      llama=r"tensor 'blk.0.attn_q.weight': row 0 block 1: group index 4095 >= 4 groups")
def _(lay):
    return set_block(lay, "blk.0.attn_q.weight", 0, 1, index=4095)


@case("gqsa_index_last_block_of_file", "out-of-range index in the very last block of the data section",
      python=rf"'{FFN_DOWN}'.*row 63 block 3.*group index 9 >= 8", gqsa=True,
      llama=rf"tensor '{FFN_DOWN}': row 63 block 3: group index 9 >= 8")
def _(lay):
    assert max(lay.tensors.values(), key=lambda t: t.data_pos).name == FFN_DOWN
    return set_block(lay, FFN_DOWN, 63, 3, index=9)


@case("gqsa_duplicate_index", "two blocks of a row hold the same group",
      python=r"'blk.0.ffn_up.weight'.*row 7 block 1.*group index (\d+) after \1", gqsa=True,
      llama=r"tensor 'blk.0.ffn_up.weight': row 7 block 1: group index (\d+) after \1 .*strictly increase")
def _(lay):
    return set_block(lay, "blk.0.ffn_up.weight", 7, 1, index=lay.block_index("blk.0.ffn_up.weight", 7, 0))


@case("gqsa_unsorted_indices", "two blocks of a row swap their group indices",
      python=rf"'{FFN_DOWN}'.*row 0 block 2.*group index \d+ after \d+", gqsa=True,
      llama=rf"tensor '{FFN_DOWN}': row 0 block 2: group index \d+ after \d+")
def _(lay):
    a, b = lay.block_index(FFN_DOWN, 0, 1), lay.block_index(FFN_DOWN, 0, 2)
    return set_block(replace(lay, buf=set_block(lay, FFN_DOWN, 0, 1, index=b)), FFN_DOWN, 0, 2, index=a)


@case("gqsa_zeroed_tensor", "all data bytes of a gqsa4 tensor zero (a sparse-file hole)",
      python=r"'blk.1.ffn_gate.weight'.*row 0 block 1.*group index 0 after 0", gqsa=True,
      llama=r"tensor 'blk.1.ffn_gate.weight': row 0 block 1: group index 0 after 0")
def _(lay):
    t = lay.tensors["blk.1.ffn_gate.weight"]
    buf = bytearray(lay.buf)
    buf[t.data_pos:t.data_pos + t.nbytes] = bytes(t.nbytes)
    return bytes(buf)


for _bits, _label in ((0x7E00, "nan"), (0x7C00, "inf"), (0xFC00, "neg_inf")):
    def _make(lay, bits=_bits):
        return set_block(lay, "blk.1.attn_v.weight", 2, 0, d_bits=bits)
    case(f"gqsa_{_label}_scale", f"a block's fp16 scale is {_label} (0x{_bits:04x})",
         python=rf"'blk.1.attn_v.weight'.*row 2 block 0.*scale .*0x{_bits:04x}", gqsa=True,
         llama=rf"tensor 'blk.1.attn_v.weight': row 2 block 0: scale is not finite \(fp16 bits 0x{_bits:04x}\)")(_make)


@case("gqsa_random_bytes_as_gqsa4", "type confusion: a gqsa4 tensor's data replaced by F16 weights",
      python=r"'blk.0.attn_output.weight'.*(group index|scale)", gqsa=True,
      llama=r"tensor 'blk.0.attn_output.weight': row \d+ block \d+: (group index|scale)")
def _(lay):
    t = lay.tensors["blk.0.attn_output.weight"]
    f16 = (np.random.default_rng(1).standard_normal(t.nbytes // 2) * 0.02).astype("<f2").tobytes()
    return lay.buf[:t.data_pos] + f16 + lay.buf[t.data_pos + t.nbytes:]


# GQSA-specific: shapes and types

@case("gqsa_ne0_not_multiple_of_16", "a gqsa4 tensor with ne0 = 24",
      python=r"'blk.0.attn_q.weight' of type gqsa4 has ne0 = 24, not a multiple of its block size 16", gqsa=True,
      llama=r"tensor 'blk.0.attn_q.weight' of type 128 \(gqsa4\) has 24 elements per row, not a multiple of block size \(16\)")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].ne_pos, "<Q", 24))


@case("gqsa_ne0_exceeds_width", "5 blocks per row (ne0 = 80) in a tensor of width 64 (4 groups)",
      python=r"'blk.0.attn_q.weight': ne0 = 80 stored weights per row, but its logical width is 64", gqsa=True,
      llama=r"gqsa4 tensor 'blk.0.attn_q.weight' has shape .*expected 64 rows of at most 64 stored weights")
def _(lay):
    m = Model.of(lay)
    t = m.tensor("blk.0.attn_q.weight")
    rows = np.zeros((t.ne[1], 5), fmt.BLOCK_DTYPE)
    rows["d"] = 0.01
    rows["iz"] = np.arange(5)
    t.ne[0], t.data = 80, rows.tobytes()
    return m.to_bytes()


@case("gqsa_wrong_row_count", "a gqsa4 attn_k with 16 rows where the model has 32",
      python=None, gqsa=True, note="the reader checks the format, not the model's shapes",
      llama=r"gqsa4 tensor 'blk.0.attn_k.weight' has shape .*expected 32 rows")
def _(lay):
    m = Model.of(lay)
    t = m.tensor("blk.0.attn_k.weight")
    t.ne[1], t.data = 16, t.data[:len(t.data) // 2]
    return m.to_bytes()


def _as_gqsa4(lay: Layout, name: str) -> bytes:
    """Tensor `name` relabelled gqsa4 with the same ne (every group kept) and reinterpreted bytes."""
    m = Model.of(lay)
    t = m.tensor(name)
    n = int(np.prod(t.ne)) // fmt.GROUP_SIZE * fmt.BLOCK_BYTES
    t.type_id, t.data = fmt.GGML_TYPE_GQSA4, (t.data * 2)[:n]
    return m.to_bytes()


@case("gqsa4_token_embd", "token_embd.weight stored as gqsa4",
      python=r"GQSA tensors \['token_embd.weight'\] are not listed", gqsa=True,
      llama=r"tensor 'token_embd.weight' is stored as gqsa4, which is only supported for decoder linear weights")
def _(lay):
    return _as_gqsa4(lay, "token_embd.weight")


@case("gqsa4_norm", "a norm vector (blk.0.attn_norm.weight) stored as gqsa4",
      python=r"GQSA tensors \['blk.0.attn_norm.weight'\] are not listed", gqsa=True,
      llama=r"tensor 'blk.0.attn_norm.weight' is stored as gqsa4, which is only supported for decoder linear")
def _(lay):
    return _as_gqsa4(lay, "blk.0.attn_norm.weight")


@case("gqsa4_relabelled_q4_0", "type confusion: a gqsa4 tensor's type field says q4_0",
      python=r"'gqsa.tensor_names' lists 'blk.0.attn_q.weight', which has type Q4_0", gqsa=True,
      llama=r"tensor 'blk.0.attn_k.weight' has offset \d+, expected \d+")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].type_pos, "<I", 2))


@case("gqsa_q8_type_in_file", "a tensor of the runtime-only activation type 129 (gqsa_q8)",
      python=r"'blk.0.attn_q.weight' has type 129 \(gqsa_q8\), a runtime-only", gqsa=True,
      llama=r"tensor 'blk.0.attn_q.weight' has type gqsa_q8, a runtime-only activation type")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].type_pos, "<I", fmt.GGML_TYPE_GQSA_Q8))


# GQSA-specific: gqsa3

def set_zero(lay: Layout, tensor: str, row: int, block: int, z: int) -> bytes:
    """Overwrites the zero point (iz bits 12..15) of one block."""
    pos = lay.block_pos(tensor, row, block)
    (iz,) = struct.unpack_from("<H", lay.buf, pos + 2)
    return patched(lay.buf, (pos + 2, "<H", (iz & fmt.INDEX_MASK) | (z << fmt.ZERO_SHIFT)))


@case("gqsa3_zero_point_8", "a gqsa3 block with zero point 8 (its field holds 0..15, the type 0..7)",
      python=rf"'{FFN_DOWN}'.*row 2 block 1.*zero point 8 > 7", gqsa=True, base="w3s50",
      llama=rf"tensor '{FFN_DOWN}': row 2 block 1: zero point 8 > 7")
def _(lay):
    return set_zero(lay, FFN_DOWN, 2, 1, 8)


@case("gqsa3_zero_point_15", "a gqsa3 block with zero point 15 (legal in gqsa4)",
      python=r"'blk.0.attn_q.weight'.*row 0 block 0.*zero point 15 > 7", gqsa=True, base="w3s50",
      llama=r"tensor 'blk.0.attn_q.weight': row 0 block 0: zero point 15 > 7")
def _(lay):
    return set_zero(lay, "blk.0.attn_q.weight", 0, 0, 15)


@case("gqsa3_tensors_in_bits4_file", "type confusion: gqsa3 tensors in a file whose gqsa.bits = 4",
      python=r"lists '[^']+', which has type (?i:gqsa3)", gqsa=True, base="w3s50",
      llama=r"tensor '[^']+' is stored as gqsa3, but the file's 'gqsa.bits' = 4 names gqsa4")
def _(lay):
    return patched(lay.buf, (lay.kv[fmt.KEY_BITS].value_pos, "<I", 4))


@case("gqsa4_tensors_in_bits3_file", "type confusion: gqsa4 tensors in a file whose gqsa.bits = 3",
      python=r"lists '[^']+', which has type (?i:gqsa4)", gqsa=True,
      llama=r"tensor '[^']+' is stored as gqsa4, but the file's 'gqsa.bits' = 3 names gqsa3")
def _(lay):
    return patched(lay.buf, (lay.kv[fmt.KEY_BITS].value_pos, "<I", 3))


# GQSA-specific: metadata

@case("gqsa_format_version_future", "gqsa.format_version = 2",
      python=r"GQSA format version 2 is newer than the 1 .*upgrade gqsa-gguf", gqsa=True,
      llama=r"metadata 'gqsa.format_version' = 2: the file's GQSA format is newer .*upgrade gqsa-gguf")
def _(lay):
    return patched(lay.buf, (lay.kv[fmt.KEY_FORMAT_VERSION].value_pos, "<I", 2))


@case("gqsa_format_version_zero", "gqsa.format_version = 0",
      python=r"'gqsa.format_version' = 0 is invalid", gqsa=True,
      llama=r"metadata 'gqsa.format_version' = 0 is invalid")
def _(lay):
    return patched(lay.buf, (lay.kv[fmt.KEY_FORMAT_VERSION].value_pos, "<I", 0))


@case("gqsa_format_version_int32", "gqsa.format_version stored as int32 (same bytes)",
      python=r"'gqsa.format_version' has type INT32, expected UINT32", gqsa=True,
      llama=r"metadata 'gqsa.format_version' has type i32, expected u32")
def _(lay):
    return patched(lay.buf, (lay.kv[fmt.KEY_FORMAT_VERSION].type_pos, "<I", VT.INT32))


@case("gqsa_format_version_string", "gqsa.format_version stored as the string \"1\"",
      python=r"'gqsa.format_version' has type STRING, expected UINT32", gqsa=True,
      llama=r"metadata 'gqsa.format_version' has type str, expected u32")
def _(lay):
    m = Model.of(lay)
    m.set_kv(fmt.KEY_FORMAT_VERSION, kv_string("1"))
    return m.to_bytes()


@case("gqsa_format_version_missing", "gqsa4 tensors but no gqsa.format_version",
      python=r"missing metadata 'gqsa.format_version'", gqsa=True,
      llama=r"the file holds gqsa4 or gqsa3 tensors but no 'gqsa.format_version' metadata")
def _(lay):
    m = Model.of(lay)
    m.drop_kv(fmt.KEY_FORMAT_VERSION)
    return m.to_bytes()


@case("gqsa_bits_8", "type confusion: gqsa.bits = 8 on gqsa4 tensors",
      python=r"'gqsa.bits' = 8, but format version 1 defines only 3 and 4", gqsa=True,
      llama=r"metadata 'gqsa.bits' = 8, but GQSA format version 1 only defines 4")
def _(lay):
    return patched(lay.buf, (lay.kv[fmt.KEY_BITS].value_pos, "<I", 8))


@case("gqsa_group_size_32", "type confusion: gqsa.group_size = 32 on gqsa4 tensors",
      python=r"'gqsa.group_size' = 32, but format version 1 only defines 16", gqsa=True,
      llama=r"metadata 'gqsa.group_size' = 32, but GQSA format version 1 only defines 16")
def _(lay):
    return patched(lay.buf, (lay.kv[fmt.KEY_GROUP_SIZE].value_pos, "<I", 32))


@case("gqsa_widths_int32", "gqsa.tensor_widths is an array of int32 instead of uint32",
      python=r"'gqsa.tensor_widths' has type ARRAY\[INT32\], expected ARRAY\[UINT32\]", gqsa=True,
      llama=r"metadata 'gqsa.tensor_widths' is not an array of u32")
def _(lay):
    return patched(lay.buf, (lay.kv[fmt.KEY_TENSOR_WIDTHS].value_pos, "<I", VT.INT32))


@case("gqsa_width_disagrees", "gqsa.tensor_widths says 64 for ffn_down (width 128, 4 kept)",
      python=r"'blk.\d.ffn_down.weight': ne0 = 64 stored weights per row, but its logical width is 64|"
             r"sparsity.*keeps 4 of 4 groups", gqsa=True,
      llama=rf"tensor '{FFN_DOWN}': 'gqsa.tensor_widths' records width 64, but the model's width is 128")
def _(lay):
    m = Model.of(lay)
    names = list(lay.gqsa_width)
    widths = [64 if n == FFN_DOWN else lay.gqsa_width[n] for n in names]
    m.set_kv(fmt.KEY_TENSOR_WIDTHS, struct.pack(f"<IIQ{len(widths)}I", VT.ARRAY, VT.UINT32, len(widths), *widths))
    return m.to_bytes()


# general: header

@case("bad_magic", "magic 'GGUX'", python=r"bad magic b'GGUX'", llama=r"invalid magic characters")
def _(lay):
    return b"GGUX" + lay.buf[4:]


@case("bad_version_future", "GGUF version 4", python=r"GGUF version 4 is not supported",
      llama=r"only supports up to version 3")
def _(lay):
    return patched(lay.buf, (4, "<I", 4))


@case("bad_version_1", "GGUF version 1", python=r"GGUF version 1 is not supported",
      llama=r"GGUFv1 is no longer supported")
def _(lay):
    return patched(lay.buf, (4, "<I", 1))


@case("empty_file", "a file of zero bytes", python=r"the file is empty", llama=r"failed to read magic|GGUF")
def _(lay):
    return b""


@case("truncated_header", "cut in the middle of the metadata", python=r"truncated or corrupt|cannot fit",
      llama=r"failed to read|read_gguf|GGUF|exceeds")
def _(lay):
    return lay.buf[:lay.kv["tokenizer.ggml.tokens"].value_pos + 500]


@case("truncated_tensor_infos", "cut in the middle of the tensor infos", python=r"truncated or corrupt",
      llama=r"failed to read|GGUF|exceeds")
def _(lay):
    return lay.buf[:lay.tensors["blk.0.ffn_up.weight"].ne_pos + 3]


@case("truncated_data", "the last 100 bytes of tensor data are missing",
      python=rf"tensor '{FFN_DOWN}' data .* lies outside the file",
      llama=rf"tensor '{FFN_DOWN}' data is not within the file bounds")
def _(lay):
    return lay.buf[:len(lay.buf) - 100]


@case("huge_tensor_count", "tensor count 2^62", python=r"header claims 4611686018427387904 tensors",
      llama=r"number of tensors is 4611686018427387904")
def _(lay):
    return patched(lay.buf, (8, "<Q", 1 << 62))


@case("huge_kv_count", "metadata count 2^62", python=r"4611686018427387904 metadata entries.*cannot fit",
      llama=r"number of key value pairs is 4611686018427387904")
def _(lay):
    return patched(lay.buf, (16, "<Q", 1 << 62))


@case("huge_key_length", "the first key's length is 2^62", python=r"length of key of metadata entry 0|"
      r"key of metadata entry 0 \(4611686018427387904 bytes\)", llama=r"string length 4611686018427387904 exceeds")
def _(lay):
    return patched(lay.buf, (24, "<Q", 1 << 62))


@case("huge_string_value", "general.architecture's value length 2^40",
      python=r"value of 'general.architecture' \(1099511627776 bytes\)", llama=r"string length 1099511627776 exceeds")
def _(lay):
    return patched(lay.buf, (lay.kv["general.architecture"].value_pos, "<Q", 1 << 40))


@case("huge_string_array", "tokenizer.ggml.tokens claims 2^40 strings",
      python=r"1099511627776 strings of 'tokenizer.ggml.tokens'", llama=r"tokenizer.ggml.tokens|array|exceeds")
def _(lay):
    return patched(lay.buf, (lay.kv["tokenizer.ggml.tokens"].value_pos + 4, "<Q", 1 << 40))


@case("huge_numeric_array", "tokenizer.ggml.scores claims 2^61 float32 (2^63 bytes: overflows int64)",
      python=r"2305843009213693952 elements of 'tokenizer.ggml.scores'", llama=r"tokenizer.ggml.scores|array|exceeds")
def _(lay):
    return patched(lay.buf, (lay.kv["tokenizer.ggml.scores"].value_pos + 4, "<Q", 1 << 61))


@case("unknown_value_type", "llama.block_count has value type 13", python=r"unknown value type 13",
      llama=r"key 'llama.block_count' has invalid GGUF type 13")
def _(lay):
    return patched(lay.buf, (lay.kv["llama.block_count"].type_pos, "<I", 13))


@case("unknown_array_element_type", "tokenizer.ggml.scores has element type 99",
      python=r"unknown array element type 99", llama=r"tokenizer.ggml.scores|invalid GGUF type|array")
def _(lay):
    return patched(lay.buf, (lay.kv["tokenizer.ggml.scores"].value_pos, "<I", 99))


@case("array_of_arrays", "tokenizer.ggml.scores is an array of arrays",
      python=r"'tokenizer.ggml.scores' is an array of arrays", llama=r"tokenizer.ggml.scores|array|GGUF")
def _(lay):
    return patched(lay.buf, (lay.kv["tokenizer.ggml.scores"].value_pos, "<I", VT.ARRAY))


@case("duplicate_key", "llama.block_count appears twice", python=r"duplicate metadata key 'llama.block_count'",
      llama=r"duplicate key 'llama.block_count'")
def _(lay):
    m = Model.of(lay)
    m.kv.append((b"llama.block_count", kv_u32(N_LAYER)))
    return m.to_bytes()


@case("bad_alignment", "general.alignment = 48 (not a power of two)", base="mixed",
      python=r"'general.alignment' = 48 is not a power of two", llama=r"alignment 48 is not a power of 2")
def _(lay):
    return patched(lay.buf, (lay.kv["general.alignment"].value_pos, "<I", 48))


@case("alignment_wrong_type", "general.alignment stored as int32", base="mixed",
      python=r"'general.alignment' must be a uint32, got INT32", llama=r"general.alignment.* must be of type")
def _(lay):
    return patched(lay.buf, (lay.kv["general.alignment"].type_pos, "<I", VT.INT32))


# general: tensor infos

@case("huge_dims_overflow", "token_embd ne = (2^40, 2^40): the element count overflows int64",
      python=r"shape \(1099511627776, 1099511627776\) has more than INT64_MAX elements",
      llama=r"token_embd.weight.* may cause overflow errors")
def _(lay):
    t = lay.tensors["token_embd.weight"]
    return patched(lay.buf, (t.ne_pos, "<Q", 1 << 40), (t.ne_pos + 8, "<Q", 1 << 40))


@case("huge_dim", "blk.0.attn_q has 2^50 rows (representable, far beyond the file)",
      python=r"tensor '.*' data .* lies outside the file|overlaps", llama=r"has offset \d+, expected \d+")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].ne_pos + 8, "<Q", 1 << 50))


@case("huge_bytes_overflow", "a gqsa4 tensor of 2^40 x 2^22 weights: bytes overflow size_t",
      python=r"lies outside the file|INT64_MAX|overlaps", llama=r"size in bytes|overflow|offset")
def _(lay):
    t = lay.tensors["blk.0.attn_q.weight"]
    return patched(lay.buf, (t.ne_pos, "<Q", 1 << 40), (t.ne_pos + 8, "<Q", 1 << 22))


@case("negative_dim", "a dimension of -16", python=r"dimension 0 = \d+ is negative",
      llama=r"has invalid number of elements: -16 < 0")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].ne_pos, "<q", -16))


@case("too_many_dims", "n_dims = 5", python=r"has 5 dimensions; ggml supports 1..4",
      llama=r"invalid number of dimensions: 5 > 4")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].ndims_pos, "<I", 5))


@case("offset_outside_file", "the last tensor's offset points 1 GiB past the end",
      python=r"lies outside the file", llama=rf"tensor '{FFN_DOWN}' has offset \d+, expected \d+")
def _(lay):
    return patched(lay.buf, (lay.tensors[FFN_DOWN].offset_pos, "<Q", 1 << 30))


@case("misaligned_offset", "a tensor offset one byte past its aligned place",
      python=r"data offset \d+ is not a multiple of the alignment 32",
      llama=r"tensor 'blk.0.attn_q.weight' has offset \d+, expected \d+")
def _(lay):
    t = lay.tensors["blk.0.attn_q.weight"]
    return patched(lay.buf, (t.offset_pos, "<Q", t.offset + 1))


@case("overlapping_tensors", "blk.0.attn_k's data at blk.0.attn_q's offset",
      python=r"overlaps tensor", llama=r"tensor 'blk.0.attn_k.weight' has offset \d+, expected \d+")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_k.weight"].offset_pos, "<Q",
                             lay.tensors["blk.0.attn_q.weight"].offset))


@case("duplicate_tensor_name", "blk.1.attn_q.weight renamed blk.0.attn_q.weight",
      python=r"duplicate tensor name 'blk.0.attn_q.weight'", llama=r"duplicate tensor name 'blk.0.attn_q.weight'")
def _(lay):
    t = lay.tensors["blk.1.attn_q.weight"]
    buf = bytearray(lay.buf)
    buf[t.pos + 8:t.pos + 8 + len("blk.0")] = b"blk.0"
    return bytes(buf)


@case("tensor_name_too_long", "a tensor name of 80 bytes", python=r"names must have 1..63 bytes",
      llama=r"tensor name \d+ is too long: 80 >= 64")
def _(lay):
    m = Model.of(lay)
    m.tensor("output_norm.weight").name = b"x" * 80
    return m.to_bytes()


@case("tensor_name_invalid_utf8", "a tensor name with a 0xff byte", python=r"is not valid UTF-8",
      llama=r"missing tensor|wrong number of tensors|blk.0.attn_q")
def _(lay):
    buf = bytearray(lay.buf)
    buf[lay.tensors["blk.0.attn_q.weight"].pos + 8] = 0xFF
    return bytes(buf)


@case("unknown_type_in_gap", "tensor type 77 (unused id between upstream's and ours)",
      python=r"unknown ggml type id 77", llama=r"tensor 'blk.0.attn_q.weight' of type 77")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].type_pos, "<I", 77))


@case("removed_type_q4_2", "tensor type 4 (Q4_2, removed upstream)", python=r"unknown ggml type id 4",
      llama=r"tensor 'blk.0.attn_q.weight' of type 4")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].type_pos, "<I", 4))


@case("type_out_of_range", "tensor type 4096", python=r"unknown ggml type id 4096",
      llama=r"tensor 'blk.0.attn_q.weight' has invalid ggml type 4096")
def _(lay):
    return patched(lay.buf, (lay.tensors["blk.0.attn_q.weight"].type_pos, "<I", 4096))


# Positive controls: what must load everywhere.

POSITIVE: list[Case] = []


def positive(name: str, what: str, base: str = "w4s50"):
    def register(make: Callable[[Layout], bytes]):
        POSITIVE.append(Case(name, what, make, None, None, True, base))
        return make
    return register


@positive("valid_w4s50", "base w4s50 unchanged")
def _(lay):
    return lay.buf


@positive("valid_mixed", "base mixed (25 %/75 %, F16 embeddings, alignment 64) unchanged", base="mixed")
def _(lay):
    return lay.buf


@positive("valid_w3s50", "base w3s50 (gqsa3 weights) unchanged", base="w3s50")
def _(lay):
    return lay.buf


@positive("valid_edge_values", "legal extremes: scale 0, zero point 15, index groups-1, -65504 scale")
def _(lay):
    edited = replace(lay, buf=set_block(lay, FFN_DOWN, 0, 3, index=7, d_bits=0x0000))
    pos = edited.block_pos(FFN_DOWN, 1, 0)
    (iz,) = struct.unpack_from("<H", edited.buf, pos + 2)
    return patched(edited.buf, (pos + 2, "<H", (iz & fmt.INDEX_MASK) | (15 << fmt.ZERO_SHIFT)), (pos, "<H", 0xFBFF))


def write_cases(directory: Path, cases: list[Case] | None = None) -> dict[str, Path]:
    """Writes the bases and every case (default: CASES + POSITIVE) to `directory`; name -> path."""
    directory.mkdir(parents=True, exist_ok=True)
    lays = {b: layout(write_base(directory / f"base_{b}.gguf", b)) for b in BASES}
    out = {}
    for c in (CASES + POSITIVE) if cases is None else cases:
        p = directory / f"{c.name}.gguf"
        p.write_bytes(c.make(lays[c.base]))
        out[c.name] = p
    return out


def python_read(path: Path):
    """Our reader all the way: parse, check the metadata, and validate every gqsa4 tensor's data."""
    f = read_gguf(path)
    for name in f.gqsa:
        f.gqsa_tensor(name)
    return f


# --- llama.cpp in child processes -----------------------------------------------------------------

@dataclass
class LoadResult:
    outcome: str            # "loaded" (and generated a token), "refused" (a caught ValueError), "crashed"
    message: str = ""       # the exception text, or how the child died
    log: str = ""           # llama.cpp's warnings and errors while loading this file
    token: int | None = None        # the most likely next token after PROMPT, when loaded
    finite: bool | None = None      # whether all logits (after PROMPT and after that token) were finite
    seconds: float = 0.0

    def describe(self) -> str:
        return f"{self.outcome}: {self.message}\n--- llama.cpp log ---\n{self.log[-3000:]}"


def load_files(paths: list[Path], timeout: float = 1800.0, env: dict | None = None) -> dict[Path, LoadResult]:
    """Loads each file with the patched llama.cpp (gqsa_gguf.runtime.import_llama_cpp) in a child.

    One child loads files in turn and records each outcome in a JSON-lines file as it goes; if it
    dies (a signal, or any exit without having recorded the file it was on), that file is marked
    crashed with the exit status and the child's stderr, and a new child carries on with the rest.
    """
    results: dict[Path, LoadResult] = {}
    todo = [Path(p) for p in paths]
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    while todo:
        batch = list(todo)
        out = todo[0].parent / f".hostile-results-{os.getpid()}.jsonl"
        out.unlink(missing_ok=True)
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), *map(str, todo)],
                                  env=env, capture_output=True, text=True, errors="replace", timeout=timeout)
            rc, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = None
            stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        started = None
        for line in (out.read_text().splitlines() if out.exists() else []):
            rec = json.loads(line)
            if rec["event"] == "start":
                started = Path(rec["file"])
            else:
                results[Path(rec["file"])] = LoadResult(rec["outcome"], rec["message"], rec["log"],
                                                        rec["token"], rec["finite"], rec["seconds"])
                started = None
        out.unlink(missing_ok=True)
        todo = [p for p in todo if p not in results]
        if not todo:
            if rc != 0:     # everything recorded, yet the child failed at exit: blame its last file
                results[batch[-1]] = LoadResult("crashed", f"child exited with {rc} after its last file",
                                                _crash_report(stderr))
            break
        victim = started or todo[0]
        how = "timed out" if rc is None else (f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}")
        results[victim] = LoadResult("crashed", f"child {how} while loading {victim.name}", _crash_report(stderr))
        todo = [p for p in todo if p != victim]
    return results


_REPORT_START = re.compile(r"runtime error:|ERROR: AddressSanitizer|ERROR: LeakSanitizer|Fatal Python error|"
                           r"GGML_ASSERT|terminate called")


def _crash_report(stderr: str, lines: int = 40) -> str:
    """The start of a sanitizer/abort report in the child's stderr (its first lines say what and
    where), else the tail."""
    text = stderr.splitlines()
    for i, line in enumerate(text):
        if _REPORT_START.search(line):
            return "\n".join(text[max(0, i - 2):i + lines])
    return "\n".join(text[-lines:])


def _child(out_path: str, files: list[str]) -> int:
    """The child: load every file, record outcomes; a crash leaves the 'start' record unpaired."""
    from gqsa_gguf import runtime

    llama_cpp = runtime.import_llama_cpp()
    log: list[str] = []
    keep = {"level": 0}

    @llama_cpp.llama_log_callback
    def on_log(level, text, user_data):       # GGML_LOG_LEVEL_WARN (3), ERROR (4) and their CONT (5)
        if level != 5:
            keep["level"] = level
        if keep["level"] in (3, 4):
            log.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(on_log, None)
    with open(out_path, "a") as out:
        def record(**rec):
            out.write(json.dumps(rec) + "\n")
            out.flush()
            os.fsync(out.fileno())

        for f in files:
            record(event="start", file=f)
            if os.environ.get(SELFTEST_CRASH_ENV) == os.path.basename(f):
                os.kill(os.getpid(), signal.SIGSEGV)    # tests that a crash is seen (test_hostile_files)
            faulthandler.dump_traceback_later(FILE_TIMEOUT, exit=True)     # a hang ends the child
            log.clear()
            t0 = time.perf_counter()
            token, finite, outcome, message = None, None, "loaded", ""
            try:
                # verbose=True keeps stderr open (verbose=False points fds 1/2 at /dev/null while
                # loading, which would swallow a sanitizer's report); the log goes to on_log
                llm = llama_cpp.Llama(model_path=f, n_ctx=64, n_batch=16, n_threads=2, seed=0,
                                      logits_all=True, verbose=True)
                try:
                    llm.eval(llm.tokenize(PROMPT.encode()))             # batched mul_mat
                    logits = np.array(llm.scores[llm.n_tokens - 1])
                    token = int(np.argmax(logits))
                    llm.eval([token])                                    # one column: decode path
                    finite = bool(np.isfinite(logits).all() and np.isfinite(llm.scores[llm.n_tokens - 1]).all())
                finally:
                    llm.close()
            except ValueError as e:
                outcome, message = "refused", str(e)
            faulthandler.cancel_dump_traceback_later()
            record(event="done", file=f, outcome=outcome, message=message, log="".join(log), token=token, finite=finite,
                   seconds=round(time.perf_counter() - t0, 3))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2:]))
