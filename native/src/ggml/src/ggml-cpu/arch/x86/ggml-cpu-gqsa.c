// GQSA CPU kernels for x86 (gqsa-gguf): AVX2, with the AVX-512 VNNI (256-bit) or AVX-VNNI dot
// products where the build enables them. Each function here has its scalar reference, *_generic,
// in ../../ggml-cpu-gqsa.c (the math, the layouts and the mul_mat driver are described there), and
// native/tests/test_kernels.c checks one against the other. Without AVX2 this file is empty and
// the generic kernels take the public names (ggml-cpu-gqsa-arch.h).
//
// Measured on Zen 4 and kept out (benchmarks, not tests, hold the numbers): 512-bit versions of the
// decode step (16 blocks, vpermt2d / vpermb assembly) ran 10-15 % slower than the 256-bit one (Zen 4
// splits 512-bit ops; the step is bound by shuffles and the per-block gathers, not by instruction
// count), so AVX-512 builds use the AVX2 code with 256-bit VNNI. On Intel Emerald Rapids the
// superblock version (GQSA_SB_512, below) measured the same as the 256-bit step: it is behind a
// compile-time switch, off by default. Gathers (vpgatherdd) of the group
// scales and vector-computed group addresses spilled to the stack were slower than scalar loads
// (on Zen 5 too: 1.7x); a [8 headers][8 qs] chunked row layout gained under 8 %. 32-byte
// activation blocks (qs, d and s of a group in one load) gained under 8 % on Zen 4, and 8-17 % on
// Zen 5, where the superblock step is bound by its loads: the superblock decode activations are
// laid out so (ggml_gqsa_sb_quantize_act).
#include "ggml-cpu-gqsa-arch.h"
#include "ggml-cpu-impl.h"
#include "simd-mappings.h"

#if defined(GQSA_CPU_X86)

#include <immintrin.h>

#include <assert.h>
#include <string.h>

// ---------------------------------------------------------------------------------------------
// Activation quantization (from_float of gqsa_q8)
// ---------------------------------------------------------------------------------------------

// One group of 16 floats, bit-exact with quantize_row_gqsa_q8_ref: amax by max (|x| never NaN for
// finite x), d = amax / 127, qs = round-half-even(x / d) by IEEE division and cvtps (default MXCSR
// rounding = nearbyintf's), s = d * sum (a gqsa_quantize_group_fn)
static inline void gqsa_quantize_group_avx2(const float * GGML_RESTRICT x, int8_t * GGML_RESTRICT qs, float * d_out,
                                            float * s_out) {
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
    _mm_storeu_si128((__m128i *) qs, _mm_packs_epi16(_mm256_castsi256_si128(p16), _mm256_extracti128_si256(p16, 1)));
}

void quantize_row_gqsa_q8(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) {
    gqsa_quantize_row(gqsa_quantize_group_avx2, x, y, k);
}

// ---------------------------------------------------------------------------------------------
// Dot product of one weight row with one activation row
// ---------------------------------------------------------------------------------------------

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

