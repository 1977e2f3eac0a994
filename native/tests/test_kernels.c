// Standalone test of the GQSA CPU kernels: builds ggml-gqsa.c, ggml-cpu-gqsa.c and the target's
// arch/x86 or arch/arm ggml-cpu-gqsa.c against the shims in native/tests/shim (no llama.cpp tree),
// for the host and for aarch64 (run under qemu by native/tests/run_qemu.sh), and checks every
// dispatched (SIMD) path against its scalar reference:
//
//   - integer exactness: scales 1 and activation scales 1 make every path's result an exact integer
//     sum, so dispatched and scalar results must be equal, bit for bit;
//   - float data: dispatched vs scalar to float rounding (|a - b| <= 1e-5 * sum |terms|), and both
//     vs a straightforward float computation (dequantized weights . float activations, in double)
//     with NMSE <= 5e-4 (ggml's test-backend-ops threshold for mul_mat);
//   - the activation quantizers byte for byte against quantize_row_gqsa_q8_ref;
//   - the mul_mat driver (decode rows, panels, remainder columns) on 1 and 2 threads.
//
// Prints one line per test case and "N passed, M failed"; exits 1 if any failed.
#include "ggml-gqsa.h"
#include "ggml-cpu-gqsa-arch.h"      // which kernels this build runs (GQSA_CPU_X86, _ARM, _PANELS)
#include "ggml-cpu-impl.h"
#include "gqsa.h"
#include "gguf.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#pragma GCC diagnostic ignored "-Wdouble-promotion"   // printf and double accumulations of floats

// ---- shim definitions ------------------------------------------------------------------------

size_t ggml_type_size(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_GQSA4:   return GQSA_BLOCK_BYTES;
        case GGML_TYPE_GQSA3:   return GQSA3_BLOCK_BYTES;
        case GGML_TYPE_GQSA_Q8: return GQSA_ACT_BLOCK_BYTES;
        case GGML_TYPE_F16:     return 2;
        default:                return 4;
    }
}

static int64_t shim_blck_size(enum ggml_type type) {
    return type == GGML_TYPE_GQSA4 || type == GGML_TYPE_GQSA3 || type == GGML_TYPE_GQSA_Q8 ? GQSA_GROUP_SIZE : 1;
}

size_t ggml_row_size(enum ggml_type type, int64_t ne) {
    return ggml_type_size(type) * (size_t) (ne / shim_blck_size(type));
}

int64_t ggml_nrows(const struct ggml_tensor * t) {
    return t->ne[1] * t->ne[2] * t->ne[3];
}

bool ggml_is_contiguous(const struct ggml_tensor * t) {
    size_t next = ggml_type_size(t->type);
    for (int i = 0; i < GGML_MAX_DIMS; ++i) {
        if (t->ne[i] != 1 && t->nb[i] != next) {
            return false;
        }
        next = (i == 0 ? ggml_row_size(t->type, t->ne[0]) : next * (size_t) t->ne[i]);
    }
    return true;
}

// the kernels never read GGUF metadata
const char * gguf_type_name(enum gguf_type type) { (void) type; abort(); }
int64_t gguf_find_key(const struct gguf_context * ctx, const char * key) { (void) ctx; (void) key; abort(); }
enum gguf_type gguf_get_kv_type(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
uint32_t gguf_get_val_u32(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
enum gguf_type gguf_get_arr_type(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
size_t gguf_get_arr_n(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
const void * gguf_get_arr_data(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
const char * gguf_get_arr_str(const struct gguf_context * ctx, int64_t id, size_t i) { (void) ctx; (void) id; (void) i; abort(); }

struct ggml_threadpool {
    pthread_barrier_t barrier;
    atomic_int        chunk;
};

void ggml_barrier(struct ggml_threadpool * tp) {
    pthread_barrier_wait(&tp->barrier);
}

void ggml_threadpool_chunk_set(struct ggml_threadpool * tp, int value) {
    atomic_store(&tp->chunk, value);
}

int ggml_threadpool_chunk_add(struct ggml_threadpool * tp, int value) {
    return atomic_fetch_add(&tp->chunk, value);
}

// ---- bookkeeping and data ----------------------------------------------------------------------

static int n_passed = 0;
static int n_failed = 0;

static void report(bool ok, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    printf("test_kernels.c::");
    vprintf(fmt, ap);
    printf(ok ? " PASSED\n" : " FAILED\n");
    va_end(ap);
    ok ? ++n_passed : ++n_failed;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t) (rng_state >> 16);
}

static float frand(void) {              // uniform in [-1, 1)
    return (float) (rnd() & 0xFFFFFF) / 8388608.0f - 1.0f;
}

// sorted random choice of n of the G group indices
static void random_kept(int G, int n, int32_t * kept) {
    int c = 0;
    for (int g = 0; g < G && c < n; ++g) {
        if ((int) (rnd() % (uint32_t) (G - g)) < n - c) {
            kept[c++] = g;
        }
    }
}

// Float data: dense weights with groups that exercise the quantizer (zeros, one-signed, tiny,
// large), packed by the library quantizer (gqsa3: 3-bit blocks); activations scaled per group over
// six decades.
static void * float_weights_t(int nrows, int width, int n_kept, bool gqsa3) {
    const int G = width / GQSA_GROUP_SIZE;
    float * w = malloc(sizeof(float) * (size_t) nrows * width);
    int32_t * kept = malloc(sizeof(int32_t) * (size_t) nrows * n_kept);
    for (int r = 0; r < nrows; ++r) {
        for (int g = 0; g < G; ++g) {
            const int kind = (int) (rnd() % 7);
            for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
                float v = frand();
                v = kind == 0 ? 0.0f : kind == 1 ? fabsf(v) + 0.5f : kind == 2 ? v * 1e-6f : kind == 3 ? v * 3e3f : v;
                w[(size_t) r * width + g * GQSA_GROUP_SIZE + j] = v;
            }
        }
        random_kept(G, n_kept, kept + (size_t) r * n_kept);
    }
    const size_t bytes = (gqsa3 ? sizeof(block_gqsa3) : sizeof(block_gqsa4)) * (size_t) nrows * n_kept;
    void * b = malloc(bytes);
    if ((gqsa3 ? ggml_gqsa3_quantize_rows : ggml_gqsa_quantize_rows)(w, nrows, width, kept, n_kept, b) != bytes) {
        fprintf(stderr, "ggml_gqsa_quantize_rows refused the test data\n");
        exit(2);
    }
    free(w);
    free(kept);
    return b;
}

static block_gqsa4 * float_weights(int nrows, int width, int n_kept) {
    return (block_gqsa4 *) float_weights_t(nrows, width, n_kept, false);
}

// wild: group scales over six decades and some all-zero groups (the quantizer's edge cases);
// otherwise uniform in [-1, 1) as ggml's test-backend-ops (for the NMSE checks against float math,
// which wild scales turn into tests of cancellation rather than of the kernels)
static float * float_acts(int ncols, int width, bool wild) {
    float * x = malloc(sizeof(float) * (size_t) ncols * width);
    for (int c = 0; c < ncols; ++c) {
        for (int g = 0; g < width / GQSA_GROUP_SIZE; ++g) {
            const float scale = wild ? powf(10.0f, (float) (rnd() % 7) - 3.0f) : 1.0f;
            const bool zero = wild && rnd() % 11 == 0;
            for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
                x[(size_t) c * width + g * GQSA_GROUP_SIZE + j] = zero ? 0.0f : frand() * scale;
            }
        }
    }
    return x;
}

// Integer data: d = 1 (fp16 0x3c00) and random zero points; activations d = 1, s = sum(qs). Every
// path then computes sums of integers below 2^24, exactly.
static block_gqsa4 * int_weights(int nrows, int width, int n_kept) {
    block_gqsa4 * b = malloc(sizeof(block_gqsa4) * (size_t) nrows * n_kept);
    int32_t * kept = malloc(sizeof(int32_t) * n_kept);
    for (int r = 0; r < nrows; ++r) {
        random_kept(width / GQSA_GROUP_SIZE, n_kept, kept);
        for (int i = 0; i < n_kept; ++i) {
            block_gqsa4 * blk = b + (size_t) r * n_kept + i;
            blk->d  = 0x3C00;
            blk->iz = (uint16_t) (kept[i] | (rnd() % 16) << GQSA_INDEX_BITS);
            for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
                blk->qs[j] = (uint8_t) rnd();
            }
        }
    }
    free(kept);
    return b;
}

static block_gqsa_q8 * int_acts(int width) {
    const int G = width / GQSA_GROUP_SIZE;
    block_gqsa_q8 * a = malloc(sizeof(block_gqsa_q8) * G);
    for (int g = 0; g < G; ++g) {
        int sum = 0;
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            a[g].qs[j] = (int8_t) ((int) (rnd() % 255) - 127);
            sum += a[g].qs[j];
        }
        a[g].d = 1.0f;
        a[g].s = (float) sum;
    }
    return a;
}

