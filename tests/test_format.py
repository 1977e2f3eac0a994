"""The format's numbers agree across docs/FORMAT.md (parsed from the markdown), gqsa_gguf.format,
the NumPy block dtype, the metadata the writer emits, the C header (format numbers and the scale's
fp16 limits) and the CUDA kernels' header."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGUFValueType

from gqsa_gguf import codec, format as fmt
from gqsa_gguf.gguf_io import GQSAWriter, read_gguf

ROOT = Path(__file__).resolve().parents[1]
SPEC = (ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text of the `## title` section of docs/FORMAT.md (up to the next `## `)."""
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", SPEC, re.S | re.M)
    assert m, f"no section '{title}' in docs/FORMAT.md"
    return m.group(1)


GQSA3_SPEC = section("The 3-bit type `gqsa3`")


def spec_table_row(label: str, text: str = SPEC) -> str:
    """The value cell of the markdown table row whose first cell contains `label`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and label in cells[0]:
            return cells[1]
    raise AssertionError(f"no table row '{label}' in docs/FORMAT.md")


def spec_int(pattern: str) -> int:
    m = re.search(pattern, SPEC)
    assert m, f"pattern {pattern!r} not found in docs/FORMAT.md"
    return int(m.group(1))


def test_version_and_type_ids():
    assert spec_int(r"# The GQSA tensor format \(format version (\d+)\)") == fmt.FORMAT_VERSION
    m = re.fullmatch(r"`(\w+)` / \*\*(\d+)\*\*.*", spec_table_row("ggml type name / id"))
    assert m and m.group(1) == fmt.TYPE_NAME and int(m.group(2)) == fmt.GGML_TYPE_GQSA4
    assert spec_int(r"`gqsa_q8` \(id \*\*(\d+)\*\*") == fmt.GGML_TYPE_GQSA_Q8
    assert spec_int(r"upstream ids end at (\d+)") < fmt.GGML_TYPE_GQSA4


def test_block_geometry():
    assert int(re.match(r"(\d+) weights", spec_table_row("block size")).group(1)) == fmt.GROUP_SIZE
    assert int(spec_table_row("block bytes")) == fmt.BLOCK_BYTES
    assert spec_int(r"g: group index in the row, (\d+) bits") == fmt.INDEX_BITS
    assert spec_int(r"z: zero point, (\d+) bits") == fmt.BITS
    assert spec_int(r"iz\s+= g \| \(z << (\d+)\)") == fmt.ZERO_SHIFT
    assert spec_int(r"K / 16 <= (\d+)") == fmt.MAX_GROUPS_PER_ROW == 1 << fmt.INDEX_BITS
    assert spec_int(r"groups of (\d+) consecutive\s+weights") == fmt.GROUP_SIZE
    assert fmt.QMAX == (1 << fmt.BITS) - 1
    assert spec_int(r"// (\d+) bytes; x\[j\]") == fmt.ACT_BLOCK_BYTES == codec.ACT_BLOCK_DTYPE.itemsize


@pytest.mark.parametrize("t", fmt.TYPES.values(), ids=lambda t: t.name)
def test_block_diagram_matches_block_dtype(t):
    """The diagram's field order and sizes give the offsets of the type's block dtype."""
    text = GQSA3_SPEC if t is fmt.GQSA3 else SPEC
    diagram = re.search(r"```\nbyte:(.*?)```", text, re.S).group(0)
    byte_numbers = [int(n) for n in re.findall(r"\d+", diagram.splitlines()[1])]
    assert byte_numbers[-1] + 1 == t.block_bytes == t.block_dtype.itemsize
    row = next(line for line in diagram.splitlines() if "d (fp16)" in line)
    sizes = {"fp16": 2, "uint16": 2}
    offset = 0
    for field, kind in re.findall(r"(\w+)(?:\[\d+\])?[^|(]*\(?(fp16|uint16)?\)?[^|]*\|", row.strip().lstrip("|")):
        if kind:
            size = sizes[kind]
        else:                                           # qs[8]: 16 x 4-bit q values
            size = int(re.search(rf"{field}\[(\d+)\]", row).group(1))
        dt, off = t.block_dtype.fields[field][:2]
        assert off == offset and dt.itemsize == size, field
        offset += size
    assert offset == t.block_bytes
    assert t.block_dtype.fields["d"][0] == np.dtype("<f2")
    assert t.block_dtype.fields["iz"][0] == np.dtype("<u2")


def test_gqsa3_type_and_code_layout():
    m = re.fullmatch(r"`(\w+)` / \*\*(\d+)\*\*.*", spec_table_row("ggml type name / id", GQSA3_SPEC))
    assert m and m.group(1) == fmt.GQSA3.name and int(m.group(2)) == fmt.GQSA3.type_id == fmt.GGML_TYPE_GQSA3
    assert int(spec_table_row("block bytes", GQSA3_SPEC)) == fmt.GQSA3.block_bytes
    assert fmt.GQSA3.qmax == 7 and "integers in\n0..7" in GQSA3_SPEC
    # the spec's packing formulas, evaluated on codes 0..7, against the codec's bytes
    q = np.array([5, 0, 7, 3, 6, 1, 2, 4, 7, 7, 0, 1, 3, 5, 6, 2], np.int64)
    ql = [(q[j] & 3) | (q[j + 4] & 3) << 2 | (q[j + 8] & 3) << 4 | (q[j + 12] & 3) << 6 for j in range(4)]
    qh = sum(int(q[j] >> 2) << j for j in range(16))
    assert "ql[j] = (q[j] & 3) | (q[j+4] & 3) << 2 | (q[j+8] & 3) << 4 | (q[j+12] & 3) << 6" in GQSA3_SPEC
    assert "qh    = sum over j = 0..15 of (q[j] >> 2) << j" in GQSA3_SPEC
    packed = codec.pack([[9]], q[None, None], [[6]], [[0.5]], bits=3)
    block = packed.view(fmt.GQSA3_BLOCK_DTYPE)[0, 0]
    assert list(block["ql"]) == ql and int(block["qh"]) == qh and int(block["iz"]) == 9 | 6 << fmt.ZERO_SHIFT


def test_gqsa3_bits_per_weight_table():
    rows = re.findall(r"\| w3s(\d+) \| (\d+) % \| \**([\d.]+)\** \|", GQSA3_SPEC)
    assert len(rows) == 4
    for sparsity, keep, bpw in rows:
        assert int(sparsity) + int(keep) == 100
        width = 4000                                    # 250 groups: every listed keep is whole groups
        n_kept = fmt.kept_groups(width, int(sparsity) / 100)
        assert fmt.bits_per_weight(n_kept, width, bits=3) == pytest.approx(float(bpw))
    m = re.search(r"16 \(d\) \+ 12 \(g\) \+ 4\s+\(z\) \+ (\d+) \(q\) = (\d+) bits on 16 stored weights", GQSA3_SPEC)
    assert m and int(m.group(1)) == 16 * 3 and int(m.group(2)) == 8 * fmt.GQSA3.block_bytes


def test_bits_per_weight_table():
    rows = re.findall(r"\| w4s(\d+) \| (\d+) % \| \**([\d.]+)\** \|", SPEC)
    assert len(rows) == 4
    for sparsity, keep, bpw in rows:
        assert int(sparsity) + int(keep) == 100
        width = 4096
        n_kept = fmt.kept_groups(width, int(sparsity) / 100)
        assert fmt.bits_per_weight(n_kept, width) == pytest.approx(float(bpw))
    assert spec_int(r"= (\d+) bits on 16 stored weights") == 8 * fmt.BLOCK_BYTES


SPEC_TYPES = {"uint32": (GGUFValueType.UINT32, None), "string": (GGUFValueType.STRING, None),
              "array[string]": (GGUFValueType.ARRAY, GGUFValueType.STRING),
              "array[uint32]": (GGUFValueType.ARRAY, GGUFValueType.UINT32),
              "array[float32]": (GGUFValueType.ARRAY, GGUFValueType.FLOAT32)}


def spec_metadata() -> dict[str, str]:
    return dict(re.findall(r"^\| `(gqsa\.\w+)` \| ([\w\[\]]+) \|", SPEC, re.M))


def test_metadata_keys_match_constants():
    keys = {getattr(fmt, k) for k in dir(fmt) if k.startswith("KEY_")}
    assert set(spec_metadata()) == keys


def test_writer_emits_the_spec_metadata_types(tmp_path):
    rng = np.random.default_rng(0)
    w = GQSAWriter("llama", json.dumps({"spec": "w4s50"}))
    w.add_gqsa_tensor("x", codec.quantize_dense(rng.standard_normal((2, 32)).astype(np.float32)), 32)
    f = read_gguf(w.write(tmp_path / "m.gguf"))
    for key, typ in spec_metadata().items():
        assert f.value_types[key] == SPEC_TYPES[typ], key
    assert f.metadata[fmt.KEY_BITS] == spec_int(r"`gqsa.bits` \| uint32 \| (\d+)")
    assert f.metadata[fmt.KEY_GROUP_SIZE] == spec_int(r"`gqsa.group_size` \| uint32 \| (\d+)")


# The C header, as docs/FORMAT.md names it.
C_HEADER = ROOT / "native" / "src" / "ggml" / "src" / "ggml-gqsa.h"
C_DEFINES = {                                           # required
    "GQSA_GROUP_SIZE": fmt.GROUP_SIZE,
    "GQSA_BLOCK_BYTES": fmt.BLOCK_BYTES,
    "GQSA_INDEX_BITS": fmt.INDEX_BITS,
    "GQSA_TYPE_ID": fmt.GGML_TYPE_GQSA4,
    "GQSA_Q8_TYPE_ID": fmt.GGML_TYPE_GQSA_Q8,
    "GQSA_FORMAT_VERSION": fmt.FORMAT_VERSION,
    "GQSA_ACT_BLOCK_BYTES": fmt.ACT_BLOCK_BYTES,
    "GQSA_BITS": fmt.BITS,
    "GQSA_QMAX": fmt.QMAX,
    "GQSA3_TYPE_ID": fmt.GQSA3.type_id,
    "GQSA3_BLOCK_BYTES": fmt.GQSA3.block_bytes,
    "GQSA3_BITS": fmt.GQSA3.bits,
    "GQSA3_QMAX": fmt.GQSA3.qmax,
}
C_DERIVED = {"GQSA_INDEX_MASK": fmt.INDEX_MASK, "GQSA_MAX_GROUPS": fmt.MAX_GROUPS_PER_ROW}   # checked if present
# the fp16 limits of a scale: a float literal, and fp16 bit patterns (required)
C_FP16_FLOAT = {"GQSA_FP16_MAX": fmt.FP16_MAX}
C_FP16_BITS = {"GQSA_FP16_MAX_BITS": fmt.FP16_MAX, "GQSA_FP16_MIN_SUBNORMAL_BITS": fmt.FP16_MIN_SUBNORMAL}
# the CUDA kernels' own copies of format numbers (a standalone header: the harness builds it without ggml)
CUDA_HEADER = ROOT / "native" / "src" / "ggml" / "src" / "ggml-cuda" / "gqsa-kernels.cuh"
CUDA_DEFINES = {"GQSA_CUDA_GROUP": fmt.GROUP_SIZE, "GQSA_CUDA_BLOCK_WORDS": fmt.BLOCK_BYTES // 4}


def c_int(expr: str, defines: dict[str, str], depth: int = 0) -> int | None:
    """Value of a simple C integer expression of literals and GQSA_ macros, or None."""
    expr = re.sub(r"\b(\d+)[uUlL]*\b", r"\1", expr.strip())
    for name in set(re.findall(r"\b[A-Za-z_]\w*\b", expr)):
        if name not in defines or depth > 8:
            return None
        value = c_int(defines[name], defines, depth + 1)
        if value is None:
            return None
        expr = re.sub(rf"\b{name}\b", str(value), expr)
    if not re.fullmatch(r"[\d\s()+\-*<>]+", expr):
        return None
    return int(eval(expr, {"__builtins__": {}}))      # only digits, parentheses and + - * << >>


def c_defines(header: Path) -> tuple[str, dict[str, str]]:
    """(text without comments, {GQSA_ macro: its definition}) of a C header."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", header.read_text(encoding="utf-8"), flags=re.S)
    return text, {k: v.strip() for k, v in re.findall(r"^[ \t]*#define[ \t]+(GQSA3?_\w+)[ \t]+([^\n]+)$", text, re.M)}


