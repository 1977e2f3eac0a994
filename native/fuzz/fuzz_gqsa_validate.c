// libFuzzer target: the load-time validator, then the kernels on whatever it accepts.
//
// Claim under test: ggml_gqsa_validate reads exactly the tensor's bytes and, when it returns true,
// every kernel entry point (ggml_vec_dot_gqsa4_gqsa_q8, ggml_gqsa_rows, ggml_gqsa_pack_panel +
// ggml_gqsa_panel_rows, each SIMD and scalar) and ggml_gqsa_dequantize_rows stay inside the
// weight, activation, panel and output buffers for every row. Buffers are malloc'd at their exact
// sizes, so AddressSanitizer sees any read or write past them; UBSan checks the arithmetic. The
// results are also checked against each other, and the scalar one against a double-precision dot
// product of the dequantized operands (tolerance: the float summation bound relative to the sum of
// absolute terms, plus the rounding of the dequantized activations), so a wrong gather is a finding
// even when it stays in bounds.
//
// Input: an 8-byte header, then the tensor data.
//   u16  bits 0..12: groups of the logical width (0..8191; > 4096 and 0 are invalid)
//   u16  bits 0..12: stored blocks per row n_kept (0..8191)
//   u8   low nibble: width % 16 (non-zero is invalid); high nibble: ne0 % 16 (non-zero is invalid)
//   u8   rows - 1 (at most; fewer if the data is shorter: rows = min(this + 1, data / row bytes))
//   u16  seed of the activations (bit 15: scale them up to 1e4 to reach fp overflow)
// Build and run: native/fuzz/run.sh SECONDS (clang -fsanitize=fuzzer,address,undefined).
#include "ggml.h"
#include "gqsa.h"
#include "ggml-gqsa.h"
#include "ggml-cpu-gqsa.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void gqsa_fuzz_init_tables(void);   // ggml_stubs.c

int LLVMFuzzerInitialize(int * argc, char *** argv) {
    (void) argc; (void) argv;
    gqsa_fuzz_init_tables();
    return 0;
}

static uint32_t xorshift(uint32_t * s) {
    *s ^= *s << 13; *s ^= *s >> 17; *s ^= *s << 5;
    return *s;
}

static void fail(const char * what, int64_t row, double got, double want, double tol) {
    fprintf(stderr, "fuzz_gqsa_validate: %s: row %lld: %.9g vs %.9g (tolerance %.3g)\n",
            what, (long long) row, got, want, tol);
    abort();
}

// Sum over a row's blocks of |terms| of the kernel's formula d_w * (d_x * sum q*xq - z * s_x), for
// one activation row `a` (block form): bounds the float rounding of any summation order.
static double gqsa_abs_terms(const block_gqsa4 * row, int64_t n_kept, const block_gqsa_q8 * a) {
    double bound = 0.0;
    for (int64_t i = 0; i < n_kept; ++i) {
        const block_gqsa4 * b = row + i;
        const block_gqsa_q8 * ab = a + gqsa_block_index(b);
        double sq = 0.0;
        for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
            sq += fabs((double) ((b->qs[j] & 15) * ab->qs[j])) + fabs((double) ((b->qs[j] >> 4) * ab->qs[j + 8]));
        }
        const double dw = fabs((double) GGML_FP16_TO_FP32(b->d));
        bound += dw * (fabs((double) ab->d) * sq + (double) gqsa_block_zero(b) * fabs((double) ab->s));
    }
    return bound;
}

// `extra`: the error the reference itself may carry on top of the kernel's (0 between kernels).
static void check_close(const char * what, int64_t row, float got, double want, double bound, int64_t n_kept,
                        double extra) {
    if (!isfinite(got) || !isfinite(want) || !(bound < 1e30) || !(extra < 1e30)) {
        return;     // float overflow: nothing to compare, but the reads were checked all the same
    }
    // n_kept float additions plus a few roundings per block: (n_kept + 8) units of 2^-23, twice
    // the worst case, times the sum of absolute terms
    const double tol = (double) (n_kept + 8) * 0x1p-23 * bound + extra + 1e-30;
    if (fabs((double) got - want) > tol) {
        fail(what, row, got, want, tol);
    }
}