// exact integer result of one row against integer activations
static int64_t int_row_dot(const block_gqsa4 * x, int n_kept, const block_gqsa_q8 * y) {
    int64_t total = 0;
    for (int i = 0; i < n_kept; ++i) {
        const block_gqsa_q8 * a = y + gqsa_block_index(&x[i]);
        int64_t sumi = 0, sumx = 0;
        for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
            sumi += (x[i].qs[j] & 0x0F) * a->qs[j] + (x[i].qs[j] >> 4) * a->qs[j + GQSA_GROUP_SIZE / 2];
        }
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            sumx += a->qs[j];
        }
        total += sumi - (int64_t) gqsa_block_zero(&x[i]) * sumx;
    }
    return total;
}

// sum over blocks of |d_w * d_x * sumi| + |d_w * z * s_x|: the scale of the rounding differences
static double row_scale(const block_gqsa4 * x, int n_kept, const block_gqsa_q8 * y) {
    double s = 0.0;
    for (int i = 0; i < n_kept; ++i) {
        const block_gqsa_q8 * a = y + gqsa_block_index(&x[i]);
        const double dw = fabs(GGML_FP16_TO_FP32(x[i].d));
        double sumi = 0.0;
        for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
            sumi += fabs((double) ((x[i].qs[j] & 0x0F) * a->qs[j])) + fabs((double) ((x[i].qs[j] >> 4) * a->qs[j + 8]));
        }
        s += dw * (fabs(a->d) * sumi + gqsa_block_zero(&x[i]) * fabs(a->s));
    }
    return s;
}

// weights dequantized to the dense row . float activations, in double
static double float_row_dot(const block_gqsa4 * x, int n_kept, int width, const float * act) {
    float * dense = malloc(sizeof(float) * width);
    ggml_gqsa_dequantize_rows(x, 1, n_kept, width, dense);
    double s = 0.0;
    for (int k = 0; k < width; ++k) {
        s += (double) dense[k] * act[k];
    }
    free(dense);
    return s;
}

static block_gqsa_q8 * quantize_acts_ref(const float * x, int ncols, int width) {
    block_gqsa_q8 * a = malloc(sizeof(block_gqsa_q8) * (size_t) ncols * (width / GQSA_GROUP_SIZE));
    for (int c = 0; c < ncols; ++c) {
        quantize_row_gqsa_q8_ref(x + (size_t) c * width, a + (size_t) c * (width / GQSA_GROUP_SIZE), width);
    }
    return a;
}

// ---- tests -------------------------------------------------------------------------------------

static void test_quantize_act(int width) {
    float * x = float_acts(1, width, true);
    if (width >= 32) {                          // exact ties: d = 1, x / d = k + 0.5
        x[16] = 127.0f;
        for (int j = 1; j < GQSA_GROUP_SIZE; ++j) {
            x[16 + j] = (float) (j % 2 ? j : -j) + 0.5f;
        }
    }
    const int G = width / GQSA_GROUP_SIZE;
    block_gqsa_q8 * ref = malloc(sizeof(block_gqsa_q8) * G);
    block_gqsa_q8 * got = malloc(sizeof(block_gqsa_q8) * G);
    quantize_row_gqsa_q8_ref(x, ref, width);
    memset(got, 0x55, sizeof(block_gqsa_q8) * G);
    quantize_row_gqsa_q8(x, got, width);
    report(memcmp(ref, got, sizeof(block_gqsa_q8) * G) == 0, "quantize_row_gqsa_q8_is_bit_exact[width=%d]", width);
    free(x); free(ref); free(got);
}

static void test_vec_dot_int(int n_kept) {
    const int width = (n_kept + 5) * GQSA_GROUP_SIZE;
    block_gqsa4 * x = int_weights(3, width, n_kept);
    block_gqsa_q8 * y = int_acts(width);
    bool ok = true;
    for (int r = 0; r < 3; ++r) {
        const float want = (float) int_row_dot(x + r * n_kept, n_kept, y);
        float simd, scalar;
        ggml_vec_dot_gqsa4_gqsa_q8(n_kept * GQSA_GROUP_SIZE, &simd, 0, x + r * n_kept, 0, y, 0, 1);
        ggml_vec_dot_gqsa4_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, &scalar, 0, x + r * n_kept, 0, y, 0, 1);
        if (simd != want || scalar != want) {
            printf("    row %d: exact %.1f, scalar %.1f, dispatched %.1f\n", r, want, scalar, simd);
            ok = false;
        }
    }
    report(ok, "vec_dot_integer_sums_are_exact[n_kept=%d]", n_kept);
    free(x); free(y);
}

static void test_vec_dot_float(int width, int n_kept) {
    const int nrows = 16;
    block_gqsa4 * x = float_weights(nrows, width, n_kept);
    float * act = float_acts(1, width, false);
    block_gqsa_q8 * y = quantize_acts_ref(act, 1, width);
    bool ok = true;
    double err = 0.0, norm = 0.0;
    for (int r = 0; r < nrows; ++r) {
        float simd, scalar;
        ggml_vec_dot_gqsa4_gqsa_q8(n_kept * GQSA_GROUP_SIZE, &simd, 0, x + r * n_kept, 0, y, 0, 1);
        ggml_vec_dot_gqsa4_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, &scalar, 0, x + r * n_kept, 0, y, 0, 1);
        const double tol = 1e-5 * row_scale(x + r * n_kept, n_kept, y) + 1e-30;
        if (fabs((double) simd - scalar) > tol) {
            printf("    row %d: scalar %.9g, dispatched %.9g, tolerance %.3g\n", r, scalar, simd, tol);
            ok = false;
        }
        const double exact = float_row_dot(x + r * n_kept, n_kept, width, act);
        err  += (simd - exact) * (simd - exact);
        norm += exact * exact;
    }
    const double nmse = norm > 0 ? err / norm : err;
    if (!(nmse <= 5e-4)) {
        printf("    NMSE against float math %.3g > 5e-4\n", nmse);
        ok = false;
    }
    report(ok, "vec_dot_matches_scalar_and_float_math[width=%d,n_kept=%d]", width, n_kept);
    free(x); free(act); free(y);
}

static void test_rows(int n_kept, int nrows) {
    const int width = (n_kept + 3) * GQSA_GROUP_SIZE;
    bool ok = true;
    // integers: exact
    block_gqsa4 * x = int_weights(nrows, width, n_kept);
    block_gqsa_q8 * y = int_acts(width);
    float * got = malloc(sizeof(float) * nrows);
    float * ref = malloc(sizeof(float) * nrows);
    ggml_gqsa_rows(x, n_kept, nrows, y, got);
    ggml_gqsa_rows_generic(x, n_kept, nrows, y, ref);
    for (int r = 0; r < nrows; ++r) {
        const float want = (float) int_row_dot(x + (size_t) r * n_kept, n_kept, y);
        if (got[r] != want || ref[r] != want) {
            printf("    int row %d: exact %.1f, scalar %.1f, dispatched %.1f\n", r, want, ref[r], got[r]);
            ok = false;
        }
    }
    free(x); free(y);
    // floats: to rounding
    x = float_weights(nrows, width, n_kept);
    float * act = float_acts(1, width, true);
    y = quantize_acts_ref(act, 1, width);
    ggml_gqsa_rows(x, n_kept, nrows, y, got);
    ggml_gqsa_rows_generic(x, n_kept, nrows, y, ref);
    for (int r = 0; r < nrows; ++r) {
        const double tol = 1e-5 * row_scale(x + (size_t) r * n_kept, n_kept, y) + 1e-30;
        if (fabs((double) got[r] - ref[r]) > tol) {
            printf("    float row %d: scalar %.9g, dispatched %.9g\n", r, ref[r], got[r]);
            ok = false;
        }
    }
    report(ok, "rows_match_scalar[n_kept=%d,nrows=%d]", n_kept, nrows);
    free(x); free(act); free(y); free(got); free(ref);
}

