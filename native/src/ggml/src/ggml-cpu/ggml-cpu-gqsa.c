// GQSA CPU kernels (gqsa-gguf), generic part: the scalar kernels (*_generic: the reference every
// SIMD path is tested against by native/tests/test_kernels.c), the weight and activation layouts,
// and the mul_mat driver for gqsa4 and gqsa3 weights. The SIMD kernels live one ISA per file, as upstream's
// ggml-cpu/arch/ does it: arch/x86/ggml-cpu-gqsa.c (AVX2) and arch/arm/ggml-cpu-gqsa.c (NEON);
// ggml-cpu-gqsa-arch.h says which one a build uses.
//
// Per kept block of a weight row:  d_w * (d_x * sum_j q[j]*xq[j]  -  z * s_x),  s_x = d_x * sum_j xq[j]
// where (d_x, s_x, xq) is the activation group the block's index names. The integer sums are exact;
// paths differ only in the order of the float accumulation.
//
// Layouts:
//  - weights: block_gqsa4 rows (docs/FORMAT.md), read as stored; block_gqsa3 rows, widened to gqsa4
//    blocks a chunk at a time for the gqsa4 kernels (see "gqsa3 in the file layout" below);
//  - decode (one activation column): the documented gqsa_q8 row, 24 bytes per group;
//  - batches of >= GQSA_PANEL columns: the mul_mat driver quantizes GQSA_PANEL columns at a time
//    into a "panel", column-interleaved per group (see "Panels" below), so that one weight
//    block is dotted with GQSA_PANEL columns by four broadcast-multiply-adds, without reductions.
//    Same quantized values (bit-exact with quantize_row_gqsa_q8_ref), same 24 bytes per group and
//    column, so the panels fit the work buffer ggml sizes for gqsa_q8;
//  - weights repacked at load into superblocks (AVX2, rows keeping at least 8 blocks; the
//    CPU_GQSA buffer type), gqsa4 and gqsa3 each in its own, with kernels of its own: see
//    "Repacked weights" below, and docs/DESIGN.md.
#include "ggml-cpu-gqsa-arch.h"
#include "ggml-cpu-impl.h"
#include "simd-mappings.h"

#include <assert.h>
#include <string.h>

#define GQSA_HALF (GQSA_GROUP_SIZE / 2)

void quantize_row_gqsa4(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_gqsa4_ref(x, (block_gqsa4 *) y, k);
}

void quantize_row_gqsa3(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_gqsa3_ref(x, (block_gqsa3 *) y, k);
}

const char * ggml_gqsa_cpu_kernels(void) {
#if defined(GQSA_CPU_X86) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return "avx512vnni";
#elif defined(GQSA_CPU_X86) && defined(__AVXVNNI__)
    return "avxvnni";
#elif defined(GQSA_CPU_X86)
    return "avx2";
#elif defined(GQSA_CPU_ARM) && defined(__ARM_FEATURE_DOTPROD)
    return "neon-dotprod";
#elif defined(GQSA_CPU_ARM)
    return "neon";
#else
    return "scalar";
#endif
}

// ---------------------------------------------------------------------------------------------
// Dot product of one weight row with one activation row
// ---------------------------------------------------------------------------------------------

// One block's contribution from its integer sum: d_w * (d_x * sumi - z * s_x)
static inline float gqsa_block_value(ggml_fp16_t d, uint32_t z, int sumi, const block_gqsa_q8 * a) {
    return GGML_CPU_FP16_TO_FP32(d) * (a->d * (float) sumi - (float) z * a->s);
}

// One block of either type . the activation group its index names (y: the row's groups)
typedef float (*gqsa_block_dot_fn)(const void * GGML_RESTRICT block, const block_gqsa_q8 * GGML_RESTRICT y);

static float gqsa4_block_dot_generic(const void * GGML_RESTRICT vb, const block_gqsa_q8 * GGML_RESTRICT y) {
    const block_gqsa4 * b = (const block_gqsa4 *) vb;
    const block_gqsa_q8 * a = y + gqsa_block_index(b);
    int sumi = 0;
    for (int j = 0; j < GQSA_HALF; ++j) {
        sumi += (b->qs[j] & 0x0F) * a->qs[j];
        sumi += (b->qs[j] >>   4) * a->qs[j + GQSA_HALF];
    }
    return gqsa_block_value(b->d, gqsa_block_zero(b), sumi, a);
}

// reads the 3-bit codes as the format defines them (gqsa3_code), independently of the kernels' layouts
static float gqsa3_block_dot_generic(const void * GGML_RESTRICT vb, const block_gqsa_q8 * GGML_RESTRICT y) {
    const block_gqsa3 * b = (const block_gqsa3 *) vb;
    const block_gqsa_q8 * a = y + (b->iz & GQSA_INDEX_MASK);
    int sumi = 0;
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        sumi += gqsa3_code(b, j) * a->qs[j];
    }
    return gqsa_block_value(b->d, b->iz >> GQSA_INDEX_BITS, sumi, a);
}

// The scalar vec_dot of either type: the n/16 blocks of the row at vx (block_bytes apart), in storage order
static void gqsa_vec_dot_generic(gqsa_block_dot_fn dot, size_t block_bytes, int n, float * GGML_RESTRICT s,
                                 const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % GQSA_GROUP_SIZE == 0);
    const int nb = n / GQSA_GROUP_SIZE;
    float sumf = 0.0f;
    for (int i = 0; i < nb; ++i) {
        sumf += dot((const uint8_t *) vx + (size_t) i * block_bytes, (const block_gqsa_q8 *) vy);
    }
    *s = sumf;
}

void ggml_vec_dot_gqsa4_gqsa_q8_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                        size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);
    gqsa_vec_dot_generic(gqsa4_block_dot_generic, sizeof(block_gqsa4), n, s, vx, vy);
}

void ggml_vec_dot_gqsa3_gqsa_q8_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                        size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);
    gqsa_vec_dot_generic(gqsa3_block_dot_generic, sizeof(block_gqsa3), n, s, vx, vy);
}