def test_c_header_agrees():
    assert C_HEADER.relative_to(ROOT).as_posix() in (ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    for header in [C_HEADER]:
        text, defines = c_defines(header)
        defines = {k: v for k, v in defines.items() if k.startswith(("GQSA_", "GQSA3_"))}
        for name, value in {**C_DEFINES, **C_DERIVED}.items():
            if name not in defines:
                assert name not in C_DEFINES, f"{header.name} lacks #define {name}"
                continue
            got = c_int(defines[name], defines)
            assert got == value, f"{name} = {defines[name]} in {header.name}, {value} in format.py"
        asserts = re.findall(r"static_assert\s*\(\s*sizeof\s*\(\s*(\w+)\s*\)\s*==\s*([^,]+),", text)
        assert asserts, f"{header.name} pins no block size with static_assert"
        for lhs, rhs in asserts:
            value = c_int(rhs, defines)
            if value is None:
                continue                                # an expression with sizeof: the compiler checks it
            want = (fmt.ACT_BLOCK_BYTES if "q8" in lhs.lower() else fmt.GQSA3.block_bytes if "gqsa3" in lhs.lower()
                    else fmt.BLOCK_BYTES)
            assert value == want, f"static_assert(sizeof({lhs}) == {rhs}) in {header.name}"


def test_c_header_fp16_limits_agree():
    """The scale's fp16 limits: defined once in the C header (the C quantizer uses the macros) and
    equal to format.py's, as a float literal and as ggml_fp16_t bit patterns."""
    _, defines = c_defines(C_HEADER)
    for name, value in C_FP16_FLOAT.items():
        assert name in defines, f"{C_HEADER.name} lacks #define {name}"
        m = re.fullmatch(r"([0-9]+\.[0-9]*(?:[eE][+-]?[0-9]+)?)[fF]?", defines[name])
        assert m and float(m.group(1)) == value, f"{name} = {defines[name]} in {C_HEADER.name}, {value} in format.py"
    for name, value in C_FP16_BITS.items():
        assert name in defines, f"{C_HEADER.name} lacks #define {name}"
        m = re.fullmatch(r"0[xX]([0-9a-fA-F]{1,4})[uU]?", defines[name])
        assert m, f"{name} = {defines[name]} in {C_HEADER.name}: expected a 16-bit hex literal"
        got = float(np.array([int(m.group(1), 16)], dtype=np.uint16).view(np.float16)[0])
        assert got == value, f"{name} = {defines[name]} (fp16 {got}) in {C_HEADER.name}, {value} in format.py"
    # nowhere else in the native sources: the quantizer takes them from the header
    for src in sorted((ROOT / "native" / "src").rglob("*gqsa*")):
        if src == C_HEADER or src.suffix not in (".c", ".cpp", ".h", ".cu", ".cuh"):
            continue
        text = re.sub(r"/\*.*?\*/|//[^\n]*", "", src.read_text(encoding="utf-8"), flags=re.S)
        for literal in ("65504", "0x7bff", "0x7BFF"):
            assert literal not in text, f"{src.name} hard-codes {literal}; use the macros of {C_HEADER.name}"


def test_cuda_header_agrees():
    _, defines = c_defines(CUDA_HEADER)
    for name, value in CUDA_DEFINES.items():
        assert name in defines, f"{CUDA_HEADER.name} lacks #define {name}"
        assert c_int(defines[name], defines) == value, f"{name} = {defines[name]} in {CUDA_HEADER.name}, {value} in format.py"
