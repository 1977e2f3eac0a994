// GQSA CPU kernels for ARM (gqsa-gguf): NEON on aarch64, with the dot-product instructions (sdot)
// where the build enables them (e.g. -march=armv8.2-a+dotprod). Each function here has its scalar
// reference, *_generic, in ../../ggml-cpu-gqsa.c (the math, the layouts and the mul_mat driver are
// described there), and native/tests/test_kernels.c checks one against the other (run_qemu.sh runs
// it under qemu-aarch64). No superblock kernels: weights stay in the file layout on ARM, gqsa4 and
// gqsa3 alike; the gqsa3 kernels decode the 3-bit codes in registers and share the gqsa4 ones'
// loops. Without NEON on aarch64 this file is empty and the generic kernels take the public names
// (ggml-cpu-gqsa-arch.h).
#include "ggml-cpu-gqsa-arch.h"
#include "ggml-cpu-impl.h"
#include "simd-mappings.h"

#if defined(GQSA_CPU_ARM)

#include <arm_neon.h>

#include <assert.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// Activation quantization (from_float of gqsa_q8)
// ---------------------------------------------------------------------------------------------

// One group of 16 floats, bit-exact with quantize_row_gqsa_q8_ref (as the AVX2 version; vcvtnq
// rounds to nearest, ties to even, like nearbyintf in the default rounding mode)
static inline void gqsa_quantize_group_neon(const float * GGML_RESTRICT x, int8_t * GGML_RESTRICT qs, float * d_out,
                                            float * s_out) {
    const float32x4_t x0 = vld1q_f32(x), x1 = vld1q_f32(x + 4), x2 = vld1q_f32(x + 8), x3 = vld1q_f32(x + 12);
    const float amax = vmaxvq_f32(vmaxq_f32(vmaxq_f32(vabsq_f32(x0), vabsq_f32(x1)), vmaxq_f32(vabsq_f32(x2), vabsq_f32(x3))));
    const float d = amax / 127.0f;
    const float32x4_t dv = vdupq_n_f32(d == 0.0f ? 1.0f : d);      // d == 0: all x are +-0, q = 0
    const int32x4_t q0 = vcvtnq_s32_f32(vdivq_f32(x0, dv)), q1 = vcvtnq_s32_f32(vdivq_f32(x1, dv));
    const int32x4_t q2 = vcvtnq_s32_f32(vdivq_f32(x2, dv)), q3 = vcvtnq_s32_f32(vdivq_f32(x3, dv));
    *d_out = d;
    *s_out = d * (float) vaddvq_s32(vaddq_s32(vaddq_s32(q0, q1), vaddq_s32(q2, q3)));
    const int16x8_t h0 = vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1));
    const int16x8_t h1 = vcombine_s16(vqmovn_s32(q2), vqmovn_s32(q3));
    vst1q_s8(qs, vcombine_s8(vqmovn_s16(h0), vqmovn_s16(h1)));
}

void quantize_row_gqsa_q8(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    gqsa_quantize_row(gqsa_quantize_group_neon, x, y, k);
}

// ---------------------------------------------------------------------------------------------
// The 16 codes of a block, in order, as int8 (0..15): of either type
// ---------------------------------------------------------------------------------------------

typedef int8x16_t (*gqsa_codes_neon_fn)(const void * GGML_RESTRICT block);

// gqsa4: the low nibbles (weights 0..7), then the high ones
static inline int8x16_t gqsa4_codes_neon(const void * GGML_RESTRICT block) {
    const uint8x8_t v = vld1_u8(((const block_gqsa4 *) block)->qs);
    return vreinterpretq_s8_u8(vcombine_u8(vand_u8(v, vdup_n_u8(0x0F)), vshr_n_u8(v, 4)));
}

// gqsa3 (docs/FORMAT.md): ql (4 bytes) in every dword, shifted by 2i in dword i, gives code k's low
// two bits in byte k (ql[k & 3] >> 2 (k >> 2)); bit k of qh, tested in a byte holding qh's low
// (k < 8) or high byte, gives its third bit
static inline int8x16_t gqsa3_codes_neon(const void * GGML_RESTRICT block) {
    const block_gqsa3 * b = (const block_gqsa3 *) block;
    uint32_t ql;
    memcpy(&ql, b->ql, sizeof(ql));
    static const int32_t sh[4]  = { 0, -2, -4, -6 };
    static const uint8_t bit[16] = { 1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128 };
    const uint8x16_t lo = vandq_u8(vreinterpretq_u8_u32(vshlq_u32(vdupq_n_u32(ql), vld1q_s32(sh))), vdupq_n_u8(3));
    const uint8x16_t h  = vcombine_u8(vdup_n_u8((uint8_t) b->qh), vdup_n_u8((uint8_t) (b->qh >> 8)));
    const uint8x16_t hi = vandq_u8(vtstq_u8(h, vld1q_u8(bit)), vdupq_n_u8(4));
    return vreinterpretq_s8_u8(vorrq_u8(lo, hi));
}