void ggml_gqsa_rows_generic(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                            const void * GGML_RESTRICT vy, float * GGML_RESTRICT out) {
    const block_gqsa4 * x = (const block_gqsa4 *) vx;
    for (int64_t r = 0; r < nrows; ++r) {
        ggml_vec_dot_gqsa4_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, out + r, 0, x + r * n_kept, 0, vy, 0, 1);
    }
}

// ggml's vec_dot: the ISA file's row kernel, else the generic one
void ggml_vec_dot_gqsa4_gqsa_q8(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
#if GQSA_CPU_PANELS
    assert(nrc == 1);
    assert(n % GQSA_GROUP_SIZE == 0);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);
    *s = ggml_gqsa_row(vx, n / GQSA_GROUP_SIZE, vy);
#else
    ggml_vec_dot_gqsa4_gqsa_q8_generic(n, s, bs, vx, bx, vy, by, nrc);
#endif
}

// ---------------------------------------------------------------------------------------------
// gqsa3 in the file layout: run by the gqsa4 kernels on widened copies
// ---------------------------------------------------------------------------------------------
//
// A gqsa3 block and its gqsa4 widening (gqsa3_to_gqsa4: same d and iz, each code a nibble) have the
// same weights, so every gqsa4 kernel computes a gqsa3 dot product exactly as it does gqsa4's. On
// x86 a weight in the file layout (rows of fewer than 8 blocks, GGML_GQSA_REPACK=0) is widened here
// GQSA3_CHUNK blocks at a time, into a buffer on the stack, for each kernel call
// (ggml_gqsa3_row, ggml_gqsa3_panel_pass); the ARM file reads the 3-bit codes itself
// (GQSA_CPU_GQSA3_FILE), and the repacked weights (CPU_GQSA) have kernels of their own that do
// ("Repacked weights" below).

#define GQSA3_CHUNK 64

#if GQSA_CPU_PANELS && !GQSA_CPU_GQSA3_FILE
// one gqsa3 row of nb blocks . a decode activation row, by the ISA row kernel on widened chunks
float ggml_gqsa3_row(const void * GGML_RESTRICT vx, int nb, const void * GGML_RESTRICT y) {
    const block_gqsa3 * x = (const block_gqsa3 *) vx;
    block_gqsa4 w[GQSA3_CHUNK];
    float sumf = 0.0f;
    for (int i0 = 0; i0 < nb; i0 += GQSA3_CHUNK) {
        const int n = nb - i0 < GQSA3_CHUNK ? nb - i0 : GQSA3_CHUNK;
        for (int i = 0; i < n; ++i) {
            gqsa3_to_gqsa4(x + i0 + i, w + i);
        }
        sumf += ggml_gqsa_row(w, n, y);
    }
    return sumf;
}
#endif

void ggml_vec_dot_gqsa3_gqsa_q8(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
#if GQSA_CPU_PANELS
    assert(nrc == 1);
    assert(n % GQSA_GROUP_SIZE == 0);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);
    *s = ggml_gqsa3_row(vx, n / GQSA_GROUP_SIZE, vy);
#else
    ggml_vec_dot_gqsa3_gqsa_q8_generic(n, s, bs, vx, bx, vy, by, nrc);
#endif
}

// ---------------------------------------------------------------------------------------------
// Panels: GQSA_PANEL activation columns, column-interleaved per group
// ---------------------------------------------------------------------------------------------
//
// For group g, GQSA_PANEL_GROUP_BYTES = 24 * P bytes (P = GQSA_PANEL):
//     int8  qs[4][P][4]   qs[k][c][i] = xq of column c, weight 4k+i of the group
//     float d[P]          column c's d_x
//     float s[P]          column c's s_x
// A weight block (index g) then multiplies the four dwords of its 16 weights, each broadcast to
// all lanes, with qs[k] (one P-lane dword vector per k): four u8 x s8 dot-accumulates give the
// P integer sums of the block against the P columns in lanes, with no horizontal reduction.

// Quantizes groups [g0, g1) of GQSA_PANEL columns (column c at x + c*ldx) into a panel.
void ggml_gqsa_pack_panel_generic(const float * GGML_RESTRICT x, int64_t ldx, int64_t g0, int64_t g1,
                                  void * GGML_RESTRICT vpanel) {
    uint8_t * panel = (uint8_t *) vpanel;
    for (int64_t g = g0; g < g1; ++g) {
        uint8_t * pg = panel + g * GQSA_PANEL_GROUP_BYTES;
        float * pd = (float *) (pg + GQSA_GROUP_SIZE * GQSA_PANEL);
        for (int c = 0; c < GQSA_PANEL; ++c) {
            block_gqsa_q8 blk;
            quantize_row_gqsa_q8_ref(x + c * ldx + g * GQSA_GROUP_SIZE, &blk, GQSA_GROUP_SIZE);
            for (int k = 0; k < 4; ++k) {
                memcpy(pg + (k * GQSA_PANEL + c) * 4, blk.qs + 4 * k, 4);
            }
            pd[c]              = blk.d;
            pd[GQSA_PANEL + c] = blk.s;
        }
    }
}