static void test_pack_panel(int G) {
    const int width = G * GQSA_GROUP_SIZE;
    float * x = float_acts(GQSA_PANEL, width, true);
    const size_t bytes = (size_t) G * GQSA_ACT_BLOCK_BYTES * GQSA_PANEL;
    uint8_t * ref = malloc(bytes), * got = malloc(bytes);
    memset(ref, 0, bytes);
    memset(got, 0x55, bytes);
    ggml_gqsa_pack_panel_generic(x, width, 0, G, ref);
    ggml_gqsa_pack_panel(x, width, 0, G / 2, got);          // in two ranges, as two threads do
    ggml_gqsa_pack_panel(x, width, G / 2, G, got);
    bool ok = memcmp(ref, got, bytes) == 0;
    // the panel holds the reference quantization of every column
    block_gqsa_q8 * a = quantize_acts_ref(x, GQSA_PANEL, width);
    for (int c = 0; c < GQSA_PANEL && ok; ++c) {
        for (int g = 0; g < G && ok; ++g) {
            const uint8_t * pg = ref + (size_t) g * GQSA_ACT_BLOCK_BYTES * GQSA_PANEL;
            const block_gqsa_q8 * b = a + (size_t) c * G + g;
            float d, s;
            memcpy(&d, pg + 16 * GQSA_PANEL + 4 * c, 4);
            memcpy(&s, pg + 16 * GQSA_PANEL + 4 * (GQSA_PANEL + c), 4);
            ok = memcmp(&d, &b->d, 4) == 0 && memcmp(&s, &b->s, 4) == 0;
            for (int j = 0; j < GQSA_GROUP_SIZE && ok; ++j) {
                ok = (int8_t) pg[((j / 4) * GQSA_PANEL + c) * 4 + j % 4] == b->qs[j];
            }
        }
    }
    report(ok, "pack_panel_is_bit_exact[groups=%d]", G);
    free(x); free(ref); free(got); free(a);
}

static void test_panel_rows(int n_kept, int nrows) {
    const int width = (n_kept + 2) * GQSA_GROUP_SIZE;
    const int G = width / GQSA_GROUP_SIZE;
    bool ok = true;
    block_gqsa4 * x = float_weights(nrows, width, n_kept);
    float * act = float_acts(GQSA_PANEL, width, true);
    uint8_t * panel = malloc((size_t) G * GQSA_ACT_BLOCK_BYTES * GQSA_PANEL);
    ggml_gqsa_pack_panel_generic(act, width, 0, G, panel);
    block_gqsa_q8 * y = quantize_acts_ref(act, GQSA_PANEL, width);
    float * got = malloc(sizeof(float) * nrows * GQSA_PANEL), * ref = malloc(sizeof(float) * nrows * GQSA_PANEL);
    ggml_gqsa_panel_rows(x, n_kept, nrows, panel, got, nrows);
    ggml_gqsa_panel_rows_generic(x, n_kept, nrows, panel, ref, nrows);
    for (int c = 0; c < GQSA_PANEL; ++c) {
        for (int r = 0; r < nrows; ++r) {
            // the panel is the documented activation row of each column, rearranged
            float one;
            ggml_vec_dot_gqsa4_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, &one, 0, x + (size_t) r * n_kept, 0, y + (size_t) c * G, 0, 1);
            const double tol = 1e-5 * row_scale(x + (size_t) r * n_kept, n_kept, y + (size_t) c * G) + 1e-30;
            const float a = got[c * nrows + r], b = ref[c * nrows + r];
            if (fabs((double) a - b) > tol || fabs((double) b - one) > tol) {
                printf("    row %d column %d: vec_dot %.9g, panel scalar %.9g, panel dispatched %.9g\n", r, c, one, b, a);
                ok = false;
            }
        }
    }
    free(x); free(act); free(y);
    // integers: exact. Build the panel from integer activation blocks directly.
    x = int_weights(nrows, width, n_kept);
    block_gqsa_q8 * ya = malloc(sizeof(block_gqsa_q8) * G * GQSA_PANEL);
    for (int c = 0; c < GQSA_PANEL; ++c) {
        block_gqsa_q8 * one = int_acts(width);
        memcpy(ya + (size_t) c * G, one, sizeof(block_gqsa_q8) * G);
        free(one);
    }
    for (int g = 0; g < G; ++g) {
        uint8_t * pg = panel + (size_t) g * GQSA_ACT_BLOCK_BYTES * GQSA_PANEL;
        for (int c = 0; c < GQSA_PANEL; ++c) {
            const block_gqsa_q8 * b = ya + (size_t) c * G + g;
            for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
                pg[((j / 4) * GQSA_PANEL + c) * 4 + j % 4] = (uint8_t) b->qs[j];
            }
            memcpy(pg + 16 * GQSA_PANEL + 4 * c, &b->d, 4);
            memcpy(pg + 16 * GQSA_PANEL + 4 * (GQSA_PANEL + c), &b->s, 4);
        }
    }
    ggml_gqsa_panel_rows(x, n_kept, nrows, panel, got, nrows);
    ggml_gqsa_panel_rows_generic(x, n_kept, nrows, panel, ref, nrows);
    for (int c = 0; c < GQSA_PANEL; ++c) {
        for (int r = 0; r < nrows; ++r) {
            const float want = (float) int_row_dot(x + (size_t) r * n_kept, n_kept, ya + (size_t) c * G);
            if (got[c * nrows + r] != want || ref[c * nrows + r] != want) {
                printf("    int row %d column %d: exact %.1f, scalar %.1f, dispatched %.1f\n", r, c, want, ref[c * nrows + r], got[c * nrows + r]);
                ok = false;
            }
        }
    }
    report(ok, "panel_rows_match_scalar[n_kept=%d,nrows=%d]", n_kept, nrows);
    free(x); free(ya); free(panel); free(got); free(ref);
}

// decode activations in the superblock layout (ggml-cpu-gqsa.h: group g at 32 g, its qs then
// floats d, s, 0, 0), from block_gqsa_q8 rows
static void * sb_acts_from(const block_gqsa_q8 * y, int G) {
    uint8_t * a = calloc(1, ggml_gqsa_sb_act_bytes(G));
    for (int g = 0; g < G; ++g) {
        memcpy(a + (size_t) 32 * g, y[g].qs, GQSA_GROUP_SIZE);
        memcpy(a + (size_t) 32 * g + 16, &y[g].d, sizeof(float));
        memcpy(a + (size_t) 32 * g + 20, &y[g].s, sizeof(float));
    }
    return a;
}

// repack -> unpack gives the blocks back, and the superblocks hold every block's index, zero
// point and scale once
static void test_sb_roundtrip(int n_kept, int nrows) {
    const int width = (n_kept + 5) * GQSA_GROUP_SIZE;
    block_gqsa4 * x = float_weights(nrows, width, n_kept);
    const size_t n = (size_t) nrows * n_kept;
    gqsa_sb8 * t = malloc(sizeof(block_gqsa4) * n);
    block_gqsa4 * back = malloc(sizeof(block_gqsa4) * n);
    ggml_gqsa_sb_repack(x, t, n_kept, nrows);
    ggml_gqsa_sb_unpack(t, back, n_kept, nrows);
    bool ok = memcmp(x, back, sizeof(block_gqsa4) * n) == 0;
    int64_t sum_x = 0, sum_t = 0;
    for (size_t i = 0; i < n; ++i) {
        sum_x += (int64_t) gqsa_block_index(&x[i]) * 16 + gqsa_block_zero(&x[i]) + x[i].d;
    }
    for (int r = 0; r < nrows; ++r) {                       // a row: its superblocks, then its tail blocks
        const gqsa_sb8 * u = (const gqsa_sb8 *) ((const uint8_t *) t + (size_t) r * n_kept * sizeof(block_gqsa4));
        for (int s = 0; s < n_kept / GQSA_SB_BLOCKS; ++s) {
            for (int l = 0; l < GQSA_SB_BLOCKS; ++l) {
                sum_t += u[s].gz[l] + u[s].d[l];
            }
        }
        const block_gqsa4 * b = (const block_gqsa4 *) (u + n_kept / GQSA_SB_BLOCKS);
        for (int k = 0; k < n_kept % GQSA_SB_BLOCKS; ++k) {
            sum_t += (int64_t) gqsa_block_index(&b[k]) * 16 + gqsa_block_zero(&b[k]) + b[k].d;
        }
    }
    ok = ok && sum_x == sum_t;
    report(ok, "sb_repack_roundtrip[n_kept=%d,nrows=%d]", n_kept, nrows);
    free(x); free(t); free(back);
}

// the superblock decode activations: qs, d and s bit-exact with quantize_row_gqsa_q8_ref, any range
static void test_sb_quantize_act(int width) {
    const int G = width / GQSA_GROUP_SIZE;
    float * x = float_acts(1, width, true);
    block_gqsa_q8 * ref = quantize_acts_ref(x, 1, width);
    uint8_t * want = sb_acts_from(ref, G);
    uint8_t * got = calloc(1, ggml_gqsa_sb_act_bytes(G));
    const int g1 = G / 3;
    ggml_gqsa_sb_quantize_act(x, got, G, 0, g1);           // in two ranges, as two threads would
    ggml_gqsa_sb_quantize_act(x, got, G, g1, G);
    report(memcmp(got, want, ggml_gqsa_sb_act_bytes(G)) == 0, "sb_quantize_act_matches_ref[width=%d]", width);
    free(x); free(ref); free(want); free(got);
}