// one row: ggml_vec_dot_gqsa4_gqsa_q8's kernel (ggml-cpu-gqsa.c)
float ggml_gqsa_row(const void * GGML_RESTRICT x, int nb, const void * GGML_RESTRICT y) {
    return gqsa_row_avx2((const block_gqsa4 *) x, nb, (const block_gqsa_q8 *) y);
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

void ggml_gqsa_rows(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                    const void * GGML_RESTRICT vy, float * GGML_RESTRICT out) {
    const block_gqsa4   * x = (const block_gqsa4 *) vx;
    const block_gqsa_q8 * y = (const block_gqsa_q8 *) vy;
    if (n_kept >= 8) {
        gqsa_rows_avx2(x, n_kept, nrows, y, out);
        return;
    }
    for (int64_t r = 0; r < nrows; ++r) {
        out[r] = gqsa_row_avx2(x + r * n_kept, n_kept, y);
    }
}

// ---------------------------------------------------------------------------------------------
// Panels: GQSA_PANEL activation columns, column-interleaved per group
// ---------------------------------------------------------------------------------------------

void ggml_gqsa_pack_panel(const float * GGML_RESTRICT x, int64_t ldx, int64_t g0, int64_t g1, void * GGML_RESTRICT panel) {
    gqsa_pack_panel(gqsa_quantize_group_avx2, x, ldx, g0, g1, panel);
}

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

// A panel kernel's accumulators for np panels: acc[p] starts from acc_io[p], accz[p] (the zero-point
// terms, kept apart: two short dependency chains) from 0; at the end acc_io[p] = acc[p] - accz[p]
static inline void gqsa_panel_acc_load(float acc_io[][GQSA_PANEL], int np, __m256 * acc, __m256 * accz) {
    for (int p = 0; p < np; ++p) {
        acc[p]  = _mm256_loadu_ps(acc_io[p]);
        accz[p] = _mm256_setzero_ps();
    }
}

static inline void gqsa_panel_acc_store(float acc_io[][GQSA_PANEL], int np, const __m256 * acc, const __m256 * accz) {
    for (int p = 0; p < np; ++p) {
        _mm256_storeu_ps(acc_io[p], _mm256_sub_ps(acc[p], accz[p]));
    }
}

// The panel kernel (a gqsa_panel_row_fn): np panels (1..4) against nb blocks of a row,
// acc_io[p][c] += those blocks . column c of panel p. Superblocks have their own kernel below,
// not a layout flag here: GCC 12 then specializes each for the constant panel counts of a pass.
static inline void gqsa_panel_row_avx2(const void * GGML_RESTRICT x, int nb, const uint8_t * const * panels,
                                       int np, float acc_io[][GQSA_PANEL]) {
    __m256 acc[4], accz[4];
    gqsa_panel_acc_load(acc_io, np, acc, accz);
    gqsa_decoded8 dec;
    for (int i = 0; i < nb; i += 8) {
        const int n = nb - i < 8 ? nb - i : 8;
        gqsa_decode8_avx2((const block_gqsa4 *) x + i, n, &dec);
        gqsa_panel_dec8_avx2(&dec, n, panels, np, acc, accz);
    }
    gqsa_panel_acc_store(acc_io, np, acc, accz);
}

void ggml_gqsa_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                          const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]) {
    gqsa_panel_pass(gqsa_panel_row_avx2, gqsa_block_group, sizeof(block_gqsa4), x, row_bytes, n, nr, cur, gend, panels, np, acc);
}

// ---------------------------------------------------------------------------------------------
// Repacked weights: superblocks of 8 blocks (layout: "Repacked weights" in ggml-cpu-gqsa.c)
// ---------------------------------------------------------------------------------------------

void ggml_gqsa_sb_quantize_act(const float * GGML_RESTRICT x, void * GGML_RESTRICT vy, int64_t G, int64_t g0, int64_t g1) {
    GGML_UNUSED(G);
    for (int64_t g = g0; g < g1; ++g) {                     // group g at 32 g: qs, then d, s, 0, 0
        int8_t * a  = (int8_t *) vy + GQSA_SB_ACT_GROUP_BYTES * g;
        float    ds[4] = { 0.0f, 0.0f, 0.0f, 0.0f };
        gqsa_quantize_group_avx2(x + g * GQSA_GROUP_SIZE, a, &ds[0], &ds[1]);
        memcpy(a + GQSA_GROUP_SIZE, ds, sizeof(ds));
    }
}