// out[c*ldo + r] = row r . column c of the panel, for rows [0, nrows) and c < GQSA_PANEL
void ggml_gqsa_panel_rows_generic(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                                  const void * GGML_RESTRICT vpanel, float * GGML_RESTRICT out, int64_t ldo) {
    const block_gqsa4 * x = (const block_gqsa4 *) vx;
    const uint8_t * panel = (const uint8_t *) vpanel;
    for (int64_t r = 0; r < nrows; ++r) {
        float acc[GQSA_PANEL] = {0};
        for (int i = 0; i < n_kept; ++i) {
            const block_gqsa4 * b = x + r * n_kept + i;
            const uint8_t * pg = panel + gqsa_block_index(b) * GQSA_PANEL_GROUP_BYTES;
            const int8_t * qs = (const int8_t *) pg;
            const float * pd = (const float *) (pg + GQSA_GROUP_SIZE * GQSA_PANEL);
            const float dw = GGML_CPU_FP16_TO_FP32(b->d);
            const float z  = (float) gqsa_block_zero(b);
            for (int c = 0; c < GQSA_PANEL; ++c) {
                int sumi = 0;
                for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
                    const int q = j < GQSA_HALF ? (b->qs[j] & 0x0F) : (b->qs[j - GQSA_HALF] >> 4);
                    sumi += q * qs[((j / 4) * GQSA_PANEL + c) * 4 + j % 4];
                }
                acc[c] += dw * (pd[c] * (float) sumi - z * pd[GQSA_PANEL + c]);
            }
        }
        for (int c = 0; c < GQSA_PANEL; ++c) {
            out[c * ldo + r] = acc[c];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Repacked weights: superblocks of 8 blocks (the CPU_GQSA buffer type, ggml-cpu-gqsa-repack.cpp)
// ---------------------------------------------------------------------------------------------
//
// At load, a gqsa4 weight whose rows keep at least 8 blocks can be repacked (AVX2 builds): each row
// into n_kept / 8 superblocks of 8 consecutive blocks, 96 bytes like the 8 blocks they hold, then
// its last n_kept % 8 blocks as stored (the row's tail: LLaMA-7B's ffn_down at 25 % keeps 516):
//     uint16 gz[8]   group index << 4 | zero point   } in lane order: lane l holds block
//     fp16   d[8]    scale                           } gqsa_sb_lane[l] of the 8
//     uint8  qs[64]  half h = 0, 1 (32 bytes) holds blocks 4h..4h+3: byte k < 16 weight k of block
//                    4h (low nibble) and of block 4h+2 (high nibble); byte 16 + k the same for
//                    blocks 4h+1 and 4h+3
// The lane order is the order in which the decode step's reduction leaves the 8 block sums, so the
// scales and zero points are used as loaded; one 32-byte load gives 4 blocks' weights with an AND
// and a shift; 2 * (gz & 0xFFF0) is the byte offset of a block's group in the decode activations:
//     per group g, at 32 g: int8 qs[16], then float d, s, 0, 0
// (one 32-byte load per block brings its group's qs, d and s; two 128-bit permutes per pair of
// blocks part them: on Zen 5 the step is bound by its loads, and this layout measured 8-17 % faster
// per block than qs and (d, s) in separate arrays, which take two loads).
// Same bytes as the file layout; the decode step measured 25-30 % faster per block (benchmarks, not
// tests, hold the numbers: docs/DESIGN.md, docs/bench-llama-7b.md).
//
// A gqsa3 weight is repacked the same way into 80-byte superblocks (gqsa3_sb8), 10 bytes a block as
// in the file, and a tail of n_kept % 8 gqsa3 blocks as stored. The headers are those of gqsa_sb8;
// the codes are arranged for the decode step's four 32-byte code vectors, pair p = 0..3 holding
// block 2p in its low 128-bit lane and block 2p+1 in its high one (L = 0, 1 below), 16 codes each:
//     uint8  qa[32]  byte 16L + k: code k of block L (bits 0-2), of block 2+L (bits 3-5), the low
//                    two bits of code k of block 4+L (bits 6-7)
//     uint8  qb[16]  byte k: nibble L (bits 4L..4L+3): code k of block 6+L (bits 0-2), the third
//                    bit of code k of block 4+L (bit 3)
// One 32-byte load (qa) and one 16-byte broadcast (qb, shifted by 4 in the high lane) then give the
// four vectors by shifts and ANDs, and one OR for pair 2: ten vector operations per 8 blocks.

static const int gqsa_sb_lane[GQSA_SB_BLOCKS] = { 0, 2, 4, 6, 1, 3, 5, 7 };

// A block's iz (index | zero << 12, either type) as a superblock's group word (index << 4 | zero),
// and back
static inline uint16_t gqsa_sb_word(uint16_t iz) {
    return (uint16_t) ((iz & GQSA_INDEX_MASK) << 4 | iz >> GQSA_INDEX_BITS);
}

static inline uint16_t gqsa_sb_iz(uint16_t gz) {
    return (uint16_t) ((gz >> 4) | (gz & 0x0F) << GQSA_INDEX_BITS);
}

static inline int gqsa_weight(const block_gqsa4 * b, int j) {
    return j < GQSA_HALF ? (b->qs[j] & 0x0F) : (b->qs[j - GQSA_HALF] >> 4);
}

// row r of a repacked weight: its superblocks, then its tail blocks
static inline const gqsa_sb8 * gqsa_sb_row(const void * x, int n_kept, int64_t r) {
    return (const gqsa_sb8 *) ((const uint8_t *) x + (size_t) r * n_kept * sizeof(block_gqsa4));
}

void ggml_gqsa_sb_repack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows) {
    assert(n_kept >= GQSA_SB_BLOCKS);
    const int nsb = n_kept / GQSA_SB_BLOCKS, tail = n_kept % GQSA_SB_BLOCKS;   // never straddle a row
    for (int64_t r = 0; r < nrows; ++r) {
        const block_gqsa4 * x = (const block_gqsa4 *) src + r * n_kept;
        gqsa_sb8 * t = (gqsa_sb8 *) ((uint8_t *) dst + (size_t) r * n_kept * sizeof(block_gqsa4));
        for (int s = 0; s < nsb; ++s) {
            const block_gqsa4 * b = x + GQSA_SB_BLOCKS * s;
            for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
                const block_gqsa4 * c = b + gqsa_sb_lane[l];
                t[s].gz[l] = gqsa_sb_word(c->iz);
                t[s].d[l]  = c->d;
            }
            for (int h = 0; h < 2; ++h) {
                for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
                    t[s].qs[32 * h + k]      = (uint8_t) (gqsa_weight(b + 4 * h,     k) | gqsa_weight(b + 4 * h + 2, k) << 4);
                    t[s].qs[32 * h + 16 + k] = (uint8_t) (gqsa_weight(b + 4 * h + 1, k) | gqsa_weight(b + 4 * h + 3, k) << 4);
                }
            }
        }
        memcpy(t + nsb, x + GQSA_SB_BLOCKS * nsb, (size_t) tail * sizeof(block_gqsa4));
    }
}