// superblock rows (dispatched and scalar) against the file-layout scalar reference: exact on
// integer data, to float rounding otherwise
static void test_sb_rows(int n_kept, int nrows) {
    const int width = (n_kept + 3) * GQSA_GROUP_SIZE;
    const int G = width / GQSA_GROUP_SIZE;
    bool ok = true;
    float * got = malloc(sizeof(float) * nrows);
    float * gen = malloc(sizeof(float) * nrows);
    float * ref = malloc(sizeof(float) * nrows);
    gqsa_sb8 * t = malloc(sizeof(block_gqsa4) * (size_t) nrows * n_kept);
    for (int pass = 0; pass < 2; ++pass) {
        block_gqsa4 * x = pass == 0 ? int_weights(nrows, width, n_kept) : float_weights(nrows, width, n_kept);
        float * act = pass == 0 ? NULL : float_acts(1, width, true);
        block_gqsa_q8 * y = pass == 0 ? int_acts(width) : quantize_acts_ref(act, 1, width);
        void * ya = sb_acts_from(y, G);
        ggml_gqsa_sb_repack(x, t, n_kept, nrows);
        ggml_gqsa_sb_rows(t, n_kept, nrows, ya, G, got);
        ggml_gqsa_sb_rows_generic(t, n_kept, nrows, ya, G, gen);
        ggml_gqsa_rows_generic(x, n_kept, nrows, y, ref);
        for (int r = 0; r < nrows; ++r) {
            const double tol = pass == 0 ? 0.0 : 1e-5 * row_scale(x + (size_t) r * n_kept, n_kept, y) + 1e-30;
            if (!(fabs((double) got[r] - ref[r]) <= tol && fabs((double) gen[r] - ref[r]) <= tol)) {
                printf("    %s row %d: file-layout scalar %.9g, sb scalar %.9g, sb dispatched %.9g\n",
                       pass == 0 ? "int" : "float", r, ref[r], gen[r], got[r]);
                ok = false;
            }
        }
        free(x); free(act); free(y); free(ya);
    }
    report(ok, "sb_rows_match_scalar[n_kept=%d,nrows=%d]", n_kept, nrows);
    free(got); free(gen); free(ref); free(t);
}

typedef struct {
    struct ggml_compute_params params;
    struct ggml_tensor * dst;
    bool sb;
    bool handled;
} mm_thread;

static void * mm_run(void * arg) {
    mm_thread * t = (mm_thread *) arg;
    if (t->sb) {
        ggml_gqsa_mul_mat_sb(&t->params, t->dst);   // aborts on anything it does not handle
        t->handled = true;
    } else {
        t->handled = ggml_gqsa_mul_mat(&t->params, t->dst);
    }
    return NULL;
}

// The mul_mat driver on `nth` threads: out[c*nrows + r] = weight row r . column c of x. w holds
// nrows rows of n_kept blocks of `type` (gqsa4 or gqsa3) as in the file; sb: repacked first into
// superblocks (ggml_gqsa_sb_repack, ggml_gqsa3_sb_repack) and run by ggml_gqsa_mul_mat_sb, as the
// CPU_GQSA buffer type does. Returns whether the driver handled it.
static bool run_mul_mat(enum ggml_type type, void * w, int width, int n_kept, int nrows, float * x,
                        int ncols, int nth, bool sb, float * out) {
    const size_t bbytes = ggml_type_size(type);
    void * t = NULL;
    if (sb) {
        t = malloc(bbytes * (size_t) nrows * n_kept);                   // repacked rows keep the file's bytes
        (type == GGML_TYPE_GQSA3 ? ggml_gqsa3_sb_repack : ggml_gqsa_sb_repack)(w, t, n_kept, nrows);
    }
    memset(out, 0, sizeof(float) * nrows * ncols);
    struct ggml_tensor t0 = { .type = type, .ne = { n_kept * GQSA_GROUP_SIZE, nrows, 1, 1 }, .data = sb ? t : w };
    t0.nb[0] = bbytes; t0.nb[1] = (size_t) n_kept * bbytes; t0.nb[2] = t0.nb[3] = t0.nb[1] * nrows;
    struct ggml_tensor t1 = { .type = GGML_TYPE_F32, .ne = { width, ncols, 1, 1 }, .data = x };
    t1.nb[0] = 4; t1.nb[1] = 4 * (size_t) width; t1.nb[2] = t1.nb[3] = t1.nb[1] * ncols;
    struct ggml_tensor td = { .type = GGML_TYPE_F32, .ne = { nrows, ncols, 1, 1 }, .data = out };
    td.nb[0] = 4; td.nb[1] = 4 * (size_t) nrows; td.nb[2] = td.nb[3] = td.nb[1] * ncols;
    td.src[0] = &t0; td.src[1] = &t1;

    const size_t wsize = sb ? ggml_gqsa_sb_work_size(&td) : ggml_row_size(GGML_TYPE_GQSA_Q8, (int64_t) width * ncols);
    void * wdata = malloc(wsize);
    struct ggml_threadpool tp;
    pthread_barrier_init(&tp.barrier, NULL, (unsigned) nth);
    atomic_init(&tp.chunk, 0);
    mm_thread th[4];
    pthread_t ids[4];
    for (int i = 0; i < nth; ++i) {
        th[i].params = (struct ggml_compute_params) { .ith = i, .nth = nth, .wsize = wsize, .wdata = wdata, .threadpool = &tp, .use_ref = false };
        th[i].dst = &td;
        th[i].sb  = sb;
        pthread_create(&ids[i], NULL, mm_run, &th[i]);
    }
    bool handled = true;
    for (int i = 0; i < nth; ++i) {
        pthread_join(ids[i], NULL);
        handled = handled && th[i].handled;
    }
    pthread_barrier_destroy(&tp.barrier);
    free(t);
    free(wdata);
    return handled;
}

// sb: the weights repacked into superblocks and run by ggml_gqsa_mul_mat_sb (as the CPU_GQSA
// buffer type does), checked against the same file-layout reference
static void test_mul_mat(int width, int n_kept, int nrows, int ncols, int nth, bool sb) {
    block_gqsa4 * w = float_weights(nrows, width, n_kept);
    float * x = float_acts(ncols, width, false);
    float * out = malloc(sizeof(float) * nrows * ncols);
    const bool handled = run_mul_mat(GGML_TYPE_GQSA4, w, width, n_kept, nrows, x, ncols, nth, sb, out);

    bool ok = true;
#if GQSA_CPU_PANELS
    if (!handled) {
        printf("    the driver refused a plain 2-D f32 mul_mat\n");
        ok = false;
    }
#endif
    if (handled) {
        block_gqsa_q8 * y = quantize_acts_ref(x, ncols, width);
        double err = 0.0, norm = 0.0;
        for (int c = 0; c < ncols; ++c) {
            const block_gqsa_q8 * yc = y + (size_t) c * (width / GQSA_GROUP_SIZE);
            for (int r = 0; r < nrows && ok; ++r) {
                float ref;
                ggml_vec_dot_gqsa4_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, &ref, 0, w + (size_t) r * n_kept, 0, yc, 0, 1);
                const double tol = 1e-5 * row_scale(w + (size_t) r * n_kept, n_kept, yc) + 1e-30;
                const float got = out[(size_t) c * nrows + r];
                if (!(fabs((double) got - ref) <= tol)) {
                    printf("    row %d column %d: scalar %.9g, mul_mat %.9g\n", r, c, ref, got);
                    ok = false;
                }
                const double exact = float_row_dot(w + (size_t) r * n_kept, n_kept, width, x + (size_t) c * width);
                err  += (got - exact) * (got - exact);
                norm += exact * exact;
            }
        }
        if (ok && !(err <= 5e-4 * norm)) {
            printf("    NMSE against float math %.3g > 5e-4\n", err / norm);
            ok = false;
        }
        free(y);
    }
    report(ok, "mul_mat_driver%s[width=%d,n_kept=%d,rows=%d,cols=%d,threads=%d]", sb ? "_sb" : "", width, n_kept, nrows, ncols, nth);
    free(w); free(x); free(out);
}

// ---- gqsa3 -------------------------------------------------------------------------------------

// A gqsa3 block packed here from the byte diagram of docs/FORMAT.md (independently of the library)
static block_gqsa3 gqsa3_pack_spec(const uint8_t q[GQSA_GROUP_SIZE], uint32_t z, uint32_t g, ggml_fp16_t d) {
    block_gqsa3 b;
    b.d  = d;
    b.iz = (uint16_t) (g | z << 12);
    b.qh = 0;
    for (int j = 0; j < 4; ++j) {
        b.ql[j] = (uint8_t) ((q[j] & 3) | (q[j + 4] & 3) << 2 | (q[j + 8] & 3) << 4 | (q[j + 12] & 3) << 6);
    }
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        b.qh |= (uint16_t) ((q[j] >> 2) << j);
    }
    return b;
}

