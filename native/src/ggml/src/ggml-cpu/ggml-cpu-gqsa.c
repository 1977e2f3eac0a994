// GQSA CPU kernels (gqsa-gguf): activation quantization, the gqsa4 x gqsa_q8 dot product, and a
// mul_mat driver for gqsa4 weights. Every SIMD path has a scalar reference next to it (the
// *_generic functions), and native/tests/test_kernels.c checks each path against it.
//
// Per kept block of a weight row:  d_w * (d_x * sum_j q[j]*xq[j]  -  z * s_x),  s_x = d_x * sum_j xq[j]
// where (d_x, s_x, xq) is the activation group the block's index names. The integer sums are exact;
// paths differ only in the order of the float accumulation.
//
// Layouts:
//  - weights: block_gqsa4 rows (docs/FORMAT.md), read as stored;
//  - decode (one activation column): the documented gqsa_q8 row, 24 bytes per group;
//  - batches of >= GQSA_PANEL columns: the mul_mat driver quantizes GQSA_PANEL columns at a time
//    into a "panel", column-interleaved per group (see gqsa_panel_* below), so that one weight
//    block is dotted with GQSA_PANEL columns by four broadcast-multiply-adds, without reductions.
//    Same quantized values (bit-exact with quantize_row_gqsa_q8_ref), same 24 bytes per group and
//    column, so the panels fit the work buffer ggml sizes for gqsa_q8;
//  - weights repacked at load into superblocks (AVX2, rows keeping a multiple of 8 blocks; the
//    CPU_GQSA buffer type): see "Repacked weights" below, and docs/DESIGN.md.
//
// Measured on Zen 4 and kept out (benchmarks, not tests, hold the numbers): 512-bit versions of the
// decode step (16 blocks, vpermt2d / vpermb assembly) ran 10-15 % slower than the 256-bit one (Zen 4
// splits 512-bit ops; the step is bound by shuffles and the per-block gathers, not by instruction
// count), so AVX-512 builds use the AVX2 code with 256-bit VNNI; gathers (vpgatherdd) of the group
// scales and vector-computed group addresses spilled to the stack were slower than scalar loads;
// 32-byte activation blocks and a [8 headers][8 qs] chunked row layout gained under 8 %.
#include "ggml-cpu-gqsa.h"
#include "ggml-gqsa.h"
#include "ggml-cpu-impl.h"
#include "simd-mappings.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#define GQSA_AVX2 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define GQSA_NEON 1
#endif

#define GQSA_HALF (GQSA_GROUP_SIZE / 2)

// ---------------------------------------------------------------------------------------------
// Activation quantization (from_float of gqsa_q8)
// ---------------------------------------------------------------------------------------------

#if defined(GQSA_AVX2)
// One group of 16 floats, bit-exact with quantize_row_gqsa_q8_ref: amax by max (|x| never NaN for
// finite x), d = amax / 127, qs = round-half-even(x / d) by IEEE division and cvtps (default MXCSR
// rounding = nearbyintf's), s = d * sum. Returns the 16 qs in weight order.
static inline __m128i gqsa_quantize_act_group_avx2(const float * GGML_RESTRICT x, float * d_out, float * s_out) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 x0 = _mm256_loadu_ps(x);
    const __m256 x1 = _mm256_loadu_ps(x + 8);
    const __m256 m8 = _mm256_max_ps(_mm256_andnot_ps(sign, x0), _mm256_andnot_ps(sign, x1));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float d = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 dv = _mm256_set1_ps(d == 0.0f ? 1.0f : d);      // d == 0: all x are +-0, q = 0
    const __m256i q0 = _mm256_cvtps_epi32(_mm256_div_ps(x0, dv));
    const __m256i q1 = _mm256_cvtps_epi32(_mm256_div_ps(x1, dv));
    __m256i s8 = _mm256_add_epi32(q0, q1);
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
    *d_out = d;
    *s_out = d * (float) _mm_cvtsi128_si32(s4);
    // |q| <= 127: the saturating packs are exact; packs_epi32 interleaves 128-bit lanes, vpermq undoes it
    const __m256i p16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(q0, q1), 0xD8);
    return _mm_packs_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1));
}
#endif

#if defined(GQSA_NEON)
// One group of 16 floats, bit-exact with quantize_row_gqsa_q8_ref (as the AVX2 version; vcvtnq
// rounds to nearest, ties to even, like nearbyintf in the default rounding mode)
static inline int8x16_t gqsa_quantize_act_group_neon(const float * GGML_RESTRICT x, float * d_out, float * s_out) {
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
    return vcombine_s8(vqmovn_s16(h0), vqmovn_s16(h1));
}
#endif

void quantize_row_gqsa_q8(const float * GGML_RESTRICT x, void * GGML_RESTRICT vy, int64_t k) {
#if defined(GQSA_AVX2)
    assert(k % GQSA_GROUP_SIZE == 0);
    block_gqsa_q8 * GGML_RESTRICT y = (block_gqsa_q8 *) vy;
    const int64_t nb = k / GQSA_GROUP_SIZE;
    for (int64_t i = 0; i < nb; ++i) {
        const __m128i q = gqsa_quantize_act_group_avx2(x + i * GQSA_GROUP_SIZE, &y[i].d, &y[i].s);
        _mm_storeu_si128((__m128i *) y[i].qs, q);
    }
#elif defined(GQSA_NEON)
    assert(k % GQSA_GROUP_SIZE == 0);
    block_gqsa_q8 * GGML_RESTRICT y = (block_gqsa_q8 *) vy;
    const int64_t nb = k / GQSA_GROUP_SIZE;
    for (int64_t i = 0; i < nb; ++i) {
        vst1q_s8(y[i].qs, gqsa_quantize_act_group_neon(x + i * GQSA_GROUP_SIZE, &y[i].d, &y[i].s));
    }
#else
    quantize_row_gqsa_q8_ref(x, (block_gqsa_q8 *) vy, k);
#endif
}

void quantize_row_gqsa4(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_gqsa4_ref(x, (block_gqsa4 *) y, k);
}

// ---------------------------------------------------------------------------------------------
// Dot product of one weight row with one activation row
// ---------------------------------------------------------------------------------------------

static inline float gqsa_block_dot_generic(const block_gqsa4 * GGML_RESTRICT b, const block_gqsa_q8 * GGML_RESTRICT y) {
    const block_gqsa_q8 * a = y + gqsa_block_index(b);
    int sumi = 0;
    for (int j = 0; j < GQSA_HALF; ++j) {
        sumi += (b->qs[j] & 0x0F) * a->qs[j];
        sumi += (b->qs[j] >>   4) * a->qs[j + GQSA_HALF];
    }
    return GGML_CPU_FP16_TO_FP32(b->d) * (a->d * (float) sumi - (float) gqsa_block_zero(b) * a->s);
}