// The 8 block sums of a superblock (either type) against the decode activations y, in lane order
// [b0 b2 b4 b6 | b1 b3 b5 b7], from its headers (gz, d: in that lane order) and its four code
// vectors c0..c3, cp = [block 2p | block 2p+1] (each 128-bit lane one block's 16 codes, in order).
// One 32-byte load per block brings its activation group (qs, then d, s, 0, 0); two 128-bit
// permutes per pair part the qs of the pair's two blocks from their (d, s). The step is bound by
// its loads on Zen 5: one per block here instead of a 16-byte qs load and an 8-byte (d, s) load
// measured 8-17 % less time per block.
static inline __m256 gqsa_sb_sum8_avx2(const uint16_t * GGML_RESTRICT gz, const ggml_fp16_t * GGML_RESTRICT d,
                                       __m256i c0, __m256i c1, __m256i c2, __m256i c3, const uint8_t * GGML_RESTRICT y) {
    // byte offset of a lane's group: 32 g = 2 * (g << 4)
#define GQSA_ACT(l) _mm256_loadu_si256((const __m256i *) (y + 2 * (size_t) (gz[l] & 0xFFF0)))
    const __m256i y0 = GQSA_ACT(0), y1 = GQSA_ACT(1), y2 = GQSA_ACT(2), y3 = GQSA_ACT(3);    // b0 b2 b4 b6
    const __m256i y4 = GQSA_ACT(4), y5 = GQSA_ACT(5), y6 = GQSA_ACT(6), y7 = GQSA_ACT(7);    // b1 b3 b5 b7
#undef GQSA_ACT
    const __m256i p0 = gqsa_dot4(c0, _mm256_permute2x128_si256(y0, y4, 0x20)); // b0 | b1
    const __m256i p1 = gqsa_dot4(c1, _mm256_permute2x128_si256(y1, y5, 0x20)); // b2 | b3
    const __m256i p2 = gqsa_dot4(c2, _mm256_permute2x128_si256(y2, y6, 0x20)); // b4 | b5
    const __m256i p3 = gqsa_dot4(c3, _mm256_permute2x128_si256(y3, y7, 0x20)); // b6 | b7
    // Reduce each block's 4 dword sums to one by 16-bit packing: a dword sums 4 products (|.| <= 4*15*127),
    // a block 16 (<= 30480), so every pack is exact. Fewer shuffles than three hadds.
    const __m256i one = _mm256_set1_epi16(1);
    const __m256i s01 = _mm256_madd_epi16(_mm256_packs_epi32(p0, p1), one);     // [b0 b0 b2 b2 | b1 b1 b3 b3]
    const __m256i s23 = _mm256_madd_epi16(_mm256_packs_epi32(p2, p3), one);     // [b4 b4 b6 b6 | b5 b5 b7 b7]
    const __m256i sumi = _mm256_madd_epi16(_mm256_packs_epi32(s01, s23), one); // [b0 b2 b4 b6 | b1 b3 b5 b7]

    // activation (d, s) in lane order: the pairs' upper halves, then a 4 x 4 transpose of their low floats
    const __m256 v0 = _mm256_castsi256_ps(_mm256_permute2x128_si256(y0, y4, 0x31));     // d0 s0 . . | d1 s1 . .
    const __m256 v1 = _mm256_castsi256_ps(_mm256_permute2x128_si256(y1, y5, 0x31));     // d2 s2 . . | d3 s3 . .
    const __m256 v2 = _mm256_castsi256_ps(_mm256_permute2x128_si256(y2, y6, 0x31));     // d4 s4 . . | d5 s5 . .
    const __m256 v3 = _mm256_castsi256_ps(_mm256_permute2x128_si256(y3, y7, 0x31));     // d6 s6 . . | d7 s7 . .
    const __m256d A = _mm256_castps_pd(_mm256_unpacklo_ps(v0, v1));                       // d0 d2 s0 s2 | d1 d3 s1 s3
    const __m256d B = _mm256_castps_pd(_mm256_unpacklo_ps(v2, v3));                       // d4 d6 s4 s6 | d5 d7 s5 s7
    const __m256 dx = _mm256_castpd_ps(_mm256_unpacklo_pd(A, B));
    const __m256 sx = _mm256_castpd_ps(_mm256_unpackhi_pd(A, B));

    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) d));
    const __m256 zf = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) gz)),
                                                          _mm256_set1_epi32(0x0F)));
    return _mm256_mul_ps(dw, _mm256_fnmadd_ps(zf, sx, _mm256_mul_ps(dx, _mm256_cvtepi32_ps(sumi))));
}