// The reference quantizer of docs/FORMAT.md with QMAX = 7, written out here from the spec
static block_gqsa3 gqsa3_quantize_spec(const float * x, uint32_t g) {
    float lo = 0.0f, hi = 0.0f;
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        lo = fminf(lo, x[j]);
        hi = fmaxf(hi, x[j]);
    }
    const float s = (hi - lo) / 7.0f;
    ggml_fp16_t dh = GGML_FP32_TO_FP16(s);
    float d = GGML_FP16_TO_FP32(dh);
    if (s > 0.0f && d == 0.0f) {
        dh = 0x0001;
        d = GGML_FP16_TO_FP32(dh);
    }
    if (!(d <= 65504.0f)) {
        dh = 0x7bff;
        d = 65504.0f;
    }
    uint8_t q[GQSA_GROUP_SIZE] = {0};
    uint32_t z = 0;
    if (d != 0.0f) {
        z = (uint32_t) fminf(fmaxf(nearbyintf(-lo / d), 0.0f), 7.0f);
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            q[j] = (uint8_t) fminf(fmaxf(nearbyintf(x[j] / d) + (float) z, 0.0f), 7.0f);
        }
    }
    return gqsa3_pack_spec(q, z, g, dh);
}

// quantize_row_gqsa3_ref is bit-exact with the spec, and its weights are within about half a step
static void test_gqsa3_quantize(int width) {
    const int G = width / GQSA_GROUP_SIZE;
    float * x = malloc(sizeof(float) * width);
    for (int g = 0; g < G; ++g) {
        const int kind = g % 7;
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            float v = frand();
            v = kind == 0 ? 0.0f : kind == 1 ? fabsf(v) + 0.5f : kind == 2 ? v * 1e-6f : kind == 3 ? v * 3e3f :
                kind == 4 ? -fabsf(v) - 0.25f : kind == 5 ? (float) (rnd() % 15) * 0.5f - 3.5f : v;
            x[g * GQSA_GROUP_SIZE + j] = v;
        }
    }
    block_gqsa3 * got = malloc(sizeof(block_gqsa3) * G);
    quantize_row_gqsa3_ref(x, got, width);
    float * back = malloc(sizeof(float) * width);
    dequantize_row_gqsa3(got, back, width);
    bool ok = true;
    for (int g = 0; g < G && ok; ++g) {
        const block_gqsa3 want = gqsa3_quantize_spec(x + g * GQSA_GROUP_SIZE, (uint32_t) g);
        if (memcmp(&want, got + g, sizeof(want)) != 0) {
            printf("    group %d: not the spec's bytes\n", g);
            ok = false;
        }
        float lo = 0.0f, hi = 0.0f;
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            lo = fminf(lo, x[g * GQSA_GROUP_SIZE + j]);
            hi = fmaxf(hi, x[g * GQSA_GROUP_SIZE + j]);
        }
        const double s = (hi - lo) / 7.0, d = GGML_FP16_TO_FP32(got[g].d);
        const double bound = 0.5 * d + 8.0 * fabs(d - s) + 1e-12;     // half a step, plus the scale's rounding
        for (int j = 0; j < GQSA_GROUP_SIZE && ok; ++j) {
            const double e = fabs((double) back[g * GQSA_GROUP_SIZE + j] - x[g * GQSA_GROUP_SIZE + j]);
            if (e > bound) {
                printf("    group %d weight %d: %.9g -> %.9g, error %.3g > %.3g\n", g, j, x[g * GQSA_GROUP_SIZE + j],
                       back[g * GQSA_GROUP_SIZE + j], e, bound);
                ok = false;
            }
        }
        ok = ok && (got[g].iz >> 12) <= GQSA3_QMAX && (got[g].iz & GQSA_INDEX_MASK) == (uint32_t) g;
    }
    report(ok, "gqsa3_quantize_ref_matches_spec[width=%d]", width);
    free(x); free(got); free(back);
}

// The byte layout: one block with known bytes, then random blocks packed from the diagram; the
// library reads the codes, dequantizes, widens to gqsa4 and back
static void test_gqsa3_layout(void) {
    // q = 0..7, 7..0; z = 3; g = 5; d = 1.0 -> d 00 3c, iz 05 30, ql f0 a5 5a 0f, qh f0 0f
    static const uint8_t known[GQSA3_BLOCK_BYTES] = { 0x00, 0x3c, 0x05, 0x30, 0xf0, 0xa5, 0x5a, 0x0f, 0xf0, 0x0f };
    uint8_t q[GQSA_GROUP_SIZE];
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        q[j] = (uint8_t) (j < 8 ? j : 15 - j);
    }
    block_gqsa3 b = gqsa3_pack_spec(q, 3, 5, 0x3c00);
    bool ok = memcmp(&b, known, sizeof(known)) == 0;
    float w[GQSA_GROUP_SIZE];
    dequantize_row_gqsa3((const block_gqsa3 *) known, w, GQSA_GROUP_SIZE);
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        ok = ok && w[j] == (float) (q[j] - 3);
    }
    for (int it = 0; it < 2000 && ok; ++it) {
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            q[j] = (uint8_t) (rnd() % 8);
        }
        const uint32_t z = rnd() % 8, g = rnd() % GQSA_MAX_GROUPS;
        const ggml_fp16_t d = (ggml_fp16_t) (rnd() % 0x7c00);          // any finite nonnegative scale
        b = gqsa3_pack_spec(q, z, g, d);
        dequantize_row_gqsa3(&b, w, GQSA_GROUP_SIZE);
        block_gqsa4 b4;
        gqsa3_to_gqsa4(&b, &b4);
        block_gqsa3 back;
        gqsa4_to_gqsa3(&b4, &back);
        ok = memcmp(&b, &back, sizeof(b)) == 0 && b4.d == d && gqsa_block_index(&b4) == g && gqsa_block_zero(&b4) == z;
        for (int j = 0; j < GQSA_GROUP_SIZE && ok; ++j) {
            const int q4 = j < 8 ? b4.qs[j] & 0x0F : b4.qs[j - 8] >> 4;
            ok = gqsa3_code(&b, j) == q[j] && q4 == q[j] &&
                 w[j] == (float) ((int) q[j] - (int) z) * GGML_FP16_TO_FP32(d);
        }
    }
    // dense rows: each kept group at its index, zeros elsewhere
    const int width = 96, n_kept = 2;
    block_gqsa3 row[2];
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        q[j] = (uint8_t) (j % 8);
    }
    row[0] = gqsa3_pack_spec(q, 0, 1, 0x3c00);
    row[1] = gqsa3_pack_spec(q, 7, 4, 0x4000);                          // d = 2
    float dense[96];
    ggml_gqsa3_dequantize_rows(row, 1, n_kept, width, dense);
    for (int k = 0; k < width; ++k) {
        const int g = k / GQSA_GROUP_SIZE, j = k % GQSA_GROUP_SIZE;
        const float want = g == 1 ? (float) (j % 8) : g == 4 ? 2.0f * (float) (j % 8 - 7) : 0.0f;
        ok = ok && dense[k] == want;
    }
    report(ok, "gqsa3_block_layout_matches_spec");
}