// scale and index / zero point: both block types begin with fp16 d and uint16 iz
static inline void gqsa_header_neon(const void * GGML_RESTRICT block, float * d, uint32_t * g, uint32_t * z) {
    ggml_fp16_t dh;
    uint16_t    iz;
    memcpy(&dh, block, sizeof(dh));
    memcpy(&iz, (const uint8_t *) block + sizeof(dh), sizeof(iz));
    *d = GGML_CPU_FP16_TO_FP32(dh);
    *g = iz & GQSA_INDEX_MASK;
    *z = (uint32_t) (iz >> GQSA_INDEX_BITS);
}

// ---------------------------------------------------------------------------------------------
// Dot product of one weight row with one activation row
// ---------------------------------------------------------------------------------------------

// A row of nb blocks of either type (block_bytes apart, codes by `codes`)
GQSA_WALK float gqsa_row_neon(gqsa_codes_neon_fn codes, size_t block_bytes, const void * GGML_RESTRICT vx, int nb,
                              const block_gqsa_q8 * GGML_RESTRICT y) {
    const uint8_t * x = (const uint8_t *) vx;
    float32x4_t acc = vdupq_n_f32(0.0f);
    float zacc = 0.0f;
    for (int i = 0; i < nb; ++i) {
        const uint8_t * blk = x + (size_t) i * block_bytes;
        float dw;
        uint32_t g, z;
        gqsa_header_neon(blk, &dw, &g, &z);
        const block_gqsa_q8 * a = y + g;
        const int8x16_t q  = codes(blk);
        const int8x16_t xq = vld1q_s8(a->qs);
#if defined(__ARM_FEATURE_DOTPROD)
        const int32x4_t p = vdotq_s32(vdupq_n_s32(0), q, xq);
#else
        const int16x8_t lo = vmull_s8(vget_low_s8(q),  vget_low_s8(xq));
        const int16x8_t hi = vmull_s8(vget_high_s8(q), vget_high_s8(xq));
        const int32x4_t p  = vpadalq_s16(vpaddlq_s16(lo), hi);
#endif
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), dw * a->d);
        zacc += dw * (float) z * a->s;
    }
    return vaddvq_f32(acc) - zacc;
}

// one row: ggml_vec_dot_gqsa4_gqsa_q8's kernel (ggml-cpu-gqsa.c)
float ggml_gqsa_row(const void * GGML_RESTRICT x, int nb, const void * GGML_RESTRICT y) {
    return gqsa_row_neon(gqsa4_codes_neon, sizeof(block_gqsa4), x, nb, (const block_gqsa_q8 *) y);
}

// one gqsa3 row: ggml_vec_dot_gqsa3_gqsa_q8's kernel and the driver's (ggml-cpu-gqsa.c)
float ggml_gqsa3_row(const void * GGML_RESTRICT x, int nb, const void * GGML_RESTRICT y) {
    return gqsa_row_neon(gqsa3_codes_neon, sizeof(block_gqsa3), x, nb, (const block_gqsa_q8 *) y);
}

void ggml_gqsa_rows(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                    const void * GGML_RESTRICT vy, float * GGML_RESTRICT out) {
    const block_gqsa4 * x = (const block_gqsa4 *) vx;
    for (int64_t r = 0; r < nrows; ++r) {
        out[r] = ggml_gqsa_row(x + r * n_kept, n_kept, vy);
    }
}

// ---------------------------------------------------------------------------------------------
// Panels: GQSA_PANEL activation columns, column-interleaved per group
// ---------------------------------------------------------------------------------------------

void ggml_gqsa_pack_panel(const float * GGML_RESTRICT x, int64_t ldx, int64_t g0, int64_t g1, void * GGML_RESTRICT panel) {
    gqsa_pack_panel(gqsa_quantize_group_neon, x, ldx, g0, g1, panel);
}