void ggml_gqsa_sb_unpack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows) {
    assert(n_kept >= GQSA_SB_BLOCKS);
    const int nsb = n_kept / GQSA_SB_BLOCKS, tail = n_kept % GQSA_SB_BLOCKS;
    for (int64_t r = 0; r < nrows; ++r) {
        const gqsa_sb8 * t = gqsa_sb_row(src, n_kept, r);
        block_gqsa4 * x = (block_gqsa4 *) dst + r * n_kept;
        for (int s = 0; s < nsb; ++s) {
            block_gqsa4 * b = x + GQSA_SB_BLOCKS * s;
            for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
                block_gqsa4 * c = b + gqsa_sb_lane[l];
                c->d  = t[s].d[l];
                c->iz = gqsa_sb_iz(t[s].gz[l]);
            }
            for (int h = 0; h < 2; ++h) {
                for (int j = 0; j < GQSA_HALF; ++j) {
                    for (int m = 0; m < 4; ++m) {       // block 4h+m: byte half (m & 1), nibble (m >> 1)
                        const uint8_t * q = t[s].qs + 32 * h + 16 * (m & 1);
                        const int sh = 4 * (m >> 1);
                        b[4 * h + m].qs[j] = (uint8_t) (((q[j] >> sh) & 0x0F) | ((q[j + GQSA_HALF] >> sh) & 0x0F) << 4);
                    }
                }
            }
        }
        memcpy(x + GQSA_SB_BLOCKS * nsb, t + nsb, (size_t) tail * sizeof(block_gqsa4));
    }
}

// Code k of block b (0..7, in row order) of a gqsa3 superblock: the layout above, read back
static inline int gqsa3_sb_code(const gqsa3_sb8 * t, int b, int k) {
    const int L = b & 1;
    const int a = t->qa[GQSA_GROUP_SIZE * L + k];
    const int h = t->qb[k] >> (4 * L);
    switch (b >> 1) {
        case 0:  return a & 7;
        case 1:  return (a >> 3) & 7;
        case 2:  return (a >> 6) | ((h >> 3) & 1) << 2;
        default: return h & 7;
    }
}

// row r of a repacked gqsa3 weight: its superblocks, then its tail blocks
static inline const gqsa3_sb8 * gqsa3_sb_row(const void * x, int n_kept, int64_t r) {
    return (const gqsa3_sb8 * ) ((const uint8_t *) x + (size_t) r * n_kept * sizeof(block_gqsa3));
}

void ggml_gqsa3_sb_repack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows) {
    assert(n_kept >= GQSA_SB_BLOCKS);
    const int nsb = n_kept / GQSA_SB_BLOCKS, tail = n_kept % GQSA_SB_BLOCKS;   // never straddle a row
    for (int64_t r = 0; r < nrows; ++r) {
        const block_gqsa3 * x = (const block_gqsa3 *) src + r * n_kept;
        gqsa3_sb8 * t = (gqsa3_sb8 *) ((uint8_t *) dst + (size_t) r * n_kept * sizeof(block_gqsa3));
        for (int s = 0; s < nsb; ++s) {
            const block_gqsa3 * b = x + GQSA_SB_BLOCKS * s;
            for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
                const block_gqsa3 * c = b + gqsa_sb_lane[l];
                t[s].gz[l] = gqsa_sb_word(c->iz);
                t[s].d[l]  = c->d;
            }
            for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
                int qb = 0;
                for (int L = 0; L < 2; ++L) {
                    const int q0 = gqsa3_code(b + L, k), q1 = gqsa3_code(b + 2 + L, k);
                    const int q2 = gqsa3_code(b + 4 + L, k), q3 = gqsa3_code(b + 6 + L, k);
                    t[s].qa[GQSA_GROUP_SIZE * L + k] = (uint8_t) (q0 | q1 << 3 | (q2 & 3) << 6);
                    qb |= (q3 | (q2 >> 2) << 3) << (4 * L);
                }
                t[s].qb[k] = (uint8_t) qb;
            }
        }
        memcpy(t + nsb, x + GQSA_SB_BLOCKS * nsb, (size_t) tail * sizeof(block_gqsa3));
    }
}

void ggml_gqsa3_sb_unpack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows) {
    assert(n_kept >= GQSA_SB_BLOCKS);
    const int nsb = n_kept / GQSA_SB_BLOCKS, tail = n_kept % GQSA_SB_BLOCKS;
    for (int64_t r = 0; r < nrows; ++r) {
        const gqsa3_sb8 * t = gqsa3_sb_row(src, n_kept, r);
        block_gqsa3 * x = (block_gqsa3 *) dst + r * n_kept;
        for (int s = 0; s < nsb; ++s) {
            block_gqsa3 * b = x + GQSA_SB_BLOCKS * s;
            for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
                block_gqsa3 * c = b + gqsa_sb_lane[l];
                c->d  = t[s].d[l];
                c->iz = gqsa_sb_iz(t[s].gz[l]);
            }
            for (int m = 0; m < GQSA_SB_BLOCKS; ++m) {      // the format's packing (docs/FORMAT.md)
                uint32_t qh = 0;
                memset(b[m].ql, 0, sizeof(b[m].ql));
                for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
                    const int q = gqsa3_sb_code(t + s, m, k);
                    b[m].ql[k & 3] |= (uint8_t) ((q & 3) << (2 * (k >> 2)));
                    qh |= (uint32_t) (q >> 2) << k;
                }
                b[m].qh = (uint16_t) qh;
            }
        }
        memcpy(x + GQSA_SB_BLOCKS * nsb, t + nsb, (size_t) tail * sizeof(block_gqsa3));
    }
}

// The decode activations of group g (layout above): its qs, and its floats d, s
static inline const int8_t * gqsa_sb_act_qs(const void * y, int64_t g) {
    return (const int8_t *) y + GQSA_SB_ACT_GROUP_BYTES * g;
}

static inline const float * gqsa_sb_act_ds(const void * y, int64_t g) {
    return (const float *) ((const uint8_t *) y + GQSA_SB_ACT_GROUP_BYTES * g + GQSA_GROUP_SIZE);
}

