// GQSA CUDA GEMV: how the work of one gqsa4 mul_mat is split among warps (arXiv 2412.17560 §3.5).
//
// Plain C, shared by the kernels (gqsa-kernels.cuh, compiled by nvcc) and the CPU test
// (native/cuda/test_partition.cpp, compiled by a host compiler), so the test checks the very
// arithmetic the kernels run.
//
// The work is W = n_rows * n_kept units, one per (output row, kept block); unit u is block
// u % n_kept of row u / n_kept. One warp computes one partial dot product per row it touches
// (its lanes take every 32nd block of the row and reduce with shuffles).
//
// Data-centric: thread block t owns the tile of rows [t*rows_per_tile, (t+1)*rows_per_tile), one
// row per warp, all of each row's blocks. No fix-up; the last wave may leave multiprocessors idle.
//
// Task-centric (Stream-K): the W units are cut into n_parts contiguous, equal (to one unit)
// ranges, part p = [p*W/n_parts, (p+1)*W/n_parts), one per warp, n_parts a multiple of the
// multiprocessor count. A part walks its range as row segments: a segment covering a whole row
// writes the output directly; a partial segment (the part's first or last) writes its sum into
// slot 2p (the part's first segment) or 2p+1 (its last), and the fix-up pass adds the slots of a
// split row in part order (deterministic, no atomics). The part holding a split row's last unit
// "finishes" it: that row is the part's first segment and began before the part did.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define GQSA_PART_FN static __host__ __device__ __forceinline__
#else
#define GQSA_PART_FN static inline
#endif

#ifdef __cplusplus
extern "C" {
#endif

// ---- data-centric

GQSA_PART_FN int64_t gqsa_dc_n_tiles(int64_t n_rows, int64_t rows_per_tile) {
    return (n_rows + rows_per_tile - 1) / rows_per_tile;
}

// The row of warp `warp` in tile `tile`, or -1 when the last tile has fewer rows.
GQSA_PART_FN int64_t gqsa_dc_row(int64_t n_rows, int64_t rows_per_tile, int64_t tile, int64_t warp) {
    const int64_t row = tile * rows_per_tile + warp;
    return warp < rows_per_tile && row < n_rows ? row : -1;
}

// ---- task-centric (Stream-K)

// First unit of part p (p = n_parts gives W). p*W stays below 2^63 for any tensor ggml can hold
// (W < 2^40) and n_parts < 2^22.
GQSA_PART_FN int64_t gqsa_sk_begin(int64_t n_units, int64_t n_parts, int64_t p) {
    return p * n_units / n_parts;
}

// The part holding unit u (0 <= u < W): the largest p with begin(p) <= u, which is never empty.
GQSA_PART_FN int64_t gqsa_sk_part_of(int64_t n_units, int64_t n_parts, int64_t u) {
    const int64_t p = ((u + 1) * n_parts + n_units - 1) / n_units - 1;
    return p < n_parts - 1 ? p : n_parts - 1;
}

// One row segment of a part: blocks [b0, b1) of row `row`. slot < 0: the segment is the whole
// row and its sum is the output; else its sum goes to partial-sum slot `slot`.
typedef struct {
    int64_t row;
    int64_t b0, b1;
    int64_t slot;
} gqsa_sk_segment;

// The segment of part p that starts at unit u (begin(p) <= u < begin(p+1)); the next one starts
// at u + (b1 - b0).
GQSA_PART_FN gqsa_sk_segment gqsa_sk_segment_at(int64_t n_kept, int64_t n_units, int64_t n_parts,
                                                int64_t p, int64_t u) {
    const int64_t begin = gqsa_sk_begin(n_units, n_parts, p);
    const int64_t end   = gqsa_sk_begin(n_units, n_parts, p + 1);
    gqsa_sk_segment s;
    s.row = u / n_kept;
    const int64_t row_begin = s.row * n_kept;
    const int64_t row_end   = row_begin + n_kept;
    s.b0 = u - row_begin;
    s.b1 = (end < row_end ? end : row_end) - row_begin;
    const int whole = s.b0 == 0 && s.b1 == n_kept;
    s.slot = whole ? -1 : (u == begin ? 2 * p : 2 * p + 1);
    return s;
}

// The slot holding part q's partial sum of a split row r, for q between the parts holding the
// row's first and last units; -1 when q is empty (more parts than units) and holds nothing.
GQSA_PART_FN int64_t gqsa_sk_slot(int64_t n_kept, int64_t n_units, int64_t n_parts, int64_t q, int64_t r) {
    const int64_t begin = gqsa_sk_begin(n_units, n_parts, q);
    if (begin == gqsa_sk_begin(n_units, n_parts, q + 1)) {
        return -1;
    }
    return begin >= r * n_kept ? 2 * q : 2 * q + 1;
}

// The split row that part p finishes, or -1: p's first unit lies inside a row (not at its start),
// and that row ends within p. *first_part is the part holding the row's first unit; the fix-up
// adds the slots gqsa_sk_slot(q, row) >= 0 for q = *first_part .. p, in that order.
GQSA_PART_FN int64_t gqsa_sk_finished_row(int64_t n_kept, int64_t n_units, int64_t n_parts, int64_t p,
                                          int64_t * first_part) {
    const int64_t begin = gqsa_sk_begin(n_units, n_parts, p);
    const int64_t end   = gqsa_sk_begin(n_units, n_parts, p + 1);
    if (begin >= end || begin % n_kept == 0) {
        return -1;
    }
    const int64_t row = begin / n_kept;
    if ((row + 1) * n_kept > end) {
        return -1;                       // the row goes on into a later part, which finishes it
    }
    *first_part = gqsa_sk_part_of(n_units, n_parts, row * n_kept);
    return row;
}

#ifdef __cplusplus
}
#endif
