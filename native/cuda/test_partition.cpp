// CPU test of the GQSA CUDA work split (native/src/ggml/src/ggml-cuda/gqsa-partition.h), the same
// header the kernels include. For many shapes and part counts it replays what the kernels do:
//
// * data-centric: every (row, block) is computed by exactly one warp of one tile;
// * task-centric (Stream-K): walking each part's segments as gqsa_gemv_task does covers every
//   (row, block) exactly once; every partial-sum slot is written at most once; every row is
//   written exactly once, directly (a whole-row segment) or by the one part that finishes it; the
//   finisher reads exactly the slots the row's segments wrote; and the sums so assembled equal the
//   plain row sums (exactly, with integer unit values).
//
// Build and run: native/cuda/build.sh --partition-test (any C++17 compiler; no CUDA needed).
// Exit status 0 when every check passes; prints the first failure otherwise.
#include "gqsa-partition.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <vector>

static int64_t n_checked = 0;

#define REQUIRE(cond, ...) do { if (!(cond)) { \
    fprintf(stderr, "FAIL %s:%d: %s\n  ", __FILE__, __LINE__, #cond); fprintf(stderr, __VA_ARGS__); \
    fprintf(stderr, "\n"); exit(1); } } while (0)

static void check_data_centric(int64_t n_rows, int64_t n_kept, int64_t rows_per_tile) {
    std::vector<int> cover(n_rows, 0);
    const int64_t tiles = gqsa_dc_n_tiles(n_rows, rows_per_tile);
    for (int64_t t = 0; t < tiles; ++t) {
        for (int64_t w = 0; w < rows_per_tile + 1; ++w) {    // one warp too many: must get no row
            const int64_t r = gqsa_dc_row(n_rows, rows_per_tile, t, w);
            if (r >= 0) {
                REQUIRE(w < rows_per_tile && r < n_rows, "tile %lld warp %lld row %lld", (long long) t, (long long) w, (long long) r);
                cover[r] += 1;
            }
        }
    }
    for (int64_t r = 0; r < n_rows; ++r) {
        REQUIRE(cover[r] == 1, "data-centric rows %lld kept %lld tile %lld: row %lld computed %d times",
                (long long) n_rows, (long long) n_kept, (long long) rows_per_tile, (long long) r, cover[r]);
    }
    n_checked += n_rows * n_kept;
}