// The 8 blocks of a gqsa4 superblock, in lane order [b0 b2 b4 b6 | b1 b3 b5 b7]: one 32-byte load
// holds blocks (4h, 4h+2) in its low and high nibbles and (4h+1, 4h+3) in its two lanes
static inline __m256 gqsa_sb_step_avx2(const gqsa_sb8 * GGML_RESTRICT t, const uint8_t * GGML_RESTRICT y) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i h0 = _mm256_loadu_si256((const __m256i *) t->qs);
    const __m256i h1 = _mm256_loadu_si256((const __m256i *) (t->qs + 32));
    return gqsa_sb_sum8_avx2(t->gz, t->d, _mm256_and_si256(h0, m4), _mm256_and_si256(_mm256_srli_epi16(h0, 4), m4),
                             _mm256_and_si256(h1, m4), _mm256_and_si256(_mm256_srli_epi16(h1, 4), m4), y);
}

// The four code vectors of a gqsa3 superblock (layout: "Repacked weights" in ggml-cpu-gqsa.c):
// c[p] = [block 2p | block 2p+1]. qa holds pairs 0 and 1 whole and pair 2's low bits; qb, the same
// 16 bytes in both lanes and shifted by 4 in the high one, pair 3 and pair 2's third bits. The
// 16-bit shifts pull bits of the next byte into the top of each byte, which the ANDs drop.
static inline void gqsa3_sb_codes_avx2(const gqsa3_sb8 * GGML_RESTRICT t, __m256i c[4]) {
    const __m256i m7 = _mm256_set1_epi8(7);
    const __m256i a  = _mm256_loadu_si256((const __m256i *) t->qa);
    const __m256i b  = _mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *) t->qb)),
                                         _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    c[0] = _mm256_and_si256(a, m7);
    c[1] = _mm256_and_si256(_mm256_srli_epi16(a, 3), m7);
    c[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 6), _mm256_set1_epi8(3)),
                           _mm256_and_si256(_mm256_srli_epi16(b, 1), _mm256_set1_epi8(4)));
    c[3] = _mm256_and_si256(b, m7);
}

// The 8 blocks of a gqsa3 superblock, in lane order [b0 b2 b4 b6 | b1 b3 b5 b7]
static inline __m256 gqsa3_sb_step_avx2(const gqsa3_sb8 * GGML_RESTRICT t, const uint8_t * GGML_RESTRICT y) {
    __m256i c[4];
    gqsa3_sb_codes_avx2(t, c);
    return gqsa_sb_sum8_avx2(t->gz, t->d, c[0], c[1], c[2], c[3], y);
}

// The decode kernel's look-ahead in the row stream: 4 KiB ahead into L2 (overridable, for
// measurements). Less CPU time per token than prefetcht0 2 KiB ahead (the first setting, tuned on
// Zen 4) on both machines measured since: Intel Emerald Rapids and AMD Zen 5 (docs/DESIGN.md).
#ifndef GQSA_PREFETCH_BYTES
#define GQSA_PREFETCH_BYTES 4096
#endif
#ifndef GQSA_PREFETCH_HINT
#define GQSA_PREFETCH_HINT _MM_HINT_T2
#endif

// GQSA_SB_512=1 (-DGQSA_SB_512=1 in CFLAGS): the decode step over two superblocks in 512-bit
// registers, where the build has AVX-512 BW + VNNI. Off by default: measured no faster than the
// 256-bit step on Intel Emerald Rapids (docs/DESIGN.md, "Repacked weights at load"), slower on Zen 4.
// Kept compiled and tested (native/tests: test_kernels-sb512) for the next kind of machine.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#ifndef GQSA_SB_512
#define GQSA_SB_512 0
#endif
#else
#undef  GQSA_SB_512
#define GQSA_SB_512 0
#endif

#if GQSA_SB_512
// Two superblocks (16 blocks) per step in 512-bit registers (AVX-512 BW + VNNI), in lane order
//     [t0 b0 b2, t1 b0 b2 | t0 b1 b3, t1 b1 b3 | t0 b4 b6, t1 b4 b6 | t0 b5 b7, t1 b5 b7]
// (t0 = t[0], t1 = t[1]; bk = block k of its superblock): the order in which the 16-bit packing
// reduction leaves the block sums when each 64-byte weight load holds one superblock's nibbles, as
// loaded. The headers are brought into that order by one vpermw each (with zero-extension for the
// group words), the activation (d, s) pairs by two 64-bit gathers and two vpermt2ps. Compared with
// two 256-bit steps: half the nibble unpacking, dot products, packs, float math and scale
// conversions; 12 128-bit inserts instead of 8 to assemble the activation groups.
static const uint16_t gqsa_sb16_gz_idx[32] = {        // word of [t0 gz d | t1 gz d] -> group word of lane p
    0, 0, 1, 0, 16, 0, 17, 0, 4, 0, 5, 0, 20, 0, 21, 0, 2, 0, 3, 0, 18, 0, 19, 0, 6, 0, 7, 0, 22, 0, 23, 0 };
