"""Writes the seed corpus of native/fuzz/fuzz_gqsa_validate.c into native/fuzz/corpus/.

Each seed is the target's 8-byte header (groups, n_kept with the type in bit 15, width/ne0
remainders, rows - 1, seed) followed by rows packed by the NumPy reference codec: valid tensors of
the shapes that take each kernel path (8-block SIMD steps and superblocks, pairs, a single tail
block, 4096 groups), and one invalid variant per validator rule; gqsa4 seeds (type bit 0), then
gqsa3 ones (type bit 1, names starting with gqsa3_), drawn from the same generator after the gqsa4
ones so that those stay as they were. Re-run after a format change: python native/fuzz/make_corpus.py
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from gqsa_gguf import codec, format as fmt  # noqa: E402


TYPE_GQSA3 = 0x8000                     # bit 15 of the n_kept field: the rows are gqsa3


def header(groups: int, n_kept: int, rows: int, seed: int = 1, width_rem: int = 0, ne0_rem: int = 0,
           bits: int = 4) -> bytes:
    n_field = n_kept | (TYPE_GQSA3 if bits == 3 else 0)
    return struct.pack("<HHBBH", groups, n_field, width_rem | (ne0_rem << 4), rows - 1, seed)


def packed(rng, rows: int, groups: int, n_kept: int, bits: int = 4) -> np.ndarray:
    w = rng.standard_normal((rows, groups * fmt.GROUP_SIZE)).astype(np.float32)
    kept = np.sort(np.argsort(rng.random((rows, groups)), axis=1)[:, :n_kept], axis=1)
    return codec.quantize(w, kept, bits=bits).copy()


def blocks(p: np.ndarray, bits: int = 4) -> np.ndarray:
    return p.view(fmt.BLOCK_DTYPE if bits == 4 else fmt.GQSA3_BLOCK_DTYPE).reshape(p.shape[0], -1)


def main() -> None:
    rng = np.random.default_rng(0)
    out = HERE / "corpus"
    out.mkdir(exist_ok=True)
    seeds: dict[str, bytes] = {}
    for name, (rows, groups, n_kept) in {
        "valid_small": (4, 4, 2),
        "valid_simd_8_8_2": (3, 36, 18),        # 576 wide, 50 %: two 8-block steps and a pair
        "valid_dense": (2, 8, 8),
        "valid_tail_1": (2, 16, 9),             # one 8-block step and a single tail block
        "valid_one_group": (5, 1, 1),
    }.items():
        seeds[name] = header(groups, n_kept, rows) + packed(rng, rows, groups, n_kept).tobytes()

    p = packed(rng, 1, fmt.MAX_GROUPS_PER_ROW, 3)           # 65536 wide: indices up to 4095
    b = blocks(p)
    b["iz"][0, 2] = (b["iz"][0, 2] & (0xFFFF ^ fmt.INDEX_MASK)) | (fmt.MAX_GROUPS_PER_ROW - 1)
    seeds["valid_max_groups"] = header(fmt.MAX_GROUPS_PER_ROW, 3, 1, seed=0x8001) + p.tobytes()

    base = packed(rng, 4, 8, 4)

    def variant(edit) -> bytes:
        q = base.copy()
        edit(blocks(q))
        return header(8, 4, 4) + q.tobytes()

    def set_index(b, r, i, g):
        b["iz"][r, i] = (b["iz"][r, i] & (0xFFFF ^ fmt.INDEX_MASK)) | g

    seeds["bad_index_range"] = variant(lambda b: set_index(b, 3, 3, 8))
    seeds["bad_index_dup"] = variant(lambda b: set_index(b, 1, 1, int(b["iz"][1, 0] & fmt.INDEX_MASK)))
    seeds["bad_index_order"] = variant(lambda b: set_index(b, 2, 0, 7))
    seeds["bad_scale_nan"] = variant(lambda b: b["d"].view(np.uint16).__setitem__((0, 2), 0x7E00))
    seeds["bad_scale_inf"] = variant(lambda b: b["d"].view(np.uint16).__setitem__((3, 0), 0xFC00))
    seeds["bad_ne0_over_width"] = header(2, 4, 4) + base.tobytes()
    seeds["bad_width_rem"] = header(8, 4, 4, width_rem=8) + base.tobytes()
    seeds["bad_ne0_rem"] = header(8, 4, 4, ne0_rem=3) + base.tobytes()
    seeds["bad_width_zero"] = header(0, 4, 4) + base.tobytes()
    seeds["bad_too_many_groups"] = header(fmt.MAX_GROUPS_PER_ROW + 1, 4, 4) + base.tobytes()
    seeds["bad_no_blocks"] = header(8, 0, 4) + base.tobytes()

    # gqsa3: drawn after every gqsa4 seed, so that those keep their bytes
    for name, (rows, groups, n_kept) in {
        "gqsa3_valid_small": (4, 4, 2),
        "gqsa3_valid_sb_2_6": (3, 36, 22),     # 576 wide, 22 kept: two superblocks and a 6-block tail
        "gqsa3_valid_sb_8": (2, 12, 8),         # exactly one superblock, no tail
        "gqsa3_valid_tail_1": (2, 16, 9),       # one superblock and a single tail block
    }.items():
        seeds[name] = header(groups, n_kept, rows, bits=3) + packed(rng, rows, groups, n_kept, 3).tobytes()

    base3 = packed(rng, 4, 8, 4, 3)

    def variant3(edit) -> bytes:
        q = base3.copy()
        edit(blocks(q, 3))
        return header(8, 4, 4, bits=3) + q.tobytes()

    def set_zero(b, r, i, z):
        b["iz"][r, i] = (b["iz"][r, i] & fmt.INDEX_MASK) | (z << fmt.ZERO_SHIFT)

    seeds["gqsa3_bad_zero_8"] = variant3(lambda b: set_zero(b, 1, 2, 8))
    seeds["gqsa3_bad_zero_15"] = variant3(lambda b: set_zero(b, 3, 0, 15))
    seeds["gqsa3_bad_index_range"] = variant3(lambda b: set_index(b, 3, 3, 8))
    seeds["gqsa3_bad_index_order"] = variant3(lambda b: set_index(b, 2, 0, 7))
    seeds["gqsa3_bad_scale_nan"] = variant3(lambda b: b["d"].view(np.uint16).__setitem__((0, 2), 0x7E00))
    seeds["gqsa3_bad_ne0_over_width"] = header(2, 4, 4, bits=3) + base3.tobytes()
    for name, data in seeds.items():
        (out / name).write_bytes(data)
    print(f"wrote {len(seeds)} seeds to {out}")


if __name__ == "__main__":
    main()