void ggml_gqsa_sb_quantize_act_generic(const float * GGML_RESTRICT x, void * GGML_RESTRICT vy, int64_t G,
                                       int64_t g0, int64_t g1) {
    GGML_UNUSED(G);
    for (int64_t g = g0; g < g1; ++g) {
        block_gqsa_q8 blk;
        quantize_row_gqsa_q8_ref(x + g * GQSA_GROUP_SIZE, &blk, GQSA_GROUP_SIZE);
        uint8_t * a = (uint8_t *) vy + GQSA_SB_ACT_GROUP_BYTES * g;
        const float ds[4] = { blk.d, blk.s, 0.0f, 0.0f };
        memcpy(a, blk.qs, GQSA_GROUP_SIZE);
        memcpy(a + GQSA_GROUP_SIZE, ds, sizeof(ds));
    }
}

void ggml_gqsa_sb_rows_generic(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                               const void * GGML_RESTRICT vy, int64_t G, float * GGML_RESTRICT out) {
    GGML_UNUSED(G);
    const int nsb = n_kept / GQSA_SB_BLOCKS, tail = n_kept % GQSA_SB_BLOCKS;
    for (int64_t r = 0; r < nrows; ++r) {
        const gqsa_sb8 * t = gqsa_sb_row(vx, n_kept, r);
        float sumf = 0.0f;
        for (int s = 0; s < nsb; ++s) {
            const gqsa_sb8 * u = t + s;
            for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
                const int b = gqsa_sb_lane[l];               // block b of the 8: half b / 4, byte half b & 1, nibble (b >> 1) & 1
                const uint8_t * q = u->qs + 32 * (b / 4) + 16 * (b & 1);
                const int sh = 4 * ((b >> 1) & 1);
                const int g = u->gz[l] >> 4;
                const int8_t * qs = gqsa_sb_act_qs(vy, g);
                const float  * ds = gqsa_sb_act_ds(vy, g);
                int sumi = 0;
                for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
                    sumi += ((q[k] >> sh) & 0x0F) * qs[k];
                }
                sumf += GGML_CPU_FP16_TO_FP32(u->d[l]) * (ds[0] * (float) sumi - (float) (u->gz[l] & 0x0F) * ds[1]);
            }
        }
        const block_gqsa4 * b = (const block_gqsa4 *) (t + nsb);
        for (int k = 0; k < tail; ++k) {                     // the tail: blocks as stored
            const int g = gqsa_block_index(b + k);
            const int8_t * qs = gqsa_sb_act_qs(vy, g);
            const float  * ds = gqsa_sb_act_ds(vy, g);
            int sumi = 0;
            for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
                sumi += gqsa_weight(b + k, j) * qs[j];
            }
            sumf += GGML_CPU_FP16_TO_FP32(b[k].d) * (ds[0] * (float) sumi - (float) gqsa_block_zero(b + k) * ds[1]);
        }
        out[r] = sumf;
    }
}

void ggml_gqsa3_sb_rows_generic(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                                const void * GGML_RESTRICT vy, int64_t G, float * GGML_RESTRICT out) {
    GGML_UNUSED(G);
    const int nsb = n_kept / GQSA_SB_BLOCKS, tail = n_kept % GQSA_SB_BLOCKS;
    for (int64_t r = 0; r < nrows; ++r) {
        const gqsa3_sb8 * t = gqsa3_sb_row(vx, n_kept, r);
        float sumf = 0.0f;
        for (int s = 0; s < nsb; ++s) {
            for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
                const int g = t[s].gz[l] >> 4;
                const int8_t * qs = gqsa_sb_act_qs(vy, g);
                const float  * ds = gqsa_sb_act_ds(vy, g);
                int sumi = 0;
                for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
                    sumi += gqsa3_sb_code(t + s, gqsa_sb_lane[l], k) * qs[k];
                }
                sumf += GGML_CPU_FP16_TO_FP32(t[s].d[l]) * (ds[0] * (float) sumi - (float) (t[s].gz[l] & 0x0F) * ds[1]);
            }
        }
        const block_gqsa3 * b = (const block_gqsa3 *) (t + nsb);
        for (int k = 0; k < tail; ++k) {                     // the tail: blocks as stored
            const int g = b[k].iz & GQSA_INDEX_MASK;
            const int8_t * qs = gqsa_sb_act_qs(vy, g);
            const float  * ds = gqsa_sb_act_ds(vy, g);
            int sumi = 0;
            for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
                sumi += gqsa3_code(b + k, j) * qs[j];
            }
            sumf += GGML_CPU_FP16_TO_FP32(b[k].d) * (ds[0] * (float) sumi - (float) (b[k].iz >> GQSA_INDEX_BITS) * ds[1]);
        }
        out[r] = sumf;
    }
}

static_assert(sizeof(gqsa_sb8)  == GQSA_SB_BLOCKS * GQSA_BLOCK_BYTES,  "wrong gqsa_sb8 size/padding");
static_assert(sizeof(gqsa3_sb8) == GQSA_SB_BLOCKS * GQSA3_BLOCK_BYTES, "wrong gqsa3_sb8 size/padding");

// ---------------------------------------------------------------------------------------------
// The public kernel names where no ISA file defines them: the generic kernels
// ---------------------------------------------------------------------------------------------

#if !GQSA_CPU_PANELS
void quantize_row_gqsa_q8(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_gqsa_q8_ref(x, (block_gqsa_q8 *) y, k);
}

void ggml_gqsa_rows(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y,
                    float * GGML_RESTRICT out) {
    ggml_gqsa_rows_generic(x, n_kept, nrows, y, out);
}

void ggml_gqsa_pack_panel(const float * GGML_RESTRICT x, int64_t ldx, int64_t g0, int64_t g1, void * GGML_RESTRICT panel) {
    ggml_gqsa_pack_panel_generic(x, ldx, g0, g1, panel);
}
#endif

#if !defined(GQSA_CPU_X86)
const char * ggml_gqsa_sb_kernel(void) {
    return "none";
}

void ggml_gqsa_sb_quantize_act(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t G, int64_t g0, int64_t g1) {
    ggml_gqsa_sb_quantize_act_generic(x, y, G, g0, g1);
}

void ggml_gqsa_sb_rows(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y,
                       int64_t G, float * GGML_RESTRICT out) {
    ggml_gqsa_sb_rows_generic(x, n_kept, nrows, y, G, out);
}