// the load-time validator on gqsa3 tensors (and gqsa4 unchanged): every rule, with its message
static void test_gqsa3_validate(void) {
    const int width = 128, n_kept = 3, nrows = 2;
    block_gqsa3 * b = float_weights_t(nrows, width, n_kept, true);
    block_gqsa3 * c = malloc(sizeof(block_gqsa3) * nrows * n_kept);
    struct ggml_tensor t = { .type = GGML_TYPE_GQSA3, .ne = { n_kept * GQSA_GROUP_SIZE, nrows, 1, 1 } };
    t.nb[0] = GQSA3_BLOCK_BYTES; t.nb[1] = (size_t) n_kept * GQSA3_BLOCK_BYTES; t.nb[2] = t.nb[3] = t.nb[1] * nrows;
    snprintf(t.name, sizeof(t.name), "blk.0.ffn_up.weight");
    char err[512];
    bool ok = ggml_gqsa_validate(&t, b, width, err, sizeof(err)) && gqsa3_validate_blocks(b, sizeof(block_gqsa3) * 6);
    if (!ok) {
        printf("    valid data refused: %s\n", err);
    }
    struct {
        int blk; uint16_t iz_or, iz_and; int set_d; ggml_fp16_t d; int idx; const char * msg; bool rows_check;
    } cases[] = {
        { 4, 0x8000, 0xFFFF, 0, 0, -1, "zero point 8 > 7", true },                      // z = 8 + original z
        { 1, 0xF000, 0xFFFF, 0, 0, -1, "zero point 15 > 7", true },
        { 2, 0, 0xFFFF, 1, 0x7c00, -1, "scale is not finite", true },
        { 3, 0, 0xFFFF, 1, 0xfe00, -1, "scale is not finite", true },
        { 1, 0, 0xF000, 0, 0, 8, "group index 8 >= 8 groups", false },
        { 5, 0, 0xF000, 0, 0, -2, "indices must strictly increase", false },           // equal to the previous
        { 4, 0, 0xF000, 0, 0, -3, "indices must strictly increase", false },           // below the previous
    };
    for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); ++k) {
        memcpy(c, b, sizeof(block_gqsa3) * nrows * n_kept);
        block_gqsa3 * x = c + cases[k].blk;
        if (cases[k].iz_or == 0x8000) {
            x->iz = (uint16_t) ((x->iz & 0x0FFF) | 0x8000);
        } else {
            x->iz = (uint16_t) ((x->iz & cases[k].iz_and) | cases[k].iz_or);
        }
        if (cases[k].set_d) {
            x->d = cases[k].d;
        }
        if (cases[k].idx >= 0) {
            x->iz = (uint16_t) (x->iz | cases[k].idx);
        } else if (cases[k].idx == -2) {
            x->iz = (uint16_t) (x->iz | ((x - 1)->iz & GQSA_INDEX_MASK));
        } else if (cases[k].idx == -3) {
            x->iz = (uint16_t) (x->iz | 0);                                             // index 0 after a later one
            (x - 1)->iz = (uint16_t) (((x - 1)->iz & 0xF000) | 1);
        }
        err[0] = 0;
        const bool valid = ggml_gqsa_validate(&t, c, width, err, sizeof(err));
        const bool named = strstr(err, "blk.0.ffn_up.weight") != NULL && strstr(err, cases[k].msg) != NULL;
        const bool blocks_ok = gqsa3_validate_blocks(c, sizeof(block_gqsa3) * nrows * n_kept);
        if (valid || !named || (cases[k].rows_check && blocks_ok)) {
            printf("    case %zu: valid %d, message '%s', row-data check %d\n", k, valid, err, blocks_ok);
            ok = false;
        }
    }
    // gqsa4 keeps its zero points 0..15
    block_gqsa4 * b4 = float_weights(nrows, width, n_kept);
    b4[4].iz = (uint16_t) ((b4[4].iz & 0x0FFF) | 0xF000);
    struct ggml_tensor t4 = t;
    t4.type = GGML_TYPE_GQSA4;
    t4.nb[0] = GQSA_BLOCK_BYTES; t4.nb[1] = (size_t) n_kept * GQSA_BLOCK_BYTES; t4.nb[2] = t4.nb[3] = t4.nb[1] * nrows;
    ok = ok && ggml_gqsa_validate(&t4, b4, width, err, sizeof(err));
    // a gqsa3 tensor described with gqsa4 strides is refused
    ok = ok && !ggml_gqsa_validate(&(struct ggml_tensor) { .type = GGML_TYPE_GQSA3, .ne = { t4.ne[0], t4.ne[1], 1, 1 },
                                                          .nb = { t4.nb[0], t4.nb[1], t4.nb[2], t4.nb[3] } },
                                   b, width, err, sizeof(err));
    report(ok, "gqsa3_validate_rejects_each_broken_rule");
    free(b); free(c); free(b4);
}

// gqsa3 rows widened to gqsa4 (the blocks the kernels run)
static block_gqsa4 * gqsa3_widen(const block_gqsa3 * x, size_t n) {
    block_gqsa4 * y = malloc(sizeof(block_gqsa4) * n);
    for (size_t i = 0; i < n; ++i) {
        gqsa3_to_gqsa4(x + i, y + i);
    }
    return y;
}

// random integer gqsa3 blocks: d = 1, codes and zero points 0..7
static block_gqsa3 * int_weights3(int nrows, int width, int n_kept) {
    block_gqsa4 * b4 = int_weights(nrows, width, n_kept);
    block_gqsa3 * b = malloc(sizeof(block_gqsa3) * (size_t) nrows * n_kept);
    for (size_t i = 0; i < (size_t) nrows * n_kept; ++i) {
        b4[i].iz &= 0x7FFF;
        for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
            b4[i].qs[j] &= 0x77;
        }
        gqsa4_to_gqsa3(b4 + i, b + i);
    }
    free(b4);
    return b;
}

// vec_dot of gqsa3 (dispatched and scalar) against gqsa4's scalar kernel on the widened blocks:
// equal on integer data, to float rounding on float data; where the ISA file reads gqsa3's file
// layout itself (GQSA_CPU_GQSA3_FILE: ARM), the dispatched kernel equals gqsa4's bit for bit
static void test_gqsa3_vec_dot(int n_kept) {
    const int width = (n_kept + 5) * GQSA_GROUP_SIZE, nrows = 3;
    bool ok = true;
    for (int pass = 0; pass < 2; ++pass) {
        block_gqsa3 * x = pass == 0 ? int_weights3(nrows, width, n_kept) : float_weights_t(nrows, width, n_kept, true);
        block_gqsa4 * x4 = gqsa3_widen(x, (size_t) nrows * n_kept);
        float * act = pass == 0 ? NULL : float_acts(1, width, true);
        block_gqsa_q8 * y = pass == 0 ? int_acts(width) : quantize_acts_ref(act, 1, width);
        for (int r = 0; r < nrows; ++r) {
            float simd, scalar, ref, simd4;
            ggml_vec_dot_gqsa3_gqsa_q8(n_kept * GQSA_GROUP_SIZE, &simd, 0, x + r * n_kept, 0, y, 0, 1);
            ggml_vec_dot_gqsa3_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, &scalar, 0, x + r * n_kept, 0, y, 0, 1);
            ggml_vec_dot_gqsa4_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, &ref, 0, x4 + r * n_kept, 0, y, 0, 1);
            ggml_vec_dot_gqsa4_gqsa_q8(n_kept * GQSA_GROUP_SIZE, &simd4, 0, x4 + r * n_kept, 0, y, 0, 1);
            const double tol = pass == 0 ? 0.0 : 1e-5 * row_scale(x4 + r * n_kept, n_kept, y) + 1e-30;
            if (pass == 0 && (double) ref != (double) int_row_dot(x4 + r * n_kept, n_kept, y)) {
                ok = false;
            }
            if (GQSA_CPU_GQSA3_FILE && memcmp(&simd, &simd4, sizeof(simd)) != 0) {
                printf("    row %d: gqsa3 dispatched %.9g, gqsa4 dispatched %.9g\n", r, simd, simd4);
                ok = false;
            }
            if (!(fabs((double) simd - ref) <= tol && fabs((double) scalar - ref) <= tol)) {
                printf("    %s row %d: gqsa4 scalar %.9g, gqsa3 scalar %.9g, gqsa3 dispatched %.9g\n",
                       pass == 0 ? "int" : "float", r, ref, scalar, simd);
                ok = false;
            }
        }
        free(x); free(x4); free(act); free(y);
    }
    report(ok, "gqsa3_vec_dot_matches_gqsa4[n_kept=%d]", n_kept);
}

// Every code 0..7 at every position and every zero point 0..7, over a row's blocks: block i has
// z = i % 8 and codes (i + 3k + k / 8) % 8 (both halves of the code range in every block); the
// scales, where `extreme`, cycle through fp16's extremes: the largest finite value, the smallest
// subnormal and normal, zero, one and a negative one
static void gqsa3_fill_patterns(block_gqsa3 * x, int nrows, int n_kept, bool extreme) {
    static const ggml_fp16_t scales[] = { 0x7bff, 0x0001, 0x0400, 0x0000, 0x3c00, 0xb555 };
    for (int r = 0; r < nrows; ++r) {
        for (int i = 0; i < n_kept; ++i) {
            block_gqsa3 * b = x + (size_t) r * n_kept + i;
            uint8_t q[GQSA_GROUP_SIZE];
            for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
                q[k] = (uint8_t) ((i + r + 3 * k + k / 8) % 8);
            }
            const ggml_fp16_t d = extreme ? scales[(i + r) % 6] : b->d;
            *b = gqsa3_pack_spec(q, (uint32_t) ((i + r) % 8), b->iz & GQSA_INDEX_MASK, d);
        }
    }
}