void ggml_vec_dot_gqsa4_gqsa_q8_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                        size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    assert(n % GQSA_GROUP_SIZE == 0);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);

    const block_gqsa4   * GGML_RESTRICT x = (const block_gqsa4 *) vx;
    const block_gqsa_q8 * GGML_RESTRICT y = (const block_gqsa_q8 *) vy;
    const int nb = n / GQSA_GROUP_SIZE;

    float sumf = 0.0f;
    for (int i = 0; i < nb; ++i) {
        sumf += gqsa_block_dot_generic(x + i, y);
    }
    *s = sumf;
}

void ggml_gqsa_rows_generic(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                            const void * GGML_RESTRICT vy, float * GGML_RESTRICT out) {
    const block_gqsa4 * x = (const block_gqsa4 *) vx;
    for (int64_t r = 0; r < nrows; ++r) {
        ggml_vec_dot_gqsa4_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, out + r, 0, x + r * n_kept, 0, vy, 0, 1);
    }
}

#if defined(GQSA_AVX2)
// sum of u8 x s8 products in groups of 4 adjacent bytes (q in 0..15, xq in -127..127: no saturation)
static inline __m256i gqsa_dot4(__m256i q, __m256i xq) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, xq);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), q, xq);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), _mm256_set1_epi16(1));
#endif
}

static inline float gqsa_hsum_ps(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline __m256i gqsa_loadu2(const void * lo, const void * hi) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) lo)),
                                   _mm_loadu_si128((const __m128i *) hi), 1);
}

// The contributions of eight consecutive blocks, in lane order [b0 b1 b4 b5 | b2 b3 b6 b7].
// 128-bit lanes hold one block each: its 16 weights in order (the 8 packed bytes duplicated by an
// in-lane byte shuffle, then shifted by 0 / 4 per 64-bit half), against the 16 activation bytes of
// its group. Three horizontal adds reduce the four dot vectors to one sum per block in the lane
// order above; the headers, scales and activation (d, s) pairs are assembled in the same order.
// Group addresses come from scalar 16-bit loads: spilling vector-computed offsets and reloading
// them measured slower (store-to-load forwarding from vector stores stalls).
static inline __m256 gqsa_step8_avx2(const block_gqsa4 * GGML_RESTRICT x, const block_gqsa_q8 * GGML_RESTRICT y) {
    const uint8_t * b = (const uint8_t *) x;
    const block_gqsa_q8 * a0 = y + gqsa_block_index(x + 0), * a1 = y + gqsa_block_index(x + 1);
    const block_gqsa_q8 * a2 = y + gqsa_block_index(x + 2), * a3 = y + gqsa_block_index(x + 3);
    const block_gqsa_q8 * a4 = y + gqsa_block_index(x + 4), * a5 = y + gqsa_block_index(x + 5);
    const block_gqsa_q8 * a6 = y + gqsa_block_index(x + 6), * a7 = y + gqsa_block_index(x + 7);

    // headers (d | iz << 16) at dwords 0, 3, 6, ...: [b0 b1 .. | b2 b3 ..] and [b4 b5 .. | b6 b7 ..]
    const __m256i h = _mm256_blend_epi32(_mm256_shuffle_epi32(gqsa_loadu2(b,      b + 24), 0xCC),
                                         _mm256_shuffle_epi32(gqsa_loadu2(b + 48, b + 72), 0xCC), 0xCC);

    // qs of blocks (0,2), (1,3), (4,6), (5,7) sit at byte 0 / byte 8 of the two lanes of these loads
    const __m256i dup = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7,
                                         8, 9, 10, 11, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i sh = _mm256_setr_epi64x(0, 4, 0, 4);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
#define GQSA_W(off) _mm256_and_si256(_mm256_srlv_epi64(_mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *) (b + (off))), dup), sh), m4)
    const __m256i p0 = gqsa_dot4(GQSA_W(4),  gqsa_loadu2(a0->qs, a2->qs));
    const __m256i p1 = gqsa_dot4(GQSA_W(16), gqsa_loadu2(a1->qs, a3->qs));
    const __m256i p2 = gqsa_dot4(GQSA_W(52), gqsa_loadu2(a4->qs, a6->qs));
    const __m256i p3 = gqsa_dot4(GQSA_W(64), gqsa_loadu2(a5->qs, a7->qs));
#undef GQSA_W
    const __m256i sumi = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));

    // activation (d, s): [d0 s0 d1 s1 | d2 s2 d3 s3], [d4 s4 d5 s5 | d6 s6 d7 s7] -> lane order
    const __m128d q01 = _mm_loadh_pd(_mm_load_sd((const double *) a0), (const double *) a1);
    const __m128d q23 = _mm_loadh_pd(_mm_load_sd((const double *) a2), (const double *) a3);
    const __m128d q45 = _mm_loadh_pd(_mm_load_sd((const double *) a4), (const double *) a5);
    const __m128d q67 = _mm_loadh_pd(_mm_load_sd((const double *) a6), (const double *) a7);
    const __m256 A  = _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(q01), q23, 1));
    const __m256 B  = _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(q45), q67, 1));
    const __m256 dx = _mm256_shuffle_ps(A, B, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 sx = _mm256_shuffle_ps(A, B, _MM_SHUFFLE(3, 1, 3, 1));

    const __m256i dsel = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256 dw = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_shuffle_epi8(h, dsel), 0x08)));
    const __m256 zf = _mm256_cvtepi32_ps(_mm256_srli_epi32(h, 28));

    return _mm256_mul_ps(dw, _mm256_fnmadd_ps(zf, sx, _mm256_mul_ps(dx, _mm256_cvtepi32_ps(sumi))));
}

// 1..7 blocks: copied into zero blocks (d = 0: they contribute 0; index 0: a valid address)
static inline __m256 gqsa_step8_partial_avx2(const block_gqsa4 * GGML_RESTRICT x, int n, const block_gqsa_q8 * GGML_RESTRICT y) {
    block_gqsa4 tmp[8];
    memset(tmp, 0, sizeof(tmp));
    memcpy(tmp, x, (size_t) n * sizeof(block_gqsa4));
    return gqsa_step8_avx2(tmp, y);
}

static float gqsa_row_avx2(const block_gqsa4 * GGML_RESTRICT x, int nb, const block_gqsa_q8 * GGML_RESTRICT y) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= nb; i += 8) {
        acc = _mm256_add_ps(acc, gqsa_step8_avx2(x + i, y));
    }
    if (i < nb) {
        acc = _mm256_add_ps(acc, gqsa_step8_partial_avx2(x + i, nb - i, y));
    }
    return gqsa_hsum_ps(acc);
}