void ggml_gqsa3_sb_rows(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y,
                        int64_t G, float * GGML_RESTRICT out) {
    ggml_gqsa3_sb_rows_generic(x, n_kept, nrows, y, G, out);
}
#endif

// ---------------------------------------------------------------------------------------------
// mul_mat driver
// ---------------------------------------------------------------------------------------------

#define GQSA_ROWS_PER_PASS 32             // rows per pass over the K windows (accumulators on the stack)
#define GQSA_WINDOW_BYTES  (24 * 1024)     // four panels' data of one K window: about 3/4 of a 32 KiB L1

// out[c*ldo + r] = row r . column c of the panel. With panel kernels, the test entry of the ISA
// file's ggml_gqsa_panel_pass, run as the driver runs it but in one K window (a row's blocks in one
// kernel call); else the generic kernel.
void ggml_gqsa_panel_rows(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT panel,
                          float * GGML_RESTRICT out, int64_t ldo) {
#if GQSA_CPU_PANELS
    const uint8_t * panels[1] = { (const uint8_t *) panel };
    const size_t row_bytes = (size_t) n_kept * sizeof(block_gqsa4);
    for (int64_t r0 = 0; r0 < nrows; r0 += GQSA_ROWS_PER_PASS) {
        float acc[GQSA_ROWS_PER_PASS][4][GQSA_PANEL] = {{{0}}};
        int   cur[GQSA_ROWS_PER_PASS] = {0};
        const int nr = (int) (nrows - r0 < GQSA_ROWS_PER_PASS ? nrows - r0 : GQSA_ROWS_PER_PASS);
        ggml_gqsa_panel_pass((const uint8_t *) x + r0 * row_bytes, row_bytes, n_kept, nr, cur, UINT32_MAX, panels, 1, acc);
        for (int c = 0; c < GQSA_PANEL; ++c) {
            for (int i = 0; i < nr; ++i) {
                out[c * ldo + r0 + i] = acc[i][0][c];
            }
        }
    }
#else
    ggml_gqsa_panel_rows_generic(x, n_kept, nrows, panel, out, ldo);
#endif
}

bool ggml_gqsa_sb_available(void) {
#if defined(GQSA_CPU_X86)
    return true;
#else
    return false;
#endif
}

bool ggml_gqsa_sb_supported(int n_kept) {
    return ggml_gqsa_sb_available() && n_kept >= GQSA_SB_BLOCKS;
}

// what both drivers handle: a 2-D contiguous weight, contiguous f32 activations and result
static bool gqsa_mul_mat_shape_ok(const struct ggml_tensor * dst) {
    const struct ggml_tensor * src0 = dst->src[0];
    const struct ggml_tensor * src1 = dst->src[1];
    return ggml_gqsa_is_type(src0->type) && src1->type == GGML_TYPE_F32 && dst->type == GGML_TYPE_F32 &&
           src0->ne[2] == 1 && src0->ne[3] == 1 && ggml_is_contiguous(src0) && ggml_is_contiguous(src1) &&
           ggml_is_contiguous(dst) && src1->ne[0] % GQSA_GROUP_SIZE == 0;
}

bool ggml_gqsa_sb_supports_mul_mat(const struct ggml_tensor * dst) {
    return gqsa_mul_mat_shape_ok(dst) && ggml_gqsa_sb_supported((int) (dst->src[0]->ne[0] / GQSA_GROUP_SIZE));
}

// Work buffer layout: full panels first (24 bytes per group and column), then the remaining
// columns as decode rows (24 bytes per group in the file layout, 32 for superblocks)
static size_t gqsa_work_bytes(int64_t G, int64_t ncols, bool sb, int64_t * np_out) {
    const int64_t np  = GQSA_CPU_PANELS ? ncols / GQSA_PANEL : 0;
    const int64_t rem = ncols - np * GQSA_PANEL;
    if (np_out) {
        *np_out = np;
    }
    return (size_t) (np * GQSA_PANEL * G) * GQSA_ACT_BLOCK_BYTES +
           (size_t) rem * (sb ? ggml_gqsa_sb_act_bytes(G) : (size_t) G * GQSA_ACT_BLOCK_BYTES);
}

size_t ggml_gqsa_sb_work_size(const struct ggml_tensor * dst) {
    const struct ggml_tensor * src1 = dst->src[1];
    return gqsa_work_bytes(src1->ne[0] / GQSA_GROUP_SIZE, src1->ne[1] * src1->ne[2] * src1->ne[3], true, NULL);
}

// A weight layout as the driver sees it: each row a run of units (blocks in the file layout,
// superblocks when repacked, then a repacked row's tail of blocks), sorted by group; its decode
// activations; its kernels.
typedef struct {
    size_t block_bytes;         // bytes per block (12 gqsa4, 10 gqsa3: repacked rows keep the file's bytes)
    size_t unit_bytes;
    size_t act_group_bytes;     // decode activation bytes per group
    // decode activations: groups [g0, g1) of column x (G groups) into y
    void (*quantize_act)(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t G, int64_t g0, int64_t g1);
    // out[r] = row r . decode column y, for nrows rows of n_kept blocks
    void (*rows)(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y, int64_t G,
                 float * GGML_RESTRICT out);
    // one K window for a pass of rows against np panels (ggml-cpu-gqsa-arch.h): of the units, and
    // of the blocks of a repacked row's tail (NULL where rows have no tail)
    void (*panel_pass)(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                       const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]);
    void (*tail_pass)(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                      const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]);
} gqsa_layout;

static void gqsa_quantize_act(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t G, int64_t g0, int64_t g1) {
    GGML_UNUSED(G);
    quantize_row_gqsa_q8(x + g0 * GQSA_GROUP_SIZE, (uint8_t *) y + g0 * GQSA_ACT_BLOCK_BYTES, (g1 - g0) * GQSA_GROUP_SIZE);
}

static void gqsa_rows(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y, int64_t G,
                      float * GGML_RESTRICT out) {
    GGML_UNUSED(G);
    ggml_gqsa_rows(x, n_kept, nrows, y, out);
}