// A gqsa3 superblock built here from the layout comment of ggml-cpu-gqsa.c ("Repacked weights"),
// independently of the library: headers in lane order, then qa and qb
static void gqsa3_sb_pack_spec(const block_gqsa3 * b, uint8_t out[8 * GQSA3_BLOCK_BYTES]) {
    static const int lane[8] = { 0, 2, 4, 6, 1, 3, 5, 7 };
    memset(out, 0, 8 * GQSA3_BLOCK_BYTES);
    for (int l = 0; l < 8; ++l) {
        const block_gqsa3 * c = b + lane[l];
        const uint16_t gz = (uint16_t) ((c->iz & 0x0FFF) << 4 | c->iz >> 12);
        memcpy(out + 2 * l, &gz, 2);
        memcpy(out + 16 + 2 * l, &c->d, 2);
    }
    for (int L = 0; L < 2; ++L) {
        for (int k = 0; k < GQSA_GROUP_SIZE; ++k) {
            const int q0 = gqsa3_code(b + L, k), q1 = gqsa3_code(b + 2 + L, k);
            const int q2 = gqsa3_code(b + 4 + L, k), q3 = gqsa3_code(b + 6 + L, k);
            out[32 + 16 * L + k] = (uint8_t) (q0 | q1 << 3 | (q2 & 3) << 6);
            out[64 + k] |= (uint8_t) ((q3 | (q2 >> 2) << 3) << (4 * L));
        }
    }
}

// repack -> unpack gives the gqsa3 blocks back, and the repacked rows are the spec's superblocks
// (from the layout comment, built here) then the tail blocks as stored: 10 bytes a block
static void test_gqsa3_sb_roundtrip(int n_kept, int nrows) {
    const int width = (n_kept + 5) * GQSA_GROUP_SIZE;
    const size_t n = (size_t) nrows * n_kept;
    block_gqsa3 * x = float_weights_t(nrows, width, n_kept, true);
    if (nrows > 1) {
        gqsa3_fill_patterns(x + n_kept, 1, n_kept, true);                  // row 1: every code and zero point
    }
    uint8_t * t = malloc(sizeof(block_gqsa3) * n + 1);
    block_gqsa3 * back = malloc(sizeof(block_gqsa3) * n);
    t[sizeof(block_gqsa3) * n] = 0xA5;                                      // a guard byte after the rows
    ggml_gqsa3_sb_repack(x, t, n_kept, nrows);
    ggml_gqsa3_sb_unpack(t, back, n_kept, nrows);
    bool ok = memcmp(x, back, sizeof(block_gqsa3) * n) == 0 && t[sizeof(block_gqsa3) * n] == 0xA5;
    for (int r = 0; r < nrows && ok; ++r) {
        const uint8_t * row = t + (size_t) r * n_kept * GQSA3_BLOCK_BYTES;
        const block_gqsa3 * xr = x + (size_t) r * n_kept;
        for (int s = 0; s < n_kept / 8 && ok; ++s) {
            uint8_t want[8 * GQSA3_BLOCK_BYTES];
            gqsa3_sb_pack_spec(xr + 8 * s, want);
            ok = memcmp(row + 8 * GQSA3_BLOCK_BYTES * s, want, sizeof(want)) == 0;
        }
        const int tail = n_kept % 8;
        ok = ok && memcmp(row + (size_t) (n_kept - tail) * GQSA3_BLOCK_BYTES, xr + n_kept - tail,
                          (size_t) tail * GQSA3_BLOCK_BYTES) == 0;
    }
    report(ok, "gqsa3_sb_repack_roundtrip[n_kept=%d,nrows=%d]", n_kept, nrows);
    free(x); free(t); free(back);
}

// Whether the gqsa3 superblock kernels run the gqsa4 ones' float arithmetic in the same order:
// everywhere but in a GQSA_SB_512 build, whose gqsa4 decode step takes two superblocks at a time
static bool gqsa3_sb_same_order(void) {
    return strcmp(ggml_gqsa_sb_kernel(), "avx512") != 0;
}

// Repacked gqsa3 rows (dispatched and scalar kernels) against the gqsa4 superblock kernels on the
// widened blocks: bit for bit (the same code bytes run the same arithmetic in the same order; to
// rounding against GQSA_SB_512's step), on integer data, the format's patterns with extreme
// scales, and float data; and against the file-layout scalar reference (vec_dot of gqsa3): exactly
// on integer data, to rounding otherwise
static void test_gqsa3_sb_rows(int n_kept, int nrows) {
    const int width = (n_kept + 3) * GQSA_GROUP_SIZE;
    const int G = width / GQSA_GROUP_SIZE;
    const size_t n = (size_t) nrows * n_kept;
    float * got = malloc(sizeof(float) * nrows), * gen = malloc(sizeof(float) * nrows);
    float * got4 = malloc(sizeof(float) * nrows), * gen4 = malloc(sizeof(float) * nrows);
    uint8_t * t = malloc(sizeof(block_gqsa3) * n), * t4 = malloc(sizeof(block_gqsa4) * n);
    bool ok = true;
    for (int pass = 0; pass < 4; ++pass) {      // integers; patterns, d = 1; patterns, extreme scales; floats
        block_gqsa3 * x = pass == 3 ? float_weights_t(nrows, width, n_kept, true) : int_weights3(nrows, width, n_kept);
        if (pass == 1 || pass == 2) {
            gqsa3_fill_patterns(x, nrows, n_kept, pass == 2);
        }
        block_gqsa4 * x4 = gqsa3_widen(x, n);
        float * act = pass < 2 ? NULL : float_acts(1, width, true);
        block_gqsa_q8 * y = pass < 2 ? int_acts(width) : quantize_acts_ref(act, 1, width);
        void * ya = sb_acts_from(y, G);
        ggml_gqsa3_sb_repack(x, t, n_kept, nrows);
        ggml_gqsa_sb_repack(x4, t4, n_kept, nrows);
        ggml_gqsa3_sb_rows(t, n_kept, nrows, ya, G, got);
        ggml_gqsa3_sb_rows_generic(t, n_kept, nrows, ya, G, gen);
        ggml_gqsa_sb_rows(t4, n_kept, nrows, ya, G, got4);
        ggml_gqsa_sb_rows_generic(t4, n_kept, nrows, ya, G, gen4);
        for (int r = 0; r < nrows; ++r) {
            float ref;
            ggml_vec_dot_gqsa3_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, &ref, 0, x + (size_t) r * n_kept, 0, y, 0, 1);
            const double tol = pass < 2 ? 0.0 : 1e-5 * row_scale(x4 + (size_t) r * n_kept, n_kept, y) + 1e-30;
            const bool exact = pass >= 2 || (double) ref == (double) int_row_dot(x4 + (size_t) r * n_kept, n_kept, y);
            const bool same = (memcmp(&got[r], &got4[r], sizeof(float)) == 0 || !gqsa3_sb_same_order()) &&
                              memcmp(&gen[r], &gen4[r], sizeof(float)) == 0;
            if (!exact || !same || !(fabs((double) got[r] - ref) <= tol && fabs((double) gen[r] - ref) <= tol)) {
                printf("    pass %d row %d: gqsa3 scalar %.9g; sb scalar gqsa3 %.9g gqsa4 %.9g; sb dispatched gqsa3 %.9g gqsa4 %.9g\n",
                       pass, r, ref, gen[r], gen4[r], got[r], got4[r]);
                ok = false;
            }
        }
        free(x); free(x4); free(act); free(y); free(ya);
    }
    report(ok, "gqsa3_sb_rows_match_gqsa4_and_scalar[n_kept=%d,nrows=%d]", n_kept, nrows);
    free(got); free(gen); free(got4); free(gen4); free(t); free(t4);
}