// Consecutive rows as one stream of blocks (rows are contiguous): eight blocks per step whatever
// the row boundaries, so short rows (a 576-wide row at 50 % keeps 18 blocks) pay no per-row tail.
// A step that crosses into the next row splits its lanes with a mask. Needs nb >= 8 (at most one
// boundary per step).
static void gqsa_rows_avx2(const block_gqsa4 * GGML_RESTRICT x, int nb, int64_t nrows,
                           const block_gqsa_q8 * GGML_RESTRICT y, float * GGML_RESTRICT out) {
    // lanes_lt[n]: lanes holding blocks 0..n-1 of the step, in the lane order of gqsa_step8_avx2
    static const int32_t lanes_lt[9][8] = {
        { 0,  0,  0,  0,  0,  0,  0,  0}, {-1,  0,  0,  0,  0,  0,  0,  0}, {-1, -1,  0,  0,  0,  0,  0,  0},
        {-1, -1,  0,  0, -1,  0,  0,  0}, {-1, -1,  0,  0, -1, -1,  0,  0}, {-1, -1, -1,  0, -1, -1,  0,  0},
        {-1, -1, -1, -1, -1, -1,  0,  0}, {-1, -1, -1, -1, -1, -1, -1,  0}, {-1, -1, -1, -1, -1, -1, -1, -1},
    };
    assert(nb >= 8);
    const block_gqsa4 * p   = x;
    const block_gqsa4 * end = x + (int64_t) nb * nrows;
    __m256 acc = _mm256_setzero_ps();
    int left = nb;                                          // blocks of the current row not yet summed
    for (; p + 8 <= end; p += 8) {
        const __m256 c = gqsa_step8_avx2(p, y);
        if (left > 8) {
            acc = _mm256_add_ps(acc, c);
            left -= 8;
            continue;
        }
        const __m256 m = _mm256_castsi256_ps(_mm256_loadu_si256((const __m256i *) lanes_lt[left]));
        *out++ = gqsa_hsum_ps(_mm256_add_ps(acc, _mm256_and_ps(m, c)));
        acc  = _mm256_andnot_ps(m, c);
        left += nb - 8;
    }
    if (p < end) {                                          // the last row's last 1..7 blocks
        acc = _mm256_add_ps(acc, gqsa_step8_partial_avx2(p, (int) (end - p), y));
        *out = gqsa_hsum_ps(acc);
    }
}
#endif // GQSA_AVX2

#if defined(GQSA_NEON)
static float gqsa_row_neon(const block_gqsa4 * GGML_RESTRICT x, int nb, const block_gqsa_q8 * GGML_RESTRICT y) {
    const uint8x8_t m4 = vdup_n_u8(0x0F);
    float32x4_t acc = vdupq_n_f32(0.0f);
    float zacc = 0.0f;
    for (int i = 0; i < nb; ++i) {
        const block_gqsa_q8 * a = y + gqsa_block_index(&x[i]);
        const uint8x8_t v  = vld1_u8(x[i].qs);
        const int8x16_t q  = vreinterpretq_s8_u8(vcombine_u8(vand_u8(v, m4), vshr_n_u8(v, 4)));
        const int8x16_t xq = vld1q_s8(a->qs);
#if defined(__ARM_FEATURE_DOTPROD)
        const int32x4_t p = vdotq_s32(vdupq_n_s32(0), q, xq);
#else
        const int16x8_t lo = vmull_s8(vget_low_s8(q),  vget_low_s8(xq));
        const int16x8_t hi = vmull_s8(vget_high_s8(q), vget_high_s8(xq));
        const int32x4_t p  = vpadalq_s16(vpaddlq_s16(lo), hi);
#endif
        const float dw = GGML_CPU_FP16_TO_FP32(x[i].d);
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), dw * a->d);
        zacc += dw * (float) gqsa_block_zero(&x[i]) * a->s;
    }
    return vaddvq_f32(acc) - zacc;
}
#endif

void ggml_vec_dot_gqsa4_gqsa_q8(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
    assert(nrc == 1);
    assert(n % GQSA_GROUP_SIZE == 0);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);
#if defined(GQSA_AVX2)
    *s = gqsa_row_avx2((const block_gqsa4 *) vx, n / GQSA_GROUP_SIZE, (const block_gqsa_q8 *) vy);
#elif defined(GQSA_NEON)
    *s = gqsa_row_neon((const block_gqsa4 *) vx, n / GQSA_GROUP_SIZE, (const block_gqsa_q8 *) vy);
#else
    ggml_vec_dot_gqsa4_gqsa_q8_generic(n, s, bs, vx, bx, vy, by, nrc);
#endif
}

void ggml_gqsa_rows(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                    const void * GGML_RESTRICT vy, float * GGML_RESTRICT out) {
#if defined(GQSA_AVX2) || defined(GQSA_NEON)
    const block_gqsa4   * x = (const block_gqsa4 *) vx;
    const block_gqsa_q8 * y = (const block_gqsa_q8 *) vy;
#endif
#if defined(GQSA_AVX2)
    if (n_kept >= 8) {
        gqsa_rows_avx2(x, n_kept, nrows, y, out);
        return;
    }
    for (int64_t r = 0; r < nrows; ++r) {
        out[r] = gqsa_row_avx2(x + r * n_kept, n_kept, y);
    }
#elif defined(GQSA_NEON)
    for (int64_t r = 0; r < nrows; ++r) {
        out[r] = gqsa_row_neon(x + r * n_kept, n_kept, y);
    }
#else
    ggml_gqsa_rows_generic(vx, n_kept, nrows, vy, out);
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

#define GQSA_PANEL_GROUP_BYTES (GQSA_ACT_BLOCK_BYTES * GQSA_PANEL)

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

void ggml_gqsa_pack_panel(const float * GGML_RESTRICT x, int64_t ldx, int64_t g0, int64_t g1, void * GGML_RESTRICT vpanel) {
#if defined(GQSA_AVX2)
    uint8_t * panel = (uint8_t *) vpanel;
    for (int64_t g = g0; g < g1; ++g) {
        uint8_t * pg = panel + g * GQSA_PANEL_GROUP_BYTES;
        float * pd = (float *) (pg + GQSA_GROUP_SIZE * GQSA_PANEL);
        for (int c = 0; c < GQSA_PANEL; ++c) {
            const __m128i q = gqsa_quantize_act_group_avx2(x + c * ldx + g * GQSA_GROUP_SIZE, &pd[c], &pd[GQSA_PANEL + c]);
            const int32_t w0 = _mm_cvtsi128_si32(q),     w1 = _mm_extract_epi32(q, 1);
            const int32_t w2 = _mm_extract_epi32(q, 2),  w3 = _mm_extract_epi32(q, 3);
            memcpy(pg + (0 * GQSA_PANEL + c) * 4, &w0, 4);
            memcpy(pg + (1 * GQSA_PANEL + c) * 4, &w1, 4);
            memcpy(pg + (2 * GQSA_PANEL + c) * 4, &w2, 4);
            memcpy(pg + (3 * GQSA_PANEL + c) * 4, &w3, 4);
        }
    }
#elif defined(GQSA_NEON)
    uint8_t * panel = (uint8_t *) vpanel;
    for (int64_t g = g0; g < g1; ++g) {
        uint8_t * pg = panel + g * GQSA_PANEL_GROUP_BYTES;
        float * pd = (float *) (pg + GQSA_GROUP_SIZE * GQSA_PANEL);
        for (int c = 0; c < GQSA_PANEL; ++c) {
            const int32x4_t q = vreinterpretq_s32_s8(gqsa_quantize_act_group_neon(x + c * ldx + g * GQSA_GROUP_SIZE, &pd[c], &pd[GQSA_PANEL + c]));
            vst1q_lane_s32((int32_t *) (pg + (0 * GQSA_PANEL + c) * 4), q, 0);
            vst1q_lane_s32((int32_t *) (pg + (1 * GQSA_PANEL + c) * 4), q, 1);
            vst1q_lane_s32((int32_t *) (pg + (2 * GQSA_PANEL + c) * 4), q, 2);
            vst1q_lane_s32((int32_t *) (pg + (3 * GQSA_PANEL + c) * 4), q, 3);
        }
    }
#else
    ggml_gqsa_pack_panel_generic(x, ldx, g0, g1, vpanel);
#endif
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

#if defined(GQSA_AVX2)
// Eight blocks of a row decoded once for all panels: the 16 weights of each (in order), the scale,
// scale * zero point, and the byte offset of the block's group in a panel.
typedef struct {
    uint8_t q[8][GQSA_GROUP_SIZE];
    float   dw[8];
    float   dwz[8];
    int32_t off[8];
} gqsa_decoded8;

static inline void gqsa_decode8_avx2(const block_gqsa4 * GGML_RESTRICT x, int n, gqsa_decoded8 * GGML_RESTRICT dec) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    for (int k = 0; k < n; ++k) {
        const __m128i v = _mm_loadl_epi64((const __m128i *) x[k].qs);
        _mm_storeu_si128((__m128i *) dec->q[k], _mm_unpacklo_epi64(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4)));
        const float dw = GGML_CPU_FP16_TO_FP32(x[k].d);
        dec->dw[k]  = dw;
        dec->dwz[k] = dw * (float) gqsa_block_zero(&x[k]);
        dec->off[k] = (int32_t) gqsa_block_index(&x[k]) * GQSA_PANEL_GROUP_BYTES;
    }
}