// Runs every kernel entry point on validated data and checks them against each other; every
// buffer is exactly as large as needed. Column 0 of the GQSA_PANEL activation columns serves the
// single-row kernels; all columns the panel kernels.
static void check_kernels(const uint8_t * w, int64_t nrows, int64_t n_kept, int64_t width, uint16_t seed) {
    const int64_t n_groups = width / GQSA_GROUP_SIZE;
    const int P = GQSA_PANEL;
    const block_gqsa4 * blocks = (const block_gqsa4 *) w;
    float * x     = malloc((size_t) (P * width) * sizeof(float));           // P columns of width
    float * xdq   = malloc((size_t) width * sizeof(float));
    block_gqsa_q8 * act = malloc((size_t) (P * n_groups) * sizeof(block_gqsa_q8));
    void  * panel = malloc((size_t) n_groups * 24 * P);
    float * wdq   = malloc((size_t) (nrows * width <= (1 << 18) ? nrows * width : 0) * sizeof(float) + 1);
    float * rows  = malloc((size_t) nrows * sizeof(float) + 1);
    float * rows_g = malloc((size_t) nrows * sizeof(float) + 1);
    float * pout  = malloc((size_t) (P * nrows) * sizeof(float) + 1);
    float * pout_g = malloc((size_t) (P * nrows) * sizeof(float) + 1);

    uint32_t s = 0x9e3779b9u ^ seed;
    const float scale = (seed & 0x8000) ? 1e4f : 1.0f;
    for (int64_t k = 0; k < P * width; ++k) {
        const uint32_t r = xorshift(&s);
        x[k] = (r & 7) == 0 ? 0.0f : scale * ((float) (r >> 8) / (float) (1u << 24) - 0.5f);
    }
    for (int c = 0; c < P; ++c) {
        quantize_row_gqsa_q8(x + c * width, act + c * n_groups, width);
    }
    dequantize_row_gqsa_q8(act, xdq, width);
    // the dense check costs nrows * width: kept for inputs up to 2^18 weights (all shapes still
    // reach it with fewer rows), so that wide inputs do not slow the fuzzer down
    const bool dense = nrows * width <= (1 << 18);
    if (dense) {
        ggml_gqsa_dequantize_rows(w, nrows, n_kept, width, wdq);
    }

    // single activation row: one-row dot product (SIMD, scalar), multi-row kernels (SIMD, scalar)
    ggml_gqsa_rows(w, (int) n_kept, nrows, act, rows);
    ggml_gqsa_rows_generic(w, (int) n_kept, nrows, act, rows_g);
    for (int64_t r = 0; r < nrows; ++r) {
        const block_gqsa4 * row = blocks + r * n_kept;
        float simd = 0.0f, scalar = 0.0f;
        ggml_vec_dot_gqsa4_gqsa_q8((int) (n_kept * GQSA_GROUP_SIZE), &simd, 0, row, 0, act, 0, 1);
        ggml_vec_dot_gqsa4_gqsa_q8_generic((int) (n_kept * GQSA_GROUP_SIZE), &scalar, 0, row, 0, act, 0, 1);
        const double bound = gqsa_abs_terms(row, n_kept, act);
        if (dense) {
            // The reference carries an error of its own: xdq = d_x * q_x is rounded per element
            // (wdq = (q - z) * d_w is exact: 11 by 4 bits), up to 2^-24 of each product. The
            // kernel's bound does not cover it when the zero-point term z * s_x cancels (s_x sums
            // the activations before rounding), so it is added, four times over.
            double ref = 0.0, ref_abs = 0.0;
            for (int64_t k = 0; k < width; ++k) {
                const double t = (double) wdq[r * width + k] * (double) xdq[k];
                ref += t;
                ref_abs += fabs(t);
            }
            check_close("scalar vec_dot vs dequantized dot product", r, scalar, ref, bound, n_kept,
                        4.0 * 0x1p-24 * ref_abs);
        }
        check_close("SIMD vec_dot vs scalar", r, simd, scalar, bound, n_kept, 0.0);
        check_close("ggml_gqsa_rows vs scalar vec_dot", r, rows[r], scalar, bound, n_kept, 0.0);
        check_close("ggml_gqsa_rows_generic vs scalar vec_dot", r, rows_g[r], scalar, bound, n_kept, 0.0);
    }

    // GQSA_PANEL columns at once: the panel of all groups, then every row against every column
    ggml_gqsa_pack_panel(x, width, 0, n_groups, panel);
    ggml_gqsa_panel_rows(w, (int) n_kept, nrows, panel, pout, nrows);
    ggml_gqsa_panel_rows_generic(w, (int) n_kept, nrows, panel, pout_g, nrows);
    for (int c = 0; c < P; ++c) {
        ggml_gqsa_rows_generic(w, (int) n_kept, nrows, act + c * n_groups, rows_g);
        for (int64_t r = 0; r < nrows; ++r) {
            const double bound = gqsa_abs_terms(blocks + r * n_kept, n_kept, act + c * n_groups);
            check_close("ggml_gqsa_panel_rows vs rows", r, pout[c * nrows + r], rows_g[r], bound, n_kept, 0.0);
            check_close("ggml_gqsa_panel_rows_generic vs rows", r, pout_g[c * nrows + r], rows_g[r], bound, n_kept, 0.0);
        }
    }
    free(x); free(xdq); free(act); free(panel); free(wdq); free(rows); free(rows_g); free(pout); free(pout_g);
}

