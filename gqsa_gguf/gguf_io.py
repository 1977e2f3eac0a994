"""Writing and reading GGUF files that hold gqsa4 tensors.

Writing builds on the PyPI `gguf` package's GGUFWriter (stock metadata, tokenizer, F32/F16
tensors); this module adds the gqsa4 tensor type, the `gqsa.*` metadata of docs/FORMAT.md and an
atomic write (a temporary file in the target directory, `os.replace`d at the end):

    w = GQSAWriter("llama", config_json)         # w.gguf is the GGUFWriter, for stock metadata
    w.add_tensor("token_embd.weight", emb)        # stock tensor, written as given
    w.add_gqsa_tensor("blk.0.attn_q.weight", packed, width)
    w.write("model.gguf")

Reading is our own parser (gguf-py's reader rejects unknown type ids). `read_gguf(path)` checks
every field where it enters — the file may come from a stranger — and raises GGUFError naming the
field, its offset or tensor, the value, and what to do. Tensor data stays in a read-only memmap;
`GGUFFile.gqsa_tensor(name)` returns packed rows validated by `codec.validate`, and
`GGUFFile.tensor_array(name)` returns float32 values (gqsa4: the dense dequantized matrix).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from gguf import GGUFWriter
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from . import __version__, codec
from .errors import GQSAError
from .format import (
    BITS,
    BLOCK_BYTES,
    FORMAT_VERSION,
    GGML_TYPE_GQSA4,
    GGML_TYPE_GQSA_Q8,
    GROUP_SIZE,
    KEY_BITS,
    KEY_CONFIG,
    KEY_FORMAT_VERSION,
    KEY_GROUP_SIZE,
    KEY_TENSOR_NAMES,
    KEY_TENSOR_SPARSITY,
    KEY_TENSOR_WIDTHS,
    KEY_TOOL_VERSION,
    TYPE_IDS,
    TYPES,
    TYPE_NAME,
    gqsa_type,
)

__all__ = [
    "GGUFError",
    "GQSATensorRecord",
    "GQSAWriter",
    "GGUFFile",
    "TensorInfo",
    "register_gqsa_type",
    "add_gqsa_tensor",
    "add_gqsa_metadata",
    "read_gguf",
]

GGUF_MAGIC_BYTES = b"GGUF"
GGUF_SUPPORTED_VERSIONS = (2, 3)      # v1 used 32-bit counts and is long gone
GGML_MAX_DIMS = 4                     # ggml's limits, which llama.cpp enforces on load
GGML_MAX_NAME = 64                    # tensor names are shorter than this (NUL included)
KEY_ALIGNMENT = Keys.General.ALIGNMENT
_INT64_MAX = (1 << 63) - 1

_NUMERIC_DTYPES = {                   # NumPy dtype per numeric GGUF value type, of a value or an array element
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8",
    GGUFValueType.BOOL: "<u1",
}
_STRING_HEADER = 8                    # uint64 length before the bytes
_MIN_KV_BYTES = _STRING_HEADER + 1 + 4 + 1                    # key of >= 1 byte, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = _STRING_HEADER + 1 + 4 + 8 + 4 + 8  # name, n_dims, 1 dim, type, offset


class GGUFError(GQSAError, ValueError):
    """A GGUF file is malformed, or uses something this version of gqsa-gguf does not support."""


@dataclass(frozen=True)
class GQSATensorRecord:
    """What `gqsa.tensor_*` metadata says about one gqsa4 tensor."""
    name: str
    width: int          # logical width K (input columns)
    sparsity: float     # fraction of pruned groups, 1 - n_kept / (K/16)


# --- writing -------------------------------------------------------------------------------------

def register_gqsa_type() -> None:
    """Teaches the gguf package the block geometry of type ids 128 and 130 (idempotent).

    GGUFWriter itself only packs the type id as a uint32, but `add_tensor(..., raw_dtype=...)`
    with a uint8 array converts the byte shape to an element shape through GGML_QUANT_SIZES.
    """
    for t in TYPES.values():
        entry = GGML_QUANT_SIZES.get(t.type_id)     # type: ignore[call-overload]
        if entry is None:
            GGML_QUANT_SIZES[t.type_id] = (GROUP_SIZE, t.block_bytes)  # type: ignore[index]
        elif tuple(entry) != (GROUP_SIZE, t.block_bytes):
            raise RuntimeError(f"the installed gguf package defines ggml type {t.type_id} as "
                               f"{entry}, not {t.name} {(GROUP_SIZE, t.block_bytes)} — use gguf==0.19.0")


def _check_tensor_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor name must be a non-empty str, got {name!r}")
    if len(name.encode("utf-8")) >= GGML_MAX_NAME:
        raise ValueError(f"tensor name '{name}' has {len(name.encode('utf-8'))} bytes; llama.cpp "
                         f"accepts at most {GGML_MAX_NAME - 1}")


def add_gqsa_tensor(writer: GGUFWriter, name: str, packed: np.ndarray, width: int,
                    sparsity: float | None = None, bits: int = BITS) -> GQSATensorRecord:
    """Adds packed gqsa4 rows (uint8 [N, n_kept*12]; bits=3: gqsa3, [N, n_kept*10]) as tensor
    `name` with ggml shape ne0 = n_kept*16, ne1 = N. Validates the rows against `width` first.

    `sparsity` may be the nominal target (e.g. 0.5); it must agree with the kept groups to within
    half a group, and the record holds the actual fraction of pruned groups.
    """
    _check_tensor_name(name)
    t = gqsa_type(bits)
    codec.validate(packed, width, name, bits)
    packed = np.ascontiguousarray(packed)
    n_groups = width // GROUP_SIZE
    n_kept = packed.shape[1] // t.block_bytes
    actual = 1.0 - n_kept / n_groups
    if sparsity is not None and abs(float(sparsity) - actual) > 0.5 / n_groups + 1e-9:
        raise ValueError(f"tensor '{name}': sparsity {sparsity} disagrees with the packed rows, which keep "
                         f"{n_kept} of {n_groups} groups (sparsity {actual:.4f})")
    register_gqsa_type()
    writer.add_tensor(name, packed, raw_dtype=t.type_id)    # type: ignore[arg-type]
    return GQSATensorRecord(name=name, width=int(width), sparsity=actual)


def add_gqsa_metadata(writer: GGUFWriter, config_json: str, tool_version: str,
                      records: Sequence[GQSATensorRecord], bits: int = BITS) -> None:
    """Writes every `gqsa.*` key of docs/FORMAT.md, with the types the spec gives them; `bits`
    names the file's GQSA type (4: gqsa4, 3: gqsa3)."""
    gqsa_type(bits)
    if not isinstance(config_json, str):
        raise TypeError(f"config_json must be a JSON string, got {type(config_json).__name__}")
    try:
        if not isinstance(json.loads(config_json), dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise ValueError(f"config_json must be a JSON object: {e}") from None
    if not tool_version:
        raise ValueError("tool_version must be a non-empty string")
    if not records:
        raise ValueError("no gqsa4 tensors were added — a GQSA file must hold at least one")
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tensor names in the gqsa records: {names}")

    writer.add_uint32(KEY_FORMAT_VERSION, FORMAT_VERSION)
    writer.add_uint32(KEY_BITS, bits)
    writer.add_uint32(KEY_GROUP_SIZE, GROUP_SIZE)
    # add_key_value rather than add_string/add_array, which silently drop empty values
    writer.add_key_value(KEY_TOOL_VERSION, tool_version, GGUFValueType.STRING)
    writer.add_key_value(KEY_CONFIG, config_json, GGUFValueType.STRING)
    writer.add_key_value(KEY_TENSOR_NAMES, names, GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    writer.add_key_value(KEY_TENSOR_WIDTHS, [int(r.width) for r in records], GGUFValueType.ARRAY,
                         sub_type=GGUFValueType.UINT32)
    writer.add_key_value(KEY_TENSOR_SPARSITY, [float(r.sparsity) for r in records], GGUFValueType.ARRAY,
                         sub_type=GGUFValueType.FLOAT32)


class GQSAWriter:
    """A GGUFWriter plus the GQSA tensors (all of the `bits`-bit type: 4 gqsa4, 3 gqsa3) and
    metadata; writes once, atomically.

    Use `self.gguf` (a gguf.GGUFWriter) for the stock metadata and tokenizer keys.
    """

    def __init__(self, arch: str, config_json: str, tool_version: str = __version__, bits: int = BITS):
        self.type = gqsa_type(bits)
        self.gguf = GGUFWriter(path=None, arch=arch)
        self.config_json = config_json
        self.tool_version = tool_version
        self.records: list[GQSATensorRecord] = []
        self._written = False

    def add_tensor(self, name: str, array: np.ndarray, raw_dtype: GGMLQuantizationType | None = None) -> None:
        """A stock tensor (F32, F16, ... or raw quantized bytes with `raw_dtype`), written as given."""
        _check_tensor_name(name)
        self.gguf.add_tensor(name, np.ascontiguousarray(array), raw_dtype=raw_dtype)

    def add_gqsa_tensor(self, name: str, packed: np.ndarray, width: int,
                        sparsity: float | None = None) -> GQSATensorRecord:
        record = add_gqsa_tensor(self.gguf, name, packed, width, sparsity, self.type.bits)
        self.records.append(record)
        return record

    def write(self, path: os.PathLike[str] | str, progress: bool = False) -> Path:
        """Writes the file to `path`. Until the final rename the target is untouched; on any
        exception (KeyboardInterrupt included) the temporary file is removed."""
        if self._written:
            raise RuntimeError("GQSAWriter.write can only be called once")
        self._written = True
        path = Path(path)
        add_gqsa_metadata(self.gguf, self.config_json, self.tool_version, self.records, self.type.bits)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self.gguf.write_header_to_file(tmp)
            self.gguf.write_kv_data_to_file()
            self.gguf.write_tensors_to_file(progress=progress)
            self.gguf.flush()
            assert self.gguf.fout is not None
            for f in self.gguf.fout:
                os.fsync(f.fileno())
            self.gguf.close()
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)            # mkstemp creates 0600; give the usual mode
            os.replace(tmp, path)
        except BaseException:
            self.gguf.close()
            tmp.unlink(missing_ok=True)
            raise
        return path


# --- reading -------------------------------------------------------------------------------------

def _type_sizes(type_id: int) -> tuple[str, int, int] | None:
    """(name, block size, block bytes) of a ggml type id storable in a file, or None if unknown."""
    if type_id in TYPE_IDS:
        return TYPE_IDS[type_id].name, GROUP_SIZE, TYPE_IDS[type_id].block_bytes
    try:
        t = GGMLQuantizationType(type_id)
    except ValueError:
        return None
    if t not in GGML_QUANT_SIZES:
        return None
    blck, size = GGML_QUANT_SIZES[t]
    return t.name, blck, size


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ne: tuple[int, ...]     # ggml order: ne[0] is the contiguous (row) dimension
    type_id: int
    type_name: str
    offset: int             # absolute byte offset of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """NumPy order (reversed ne). For quantized types the last axis counts elements, not bytes."""
        return tuple(reversed(self.ne))

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])