// Decoded blocks (n <= 8) against np panels (1..4) of GQSA_PANEL = 8 columns: acc[p] += the
// blocks' products with the columns of panel p, accz[p] += their zero-point terms (kept apart: two
// short dependency chains). Inlined with a constant np, the accumulators stay in registers.
static inline void gqsa_panel_dec8_avx2(const gqsa_decoded8 * GGML_RESTRICT dec, int n, const uint8_t * const * panels,
                                        int np, __m256 * acc, __m256 * accz) {
    for (int k = 0; k < n; ++k) {
        int32_t w[4];
        memcpy(w, dec->q[k], sizeof(w));
        const __m256i w0 = _mm256_set1_epi32(w[0]), w1 = _mm256_set1_epi32(w[1]);
        const __m256i w2 = _mm256_set1_epi32(w[2]), w3 = _mm256_set1_epi32(w[3]);
        const __m256 dw  = _mm256_set1_ps(dec->dw[k]);
        const __m256 dwz = _mm256_set1_ps(dec->dwz[k]);
        for (int p = 0; p < np; ++p) {
            const uint8_t * pg = panels[p] + dec->off[k];
            const __m256i * a = (const __m256i *) pg;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), w0, _mm256_loadu_si256(a + 0));
            s = _mm256_dpbusd_epi32(s, w1, _mm256_loadu_si256(a + 1));
            s = _mm256_dpbusd_epi32(s, w2, _mm256_loadu_si256(a + 2));
            s = _mm256_dpbusd_epi32(s, w3, _mm256_loadu_si256(a + 3));
#elif defined(__AVXVNNI__)
            __m256i s = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w0, _mm256_loadu_si256(a + 0));
            s = _mm256_dpbusd_avx_epi32(s, w1, _mm256_loadu_si256(a + 1));
            s = _mm256_dpbusd_avx_epi32(s, w2, _mm256_loadu_si256(a + 2));
            s = _mm256_dpbusd_avx_epi32(s, w3, _mm256_loadu_si256(a + 3));
#else
            // pairwise u8 x s8 sums are at most 2*15*127: four of them fit int16
            __m256i s16 = _mm256_maddubs_epi16(w0, _mm256_loadu_si256(a + 0));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w1, _mm256_loadu_si256(a + 1)));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w2, _mm256_loadu_si256(a + 2)));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(w3, _mm256_loadu_si256(a + 3)));
            const __m256i s = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
#endif
            const __m256 dx = _mm256_loadu_ps((const float *) (pg + GQSA_GROUP_SIZE * GQSA_PANEL));
            const __m256 sx = _mm256_loadu_ps((const float *) (pg + GQSA_GROUP_SIZE * GQSA_PANEL) + GQSA_PANEL);
            acc[p]  = _mm256_fmadd_ps(dw, _mm256_mul_ps(dx, _mm256_cvtepi32_ps(s)), acc[p]);
            accz[p] = _mm256_fmadd_ps(dwz, sx, accz[p]);
        }
    }
}

// np panels (1..4) against nb blocks of a row: acc_io[p][c] += those blocks . column c of panel p
static inline void gqsa_panel_row_avx2(const block_gqsa4 * GGML_RESTRICT x, int nb, const uint8_t * const * panels,
                                       int np, float acc_io[][GQSA_PANEL]) {
    __m256 acc[4], accz[4];
    for (int p = 0; p < np; ++p) {
        acc[p]  = _mm256_loadu_ps(acc_io[p]);
        accz[p] = _mm256_setzero_ps();
    }
    gqsa_decoded8 dec;
    for (int i = 0; i < nb; i += 8) {
        const int n = nb - i < 8 ? nb - i : 8;
        gqsa_decode8_avx2(x + i, n, &dec);
        gqsa_panel_dec8_avx2(&dec, n, panels, np, acc, accz);
    }
    for (int p = 0; p < np; ++p) {
        _mm256_storeu_ps(acc_io[p], _mm256_sub_ps(acc[p], accz[p]));
    }
}
#define gqsa_panel_row gqsa_panel_row_avx2
#endif // GQSA_AVX2