#if GQSA_CPU_PANELS
static void gqsa3_rows(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT y, int64_t G,
                       float * GGML_RESTRICT out) {
    GGML_UNUSED(G);
    for (int64_t r = 0; r < nrows; ++r) {
        out[r] = ggml_gqsa3_row((const block_gqsa3 *) x + r * n_kept, n_kept, y);
    }
}

#if !GQSA_CPU_GQSA3_FILE
// the panel pass of gqsa3 blocks (file-layout rows, and the tails of repacked ones): each row's
// blocks in the window, widened a chunk at a time, through the gqsa4 panel pass (one row per call,
// its accumulators acc[i])
void ggml_gqsa3_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                           const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]) {
    block_gqsa4 w[GQSA3_CHUNK];
    for (int i = 0; i < nr; ++i) {
        const block_gqsa3 * xr = (const block_gqsa3 *) (x + i * row_bytes);
        for (;;) {
            int m = 0;
            while (m < GQSA3_CHUNK && cur[i] + m < n && (xr[cur[i] + m].iz & GQSA_INDEX_MASK) < gend) {
                gqsa3_to_gqsa4(xr + cur[i] + m, w + m);
                ++m;
            }
            if (m == 0) {
                break;
            }
            int c = 0;
            ggml_gqsa_panel_pass((const uint8_t *) w, 0, m, 1, &c, UINT32_MAX, panels, np, acc + i);
            cur[i] += m;
        }
    }
}
#endif
#endif

// The layout the driver runs for a weight of `type`, chosen once per mul_mat; NULL where this build
// has no panel kernels for it: then ggml's generic vec_dot loop over (row, column) is as good, and
// superblocks exist only where the AVX2 kernels do.
static const gqsa_layout * gqsa_layout_of(enum ggml_type type, bool sb) {
#if GQSA_CPU_PANELS
    static const gqsa_layout file_rows = {
        sizeof(block_gqsa4), sizeof(block_gqsa4), GQSA_ACT_BLOCK_BYTES, gqsa_quantize_act, gqsa_rows,
        ggml_gqsa_panel_pass, NULL,
    };
    static const gqsa_layout file_rows3 = {
        sizeof(block_gqsa3), sizeof(block_gqsa3), GQSA_ACT_BLOCK_BYTES, gqsa_quantize_act, gqsa3_rows,
        ggml_gqsa3_panel_pass, NULL,
    };
    if (!sb) {
        return type == GGML_TYPE_GQSA3 ? &file_rows3 : &file_rows;
    }
#endif
#if defined(GQSA_CPU_X86)
    static const gqsa_layout superblocks = {
        sizeof(block_gqsa4), sizeof(gqsa_sb8), ggml_gqsa_sb_act_bytes(1), ggml_gqsa_sb_quantize_act,
        ggml_gqsa_sb_rows, ggml_gqsa_sb_panel_pass, ggml_gqsa_panel_pass,
    };
    static const gqsa_layout superblocks3 = {
        sizeof(block_gqsa3), sizeof(gqsa3_sb8), ggml_gqsa_sb_act_bytes(1), ggml_gqsa_sb_quantize_act,
        ggml_gqsa3_sb_rows, ggml_gqsa3_sb_panel_pass, ggml_gqsa3_panel_pass,
    };
    return type == GGML_TYPE_GQSA3 ? &superblocks3 : &superblocks;
#else
    GGML_UNUSED(type);
    GGML_UNUSED(sb);
    return NULL;
#endif
}

// One mul_mat as the driver runs it
typedef struct {
    const gqsa_layout * L;
    const uint8_t * x;          // weight rows, row_bytes apart
    size_t   row_bytes;
    int      nb, nunit;         // blocks, units per row
    int      tail;              // repacked rows: blocks after the superblocks (file layout)
    int64_t  K, G, nrows;
    int64_t  np, rem;           // full panels, then decode columns
    uint8_t * panels;           // work buffer: np panels, panel_bytes apart, then
    uint8_t * act;              //   rem decode columns, act_bytes apart
    size_t   panel_bytes, act_bytes;
    float  * out;               // column j at out + j*ldd
    int64_t  ldd;
} gqsa_mm;

// Sets m up for dst, or returns false for what the driver does not handle
static bool gqsa_mm_init(gqsa_mm * m, const struct ggml_compute_params * params, const struct ggml_tensor * dst, bool sb) {
    const struct ggml_tensor * src0 = dst->src[0];
    const struct ggml_tensor * src1 = dst->src[1];
    const gqsa_layout * L = gqsa_layout_of(src0->type, sb);
    if (L == NULL || !gqsa_mul_mat_shape_ok(dst)) {
        return false;                                   // ggml's generic path handles the rest
    }
    m->L     = L;
    m->x     = (const uint8_t *) src0->data;
    m->K     = src1->ne[0];
    m->G     = m->K / GQSA_GROUP_SIZE;
    m->nb    = (int) (src0->ne[0] / GQSA_GROUP_SIZE);
    m->nrows = src0->ne[1];
    const int64_t ncols = src1->ne[1] * src1->ne[2] * src1->ne[3];
    if (params->wsize < gqsa_work_bytes(m->G, ncols, sb, &m->np) || (sb && !ggml_gqsa_sb_supported(m->nb))) {
        return false;
    }
    m->nunit       = (int) (m->nb * L->block_bytes / L->unit_bytes);
    m->tail        = m->nb - (int) (m->nunit * L->unit_bytes / L->block_bytes);
    m->row_bytes   = (size_t) m->nb * L->block_bytes;              // as many bytes as blocks or superblocks
    m->rem         = ncols - m->np * GQSA_PANEL;
    m->panel_bytes = (size_t) (GQSA_PANEL * m->G) * GQSA_ACT_BLOCK_BYTES;
    m->act_bytes   = (size_t) m->G * L->act_group_bytes;
    m->panels      = (uint8_t *) params->wdata;
    m->act         = m->panels + m->np * m->panel_bytes;
    m->out         = (float *) dst->data;
    m->ldd         = dst->nb[1] / (int64_t) sizeof(float);
    return true;
}