static void check_task_centric(int64_t n_rows, int64_t n_kept, int64_t n_parts) {
    const int64_t W = n_rows * n_kept;
    std::vector<uint8_t> cover(W, 0);
    std::vector<int> row_writes(n_rows, 0);
    std::vector<int64_t> out(n_rows, 0);
    std::vector<int64_t> slot_val(2 * n_parts, 0);
    std::vector<int64_t> slot_row(2 * n_parts, -1);
    auto unit_value = [](int64_t u) { return (u * 2654435761ll) % 1000003 + 1; };

    REQUIRE(gqsa_sk_begin(W, n_parts, 0) == 0 && gqsa_sk_begin(W, n_parts, n_parts) == W, "ends");
    for (int64_t p = 0; p < n_parts; ++p) {
        const int64_t begin = gqsa_sk_begin(W, n_parts, p), end = gqsa_sk_begin(W, n_parts, p + 1);
        REQUIRE(begin <= end && end - begin <= W / n_parts + 1 && end - begin >= W / n_parts,
                "part %lld of %lld has %lld units of %lld", (long long) p, (long long) n_parts,
                (long long) (end - begin), (long long) W);
        if (begin < end) {
            REQUIRE(gqsa_sk_part_of(W, n_parts, begin) == p && gqsa_sk_part_of(W, n_parts, end - 1) == p,
                    "part_of at the ends of part %lld", (long long) p);
        }
        int n_partial = 0;
        for (int64_t u = begin; u < end;) {                 // as gqsa_gemv_task walks it
            const gqsa_sk_segment s = gqsa_sk_segment_at(n_kept, W, n_parts, p, u);
            REQUIRE(s.row >= 0 && s.row < n_rows && 0 <= s.b0 && s.b0 < s.b1 && s.b1 <= n_kept,
                    "segment row %lld [%lld, %lld)", (long long) s.row, (long long) s.b0, (long long) s.b1);
            REQUIRE(s.row * n_kept + s.b0 == u, "segment does not start at u");
            int64_t sum = 0;
            for (int64_t b = s.b0; b < s.b1; ++b) {
                const int64_t unit = s.row * n_kept + b;
                cover[unit] += 1;
                sum += unit_value(unit);
            }
            if (s.slot < 0) {
                REQUIRE(s.b0 == 0 && s.b1 == n_kept, "direct write of a partial row");
                row_writes[s.row] += 1;
                out[s.row] = sum;
            } else {
                REQUIRE(s.slot == 2 * p || s.slot == 2 * p + 1, "slot %lld of part %lld", (long long) s.slot, (long long) p);
                REQUIRE(slot_row[s.slot] < 0, "slot %lld written twice", (long long) s.slot);
                REQUIRE(s.slot == gqsa_sk_slot(n_kept, W, n_parts, p, s.row), "writer and reader disagree on the slot");
                slot_row[s.slot] = s.row;
                slot_val[s.slot] = sum;
                ++n_partial;
            }
            u += s.b1 - s.b0;
        }
        REQUIRE(n_partial <= 2, "part %lld has %d partial segments", (long long) p, n_partial);
    }
    // the fix-up pass, as gqsa_gemv_task_fixup runs it
    std::vector<int> slot_reads(2 * n_parts, 0);
    for (int64_t p = 0; p < n_parts; ++p) {
        int64_t first = -1;
        const int64_t row = gqsa_sk_finished_row(n_kept, W, n_parts, p, &first);
        if (row < 0) continue;
        REQUIRE(first >= 0 && first < p, "finisher %lld of row %lld: first part %lld", (long long) p, (long long) row, (long long) first);
        int64_t sum = 0;
        for (int64_t q = first; q <= p; ++q) {
            const int64_t slot = gqsa_sk_slot(n_kept, W, n_parts, q, row);
            const bool empty = gqsa_sk_begin(W, n_parts, q) == gqsa_sk_begin(W, n_parts, q + 1);
            REQUIRE((slot < 0) == empty, "part %lld: slot %lld, empty %d", (long long) q, (long long) slot, empty);
            if (slot < 0) continue;
            REQUIRE(slot_row[slot] == row, "finisher of row %lld reads slot %lld holding row %lld",
                    (long long) row, (long long) slot, (long long) slot_row[slot]);
            slot_reads[slot] += 1;
            sum += slot_val[slot];
        }
        row_writes[row] += 1;
        out[row] = sum;
    }
    for (int64_t u = 0; u < W; ++u) {
        REQUIRE(cover[u] == 1, "rows %lld kept %lld parts %lld: unit %lld (row %lld block %lld) computed %d times",
                (long long) n_rows, (long long) n_kept, (long long) n_parts, (long long) u, (long long) (u / n_kept),
                (long long) (u % n_kept), cover[u]);
    }
    for (int64_t s = 0; s < 2 * n_parts; ++s) {
        REQUIRE((slot_row[s] >= 0) == (slot_reads[s] == 1) && slot_reads[s] <= 1,
                "rows %lld kept %lld parts %lld: slot %lld written %d, read %d times", (long long) n_rows,
                (long long) n_kept, (long long) n_parts, (long long) s, slot_row[s] >= 0, slot_reads[s]);
    }
    for (int64_t r = 0; r < n_rows; ++r) {
        int64_t want = 0;
        for (int64_t b = 0; b < n_kept; ++b) want += unit_value(r * n_kept + b);
        REQUIRE(row_writes[r] == 1 && out[r] == want, "rows %lld kept %lld parts %lld: row %lld written %d times, sum %lld != %lld",
                (long long) n_rows, (long long) n_kept, (long long) n_parts, (long long) r, row_writes[r],
                (long long) out[r], (long long) want);
    }
    n_checked += W;
}

int main() {
    int64_t cases = 0;
    // exhaustive over small shapes and part counts (more parts than units included)
    for (int64_t n_rows = 1; n_rows <= 12; ++n_rows) {
        for (int64_t n_kept = 1; n_kept <= 12; ++n_kept) {
            for (int64_t parts = 1; parts <= n_rows * n_kept + 3; ++parts) {
                check_task_centric(n_rows, n_kept, parts);
                ++cases;
            }
            for (int64_t tile = 1; tile <= 5; ++tile) {
                check_data_centric(n_rows, n_kept, tile);
                ++cases;
            }
        }
    }
    // model shapes (rows, kept blocks at 25/50/75 % sparsity) on real multiprocessor counts
    const int64_t shapes[][2] = {{576, 27}, {1536, 18}, {4096, 128}, {4096, 64}, {11008, 192},
                                 {4096, 344}, {14336, 32}, {32000, 96}};
    const int64_t sms[] = {1, 7, 46, 84, 108, 114, 132, 142, 170};
    for (auto & sh : shapes) {
        for (int64_t sm : sms) {
            for (int64_t per_sm : {1, 4, 16, 32}) {
                check_task_centric(sh[0], sh[1], sm * per_sm);
                ++cases;
            }
        }
        check_data_centric(sh[0], sh[1], 4);
        ++cases;
    }
    // random shapes and part counts
    uint64_t s = 88172645463325252ull;
    auto rnd = [&](int64_t n) { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return (int64_t) (s % (uint64_t) n); };
    for (int i = 0; i < 150; ++i) {
        const int64_t n_rows = 1 + rnd(3000), n_kept = 1 + rnd(700);
        const int64_t parts = 1 + rnd(i % 4 == 0 ? n_rows * n_kept + 100 : 20000);
        check_task_centric(n_rows, n_kept, parts);
        check_data_centric(n_rows, n_kept, 1 + rnd(16));
        cases += 2;
    }
    printf("gqsa partition: %lld cases, %lld (row, block) units each covered exactly once; all rows assembled exactly\n",
           (long long) cases, (long long) n_checked);
    return 0;
}