#if defined(GQSA_NEON)
// As gqsa_panel_row_avx2: each weight block's 16 weights in one register; sdot by lane multiplies
// weights 4k..4k+3 with the qs[k] dwords of 4 columns at once.
static inline void gqsa_panel_row_neon(const block_gqsa4 * GGML_RESTRICT x, int nb, const uint8_t * const * panels,
                                       int np, float acc_io[][GQSA_PANEL]) {
    float32x4_t acc[4][2];
    for (int p = 0; p < np; ++p) {
        acc[p][0] = vld1q_f32(acc_io[p]);
        acc[p][1] = vld1q_f32(acc_io[p] + 4);
    }
    const uint8x8_t m4 = vdup_n_u8(0x0F);
    for (int i = 0; i < nb; ++i) {
        const uint8x8_t v = vld1_u8(x[i].qs);
        const int8x16_t w = vreinterpretq_s8_u8(vcombine_u8(vand_u8(v, m4), vshr_n_u8(v, 4)));
        const float dw  = GGML_CPU_FP16_TO_FP32(x[i].d);
        const float dwz = dw * (float) gqsa_block_zero(&x[i]);
        const size_t off = (size_t) gqsa_block_index(&x[i]) * GQSA_PANEL_GROUP_BYTES;
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
#define gqsa_panel_row gqsa_panel_row_neon
#endif // GQSA_NEON

// ---------------------------------------------------------------------------------------------
// Repacked weights: superblocks of 8 blocks (the CPU_GQSA buffer type, ggml-cpu-gqsa-repack.cpp)
// ---------------------------------------------------------------------------------------------
//
// At load, a gqsa4 weight whose rows keep a multiple of 8 blocks can be repacked (AVX2 builds) into
// superblocks of 8 consecutive blocks of a row, 96 bytes like the 8 blocks they hold:
//     uint16 gz[8]   group index << 4 | zero point   } in lane order: lane l holds block
//     fp16   d[8]    scale                           } gqsa_sb_lane[l] of the 8
//     uint8  qs[64]  half h = 0, 1 (32 bytes) holds blocks 4h..4h+3: byte k < 16 weight k of block
//                    4h (low nibble) and of block 4h+2 (high nibble); byte 16 + k the same for
//                    blocks 4h+1 and 4h+3
// The lane order is the order in which the decode step's reduction leaves the 8 block sums, so the
// scales and zero points are used as loaded; one 32-byte load gives 4 blocks' weights with an AND
// and a shift; gz & 0xFFF0 is the byte offset of a block's group in the decode activation layout:
//     int8 qs[G][16], then float ds[G][4] = {d, s, 0, 0} (32 bytes per group).
// Same bytes as the file layout; the decode step measured 25-30 % faster per block (benchmarks, not
// tests, hold the numbers: docs/DESIGN.md, docs/bench-llama-7b.md).

static const int gqsa_sb_lane[GQSA_SB_BLOCKS] = { 0, 2, 4, 6, 1, 3, 5, 7 };

static inline int gqsa_weight(const block_gqsa4 * b, int j) {
    return j < GQSA_HALF ? (b->qs[j] & 0x0F) : (b->qs[j - GQSA_HALF] >> 4);
}

void ggml_gqsa_sb_repack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows) {
    assert(n_kept % GQSA_SB_BLOCKS == 0);
    const block_gqsa4 * x = (const block_gqsa4 *) src;
    gqsa_sb8 * t = (gqsa_sb8 *) dst;
    const int64_t nsb = (int64_t) (n_kept / GQSA_SB_BLOCKS) * nrows;   // never straddle a row
    for (int64_t s = 0; s < nsb; ++s) {
        const block_gqsa4 * b = x + GQSA_SB_BLOCKS * s;
        for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
            const block_gqsa4 * c = b + gqsa_sb_lane[l];
            t[s].gz[l] = (uint16_t) (gqsa_block_index(c) << 4 | gqsa_block_zero(c));
            t[s].d[l]  = c->d;
        }
        for (int h = 0; h < 2; ++h) {
            for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
                t[s].qs[32 * h + k]      = (uint8_t) (gqsa_weight(b + 4 * h,     k) | gqsa_weight(b + 4 * h + 2, k) << 4);
                t[s].qs[32 * h + 16 + k] = (uint8_t) (gqsa_weight(b + 4 * h + 1, k) | gqsa_weight(b + 4 * h + 3, k) << 4);
            }
        }
    }
}

void ggml_gqsa_sb_unpack(const void * GGML_RESTRICT src, void * GGML_RESTRICT dst, int n_kept, int64_t nrows) {
    assert(n_kept % GQSA_SB_BLOCKS == 0);
    const gqsa_sb8 * t = (const gqsa_sb8 *) src;
    block_gqsa4 * x = (block_gqsa4 *) dst;
    const int64_t nsb = (int64_t) (n_kept / GQSA_SB_BLOCKS) * nrows;
    for (int64_t s = 0; s < nsb; ++s) {
        block_gqsa4 * b = x + GQSA_SB_BLOCKS * s;
        for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
            block_gqsa4 * c = b + gqsa_sb_lane[l];
            c->d  = t[s].d[l];
            c->iz = (uint16_t) ((t[s].gz[l] >> 4) | (t[s].gz[l] & 0x0F) << GQSA_INDEX_BITS);
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
}

void ggml_gqsa_sb_quantize_act(const float * GGML_RESTRICT x, void * GGML_RESTRICT vy, int64_t G, int64_t g0, int64_t g1) {
    int8_t * qs = (int8_t *) vy;
    float  * ds = (float *) (qs + GQSA_GROUP_SIZE * G);
    for (int64_t g = g0; g < g1; ++g) {
#if defined(GQSA_AVX2)
        const __m128i q = gqsa_quantize_act_group_avx2(x + g * GQSA_GROUP_SIZE, &ds[4 * g], &ds[4 * g + 1]);
        _mm_storeu_si128((__m128i *) (qs + GQSA_GROUP_SIZE * g), q);
#else
        block_gqsa_q8 blk;
        quantize_row_gqsa_q8_ref(x + g * GQSA_GROUP_SIZE, &blk, GQSA_GROUP_SIZE);
        memcpy(qs + GQSA_GROUP_SIZE * g, blk.qs, GQSA_GROUP_SIZE);
        ds[4 * g]     = blk.d;
        ds[4 * g + 1] = blk.s;
#endif
        ds[4 * g + 2] = ds[4 * g + 3] = 0.0f;
    }
}

void ggml_gqsa_sb_rows_generic(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                               const void * GGML_RESTRICT vy, int64_t G, float * GGML_RESTRICT out) {
    const gqsa_sb8 * t = (const gqsa_sb8 *) vx;
    const int8_t * qs = (const int8_t *) vy;
    const float  * ds = (const float *) (qs + GQSA_GROUP_SIZE * G);
    const int nsb = n_kept / GQSA_SB_BLOCKS;
    for (int64_t r = 0; r < nrows; ++r) {
        float sumf = 0.0f;
        for (int s = 0; s < nsb; ++s) {
            const gqsa_sb8 * u = t + r * nsb + s;
            for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
                const int b = gqsa_sb_lane[l];               // block b of the 8: half b / 4, byte half b & 1, nibble (b >> 1) & 1
                const uint8_t * q = u->qs + 32 * (b / 4) + 16 * (b & 1);
                const int sh = 4 * ((b >> 1) & 1);
                const int g = u->gz[l] >> 4;
                int sumi = 0;
                for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
                    sumi += ((q[k] >> sh) & 0x0F) * qs[GQSA_GROUP_SIZE * g + k];
                }
                sumf += GGML_CPU_FP16_TO_FP32(u->d[l]) * (ds[4 * g] * (float) sumi - (float) (u->gz[l] & 0x0F) * ds[4 * g + 1]);
            }
        }
        out[r] = sumf;
    }
}