static const uint16_t gqsa_sb16_d_idx[32] = {         // ... -> scale of lane p (words 0..15)
    8, 9, 24, 25, 12, 13, 28, 29, 10, 11, 26, 27, 14, 15, 30, 31, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 };

static inline __m512i gqsa_loadu4(const void * a, const void * b, const void * c, const void * d) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(gqsa_loadu2(a, b)), gqsa_loadu2(c, d), 1);
}

static inline __m512 gqsa_sb_step16_avx512(const gqsa_sb8 * GGML_RESTRICT t, const uint8_t * GGML_RESTRICT y, __m512 acc) {
    const uint16_t * g0 = t[0].gz, * g1 = t[1].gz;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i w0 = _mm512_loadu_si512((const void *) t[0].qs);    // [(b0,b2) (b1,b3) (b4,b6) (b5,b7)] of t0
    const __m512i w1 = _mm512_loadu_si512((const void *) t[1].qs);
    // activation groups of the blocks in the lanes of each weight vector: lanes l0 l4 l2 l6 (blocks
    // 0 1 4 5) for the low nibbles, l1 l5 l3 l7 (blocks 2 3 6 7) for the high ones
#define GQSA_Y(g, a) (y + 2 * (size_t) (g[a] & 0xFFF0))
#define GQSA_A4(g, a, b, c, d) gqsa_loadu4(GQSA_Y(g, a), GQSA_Y(g, b), GQSA_Y(g, c), GQSA_Y(g, d))
    const __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w0, m4),                        GQSA_A4(g0, 0, 4, 2, 6));
    const __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(w0, 4), m4), GQSA_A4(g0, 1, 5, 3, 7));
    const __m512i p2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w1, m4),                        GQSA_A4(g1, 0, 4, 2, 6));
    const __m512i p3 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(w1, 4), m4), GQSA_A4(g1, 1, 5, 3, 7));
#undef GQSA_A4
#undef GQSA_Y
    // as in the 256-bit step: exact 16-bit packing; 128-bit lane k ends as [p0_k p1_k p2_k p3_k]
    const __m512i one  = _mm512_set1_epi16(1);
    const __m512i s01  = _mm512_madd_epi16(_mm512_packs_epi32(p0, p1), one);
    const __m512i s23  = _mm512_madd_epi16(_mm512_packs_epi32(p2, p3), one);
    const __m512i sumi = _mm512_madd_epi16(_mm512_packs_epi32(s01, s23), one);

    // headers [t0 gz d | t1 gz d] (32 bytes each) -> lane order
    const __m512i h  = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *) t[0].gz)),
                                          _mm256_loadu_si256((const __m256i *) t[1].gz), 1);
    const __m512i gz = _mm512_maskz_permutexvar_epi16(0x55555555u, _mm512_loadu_si512((const void *) gqsa_sb16_gz_idx), h);
    const __m512  dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(_mm512_loadu_si512((const void *) gqsa_sb16_d_idx), h)));
    const __m512  zf = _mm512_cvtepi32_ps(_mm512_and_si512(gz, _mm512_set1_epi32(0x0F)));

    // activation (d, s) of each lane's group: 64-bit gathers at 32 g + 16, then d and s apart
    const __m512i off = _mm512_and_si512(gz, _mm512_set1_epi32(0xFFF0));                     // 16 g
    const void *  yds = y + GQSA_GROUP_SIZE;
    const __m512  q0  = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_castsi512_si256(off), yds, 2));
    const __m512  q1  = _mm512_castsi512_ps(_mm512_i32gather_epi64(_mm512_extracti64x4_epi64(off, 1), yds, 2));
    const __m512i ev  = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512  dx  = _mm512_permutex2var_ps(q0, ev, q1);
    const __m512  sx  = _mm512_permutex2var_ps(q0, _mm512_add_epi32(ev, _mm512_set1_epi32(1)), q1);

    return _mm512_fmadd_ps(dw, _mm512_fnmadd_ps(zf, sx, _mm512_mul_ps(dx, _mm512_cvtepi32_ps(sumi))), acc);
}
#endif