int LLVMFuzzerTestOneInput(const uint8_t * in, size_t size) {
    if (size < 8) {
        return 0;
    }
    const int64_t groups  = (in[0] | (in[1] << 8)) & 0x1FFF;
    const int64_t n_kept  = (in[2] | (in[3] << 8)) & 0x1FFF;
    const int64_t width   = groups * GQSA_GROUP_SIZE + (in[4] & 15);
    const int64_t ne0     = n_kept * GQSA_GROUP_SIZE + (in[4] >> 4);
    const int64_t max_rows = (int64_t) in[5] + 1;
    const uint16_t seed   = (uint16_t) (in[6] | (in[7] << 8));
    const size_t row_bytes = (size_t) (ne0 / GQSA_GROUP_SIZE) * sizeof(block_gqsa4);
    const size_t avail = size - 8;
    int64_t nrows = row_bytes ? (int64_t) (avail / row_bytes) : max_rows;
    nrows = nrows < max_rows ? nrows : max_rows;

    const size_t nbytes = (size_t) nrows * row_bytes;
    uint8_t * data = malloc(nbytes ? nbytes : 1);      // exactly the tensor's bytes
    memcpy(data, in + 8, nbytes);

    struct ggml_tensor t;
    memset(&t, 0, sizeof(t));
    t.type  = GGML_TYPE_GQSA4;
    t.ne[0] = ne0; t.ne[1] = nrows; t.ne[2] = 1; t.ne[3] = 1;
    t.nb[0] = sizeof(block_gqsa4);
    t.nb[1] = row_bytes;
    t.nb[2] = t.nb[3] = row_bytes * (size_t) nrows;
    strcpy(t.name, "fuzz.weight");

    char err[256];
    memset(err, 0x7f, sizeof(err));                     // the message must be NUL-terminated
    const bool ok = ggml_gqsa_validate(&t, data, width, err, sizeof(err));
    if (!ok) {
        if (memchr(err, 0, sizeof(err)) == NULL || strncmp(err, "tensor 'fuzz.weight'", 20) != 0) {
            fprintf(stderr, "fuzz_gqsa_validate: bad error message\n");
            abort();
        }
    } else {
        check_kernels(data, nrows, n_kept, width, seed);
    }
    // The dequantizer promises to stay in bounds on unvalidated data too, for any shape it is
    // given that fits its buffers (a positive width that is a multiple of 16).
    if (!ok && width > 0 && width % GQSA_GROUP_SIZE == 0 && nrows * width <= (1 << 16)) {
        float * out = malloc((size_t) (nrows * width) * sizeof(float) + 1);
        ggml_gqsa_dequantize_rows(data, nrows, ne0 / GQSA_GROUP_SIZE, width, out);
        free(out);
    }
    free(data);
    return 0;
}