// np panels (1..4) against nb blocks of a row of either type (block_bytes apart, codes by `codes`):
// acc_io[p][c] += those blocks . column c of panel p. Each weight block's 16 weights in one
// register; sdot by lane multiplies weights 4k..4k+3 with the qs[k] dwords of 4 columns at once.
GQSA_WALK void gqsa_panel_row_neon(gqsa_codes_neon_fn codes, size_t block_bytes, const void * GGML_RESTRICT vx, int nb,
                                   const uint8_t * const * panels, int np, float acc_io[][GQSA_PANEL]) {
    const uint8_t * x = (const uint8_t *) vx;
    float32x4_t acc[4][2];
    for (int p = 0; p < np; ++p) {
        acc[p][0] = vld1q_f32(acc_io[p]);
        acc[p][1] = vld1q_f32(acc_io[p] + 4);
    }
    for (int i = 0; i < nb; ++i) {
        const uint8_t * blk = x + (size_t) i * block_bytes;
        const int8x16_t w = codes(blk);
        float dw;
        uint32_t g, z;
        gqsa_header_neon(blk, &dw, &g, &z);
        const float dwz = dw * (float) z;
        const size_t off = (size_t) g * GQSA_PANEL_GROUP_BYTES;
#if !defined(__ARM_FEATURE_DOTPROD)
        int32_t wd[4];
        vst1q_s32(wd, vreinterpretq_s32_s8(w));
#endif
        for (int p = 0; p < np; ++p) {
            const int8_t * pg = (const int8_t *) (panels[p] + off);
            int32x4_t s[2];
#if defined(__ARM_FEATURE_DOTPROD)
            for (int h = 0; h < 2; ++h) {          // columns 4h..4h+3
                int32x4_t t = vdotq_laneq_s32(vdupq_n_s32(0), vld1q_s8(pg +  0 + 16 * h), w, 0);
                t = vdotq_laneq_s32(t, vld1q_s8(pg + 32 + 16 * h), w, 1);
                t = vdotq_laneq_s32(t, vld1q_s8(pg + 64 + 16 * h), w, 2);
                s[h] = vdotq_laneq_s32(t, vld1q_s8(pg + 96 + 16 * h), w, 3);
            }
#else
            s[0] = s[1] = vdupq_n_s32(0);
            for (int k = 0; k < 4; ++k) {
                const int8x8_t w8 = vreinterpret_s8_s32(vdup_n_s32(wd[k]));     // weights 4k..4k+3, twice
                for (int h = 0; h < 2; ++h) {      // columns 4h, 4h+1 and 4h+2, 4h+3
                    const int8x16_t a = vld1q_s8(pg + 32 * k + 16 * h);
                    const int32x4_t p01 = vpaddlq_s16(vmull_s8(vget_low_s8(a),  w8));
                    const int32x4_t p23 = vpaddlq_s16(vmull_s8(vget_high_s8(a), w8));
                    s[h] = vaddq_s32(s[h], vpaddq_s32(p01, p23));
                }
            }
#endif
            const float * pd = (const float *) (panels[p] + off + GQSA_GROUP_SIZE * GQSA_PANEL);
            for (int h = 0; h < 2; ++h) {
                const float32x4_t t = vmulq_f32(vld1q_f32(pd + 4 * h), vcvtq_f32_s32(s[h]));
                acc[p][h] = vfmaq_n_f32(acc[p][h], t, dw);
                acc[p][h] = vfmsq_f32(acc[p][h], vld1q_f32(pd + GQSA_PANEL + 4 * h), vdupq_n_f32(dwz));
            }
        }
    }
    for (int p = 0; p < np; ++p) {
        vst1q_f32(acc_io[p],     acc[p][0]);
        vst1q_f32(acc_io[p] + 4, acc[p][1]);
    }
}

// the panel kernels of each type (gqsa_panel_row_fn)
static inline void gqsa4_panel_row_neon(const void * GGML_RESTRICT x, int nb, const uint8_t * const * panels, int np,
                                        float acc_io[][GQSA_PANEL]) {
    gqsa_panel_row_neon(gqsa4_codes_neon, sizeof(block_gqsa4), x, nb, panels, np, acc_io);
}

static inline void gqsa3_panel_row_neon(const void * GGML_RESTRICT x, int nb, const uint8_t * const * panels, int np,
                                        float acc_io[][GQSA_PANEL]) {
    gqsa_panel_row_neon(gqsa3_codes_neon, sizeof(block_gqsa3), x, nb, panels, np, acc_io);
}

void ggml_gqsa_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                          const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]) {
    gqsa_panel_pass(gqsa4_panel_row_neon, gqsa_block_group, sizeof(block_gqsa4), x, row_bytes, n, nr, cur, gend, panels, np, acc);
}

void ggml_gqsa3_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                           const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]) {
    gqsa_panel_pass(gqsa3_panel_row_neon, gqsa3_block_group, sizeof(block_gqsa3), x, row_bytes, n, nr, cur, gend, panels, np, acc);
}

#endif // GQSA_CPU_ARM
