// GQSA CPU kernels: activation quantization and the gqsa4 x gqsa_q8 dot product
// (scalar reference, AVX2, NEON). ggml's mul_mat hands each call one whole weight row, so a row's
// blocks are walked in storage order and each one gathers the activation group its index names.
//
// Per block:  d_w * (d_x * sum_j q[j]*xq[j]  -  z * s_x),   s_x = d_x * sum_j xq[j]
// The integer sum is exact; only the float accumulation order differs between paths.
#include "ggml-cpu-gqsa.h"
#include "ggml-gqsa.h"
#include "simd-mappings.h"

#include <assert.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

void quantize_row_gqsa_q8(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_gqsa_q8_ref(x, (block_gqsa_q8 *) y, k);
}

void quantize_row_gqsa4(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    quantize_row_gqsa4_ref(x, (block_gqsa4 *) y, k);
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
        const block_gqsa_q8 * a = y + gqsa_block_index(&x[i]);
        int sumi = 0;
        for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
            sumi += (x[i].qs[j] & 0x0F) * a->qs[j];
            sumi += (x[i].qs[j] >>   4) * a->qs[j + GQSA_GROUP_SIZE / 2];
        }
        const float dw = GGML_CPU_FP16_TO_FP32(x[i].d);
        sumf += dw * (a->d * (float) sumi - (float) gqsa_block_zero(&x[i]) * a->s);
    }
    *s = sumf;
}

#if defined(__AVX2__)
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

// nibbles of blocks b[0..3] -> lo = [b0 q0..15 | b2 q0..15], hi = [b1 | b3] (weight order)
static inline void gqsa_unpack4(const block_gqsa4 * b, __m256i * even, __m256i * odd) {
    const __m128i v01 = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *) b[0].qs), _mm_loadl_epi64((const __m128i *) b[1].qs));
    const __m128i v23 = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *) b[2].qs), _mm_loadl_epi64((const __m128i *) b[3].qs));
    const __m256i v  = _mm256_inserti128_si256(_mm256_castsi128_si256(v01), v23, 1);
    const __m256i m  = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, m);                       // [b0.lo b1.lo | b2.lo b3.lo]
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m); // [b0.hi b1.hi | b2.hi b3.hi]
    *even = _mm256_unpacklo_epi64(lo, hi);                           // [b0 | b2]
    *odd  = _mm256_unpackhi_epi64(lo, hi);                           // [b1 | b3]
}

static inline __m256i gqsa_act2(const block_gqsa_q8 * a0, const block_gqsa_q8 * a1) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) a0->qs)),
                                   _mm_loadu_si128((const __m128i *) a1->qs), 1);
}

// (d, s) of two activation blocks -> [d0 s0 d1 s1]
static inline __m128 gqsa_ds2(const block_gqsa_q8 * a0, const block_gqsa_q8 * a1) {
    return _mm_castpd_ps(_mm_unpacklo_pd(_mm_load_sd((const double *) a0), _mm_load_sd((const double *) a1)));
}