// 1. quantize the activations: each thread a range of groups of every column
static void gqsa_mm_quantize(const gqsa_mm * m, const float * GGML_RESTRICT xf, int ith, int nth) {
    const int64_t g0 = m->G * ith / nth;
    const int64_t g1 = m->G * (ith + 1) / nth;
    if (g0 >= g1) {
        return;
    }
    for (int64_t p = 0; p < m->np; ++p) {
        ggml_gqsa_pack_panel(xf + p * GQSA_PANEL * m->K, m->K, g0, g1, m->panels + p * m->panel_bytes);
    }
    for (int64_t j = 0; j < m->rem; ++j) {
        m->L->quantize_act(xf + (m->np * GQSA_PANEL + j) * m->K, m->act + j * m->act_bytes, m->G, g0, g1);
    }
}

// 2a. rows [r0, r1) against the panels. Panels go in groups of up to four that share each row's
// decoded weights. The columns of K are walked in windows of `win` groups whose panel data stays
// in L1 (a row's units are sorted by group, so each window is a contiguous range of them), for
// GQSA_ROWS_PER_PASS rows at a time that keep their accumulators and cursors (in units) here.
static void gqsa_mm_panels(const gqsa_mm * m, int64_t r0, int64_t r1) {
    const int64_t win = GQSA_WINDOW_BYTES / (4 * GQSA_PANEL_GROUP_BYTES);   // groups per window
    for (int64_t rb = r0; rb < r1; rb += GQSA_ROWS_PER_PASS) {
        const int nr = r1 - rb < GQSA_ROWS_PER_PASS ? (int) (r1 - rb) : GQSA_ROWS_PER_PASS;
        for (int64_t p0 = 0; p0 < m->np; p0 += 4) {
            const int npg = m->np - p0 < 4 ? (int) (m->np - p0) : 4;
            const uint8_t * panels[4];
            for (int p = 0; p < npg; ++p) {
                panels[p] = m->panels + (p0 + p) * m->panel_bytes;
            }
            float acc[GQSA_ROWS_PER_PASS][4][GQSA_PANEL];
            int   cur[GQSA_ROWS_PER_PASS], cur_tail[GQSA_ROWS_PER_PASS];
            memset(acc, 0, sizeof(acc));
            memset(cur, 0, sizeof(cur));
            memset(cur_tail, 0, sizeof(cur_tail));
            const uint8_t * x = m->x + rb * m->row_bytes;
            for (int64_t gw = 0; gw < m->G; gw += win) {
                m->L->panel_pass(x, m->row_bytes, m->nunit, nr, cur, (uint32_t) (gw + win), panels, npg, acc);
                if (m->tail > 0) {              // a repacked row's tail: blocks, after its superblocks
                    m->L->tail_pass(x + m->nunit * m->L->unit_bytes, m->row_bytes, m->tail, nr, cur_tail,
                                    (uint32_t) (gw + win), panels, npg, acc);
                }
            }
            for (int i = 0; i < nr; ++i) {
                for (int p = 0; p < npg; ++p) {
                    float * o = m->out + (p0 + p) * GQSA_PANEL * m->ldd + rb + i;
                    for (int c = 0; c < GQSA_PANEL; ++c) {
                        o[c * m->ldd] = acc[i][p][c];
                    }
                }
            }
        }
    }
}

// 2b. rows [r0, r1) against the decode columns
static void gqsa_mm_decode(const gqsa_mm * m, int64_t r0, int64_t r1) {
    for (int64_t j = 0; j < m->rem; ++j) {
        m->L->rows(m->x + r0 * m->row_bytes, m->nb, r1 - r0, m->act + j * m->act_bytes, m->G,
                   m->out + (m->np * GQSA_PANEL + j) * m->ldd + r0);
    }
}

// The driver behind ggml_gqsa_mul_mat (file layout, sb = false) and ggml_gqsa_mul_mat_sb, run by
// every thread: 1. quantize a share of the activations into the work buffer (panels of
// GQSA_PANEL columns, the rest as decode columns), 2. after a barrier, run chunks of rows against
// every column. Returns false (on every thread alike) for what it does not handle.
static bool gqsa_mul_mat(const struct ggml_compute_params * params, struct ggml_tensor * dst, bool sb) {
    gqsa_mm m;
    if (!gqsa_mm_init(&m, params, dst, sb)) {
        return false;
    }
    const int ith = params->ith;
    const int nth = params->nth;
    gqsa_mm_quantize(&m, (const float *) dst->src[1]->data, ith, nth);
    if (ith == 0) {
        ggml_threadpool_chunk_set(params->threadpool, nth);
    }
    ggml_barrier(params->threadpool);

    // 2. rows in chunks, handed out dynamically (a thread that shares its core with another process
    //    takes fewer); each chunk runs every column
    //    Chunks of at least 32 rows, 16 per thread at most: threads end an op at most a small chunk
    //    apart (4 per thread left 6 % of 7B decode time in the end-of-op barrier, 16 leave 3 %).
    const int64_t nrows  = m.nrows;
    const int64_t nchunk = nth == 1 ? 1 : nrows / 32 < nth ? nth : nrows / 32 < 16 * nth ? nrows / 32 : 16 * nth;
    const int64_t dr     = (nrows + nchunk - 1) / nchunk;
    for (int64_t chunk = ith; chunk < nchunk; chunk = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t r0 = chunk * dr;
        const int64_t r1 = r0 + dr < nrows ? r0 + dr : nrows;
        if (r0 >= r1) {
            continue;
        }
        gqsa_mm_panels(&m, r0, r1);
        gqsa_mm_decode(&m, r0, r1);
        if (nth >= nchunk) {
            break;
        }
    }
    return true;
}

bool ggml_gqsa_mul_mat(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    return gqsa_mul_mat(params, dst, false);
}

void ggml_gqsa_mul_mat_sb(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    // the buffer type accepted this mul_mat (ggml_gqsa_sb_supports_mul_mat) and sized the work
    // buffer (ggml_gqsa_sb_work_size): ggml's generic path cannot read superblocks
    if (!gqsa_mul_mat(params, dst, true)) {
        GGML_ABORT("gqsa: mul_mat of repacked weight '%s' not handled", dst->src[0]->name);
    }
}
