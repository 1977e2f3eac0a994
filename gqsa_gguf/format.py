"""Constants of the GQSA tensor format: the single Python source of truth.

docs/FORMAT.md is the written specification; native/src/ggml/src/ggml-gqsa.h mirrors these numbers
in C (the fp16 limits included), and tests/test_format.py checks that the three agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 1

GGML_TYPE_GQSA4 = 128          # ggml/GGUF tensor type id of GQSA 4-bit weights
GGML_TYPE_GQSA_Q8 = 129        # runtime-only activation type (vec_dot_type); never in files
TYPE_NAME = "gqsa4"

BITS = 4
GROUP_SIZE = 16                # weights per group = ggml block size
BLOCK_BYTES = 12               # fp16 d + uint16 (index | zero << 12) + 8 bytes of nibbles
INDEX_BITS = 12
INDEX_MASK = (1 << INDEX_BITS) - 1
ZERO_SHIFT = INDEX_BITS
QMAX = (1 << BITS) - 1         # 15
FP16_MAX = 65504.0             # largest finite fp16: a scale is clamped to it
FP16_MIN_SUBNORMAL = 2.0 ** -24  # smallest positive fp16: a nonzero scale never rounds to 0
MAX_GROUPS_PER_ROW = 1 << INDEX_BITS   # 4096 -> logical widths up to 65536

ACT_BLOCK_BYTES = 24           # gqsa_q8: float d, float s, int8 qs[16]

# One block as a NumPy structured dtype (little endian, packed, 12 bytes).
BLOCK_DTYPE = np.dtype([("d", "<f2"), ("iz", "<u2"), ("qs", "u1", (GROUP_SIZE // 2,))])
assert BLOCK_DTYPE.itemsize == BLOCK_BYTES

# The 3-bit type (docs/FORMAT.md "The 3-bit type gqsa3"): the same header, 16 x 3-bit codes as two
# low bits in ql (4 codes a byte) and the third bits in qh, 10 bytes a block.
GGML_TYPE_GQSA3 = 130
GQSA3_BLOCK_BYTES = 10
GQSA3_BLOCK_DTYPE = np.dtype([("d", "<f2"), ("iz", "<u2"), ("ql", "u1", (GROUP_SIZE // 4,)), ("qh", "<u2")])
assert GQSA3_BLOCK_DTYPE.itemsize == GQSA3_BLOCK_BYTES


@dataclass(frozen=True)
class GQSAType:
    """One of the format's two tensor types: its ggml name and id, code width and block."""

    name: str
    type_id: int
    bits: int
    block_bytes: int
    block_dtype: np.dtype

    @property
    def qmax(self) -> int:
        """The largest code q and zero point z."""
        return (1 << self.bits) - 1

    def row_bytes(self, n_kept: int) -> int:
        return self.block_bytes * n_kept

    def bits_per_weight(self, n_kept: int, width: int) -> float:
        """Bits per logical weight of a row keeping `n_kept` of its `width // 16` groups."""
        return 8.0 * self.block_bytes * n_kept / width


GQSA4 = GQSAType(TYPE_NAME, GGML_TYPE_GQSA4, BITS, BLOCK_BYTES, BLOCK_DTYPE)
GQSA3 = GQSAType("gqsa3", GGML_TYPE_GQSA3, 3, GQSA3_BLOCK_BYTES, GQSA3_BLOCK_DTYPE)
TYPES = {t.bits: t for t in (GQSA4, GQSA3)}          # by code width
TYPE_IDS = {t.type_id: t for t in TYPES.values()}


def gqsa_type(bits: int) -> GQSAType:
    """The tensor type storing `bits`-bit codes (3 or 4); ValueError for any other width."""
    if bits not in TYPES:
        raise ValueError(f"the GQSA format stores 4-bit (gqsa4) or 3-bit (gqsa3) codes, not {bits}-bit")
    return TYPES[bits]


# GGUF metadata keys (docs/FORMAT.md, "GGUF metadata").
KEY_FORMAT_VERSION = "gqsa.format_version"
KEY_BITS = "gqsa.bits"
KEY_GROUP_SIZE = "gqsa.group_size"
KEY_TOOL_VERSION = "gqsa.tool_version"
KEY_CONFIG = "gqsa.config"
KEY_TENSOR_NAMES = "gqsa.tensor_names"
KEY_TENSOR_WIDTHS = "gqsa.tensor_widths"
KEY_TENSOR_SPARSITY = "gqsa.tensor_sparsity"


def qmax_of(bits: int) -> int:
    """The largest code and zero point of `bits`-bit codes: 15 (gqsa4, read from this module's QMAX,
    which benchmarks/code_width.py narrows to emulate other widths) or 7 (gqsa3)."""
    return QMAX if bits == BITS else gqsa_type(bits).qmax


def bits_per_weight(n_kept: int, width: int, bits: int = BITS) -> float:
    """Bits per logical weight of a row keeping `n_kept` of its `width // 16` groups."""
    return gqsa_type(bits).bits_per_weight(n_kept, width)


def row_bytes(n_kept: int, bits: int = BITS) -> int:
    return gqsa_type(bits).row_bytes(n_kept)


def kept_groups(width: int, sparsity: float) -> int:
    """Groups each row keeps at `sparsity` (fraction pruned), rounded to whole groups, at least 1."""
    if width % GROUP_SIZE:
        raise ValueError(f"width {width} is not a multiple of the group size {GROUP_SIZE}")
    n_groups = width // GROUP_SIZE
    if n_groups > MAX_GROUPS_PER_ROW:
        raise ValueError(f"width {width} has {n_groups} groups, more than the format's "
                         f"{MAX_GROUPS_PER_ROW} ({INDEX_BITS}-bit group index)")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    return max(1, int(round(n_groups * (1.0 - sparsity))))