// The mul_mat driver on gqsa3 weights, in the file layout (sb = false) or repacked (sb: gqsa3
// superblocks), against the same driver on the widened gqsa4 weights (in the file layout on x86 to
// float rounding: the integer sums are the same; repacked, and on ARM, bit for bit), the scalar
// gqsa4 kernel, and float math (NMSE <= 5e-4)
static void test_gqsa3_mul_mat(int width, int n_kept, int nrows, int ncols, int nth, bool sb) {
    block_gqsa3 * w = float_weights_t(nrows, width, n_kept, true);
    block_gqsa4 * w4 = gqsa3_widen(w, (size_t) nrows * n_kept);
    float * x = float_acts(ncols, width, false);
    float * out = malloc(sizeof(float) * nrows * ncols), * out4 = malloc(sizeof(float) * nrows * ncols);
    const bool handled  = run_mul_mat(GGML_TYPE_GQSA3, w, width, n_kept, nrows, x, ncols, nth, sb, out);
    const bool handled4 = run_mul_mat(GGML_TYPE_GQSA4, w4, width, n_kept, nrows, x, ncols, nth, sb, out4);
    bool ok = handled == handled4;
#if GQSA_CPU_PANELS
    ok = ok && handled;
#endif
    if (handled && handled4) {
        block_gqsa_q8 * y = quantize_acts_ref(x, ncols, width);
        float * dense = malloc(sizeof(float) * width);
        double err = 0.0, norm = 0.0;
        for (int r = 0; r < nrows && ok; ++r) {
            ggml_gqsa3_dequantize_rows(w + (size_t) r * n_kept, 1, n_kept, width, dense);
            for (int c = 0; c < ncols && ok; ++c) {
                const block_gqsa_q8 * yc = y + (size_t) c * (width / GQSA_GROUP_SIZE);
                float ref;
                ggml_vec_dot_gqsa4_gqsa_q8_generic(n_kept * GQSA_GROUP_SIZE, &ref, 0, w4 + (size_t) r * n_kept, 0,
                                                   yc, 0, 1);
                const double tol = 1e-5 * row_scale(w4 + (size_t) r * n_kept, n_kept, yc) + 1e-30;
                const float got = out[(size_t) c * nrows + r], got4 = out4[(size_t) c * nrows + r];
                // repacked (and in the file layout on ARM), the gqsa3 kernels decode the same codes
                // into the gqsa4 kernels' arithmetic
                const bool bitwise = sb ? gqsa3_sb_same_order() : GQSA_CPU_GQSA3_FILE;
                const bool same = !bitwise || memcmp(&got, &got4, sizeof(got)) == 0;
                if (!(same && fabs((double) got - got4) <= tol && fabs((double) got - ref) <= tol)) {
                    printf("    row %d column %d: gqsa4 scalar %.9g, gqsa4 mul_mat %.9g, gqsa3 mul_mat %.9g\n",
                           r, c, ref, got4, got);
                    ok = false;
                }
                double exact = 0.0;
                for (int k = 0; k < width; ++k) {
                    exact += (double) dense[k] * x[(size_t) c * width + k];
                }
                err  += (got - exact) * (got - exact);
                norm += exact * exact;
            }
        }
        if (ok && !(err <= 5e-4 * norm)) {
            printf("    NMSE against float math %.3g > 5e-4\n", err / norm);
            ok = false;
        }
        free(y); free(dense);
    }
    report(ok, "gqsa3_mul_mat_driver%s[width=%d,n_kept=%d,rows=%d,cols=%d,threads=%d]", sb ? "_sb" : "", width, n_kept,
           nrows, ncols, nth);
    free(w); free(w4); free(x); free(out); free(out4);
}

static void test_gqsa3(void) {
    test_gqsa3_quantize(16);
    test_gqsa3_quantize(4096);
    test_gqsa3_layout();
    test_gqsa3_validate();
    const int kepts[] = { 1, 2, 7, 8, 9, 17, 64, 65, 129, 257 };
    for (size_t i = 0; i < sizeof(kepts) / sizeof(kepts[0]); ++i) {
        test_gqsa3_vec_dot(kepts[i]);
    }
    // superblocks: layout and rows everywhere (scalar kernels included); with tails 9, 15, 18, 154
    // (LLaMA-7B's 4096-wide rows at w3s40), 413 (its ffn_down), 516
    const int sb_kepts[] = { 8, 9, 15, 16, 18, 24, 128, 154, 413, 516 };
    for (size_t i = 0; i < sizeof(sb_kepts) / sizeof(sb_kepts[0]); ++i) {
        test_gqsa3_sb_roundtrip(sb_kepts[i], 3);
        test_gqsa3_sb_rows(sb_kepts[i], 1);
        test_gqsa3_sb_rows(sb_kepts[i], 5);
    }
    // the file layout: short rows (the repacking needs 8 blocks), long rows in several chunks
    const int cols[] = { 1, 7, 8, 9, 35 };
    for (size_t i = 0; i < sizeof(cols) / sizeof(cols[0]); ++i) {
        test_gqsa3_mul_mat(64, 2, 9, cols[i], 2, false);
        test_gqsa3_mul_mat(576, 5, 37, cols[i], 1, false);
        test_gqsa3_mul_mat(1536, 72, 20, cols[i], 2, false);
        test_gqsa3_mul_mat(4096, 150, 6, cols[i], 2, false);
    }
    // repacked superblocks, with and without a tail, odd row counts
    if (ggml_gqsa_sb_available()) {
        for (size_t i = 0; i < sizeof(cols) / sizeof(cols[0]); ++i) {
            test_gqsa3_mul_mat(256, 8, 70, cols[i], 2, true);
            test_gqsa3_mul_mat(576, 18, 37, cols[i], 1, true);
            test_gqsa3_mul_mat(4096, 128, 20, cols[i], 2, true);
            test_gqsa3_mul_mat(4096, 154, 33, cols[i], 2, true);
            test_gqsa3_mul_mat(11008, 516, 6, cols[i], 2, true);
        }
        test_gqsa3_mul_mat(11008, 413, 9, 40, 2, true);                  // five panels and a decode column
    }
}

int main(void) {
    printf("GQSA kernel tests (%s)\n", ggml_gqsa_cpu_kernels());
    printf("superblock decode step: %s\n", ggml_gqsa_sb_kernel());
    const int act_widths[] = { 16, 48, 576, 4096 };
    for (size_t i = 0; i < sizeof(act_widths) / sizeof(act_widths[0]); ++i) {
        test_quantize_act(act_widths[i]);
    }
    const int kepts[] = { 1, 2, 3, 7, 8, 9, 15, 16, 17, 18, 24, 31, 48, 129, 257 };
    for (size_t i = 0; i < sizeof(kepts) / sizeof(kepts[0]); ++i) {
        test_vec_dot_int(kepts[i]);
    }
    // widths of SmolLM2 / LLaMA-7B at 25 / 50 / 75 % sparsity
    const int widths[] = { 576, 1536, 4096, 11008 };
    const double keeps[] = { 0.75, 0.5, 0.25 };
    for (size_t i = 0; i < 4; ++i) {
        for (size_t k = 0; k < 3; ++k) {
            test_vec_dot_float(widths[i], (int) lround(widths[i] / GQSA_GROUP_SIZE * keeps[k]));
        }
    }
    const int row_kepts[] = { 1, 5, 7, 8, 9, 16, 17, 18, 27, 64 };
    const int row_counts[] = { 1, 2, 3, 17 };
    for (size_t i = 0; i < sizeof(row_kepts) / sizeof(row_kepts[0]); ++i) {
        for (size_t j = 0; j < sizeof(row_counts) / sizeof(row_counts[0]); ++j) {
            test_rows(row_kepts[i], row_counts[j]);
        }
    }
    const int panel_groups[] = { 1, 3, 36, 257 };
    for (size_t i = 0; i < 4; ++i) {
        test_pack_panel(panel_groups[i]);
    }
    const int panel_kepts[] = { 1, 7, 9, 18, 40 };
    for (size_t i = 0; i < 5; ++i) {
        test_panel_rows(panel_kepts[i], 5);
    }
    const int mm_cols[] = { 1, 7, 8, 9, 17, 32, 35 };
    for (size_t i = 0; i < sizeof(mm_cols) / sizeof(mm_cols[0]); ++i) {
        test_mul_mat(576, 18, 37, mm_cols[i], 1, false);
        test_mul_mat(1536, 72, 20, mm_cols[i], 2, false);
    }
    test_mul_mat(64, 2, 9, 9, 2, false);
    test_mul_mat(11008, 172, 6, 9, 2, false);

    // repacked superblocks: layout and rows everywhere (scalar reference included), the driver
    // where this build repacks (AVX2)
    const int sb_kepts[] = { 8, 9, 15, 16, 18, 24, 48, 128, 344, 516 };     // with tails: 9, 15, 18, 516
    for (size_t i = 0; i < sizeof(sb_kepts) / sizeof(sb_kepts[0]); ++i) {
        test_sb_roundtrip(sb_kepts[i], 3);
        test_sb_rows(sb_kepts[i], 1);
        test_sb_rows(sb_kepts[i], 5);
    }
    test_sb_quantize_act(48);
    test_sb_quantize_act(4096);
    report(ggml_gqsa_sb_supported(16) == ggml_gqsa_sb_available() && ggml_gqsa_sb_supported(18) == ggml_gqsa_sb_available() &&
           !ggml_gqsa_sb_supported(7) && !ggml_gqsa_sb_supported(0), "sb_supported_needs_8_blocks");
    if (ggml_gqsa_sb_available()) {
        for (size_t i = 0; i < sizeof(mm_cols) / sizeof(mm_cols[0]); ++i) {
            test_mul_mat(1536, 48, 37, mm_cols[i], 1, true);
            test_mul_mat(4096, 128, 20, mm_cols[i], 2, true);
        }
        test_mul_mat(11008, 344, 6, 9, 2, true);
        test_mul_mat(256, 8, 70, 40, 2, true);
        for (size_t i = 0; i < sizeof(mm_cols) / sizeof(mm_cols[0]); ++i) {    // rows with tails
            test_mul_mat(576, 18, 37, mm_cols[i], 1, true);
            test_mul_mat(11008, 516, 10, mm_cols[i], 2, true);
        }
    }
    test_gqsa3();
    printf("%d passed, %d failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}