// One block of a repacked row's tail against the superblock decode activations, from its 16 codes
// (in order) w: a 128-bit dot product and a horizontal sum
static inline float gqsa_sb_tail_block_sse(__m128i w, uint32_t g, ggml_fp16_t d, uint32_t z,
                                           const uint8_t * GGML_RESTRICT y) {
    const uint8_t * ya = y + (size_t) g * GQSA_SB_ACT_GROUP_BYTES;
    const __m128i a = _mm_loadu_si128((const __m128i *) ya);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __m128i p = _mm_dpbusd_epi32(_mm_setzero_si128(), w, a);
#elif defined(__AVXVNNI__)
    __m128i p = _mm_dpbusd_avx_epi32(_mm_setzero_si128(), w, a);
#else
    __m128i p = _mm_madd_epi16(_mm_maddubs_epi16(w, a), _mm_set1_epi16(1));
#endif
    p = _mm_add_epi32(p, _mm_unpackhi_epi64(p, p));
    p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 1));
    float ds[2];
    memcpy(ds, ya + GQSA_GROUP_SIZE, sizeof(ds));
    return GGML_CPU_FP16_TO_FP32(d) * (ds[0] * (float) _mm_cvtsi128_si32(p) - (float) z * ds[1]);
}

// The 1..7 blocks of a repacked gqsa4 row's tail (stored as in the file), one at a time
static inline float gqsa_sb_tail_avx2(const block_gqsa4 * GGML_RESTRICT b, int n, const uint8_t * GGML_RESTRICT y) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    float sumf = 0.0f;
    for (int k = 0; k < n; ++k) {
        const __m128i v = _mm_loadl_epi64((const __m128i *) b[k].qs);
        const __m128i w = _mm_unpacklo_epi64(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
        sumf += gqsa_sb_tail_block_sse(w, gqsa_block_index(b + k), b[k].d, gqsa_block_zero(b + k), y);
    }
    return sumf;
}

// The 16 codes of a gqsa3 block (docs/FORMAT.md), in order. One 8-byte load of bytes 2..9 (iz, ql,
// qh: it stays inside the block); byte k gets ql[k & 3] shifted by 2 (k >> 2) for its low two bits
// (a byte shuffle and a shift per dword), and bit k of qh (a byte shuffle, a bit test) as bit 2.
static inline __m128i gqsa3_block_codes_sse(const block_gqsa3 * GGML_RESTRICT b) {
    const __m128i v   = _mm_loadl_epi64((const __m128i *) ((const uint8_t *) b + 2));
    const __m128i ql  = _mm_shuffle_epi8(v, _mm_setr_epi8(2, 3, 4, 5, 2, 3, 4, 5, 2, 3, 4, 5, 2, 3, 4, 5));
    const __m128i lo  = _mm_and_si128(_mm_srlv_epi32(ql, _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(3));
    const __m128i bit = _mm_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
    const __m128i qh  = _mm_and_si128(_mm_shuffle_epi8(v, _mm_setr_epi8(6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7)), bit);
    return _mm_or_si128(lo, _mm_and_si128(_mm_cmpeq_epi8(qh, bit), _mm_set1_epi8(4)));
}

// The 1..7 blocks of a repacked gqsa3 row's tail (stored as in the file), one at a time
static inline float gqsa3_sb_tail_avx2(const block_gqsa3 * GGML_RESTRICT b, int n, const uint8_t * GGML_RESTRICT y) {
    float sumf = 0.0f;
    for (int k = 0; k < n; ++k) {
        sumf += gqsa_sb_tail_block_sse(gqsa3_block_codes_sse(b + k), b[k].iz & GQSA_INDEX_MASK, b[k].d,
                                       (uint32_t) (b[k].iz >> GQSA_INDEX_BITS), y);
    }
    return sumf;
}

static void gqsa_sb_rows_avx2(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT vy,
                              float * GGML_RESTRICT out) {
    const uint8_t * y = (const uint8_t *) vy;
    const int nsb = n_kept / GQSA_SB_BLOCKS, tail = n_kept % GQSA_SB_BLOCKS;
    for (int64_t r = 0; r < nrows; ++r) {
        const gqsa_sb8 * t = (const gqsa_sb8 *) ((const uint8_t *) x + (size_t) r * n_kept * sizeof(block_gqsa4));
        __m256 acc = _mm256_setzero_ps();
        int s = 0;
#if GQSA_SB_512
        __m512 acc16 = _mm512_setzero_ps();
        for (; s + 2 <= nsb; s += 2) {
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES, GQSA_PREFETCH_HINT);
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES + 64, GQSA_PREFETCH_HINT);
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES + 128, GQSA_PREFETCH_HINT);
            acc16 = gqsa_sb_step16_avx512(t + s, y, acc16);
        }
        acc = _mm256_add_ps(_mm512_castps512_ps256(acc16), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc16), 1)));