static inline float gqsa_hsum_ps(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

void ggml_vec_dot_gqsa4_gqsa_q8(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) {
#if defined(__AVX2__)
    assert(nrc == 1);
    assert(n % GQSA_GROUP_SIZE == 0);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);

    const block_gqsa4   * GGML_RESTRICT x = (const block_gqsa4 *) vx;
    const block_gqsa_q8 * GGML_RESTRICT y = (const block_gqsa_q8 *) vy;
    const int nb = n / GQSA_GROUP_SIZE;

    // Eight blocks per step. Horizontal adds reduce the four dot vectors to one int32 sum per
    // block, in lane order [b0 b1 b4 b5 | b2 b3 b6 b7]; scales, zero points and the activation
    // (d, s) pairs are assembled in that same order, so the block math runs on 8 lanes at once.
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 7 < nb; i += 8) {
        const block_gqsa4 * b = x + i;
        uint32_t h[8];
        const block_gqsa_q8 * a[8];
        for (int k = 0; k < 8; ++k) {
            memcpy(&h[k], &b[k], sizeof(uint32_t));          // d | iz << 16
            a[k] = y + ((h[k] >> 16) & GQSA_INDEX_MASK);
        }

        __m256i q0, q1, q2, q3;
        gqsa_unpack4(b,     &q0, &q1);                       // [b0|b2], [b1|b3]
        gqsa_unpack4(b + 4, &q2, &q3);                       // [b4|b6], [b5|b7]
        const __m256i p0 = gqsa_dot4(q0, gqsa_act2(a[0], a[2]));
        const __m256i p1 = gqsa_dot4(q1, gqsa_act2(a[1], a[3]));
        const __m256i p2 = gqsa_dot4(q2, gqsa_act2(a[4], a[6]));
        const __m256i p3 = gqsa_dot4(q3, gqsa_act2(a[5], a[7]));
        const __m256i sumi = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));

        const __m256i hv = _mm256_setr_epi32((int) h[0], (int) h[1], (int) h[4], (int) h[5],
                                             (int) h[2], (int) h[3], (int) h[6], (int) h[7]);
        const __m256i dbits = _mm256_packus_epi32(_mm256_and_si256(hv, _mm256_set1_epi32(0xFFFF)), _mm256_setzero_si256());
        const __m256  dw = _mm256_cvtph_ps(_mm256_castsi256_si128(_mm256_permute4x64_epi64(dbits, 0x08)));
        const __m256  zf = _mm256_cvtepi32_ps(_mm256_srli_epi32(hv, 28));

        const __m256 ds01 = _mm256_insertf128_ps(_mm256_castps128_ps256(gqsa_ds2(a[0], a[1])), gqsa_ds2(a[2], a[3]), 1);
        const __m256 ds45 = _mm256_insertf128_ps(_mm256_castps128_ps256(gqsa_ds2(a[4], a[5])), gqsa_ds2(a[6], a[7]), 1);
        const __m256 dx = _mm256_shuffle_ps(ds01, ds45, _MM_SHUFFLE(2, 0, 2, 0));
        const __m256 sx = _mm256_shuffle_ps(ds01, ds45, _MM_SHUFFLE(3, 1, 3, 1));

        // d_w * (d_x * sumi - z * s_x)
        const __m256 t = _mm256_fnmadd_ps(zf, sx, _mm256_mul_ps(dx, _mm256_cvtepi32_ps(sumi)));
        acc = _mm256_fmadd_ps(dw, t, acc);
    }
    // remaining pairs of blocks (a 576-wide row at 50 % keeps 18 = 2*8 + 2)
    __m256 acc2 = _mm256_setzero_ps();
    for (; i + 1 < nb; i += 2) {
        const block_gqsa4 * b0 = x + i;
        const block_gqsa4 * b1 = x + i + 1;
        const block_gqsa_q8 * a0 = y + gqsa_block_index(b0);
        const block_gqsa_q8 * a1 = y + gqsa_block_index(b1);
        const __m128i v  = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *) b0->qs), _mm_loadl_epi64((const __m128i *) b1->qs));
        const __m128i m  = _mm_set1_epi8(0x0F);
        const __m128i lo = _mm_and_si128(v, m);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), m);
        const __m256i q  = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi64(lo, hi)), _mm_unpackhi_epi64(lo, hi), 1);
        const __m256i p  = gqsa_dot4(q, gqsa_act2(a0, a1));
        const float dw0 = GGML_CPU_FP16_TO_FP32(b0->d);
        const float dw1 = GGML_CPU_FP16_TO_FP32(b1->d);
        const __m256 sc = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(dw0 * a0->d)), _mm_set1_ps(dw1 * a1->d), 1);
        acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc, acc2);
        acc2 = _mm256_sub_ps(acc2, _mm256_setr_ps(dw0 * (float) gqsa_block_zero(b0) * a0->s, 0, 0, 0,
                                                  dw1 * (float) gqsa_block_zero(b1) * a1->s, 0, 0, 0));
    }
    float sumf = gqsa_hsum_ps(_mm256_add_ps(acc, acc2));
    if (i < nb) {
        float tail;
        ggml_vec_dot_gqsa4_gqsa_q8_generic(GQSA_GROUP_SIZE, &tail, 0, x + i, 0, vy, 0, 1);
        sumf += tail;
    }
    *s = sumf;
#elif defined(__ARM_NEON) && defined(__aarch64__)
    assert(nrc == 1);
    assert(n % GQSA_GROUP_SIZE == 0);
    GGML_UNUSED(bs); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(nrc);

    const block_gqsa4   * GGML_RESTRICT x = (const block_gqsa4 *) vx;
    const block_gqsa_q8 * GGML_RESTRICT y = (const block_gqsa_q8 *) vy;
    const int nb = n / GQSA_GROUP_SIZE;
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
    *s = vaddvq_f32(acc) - zacc;
#else
    ggml_vec_dot_gqsa4_gqsa_q8_generic(n, s, bs, vx, bx, vy, by, nrc);
#endif
}
