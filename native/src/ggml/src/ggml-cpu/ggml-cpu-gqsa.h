// GQSA CPU kernels (gqsa-gguf). See ggml-gqsa.h for the block layouts. Each kernel X has a scalar
// reference X_generic (ggml-cpu-gqsa.c); X itself is the ISA version where the build has one
// (arch/x86/ggml-cpu-gqsa.c, arch/arm/ggml-cpu-gqsa.c: ggml-cpu-gqsa-arch.h picks; the vec_dot and
// panel_rows entries are defined once in ggml-cpu-gqsa.c on top of the ISA kernels), else the
// generic one.
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;

// Activation columns per panel: the column-interleaved activation layout of the mul_mat driver
// for batches (see ggml-cpu-gqsa.c). A panel holds 24 * GQSA_PANEL bytes per group of 16.
#define GQSA_PANEL 8

// Which kernels this ggml-cpu was compiled with (ggml-cpu-gqsa-arch.h picks by the compiler's ISA
// macros): "avx512vnni", "avxvnni", "avx2", "neon-dotprod", "neon" or "scalar". A portable build
// has one ggml-cpu per CPU variant, each with its own answer; the tests ask every variant.
const char * ggml_gqsa_cpu_kernels(void);

// from_float of the activation type gqsa_q8 (k % 16 == 0); bit-exact with quantize_row_gqsa_q8_ref
void quantize_row_gqsa_q8(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
// from_float of gqsa4 itself: a dense row, every group kept
void quantize_row_gqsa4(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
// from_float of gqsa3: the same with 3-bit codes
void quantize_row_gqsa3(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);

// Dot product of one gqsa4 row of n stored weights (n/16 blocks) with a gqsa_q8 activation row of
// the full logical width: each block reads the activation group its index names.
void ggml_vec_dot_gqsa4_gqsa_q8(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
// The scalar reference of the above; every SIMD path is tested against it.
void ggml_vec_dot_gqsa4_gqsa_q8_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                        size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// The same for a gqsa3 row (ggml's vec_dot of gqsa3, the file layout). With ISA kernels, the blocks
// widened to gqsa4 blocks a chunk at a time (gqsa3_to_gqsa4) and run by the gqsa4 kernel; the
// generic one reads the 3-bit codes. The integer sums are those of the widened blocks.
void ggml_vec_dot_gqsa3_gqsa_q8(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
void ggml_vec_dot_gqsa3_gqsa_q8_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                        size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

// out[r] = row r . y for `nrows` consecutive gqsa4 rows of n_kept blocks (one activation row y)
void ggml_gqsa_rows        (const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y, float * GGML_RESTRICT out);
void ggml_gqsa_rows_generic(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y, float * GGML_RESTRICT out);

// Quantizes groups [g0, g1) of GQSA_PANEL float columns (column c at x + c*ldx) into a panel
// (bit-exact with quantize_row_gqsa_q8_ref, rearranged)
void ggml_gqsa_pack_panel        (const float * GGML_RESTRICT x, int64_t ldx, int64_t g0, int64_t g1, void * GGML_RESTRICT panel);
void ggml_gqsa_pack_panel_generic(const float * GGML_RESTRICT x, int64_t ldx, int64_t g0, int64_t g1, void * GGML_RESTRICT panel);

// out[c*ldo + r] = row r . panel column c, for `nrows` consecutive gqsa4 rows and c < GQSA_PANEL
void ggml_gqsa_panel_rows        (const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT panel,
                                  float * GGML_RESTRICT out, int64_t ldo);
void ggml_gqsa_panel_rows_generic(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT panel,
                                  float * GGML_RESTRICT out, int64_t ldo);

// The mul_mat of a gqsa4 or gqsa3 weight (src0) with f32 activations (src1), called by
// ggml_compute_forward_mul_mat on every thread: quantizes the activations into the work buffer
// (decode rows, or panels for batches of GQSA_PANEL columns), then runs row chunks. Returns false
// (on every thread alike) for what it does not handle, which then takes ggml's generic path.
bool ggml_gqsa_mul_mat(const struct ggml_compute_params * params, struct ggml_tensor * dst);

// ---- repacked weights (the CPU_GQSA buffer type; see "Repacked weights" in ggml-cpu-gqsa.c) ----

#define GQSA_SB_BLOCKS 8

// 8 consecutive gqsa4 blocks of a row, rearranged for the AVX2 kernels; 96 bytes, as the 8 blocks
typedef struct {
    uint16_t    gz[GQSA_SB_BLOCKS];        // group index << 4 | zero point, in lane order
    ggml_fp16_t d[GQSA_SB_BLOCKS];         // scales, in lane order
    uint8_t     qs[4 * GQSA_SB_BLOCKS * 2]; // weights, two halves of 4 blocks
} gqsa_sb8;

// 8 consecutive gqsa3 blocks of a row, rearranged for the AVX2 kernels; 80 bytes, as the 8 blocks.
// The headers as in gqsa_sb8; the 3-bit codes in one 32-byte and one 16-byte field (layout:
// "Repacked weights" in ggml-cpu-gqsa.c)
typedef struct {
    uint16_t    gz[GQSA_SB_BLOCKS];        // group index << 4 | zero point, in lane order
    ggml_fp16_t d[GQSA_SB_BLOCKS];         // scales, in lane order
    uint8_t     qa[32];                    // per lane L: codes of blocks L, L+2, low bits of L+4
    uint8_t     qb[16];                    // per nibble L: codes of block 6+L, third bits of 4+L
} gqsa3_sb8;

// Whether this build repacks gqsa4 and gqsa3 weights (AVX2 kernels) and whether rows of n_kept blocks can be
bool ggml_gqsa_sb_available(void);
// The decode step this build runs on superblocks: "avx512" (two per step, 512-bit registers),
// "avx2" (one per step, 256-bit), "none" (no repacking)
const char * ggml_gqsa_sb_kernel(void);
bool ggml_gqsa_sb_supported(int n_kept);
// gqsa4 rows (n_kept >= 8) <-> repacked rows: n_kept / 8 superblocks, then the row's last
// n_kept % 8 blocks as stored (its tail); same bytes per row. src and dst must not overlap
void ggml_gqsa_sb_repack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows);
void ggml_gqsa_sb_unpack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows);
// gqsa3 rows (n_kept >= 8) <-> repacked rows: n_kept / 8 gqsa3 superblocks (gqsa3_sb8), then the
// row's last n_kept % 8 blocks as stored; same bytes per row (10 a block). src and dst must not overlap
void ggml_gqsa3_sb_repack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows);
void ggml_gqsa3_sb_unpack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows);
// Decode activations for superblocks: groups [g0, g1) of one float row of G groups into y, 32 bytes
// per group: group g at 32 g, its 16 qs then floats d, s, 0, 0; ggml_gqsa_sb_act_bytes(G) per row
#define GQSA_SB_ACT_GROUP_BYTES   32
#define ggml_gqsa_sb_act_bytes(G) ((size_t) (G) * GQSA_SB_ACT_GROUP_BYTES)
void ggml_gqsa_sb_quantize_act        (const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t G, int64_t g0, int64_t g1);
void ggml_gqsa_sb_quantize_act_generic(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t G, int64_t g0, int64_t g1);
// out[r] = repacked row r . y (decode activations of G groups), for nrows consecutive rows
void ggml_gqsa_sb_rows        (const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y,
                               int64_t G, float * GGML_RESTRICT out);
void ggml_gqsa_sb_rows_generic(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y,
                               int64_t G, float * GGML_RESTRICT out);
// The same for repacked gqsa3 rows
void ggml_gqsa3_sb_rows        (const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y,
                                int64_t G, float * GGML_RESTRICT out);
void ggml_gqsa3_sb_rows_generic(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y,
                                int64_t G, float * GGML_RESTRICT out);
// Work buffer bytes and the mul_mat of a repacked gqsa4 or gqsa3 weight (src0) with f32 activations; unlike
// ggml_gqsa_mul_mat it handles every mul_mat the buffer type accepts (ggml_gqsa_sb_supports_mul_mat)
size_t ggml_gqsa_sb_work_size(const struct ggml_tensor * dst);
bool   ggml_gqsa_sb_supports_mul_mat(const struct ggml_tensor * dst);
void   ggml_gqsa_mul_mat_sb(const struct ggml_compute_params * params, struct ggml_tensor * dst);

#ifdef __cplusplus
}
#endif