#endif
        for (; s < nsb; ++s) {
            // the hardware prefetchers alone leave the stream latency-bound (measured 10-15 % slower
            // decode on 7B shapes); prefetching runs past rows and chunks, harmlessly
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES, GQSA_PREFETCH_HINT);
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES + 64, GQSA_PREFETCH_HINT);
            acc = _mm256_add_ps(acc, gqsa_sb_step_avx2(t + s, y));
        }
        out[r] = gqsa_hsum_ps(acc) + (tail ? gqsa_sb_tail_avx2((const block_gqsa4 *) (t + nsb), tail, y) : 0.0f);
    }
}

// The same for repacked gqsa3 rows (80-byte superblocks: the same two prefetches per superblock)
static void gqsa3_sb_rows_avx2(const void * GGML_RESTRICT x, int n_kept, int64_t nrows, const void * GGML_RESTRICT vy,
                               float * GGML_RESTRICT out) {
    const uint8_t * y = (const uint8_t *) vy;
    const int nsb = n_kept / GQSA_SB_BLOCKS, tail = n_kept % GQSA_SB_BLOCKS;
    for (int64_t r = 0; r < nrows; ++r) {
        const gqsa3_sb8 * t = (const gqsa3_sb8 *) ((const uint8_t *) x + (size_t) r * n_kept * sizeof(block_gqsa3));
        __m256 acc = _mm256_setzero_ps();
        for (int s = 0; s < nsb; ++s) {
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES, GQSA_PREFETCH_HINT);
            _mm_prefetch((const char *) (t + s) + GQSA_PREFETCH_BYTES + 64, GQSA_PREFETCH_HINT);
            acc = _mm256_add_ps(acc, gqsa3_sb_step_avx2(t + s, y));
        }
        out[r] = gqsa_hsum_ps(acc) + (tail ? gqsa3_sb_tail_avx2((const block_gqsa3 *) (t + nsb), tail, y) : 0.0f);
    }
}

// The headers of a superblock (either type) decoded for the panel kernel, slot l from lane l
static inline void gqsa_sb_decode_headers_avx2(const uint16_t * GGML_RESTRICT gzp, const ggml_fp16_t * GGML_RESTRICT d,
                                               gqsa_decoded8 * GGML_RESTRICT dec) {
    const __m256  dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) d));
    const __m256i gz = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *) gzp));
    _mm256_storeu_ps(dec->dw, dw);
    _mm256_storeu_ps(dec->dwz, _mm256_mul_ps(dw, _mm256_cvtepi32_ps(_mm256_and_si256(gz, _mm256_set1_epi32(0x0F)))));
    _mm256_storeu_si256((__m256i *) dec->off, _mm256_mullo_epi32(_mm256_srli_epi32(gz, 4), _mm256_set1_epi32(GQSA_PANEL_GROUP_BYTES)));
}

// A gqsa4 superblock decoded for the panel kernel: slot l holds lane l (block gqsa_sb_lane[l])
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
    gqsa_sb_decode_headers_avx2(t->gz, t->d, dec);
}

