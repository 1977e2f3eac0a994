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
// 16 nibbles of one block -> 16 bytes in weight order (low nibbles are weights 0..7)
static inline __m128i gqsa_unpack16(const uint8_t * qs) {
    const __m128i v = _mm_loadl_epi64((const __m128i *) qs);
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm_unpacklo_epi64(_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m));
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

    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc  = _mm256_setzero_ps();  // d_w*d_x*sum(q*xq), lanes 0..3 one block, 4..7 the other
    float  zacc = 0.0f;                 // sum of d_w * z * s_x

    // two blocks per step: one 256-bit maddubs covers 2 x 16 weights
    int i = 0;
    for (; i + 1 < nb; i += 2) {
        const block_gqsa4 * b0 = x + i;
        const block_gqsa4 * b1 = x + i + 1;
        const block_gqsa_q8 * a0 = y + gqsa_block_index(b0);
        const block_gqsa_q8 * a1 = y + gqsa_block_index(b1);

        const __m256i q  = _mm256_inserti128_si256(_mm256_castsi128_si256(gqsa_unpack16(b0->qs)), gqsa_unpack16(b1->qs), 1);
        const __m256i xq = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *) a0->qs)),
                                                   _mm_loadu_si128((const __m128i *) a1->qs), 1);
        // q in 0..15 (unsigned), xq in -127..127: the pairwise int16 sums cannot saturate
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), ones);

        const float dw0 = GGML_CPU_FP16_TO_FP32(b0->d);
        const float dw1 = GGML_CPU_FP16_TO_FP32(b1->d);
        const __m256 sc = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(dw0 * a0->d)), _mm_set1_ps(dw1 * a1->d), 1);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc, acc);

        zacc += dw0 * (float) gqsa_block_zero(b0) * a0->s + dw1 * (float) gqsa_block_zero(b1) * a1->s;
    }
    float sumf = gqsa_hsum_ps(acc) - zacc;
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