#if defined(GQSA_AVX2)
// The 8 blocks of a superblock, in lane order [b0 b2 b4 b6 | b1 b3 b5 b7]
static inline __m256 gqsa_sb_step_avx2(const gqsa_sb8 * GGML_RESTRICT t, const uint8_t * GGML_RESTRICT yq,
                                       const uint8_t * GGML_RESTRICT yd) {
    const uint16_t * gz = t->gz;
    const size_t o0 = gz[0] & 0xFFF0, o1 = gz[1] & 0xFFF0, o2 = gz[2] & 0xFFF0, o3 = gz[3] & 0xFFF0;   // b0 b2 b4 b6
    const size_t o4 = gz[4] & 0xFFF0, o5 = gz[5] & 0xFFF0, o6 = gz[6] & 0xFFF0, o7 = gz[7] & 0xFFF0;   // b1 b3 b5 b7
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i h0 = _mm256_loadu_si256((const __m256i *) t->qs);
    const __m256i h1 = _mm256_loadu_si256((const __m256i *) (t->qs + 32));
    const __m256i p0 = gqsa_dot4(_mm256_and_si256(h0, m4),                        gqsa_loadu2(yq + o0, yq + o4)); // b0 | b1
    const __m256i p1 = gqsa_dot4(_mm256_and_si256(_mm256_srli_epi16(h0, 4), m4), gqsa_loadu2(yq + o1, yq + o5)); // b2 | b3
    const __m256i p2 = gqsa_dot4(_mm256_and_si256(h1, m4),                        gqsa_loadu2(yq + o2, yq + o6)); // b4 | b5
    const __m256i p3 = gqsa_dot4(_mm256_and_si256(_mm256_srli_epi16(h1, 4), m4), gqsa_loadu2(yq + o3, yq + o7)); // b6 | b7
    // Reduce each block's 4 dword sums to one by 16-bit packing: a dword sums 4 products (|.| <= 4*15*127),
    // a block 16 (<= 30480), so every pack is exact. Fewer shuffles than three hadds.
    const __m256i one = _mm256_set1_epi16(1);
    const __m256i s01 = _mm256_madd_epi16(_mm256_packs_epi32(p0, p1), one);     // [b0 b0 b2 b2 | b1 b1 b3 b3]
    const __m256i s23 = _mm256_madd_epi16(_mm256_packs_epi32(p2, p3), one);     // [b4 b4 b6 b6 | b5 b5 b7 b7]
    const __m256i sumi = _mm256_madd_epi16(_mm256_packs_epi32(s01, s23), one); // [b0 b2 b4 b6 | b1 b3 b5 b7]

    // activation (d, s) in lane order
    const __m128d q01 = _mm_loadh_pd(_mm_load_sd((const double *) (yd + o0)), (const double *) (yd + o1));
    const __m128d q23 = _mm_loadh_pd(_mm_load_sd((const double *) (yd + o4)), (const double *) (yd + o5));
    const __m128d q45 = _mm_loadh_pd(_mm_load_sd((const double *) (yd + o2)), (const double *) (yd + o3));
    const __m128d q67 = _mm_loadh_pd(_mm_load_sd((const double *) (yd + o6)), (const double *) (yd + o7));
    const __m256 A  = _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(q01), q23, 1));   // d0 s0 d2 s2 | d1 s1 d3 s3
    const __m256 B  = _mm256_castpd_ps(_mm256_insertf128_pd(_mm256_castpd128_pd256(q45), q67, 1));   // d4 s4 d6 s6 | d5 s5 d7 s7
    const __m256 dx = _mm256_shuffle_ps(A, B, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 sx = _mm256_shuffle_ps(A, B, _MM_SHUFFLE(3, 1, 3, 1));

    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) t->d));
    const __m256 zf = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) gz)),
                                                          _mm256_set1_epi32(0x0F)));
    return _mm256_mul_ps(dw, _mm256_fnmadd_ps(zf, sx, _mm256_mul_ps(dx, _mm256_cvtepi32_ps(sumi))));
}

#ifndef GQSA_PREFETCH_BYTES      // how far ahead the decode kernel prefetches (overridable, for measurements)
#define GQSA_PREFETCH_BYTES 2048
#endif

static void gqsa_sb_rows_avx2(const gqsa_sb8 * GGML_RESTRICT x, int nsb, int64_t nrows, const void * GGML_RESTRICT vy,
                              int64_t G, float * GGML_RESTRICT out) {
    const uint8_t * yq = (const uint8_t *) vy;
    const uint8_t * yd = yq + GQSA_GROUP_SIZE * G;
    for (int64_t r = 0; r < nrows; ++r) {
        const gqsa_sb8 * t = x + r * nsb;
        __m256 acc = _mm256_setzero_ps();
        for (int s = 0; s < nsb; ++s) {
            // the hardware prefetchers alone leave the stream latency-bound (measured 10-15 % slower
            // decode on 7B shapes); prefetching runs past rows and chunks, harmlessly
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES, _MM_HINT_T0);
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES + 64, _MM_HINT_T0);
            acc = _mm256_add_ps(acc, gqsa_sb_step_avx2(t + s, yq, yd));
        }
        out[r] = gqsa_hsum_ps(acc);
    }
}

// A superblock decoded for the panel kernel: slot l holds lane l (block gqsa_sb_lane[l])
static inline void gqsa_sb_decode8_avx2(const gqsa_sb8 * GGML_RESTRICT t, gqsa_decoded8 * GGML_RESTRICT dec) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int h = 0; h < 2; ++h) {
        const __m256i v  = _mm256_loadu_si256((const __m256i *) (t->qs + 32 * h));
        const __m256i lo = _mm256_and_si256(v, m4);                          // blocks 4h   | 4h+1
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);   // blocks 4h+2 | 4h+3
        _mm_storeu_si128((__m128i *) dec->q[2 * h],     _mm256_castsi256_si128(lo));        // lane of block 4h
        _mm_storeu_si128((__m128i *) dec->q[2 * h + 4], _mm256_extracti128_si256(lo, 1));   // 4h+1
        _mm_storeu_si128((__m128i *) dec->q[2 * h + 1], _mm256_castsi256_si128(hi));        // 4h+2
        _mm_storeu_si128((__m128i *) dec->q[2 * h + 5], _mm256_extracti128_si256(hi, 1));   // 4h+3
    }
    const __m256  dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) t->d));
    const __m256i gz = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) t->gz));
    _mm256_storeu_ps(dec->dw, dw);
    _mm256_storeu_ps(dec->dwz, _mm256_mul_ps(dw, _mm256_cvtepi32_ps(_mm256_and_si256(gz, _mm256_set1_epi32(0x0F)))));
    _mm256_storeu_si256((__m256i *) dec->off, _mm256_mullo_epi32(_mm256_srli_epi32(gz, 4), _mm256_set1_epi32(GQSA_PANEL_GROUP_BYTES)));
}