class _Cursor:
    """Bounds-checked little-endian reads from the file's bytes."""

    def __init__(self, buf: np.ndarray, path: str):
        self.buf = buf
        self.size = int(buf.size)
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError(f"{self.path}: truncated or corrupt: {what} needs {n} bytes at offset {self.pos} "
                            f"but the file has {self.size} bytes")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def numbers(self, dtype: str, n: int, what: str) -> np.ndarray:
        """n values of NumPy dtype `dtype`, copied out of the file."""
        nbytes = n * np.dtype(dtype).itemsize
        self.need(nbytes, what)
        v = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += nbytes
        return v

    def string(self, what: str, strict: bool = True) -> str:
        n = self.scalar("<Q", f"length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8") if strict else raw.decode("utf-8", errors="surrogateescape")
        except UnicodeDecodeError:
            raise GGUFError(f"{self.path}: {what} at offset {self.pos - n} is not valid UTF-8: "
                            f"{raw[:40]!r}") from None


class GGUFFile:
    """A parsed GGUF file: header, metadata, tensor infos, and the data as a read-only memmap.

    Attributes: path, version, alignment, data_offset (start of the data section), metadata
    (key -> int/float/bool/str, or list[str] / np.ndarray for arrays), value_types (key ->
    (GGUFValueType, element type or None)), tensors (name -> TensorInfo, in file order), gqsa
    (name -> GQSATensorRecord for every gqsa4 tensor), data (np.memmap of the whole file).
    """

    def __init__(self, path: os.PathLike[str] | str):
        self.path = str(path)
        size = os.path.getsize(self.path)
        if size == 0:
            raise GGUFError(f"{self.path}: the file is empty, not a GGUF file")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.gqsa: dict[str, GQSATensorRecord] = {}
        self.gqsa_type = None                   # format.GQSA4 or GQSA3: the file's GQSA type (gqsa.bits)
        cur = _Cursor(self.data, self.path)
        self._read_header(cur)
        self._read_metadata(cur)
        self._read_tensor_infos(cur)
        self._check_gqsa_metadata()

    # - structure -

    def _err(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def _read_header(self, cur: _Cursor) -> None:
        cur.need(4, "magic")
        magic = bytes(self.data[:4])
        if magic != GGUF_MAGIC_BYTES:
            raise self._err(f"bad magic {magic!r}, expected {GGUF_MAGIC_BYTES!r} — not a GGUF file")
        cur.pos = 4
        version = cur.scalar("<I", "version")
        if version & 0xFFFF == 0 and version >> 16:
            raise self._err(f"version field 0x{version:08x} looks byte-swapped: big-endian GGUF files "
                            f"are not supported — convert the model on a little-endian machine")
        if version not in GGUF_SUPPORTED_VERSIONS:
            hint = "upgrade gqsa-gguf" if version > max(GGUF_SUPPORTED_VERSIONS) else "re-convert the model"
            raise self._err(f"GGUF version {version} is not supported (only {GGUF_SUPPORTED_VERSIONS}) — {hint}")
        self.version = version
        self.n_tensors = cur.scalar("<Q", "tensor count")
        self.n_kv = cur.scalar("<Q", "metadata count")
        room = cur.size - cur.pos
        if self.n_kv * _MIN_KV_BYTES + self.n_tensors * _MIN_TENSOR_INFO_BYTES > room:
            raise self._err(f"header claims {self.n_tensors} tensors and {self.n_kv} metadata entries, "
                            f"which cannot fit in the {room} bytes that follow — the file is corrupt")

    def _read_value(self, cur: _Cursor, vtype: int, key: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return cur.string(f"value of '{key}'", strict=False)
        dt = _NUMERIC_DTYPES.get(vtype)  # type: ignore[call-overload]
        if dt is None:
            raise self._err(f"metadata '{key}' has unknown value type {vtype} at offset {cur.pos - 4}")
        v = cur.numbers(dt, 1, f"value of '{key}'")[0].item()
        if vtype == GGUFValueType.BOOL:
            if v > 1:
                raise self._err(f"metadata '{key}': bool byte {v} is neither 0 nor 1 — the file is corrupt")
            return bool(v)
        return v

    def _read_metadata(self, cur: _Cursor) -> None:
        for i in range(self.n_kv):
            key = cur.string(f"key of metadata entry {i}")
            if not key:
                raise self._err(f"metadata entry {i} has an empty key")
            if key in self.metadata:
                raise self._err(f"duplicate metadata key '{key}'")
            vtype = cur.scalar("<I", f"type of '{key}'")
            if vtype == GGUFValueType.ARRAY:
                etype = cur.scalar("<I", f"element type of '{key}'")
                n = cur.scalar("<Q", f"length of '{key}'")
                if etype == GGUFValueType.ARRAY:
                    raise self._err(f"metadata '{key}' is an array of arrays, which llama.cpp refuses")
                if etype == GGUFValueType.STRING:
                    cur.need(n * _STRING_HEADER, f"{n} strings of '{key}'")
                    value: Any = [cur.string(f"element {j} of '{key}'", strict=False) for j in range(n)]
                else:
                    dt = _NUMERIC_DTYPES.get(etype)  # type: ignore[call-overload]
                    if dt is None:
                        raise self._err(f"metadata '{key}' has unknown array element type {etype}")
                    value = cur.numbers(dt, n, f"{n} elements of '{key}'")
                    if etype == GGUFValueType.BOOL:
                        if (value > 1).any():
                            raise self._err(f"metadata '{key}': bool array holds bytes other than 0/1")
                        value = value.astype(bool)
                self.value_types[key] = (GGUFValueType.ARRAY, GGUFValueType(etype))
            else:
                value = self._read_value(cur, vtype, key)
                self.value_types[key] = (GGUFValueType(vtype), None)
            self.metadata[key] = value

        self.alignment = GGUF_DEFAULT_ALIGNMENT
        if KEY_ALIGNMENT in self.metadata:
            if self.value_types[KEY_ALIGNMENT] != (GGUFValueType.UINT32, None):
                raise self._err(f"'{KEY_ALIGNMENT}' must be a uint32, got {self.value_types[KEY_ALIGNMENT][0].name}")
            a = self.metadata[KEY_ALIGNMENT]
            if a == 0 or a & (a - 1):
                raise self._err(f"'{KEY_ALIGNMENT}' = {a} is not a power of two")
            self.alignment = a

    def _read_tensor_infos(self, cur: _Cursor) -> None:
        raw, seen = [], set()
        for i in range(self.n_tensors):
            name = cur.string(f"name of tensor {i}")
            if not name or len(name.encode("utf-8")) >= GGML_MAX_NAME:
                raise self._err(f"tensor {i} has name {name[:80]!r} of {len(name.encode('utf-8'))} bytes; "
                                f"names must have 1..{GGML_MAX_NAME - 1} bytes")
            if name in seen:
                raise self._err(f"duplicate tensor name '{name}'")
            seen.add(name)
            n_dims = cur.scalar("<I", f"n_dims of tensor '{name}'")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise self._err(f"tensor '{name}' has {n_dims} dimensions; ggml supports 1..{GGML_MAX_DIMS}")
            ne = tuple(cur.scalar("<Q", f"dimension {j} of tensor '{name}'") for j in range(n_dims))
            for j, n in enumerate(ne):
                if n > _INT64_MAX:
                    raise self._err(f"tensor '{name}' dimension {j} = {n} is negative as int64")
            if math.prod(ne) > _INT64_MAX:
                raise self._err(f"tensor '{name}' shape {ne} has more than INT64_MAX elements")
            type_id = cur.scalar("<I", f"type of tensor '{name}'")
            sizes = _type_sizes(type_id)
            if sizes is None:
                if type_id == GGML_TYPE_GQSA_Q8:
                    raise self._err(f"tensor '{name}' has type {type_id} (gqsa_q8), a runtime-only activation "
                                    f"type that is never valid in a file — the file is corrupt")
                raise self._err(f"tensor '{name}' has unknown ggml type id {type_id} — the file is corrupt or "
                                f"needs a newer gqsa-gguf / gguf package")
            type_name, blck, type_size = sizes
            if ne[0] % blck:
                raise self._err(f"tensor '{name}' of type {type_name} has ne0 = {ne[0]}, not a multiple of "
                                f"its block size {blck}")
            nbytes = ne[0] // blck * type_size * math.prod(ne[1:])
            offset = cur.scalar("<Q", f"data offset of tensor '{name}'")
            if offset % self.alignment:
                raise self._err(f"tensor '{name}' data offset {offset} is not a multiple of the alignment "
                                f"{self.alignment}")
            raw.append((name, ne, type_id, type_name, offset, nbytes))

        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        end_prev, prev = 0, None
        for name, ne, type_id, type_name, offset, nbytes in sorted(raw, key=lambda r: r[4]):
            start = self.data_offset + offset
            if start + nbytes > cur.size:
                raise self._err(f"tensor '{name}' data [{start}, {start + nbytes}) lies outside the file of "
                                f"{cur.size} bytes — the file is truncated or corrupt")
            if nbytes and start < end_prev:
                raise self._err(f"tensor '{name}' data at offset {offset} overlaps tensor '{prev}'")
            if nbytes:
                end_prev, prev = start + nbytes, name
        for name, ne, type_id, type_name, offset, nbytes in raw:
            self.tensors[name] = TensorInfo(name, ne, type_id, type_name, self.data_offset + offset, nbytes)

    # - gqsa metadata -

    def _key(self, key: str, vtype: GGUFValueType, etype: GGUFValueType | None = None) -> Any:
        if key not in self.metadata:
            raise self._err(f"missing metadata '{key}' — the file was not written by gqsa-gguf, or is corrupt")
        got = self.value_types[key]
        if got != (vtype, etype):
            want = vtype.name + (f"[{etype.name}]" if etype is not None else "")
            have = got[0].name + (f"[{got[1].name}]" if got[1] is not None else "")
            raise self._err(f"metadata '{key}' has type {have}, expected {want}")
        return self.metadata[key]

    def _check_gqsa_metadata(self) -> None:
        gqsa_tensors = [t for t in self.tensors.values() if t.type_id in TYPE_IDS]
        has_keys = any(k.startswith("gqsa.") for k in self.metadata)
        if not gqsa_tensors and not has_keys:
            return
        version = self._key(KEY_FORMAT_VERSION, GGUFValueType.UINT32)
        if version > FORMAT_VERSION:
            raise self._err(f"GQSA format version {version} is newer than the {FORMAT_VERSION} this gqsa-gguf "
                            f"supports — upgrade gqsa-gguf")
        if version < 1:
            raise self._err(f"'{KEY_FORMAT_VERSION}' = {version} is invalid (versions start at 1)")
        got = self._key(KEY_GROUP_SIZE, GGUFValueType.UINT32)
        if got != GROUP_SIZE:
            raise self._err(f"'{KEY_GROUP_SIZE}' = {got}, but format version {version} only defines {GROUP_SIZE}")
        bits = self._key(KEY_BITS, GGUFValueType.UINT32)
        if bits not in TYPES:
            raise self._err(f"'{KEY_BITS}' = {bits}, but format version {version} defines only "
                            f"{' and '.join(str(b) for b in sorted(TYPES))}")
        self.gqsa_type = TYPES[bits]
        self._key(KEY_TOOL_VERSION, GGUFValueType.STRING)
        self._key(KEY_CONFIG, GGUFValueType.STRING)
        names = self._key(KEY_TENSOR_NAMES, GGUFValueType.ARRAY, GGUFValueType.STRING)
        widths = self._key(KEY_TENSOR_WIDTHS, GGUFValueType.ARRAY, GGUFValueType.UINT32)
        sparsity = self._key(KEY_TENSOR_SPARSITY, GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        if not len(names) == len(widths) == len(sparsity):
            raise self._err(f"'{KEY_TENSOR_NAMES}', '{KEY_TENSOR_WIDTHS}' and '{KEY_TENSOR_SPARSITY}' have "
                            f"lengths {len(names)}, {len(widths)}, {len(sparsity)}; they must be equal")
        if len(set(names)) != len(names):
            raise self._err(f"'{KEY_TENSOR_NAMES}' lists a tensor twice")
        for name, width, sp in zip(names, widths, sparsity):
            t = self.tensors.get(name)
            if t is None or t.type_id != self.gqsa_type.type_id:
                what = "is not in the file" if t is None else f"has type {t.type_name}"
                raise self._err(f"'{KEY_TENSOR_NAMES}' lists '{name}', which {what}"
                                + (f" (the file's '{KEY_BITS}' = {bits} makes its GQSA type {self.gqsa_type.name})"
                                   if t is not None and t.type_id in TYPE_IDS else ""))
            width = int(width)
            try:
                n_groups = codec._check_width(width, name)
            except codec.GQSAFormatError as e:
                raise self._err(str(e)) from None
            n_kept = t.ne[0] // GROUP_SIZE
            if not 0 < n_kept <= n_groups:
                raise self._err(f"tensor '{name}': ne0 = {t.ne[0]} stored weights per row, but its logical width "
                                f"is {width} — the file is corrupt")
            actual = 1.0 - n_kept / n_groups
            if not abs(float(sp) - actual) <= 1e-5:
                raise self._err(f"tensor '{name}': '{KEY_TENSOR_SPARSITY}' says {float(sp)}, but the tensor keeps "
                                f"{n_kept} of {n_groups} groups (sparsity {actual:.6f})")
            self.gqsa[name] = GQSATensorRecord(name, width, float(sp))
        missing = [t.name for t in gqsa_tensors if t.name not in self.gqsa]
        if missing:
            raise self._err(f"GQSA tensors {missing[:5]} are not listed in '{KEY_TENSOR_NAMES}' — "
                            f"their logical width is unknown; the file is corrupt")

    @property
    def gqsa_config(self) -> dict:
        """The compression config the file was made with (parsed `gqsa.config`)."""
        raw = self._key(KEY_CONFIG, GGUFValueType.STRING)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise self._err(f"'{KEY_CONFIG}' is not valid JSON: {e}") from None

    # - tensor data -

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named '{name}'") from None

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor, read-only uint8 [nbytes] (a view of the memmap)."""
        t = self._info(name)
        return np.asarray(self.data[t.offset:t.offset + t.nbytes])

    def gqsa_tensor(self, name: str) -> np.ndarray:
        """Packed rows of a GQSA tensor, read-only uint8 [rows, n_kept*12] (gqsa3: n_kept*10; the
        file's type is `self.gqsa_type`), validated against the width recorded in
        `gqsa.tensor_widths` (raises GGUFError naming tensor, row and block)."""
        t = self._info(name)
        if t.type_id not in TYPE_IDS:
            raise self._err(f"tensor '{name}' has type {t.type_name}, not a GQSA type")
        gt = TYPE_IDS[t.type_id]
        packed = self.tensor_bytes(name).reshape(t.n_rows, t.ne[0] // GROUP_SIZE * gt.block_bytes)
        try:
            codec.validate(packed, self.gqsa[name].width, name, gt.bits)
        except codec.GQSAFormatError as e:
            raise self._err(str(e)) from None
        return packed

    def tensor_array(self, name: str) -> np.ndarray:
        """float32 values in NumPy order (shape = reversed ne). F32 is a read-only view of the file;
        F16, BF16 and Q8_0 are converted; gqsa4 gives the dense matrix [..., rows, width]."""
        t = self._info(name)
        raw = self.tensor_bytes(name)
        if t.type_id in TYPE_IDS:
            dense = codec.dequantize(self.gqsa_tensor(name), self.gqsa[name].width, name, TYPE_IDS[t.type_id].bits)
            return dense.reshape(*t.shape[:-1], self.gqsa[name].width)
        if t.type_id == GGMLQuantizationType.F32:
            return raw.view("<f4").reshape(t.shape)
        if t.type_id == GGMLQuantizationType.F16:
            return raw.view("<f2").astype(np.float32).reshape(t.shape)
        if t.type_id == GGMLQuantizationType.BF16:
            return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(t.shape)
        if t.type_id == GGMLQuantizationType.Q8_0:
            blck, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
            blocks = raw.reshape(-1, size)
            d = blocks[:, :2].copy().view("<f2").astype(np.float32)
            qs = blocks[:, 2:].view(np.int8).astype(np.float32)
            return (d * qs).reshape(t.shape)
        raise NotImplementedError(f"tensor '{name}': tensor_array does not decode type {t.type_name}; "
                                  f"use tensor_bytes for the raw data")


def read_gguf(path: os.PathLike[str] | str) -> GGUFFile:
    """Parses and checks a GGUF file; raises GGUFError on anything malformed or unsupported."""
    return GGUFFile(path)