// A gqsa3 superblock decoded for the panel kernel, as a gqsa4 one: the codes of pair p (blocks 2p,
// 2p+1) go to slots p and p + 4
static inline void gqsa3_sb_decode8_avx2(const gqsa3_sb8 * GGML_RESTRICT t, gqsa_decoded8 * GGML_RESTRICT dec) {
    __m256i c[4];
    gqsa3_sb_codes_avx2(t, c);
    for (int p = 0; p < 4; ++p) {
        _mm_storeu_si128((__m128i *) dec->q[p],     _mm256_castsi256_si128(c[p]));
        _mm_storeu_si128((__m128i *) dec->q[p + 4], _mm256_extracti128_si256(c[p], 1));
    }
    gqsa_sb_decode_headers_avx2(t->gz, t->d, dec);
}

// The panel kernel of superblocks (a gqsa_panel_row_fn): np panels against nsb superblocks of a row
static inline void gqsa_sb_panel_row_avx2(const void * GGML_RESTRICT x, int nsb, const uint8_t * const * panels,
                                          int np, float acc_io[][GQSA_PANEL]) {
    __m256 acc[4], accz[4];
    gqsa_panel_acc_load(acc_io, np, acc, accz);
    gqsa_decoded8 dec;
    for (int s = 0; s < nsb; ++s) {
        gqsa_sb_decode8_avx2((const gqsa_sb8 *) x + s, &dec);
        gqsa_panel_dec8_avx2(&dec, GQSA_SB_BLOCKS, panels, np, acc, accz);
    }
    gqsa_panel_acc_store(acc_io, np, acc, accz);
}

// The same for gqsa3 superblocks
static inline void gqsa3_sb_panel_row_avx2(const void * GGML_RESTRICT x, int nsb, const uint8_t * const * panels,
                                           int np, float acc_io[][GQSA_PANEL]) {
    __m256 acc[4], accz[4];
    gqsa_panel_acc_load(acc_io, np, acc, accz);
    gqsa_decoded8 dec;
    for (int s = 0; s < nsb; ++s) {
        gqsa3_sb_decode8_avx2((const gqsa3_sb8 *) x + s, &dec);
        gqsa_panel_dec8_avx2(&dec, GQSA_SB_BLOCKS, panels, np, acc, accz);
    }
    gqsa_panel_acc_store(acc_io, np, acc, accz);
}

const char * ggml_gqsa_sb_kernel(void) {
    return GQSA_SB_512 ? "avx512" : "avx2";
}

void ggml_gqsa_sb_rows(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                       const void * GGML_RESTRICT vy, int64_t G, float * GGML_RESTRICT out) {
    GGML_UNUSED(G);
    gqsa_sb_rows_avx2(vx, n_kept, nrows, vy, out);
}

void ggml_gqsa3_sb_rows(const void * GGML_RESTRICT vx, int n_kept, int64_t nrows,
                        const void * GGML_RESTRICT vy, int64_t G, float * GGML_RESTRICT out) {
    GGML_UNUSED(G);
    gqsa3_sb_rows_avx2(vx, n_kept, nrows, vy, out);
}

// a superblock goes by the group of its first block (lane 0)
static inline uint32_t gqsa_sb_group(const void * unit) {
    return (uint32_t) (((const gqsa_sb8 *) unit)->gz[0] >> 4);
}

static inline uint32_t gqsa3_sb_group(const void * unit) {
    return (uint32_t) (((const gqsa3_sb8 *) unit)->gz[0] >> 4);
}

void ggml_gqsa_sb_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                             const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]) {
    gqsa_panel_pass(gqsa_sb_panel_row_avx2, gqsa_sb_group, sizeof(gqsa_sb8), x, row_bytes, n, nr, cur, gend, panels, np, acc);
}

void ggml_gqsa3_sb_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                              const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]) {
    gqsa_panel_pass(gqsa3_sb_panel_row_avx2, gqsa3_sb_group, sizeof(gqsa3_sb8), x, row_bytes, n, nr, cur, gend, panels, np, acc);
}

#endif // GQSA_CPU_X86