static inline void gqsa_sb_panel_row_avx2(const gqsa_sb8 * GGML_RESTRICT t, int nsb, const uint8_t * const * panels,
                                          int np, float acc_io[][GQSA_PANEL]) {
    __m256 acc[4], accz[4];
    for (int p = 0; p < np; ++p) {
        acc[p]  = _mm256_loadu_ps(acc_io[p]);
        accz[p] = _mm256_setzero_ps();
    }
    gqsa_decoded8 dec;
    for (int s = 0; s < nsb; ++s) {
        gqsa_sb_decode8_avx2(t + s, &dec);
        gqsa_panel_dec8_avx2(&dec, GQSA_SB_BLOCKS, panels, np, acc, accz);
    }
    for (int p = 0; p < np; ++p) {
        _mm256_storeu_ps(acc_io[p], _mm256_sub_ps(acc[p], accz[p]));
    }
}
#endif // GQSA_AVX2

void ggml_gqsa_sb_rows(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                       const void * GGML_RESTRICT vy, int64_t G, float * GGML_RESTRICT out) {
#if defined(GQSA_AVX2)
    gqsa_sb_rows_avx2((const gqsa_sb8 *) vx, n_kept / GQSA_SB_BLOCKS, nrows, vy, G, out);
#else
    ggml_gqsa_sb_rows_generic(vx, n_kept, nrows, vy, G, out);
#endif
}

void ggml_gqsa_panel_rows(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                          const void * GGML_RESTRICT vpanel, float * GGML_RESTRICT out, int64_t ldo) {
#if defined(gqsa_panel_row)
    const block_gqsa4 * x = (const block_gqsa4 *) vx;
    const uint8_t * panels[1] = { (const uint8_t *) vpanel };
    for (int64_t r = 0; r < nrows; ++r) {
        float tmp[1][GQSA_PANEL] = {{0}};
        gqsa_panel_row(x + r * n_kept, n_kept, panels, 1, tmp);
        for (int c = 0; c < GQSA_PANEL; ++c) {
            out[c * ldo + r] = tmp[0][c];
        }
    }
#else
    ggml_gqsa_panel_rows_generic(vx, n_kept, nrows, vpanel, out, ldo);
#endif
}

// ---------------------------------------------------------------------------------------------
// mul_mat driver
// ---------------------------------------------------------------------------------------------

#define GQSA_ROWS_PER_PASS 32             // rows per pass over the K windows (accumulators on the stack)
#define GQSA_WINDOW_BYTES  (24 * 1024)     // four panels' data of one K window: about 3/4 of a 32 KiB L1

#if defined(gqsa_panel_row)
#define GQSA_USE_PANELS 1
#else
#define GQSA_USE_PANELS 0
#endif

static_assert(sizeof(gqsa_sb8) == GQSA_SB_BLOCKS * GQSA_BLOCK_BYTES, "wrong gqsa_sb8 size/padding");

bool ggml_gqsa_sb_available(void) {
#if defined(GQSA_AVX2)
    return true;
#else
    return false;
#endif
}

bool ggml_gqsa_sb_supported(int n_kept) {
    return ggml_gqsa_sb_available() && n_kept > 0 && n_kept % GQSA_SB_BLOCKS == 0;
}

// what both drivers handle: a 2-D contiguous weight, contiguous f32 activations and result
static bool gqsa_mul_mat_shape_ok(const struct ggml_tensor * dst) {
    const struct ggml_tensor * src0 = dst->src[0];
    const struct ggml_tensor * src1 = dst->src[1];
    return src0->type == GGML_TYPE_GQSA4 && src1->type == GGML_TYPE_F32 && dst->type == GGML_TYPE_F32 &&
           src0->ne[2] == 1 && src0->ne[3] == 1 && ggml_is_contiguous(src0) && ggml_is_contiguous(src1) &&
           ggml_is_contiguous(dst) && src1->ne[0] % GQSA_GROUP_SIZE == 0;
}

bool ggml_gqsa_sb_supports_mul_mat(const struct ggml_tensor * dst) {
    return gqsa_mul_mat_shape_ok(dst) && ggml_gqsa_sb_supported((int) (dst->src[0]->ne[0] / GQSA_GROUP_SIZE));
}

// Work buffer layout: full panels first (24 bytes per group and column), then the remaining
// columns as decode rows (24 bytes per group in the file layout, 32 for superblocks)
static size_t gqsa_work_bytes(int64_t G, int64_t ncols, bool sb, int64_t * np_out) {
    const int64_t np  = GQSA_USE_PANELS ? ncols / GQSA_PANEL : 0;
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

// The driver behind ggml_gqsa_mul_mat (file layout, sb = false) and ggml_gqsa_mul_mat_sb.
static bool gqsa_mul_mat(const struct ggml_compute_params * params, struct ggml_tensor * dst, bool sb) {
#if !defined(GQSA_AVX2) && !defined(GQSA_NEON)
    // no SIMD kernels: ggml's generic vec_dot loop over (row, column) is as good; superblocks
    // exist only where the AVX2 kernels do
    GGML_UNUSED(params); GGML_UNUSED(dst); GGML_UNUSED(sb);
    return false;
#else
    const struct ggml_tensor * src0 = dst->src[0];
    const struct ggml_tensor * src1 = dst->src[1];
    if (!gqsa_mul_mat_shape_ok(dst)) {
        return false;                                   // ggml's generic path handles the rest
    }
    const int64_t K      = src1->ne[0];
    const int64_t G      = K / GQSA_GROUP_SIZE;
    const int     nb     = (int) (src0->ne[0] / GQSA_GROUP_SIZE);
    const int     nsb    = nb / GQSA_SB_BLOCKS;
    const int64_t nrows  = src0->ne[1];
    const int64_t ncols  = src1->ne[1] * src1->ne[2] * src1->ne[3];
    const int64_t ldd    = dst->nb[1] / (int64_t) sizeof(float);
    const size_t  panel_row = (size_t) G * GQSA_ACT_BLOCK_BYTES;                      // per panel column
    const size_t  act_row   = sb ? ggml_gqsa_sb_act_bytes(G) : panel_row;             // per decode column
    int64_t np = 0;                                                                    // full panels
    if (params->wsize < gqsa_work_bytes(G, ncols, sb, &np) || (sb && !ggml_gqsa_sb_supported(nb))) {
        return false;
    }
    const int64_t rem = ncols - np * GQSA_PANEL;                                       // decode columns
    uint8_t * wdata = (uint8_t *) params->wdata;
    uint8_t * rem_base = wdata + (size_t) np * GQSA_PANEL * panel_row;
    const float * xf = (const float *) src1->data;

    const int ith = params->ith;
    const int nth = params->nth;

    // 1. quantize the activations: each thread a range of groups of every column
    {
        const int64_t g0 = G * ith / nth;
        const int64_t g1 = G * (ith + 1) / nth;
        if (g0 < g1) {
            for (int64_t p = 0; p < np; ++p) {
                ggml_gqsa_pack_panel(xf + p * GQSA_PANEL * K, K, g0, g1, wdata + (size_t) p * GQSA_PANEL * panel_row);
            }
            for (int64_t j = 0; j < rem; ++j) {
                const float * xc = xf + (np * GQSA_PANEL + j) * K;
                if (sb) {
                    ggml_gqsa_sb_quantize_act(xc, rem_base + j * act_row, G, g0, g1);
                } else {
                    quantize_row_gqsa_q8(xc + g0 * GQSA_GROUP_SIZE, rem_base + j * act_row + g0 * GQSA_ACT_BLOCK_BYTES,
                                         (g1 - g0) * GQSA_GROUP_SIZE);
                }
            }
        }
    }
    if (ith == 0) {
        ggml_threadpool_chunk_set(params->threadpool, nth);
    }
    ggml_barrier(params->threadpool);

    // 2. rows in chunks, handed out dynamically (a thread that shares its core with another process
    //    takes fewer); each chunk runs every column
    //    Chunks of at least 32 rows, 16 per thread at most: threads end an op at most a small chunk
    //    apart (4 per thread left 6 % of 7B decode time in the end-of-op barrier, 16 leave 3 %).
    const int64_t nchunk = nth == 1 ? 1 : nrows / 32 < nth ? nth : nrows / 32 < 16 * nth ? nrows / 32 : 16 * nth;
    const int64_t dr     = (nrows + nchunk - 1) / nchunk;
    const block_gqsa4 * x  = (const block_gqsa4 *) src0->data;
    const gqsa_sb8    * xs = (const gqsa_sb8 *) src0->data;
    float * out = (float *) dst->data;
    const int64_t win = GQSA_WINDOW_BYTES / (4 * GQSA_PANEL_GROUP_BYTES);   // groups per window
    GGML_UNUSED(xs); GGML_UNUSED(nsb); GGML_UNUSED(win);

    for (int64_t chunk = ith; chunk < nchunk; chunk = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t r0 = chunk * dr;
        const int64_t r1 = r0 + dr < nrows ? r0 + dr : nrows;
        if (r0 >= r1) {
            continue;
        }
#if GQSA_USE_PANELS
        // Panels in groups of up to four share each row's decoded weights. The columns of K are
        // walked in windows of `win` groups whose panel data stays in L1 (a row's blocks are sorted
        // by group, so each window is a contiguous range of them; superblocks are taken whole, by
        // the group of their first block), for GQSA_ROWS_PER_PASS rows at a time that keep their
        // accumulators and cursors (in blocks or superblocks) here.
        const int nunit = sb ? nsb : nb;
        for (int64_t rb = r0; rb < r1; rb += GQSA_ROWS_PER_PASS) {
            const int nr = r1 - rb < GQSA_ROWS_PER_PASS ? (int) (r1 - rb) : GQSA_ROWS_PER_PASS;
            for (int64_t p0 = 0; p0 < np; p0 += 4) {
                const int npg = np - p0 < 4 ? (int) (np - p0) : 4;
                const uint8_t * panels[4];
                for (int p = 0; p < npg; ++p) {
                    panels[p] = wdata + (size_t) (p0 + p) * GQSA_PANEL * panel_row;
                }
                float acc[GQSA_ROWS_PER_PASS][4][GQSA_PANEL];
                int   cur[GQSA_ROWS_PER_PASS];
                memset(acc, 0, sizeof(acc));
                memset(cur, 0, sizeof(cur));
                for (int64_t gw = 0; gw < G; gw += win) {
                    const uint32_t gend = (uint32_t) (gw + win);
                    for (int i = 0; i < nr; ++i) {
                        int e = cur[i];
                        if (sb) {
                            const gqsa_sb8 * tr = xs + (rb + i) * nsb;
                            while (e < nunit && (uint32_t) (tr[e].gz[0] >> 4) < gend) {
                                ++e;
                            }
                        } else {
                            const block_gqsa4 * xr = x + (rb + i) * nb;
                            while (e < nunit && gqsa_block_index(xr + e) < gend) {
                                ++e;
                            }
                        }
                        if (e == cur[i]) {
                            continue;
                        }
#if defined(GQSA_AVX2)
                        if (sb) {
                            const gqsa_sb8 * tr = xs + (rb + i) * nsb + cur[i];
                            switch (npg) {   // constant panel counts: the accumulators stay in registers
                                case 4:  gqsa_sb_panel_row_avx2(tr, e - cur[i], panels, 4, acc[i]); break;
                                case 3:  gqsa_sb_panel_row_avx2(tr, e - cur[i], panels, 3, acc[i]); break;
                                case 2:  gqsa_sb_panel_row_avx2(tr, e - cur[i], panels, 2, acc[i]); break;
                                default: gqsa_sb_panel_row_avx2(tr, e - cur[i], panels, 1, acc[i]); break;
                            }
                            cur[i] = e;
                            continue;
                        }
#endif
                        const block_gqsa4 * xr = x + (rb + i) * nb + cur[i];
                        switch (npg) {
                            case 4:  gqsa_panel_row(xr, e - cur[i], panels, 4, acc[i]); break;
                            case 3:  gqsa_panel_row(xr, e - cur[i], panels, 3, acc[i]); break;
                            case 2:  gqsa_panel_row(xr, e - cur[i], panels, 2, acc[i]); break;
                            default: gqsa_panel_row(xr, e - cur[i], panels, 1, acc[i]); break;
                        }
                        cur[i] = e;
                    }
                }
                for (int i = 0; i < nr; ++i) {
                    for (int p = 0; p < npg; ++p) {
                        float * o = out + (p0 + p) * GQSA_PANEL * ldd + rb + i;
                        for (int c = 0; c < GQSA_PANEL; ++c) {
                            o[c * ldd] = acc[i][p][c];
                        }
                    }
                }
            }
        }
#endif
        for (int64_t j = 0; j < rem; ++j) {
            float * o = out + (np * GQSA_PANEL + j) * ldd + r0;
            if (sb) {
                ggml_gqsa_sb_rows(xs + r0 * nsb, nb, r1 - r0, rem_base + j * act_row, G, o);
            } else {
                ggml_gqsa_rows(x + r0 * nb, nb, r1 - r0, rem_base + j * act_row, o);
            }
        }
        if (nth >= nchunk) {
            break;
        }
    }
    return true;
#endif
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
