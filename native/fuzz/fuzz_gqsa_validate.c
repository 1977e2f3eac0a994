// libFuzzer target: the load-time validator, then the kernels on whatever it accepts.
//
// Claim under test: ggml_gqsa_validate reads exactly the tensor's bytes and, when it returns true,
// every kernel entry point listed here stays inside the weight, activation, panel and output
// buffers for every row (not yet the repacked prompt path: the superblock panel passes):
//   gqsa4: ggml_vec_dot_gqsa4_gqsa_q8, ggml_gqsa_rows, ggml_gqsa_pack_panel + ggml_gqsa_panel_rows
//          (each SIMD and scalar) and ggml_gqsa_dequantize_rows;
//   gqsa3: ggml_vec_dot_gqsa3_gqsa_q8 (SIMD and scalar) and ggml_gqsa3_dequantize_rows;
//   both, where this build repacks (ggml_gqsa_sb_supported(n_kept): AVX2, n_kept >= 8): the
//          superblock layout (ggml_gqsa_sb_repack / ggml_gqsa3_sb_repack and the unpacks), its decode
//          activations (ggml_gqsa_sb_quantize_act) and decode kernels (ggml_gqsa_sb_rows /
//          ggml_gqsa3_sb_rows), each SIMD and scalar.
// Buffers are malloc'd at their exact sizes, so AddressSanitizer sees any read or write past them;
// UBSan checks the arithmetic. The results are also checked against each other, and the scalar one
// against a double-precision dot product of the dequantized operands (tolerance: the float
// summation bound relative to the sum of absolute terms, plus the rounding of the dequantized
// activations), so a wrong gather is a finding even when it stays in bounds. gqsa3 is also checked
// against the gqsa4 scalar kernel on its blocks widened by gqsa3_to_gqsa4 (same weights), the
// repacked rows must unpack to the same bytes, and the superblock decode activations must be the
// bytes of the gqsa_q8 ones (SIMD and scalar alike).
//
// Input: an 8-byte header, then the tensor data.
//   u16  bits 0..12: groups of the logical width (0..8191; > 4096 and 0 are invalid)
//   u16  bits 0..12: stored blocks per row n_kept (0..8191); bit 15: the type, 0 = gqsa4 (12-byte
//        blocks), 1 = gqsa3 (10-byte blocks); bits 13 and 14 are ignored
//   u8   low nibble: width % 16 (non-zero is invalid); high nibble: ne0 % 16 (non-zero is invalid)
//   u8   rows - 1 (at most; fewer if the data is shorter: rows = min(this + 1, data / row bytes),
//        row bytes = ne0 / 16 * the type's block bytes)
//   u16  seed of the activations (bit 15: scale them up to 1e4 to reach fp overflow; bits 0..14
//        modulo groups + 1 also split the SIMD superblock activation quantization in two calls)
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

static void fail_bytes(const char * what, int64_t at) {
    fprintf(stderr, "fuzz_gqsa_validate: %s: first difference at byte %lld\n", what, (long long) at);
    abort();
}

// memcmp that names the first differing byte
static void check_same_bytes(const char * what, const void * got, const void * want, size_t n) {
    if (n && memcmp(got, want, n) != 0) {
        size_t i = 0;
        while (((const uint8_t *) got)[i] == ((const uint8_t *) want)[i]) {
            ++i;
        }
        fail_bytes(what, (int64_t) i);
    }
}

// malloc of exactly n bytes (1 for n == 0, so that the pointer is never NULL)
static void * xmalloc(size_t n) {
    void * p = malloc(n ? n : 1);
    if (!p) {
        abort();
    }
    return p;
}

// n activation floats from the input's seed (the first `width` of them are column 0)
static void fill_activations(float * x, int64_t n, uint16_t seed) {
    uint32_t s = 0x9e3779b9u ^ seed;
    const float scale = (seed & 0x8000) ? 1e4f : 1.0f;
    for (int64_t k = 0; k < n; ++k) {
        const uint32_t r = xorshift(&s);
        x[k] = (r & 7) == 0 ? 0.0f : scale * ((float) (r >> 8) / (float) (1u << 24) - 0.5f);
    }
}

// Sum over a row's blocks of |terms| of the kernel's formula d_w * (d_x * sum q*xq - z * s_x), for
// one activation row `a` (block form): bounds the float rounding of any summation order. A gqsa3
// row is bounded by its gqsa4 widening (gqsa3_to_gqsa4: the same codes, zero points and scales).
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

// The scalar vec_dot of row r against the double-precision dot product of the dequantized operands
// (wdq: nrows x width dequantized weights; xdq: the dequantized activation row). The reference
// carries an error of its own: xdq = d_x * q_x is rounded per element (wdq = (q - z) * d_w is
// exact: 11 by 4 bits), up to 2^-24 of each product. The kernel's bound does not cover it when the
// zero-point term z * s_x cancels (s_x sums the activations before rounding), so it is added, four
// times over.
static void check_dense(const char * what, int64_t r, float scalar, const float * wdq, const float * xdq,
                        int64_t width, double bound, int64_t n_kept) {
    double ref = 0.0, ref_abs = 0.0;
    for (int64_t k = 0; k < width; ++k) {
        const double t = (double) wdq[r * width + k] * (double) xdq[k];
        ref += t;
        ref_abs += fabs(t);
    }
    check_close(what, r, scalar, ref, bound, n_kept, 4.0 * 0x1p-24 * ref_abs);
}

// The repacked (superblock) decode path of either type, where this build has it, on validated rows
// w (nrows rows of n_kept blocks of the type). x: the float activation row of width floats, act: its
// gqsa_q8 blocks; scalar[r]: the type's scalar vec_dot of row r with act, bound[r] its abs-terms bound.
// Repacks into an exactly sized buffer and checks that unpacking gives the rows back; quantizes the
// decode activations (32 bytes a group: ggml_gqsa_sb_act_bytes(G)) by the SIMD and the scalar
// quantizer, which must give the bytes of act; then the decode kernels, SIMD and scalar, row by row
// against the scalar vec_dot. The kernels use unaligned loads only: malloc's alignment is enough.
static void check_sb(const uint8_t * w, bool g3, int64_t nrows, int64_t n_kept, int64_t width, uint16_t seed,
                     const float * x, const block_gqsa_q8 * act, const float * scalar, const double * bound) {
    if (!ggml_gqsa_sb_available() || !ggml_gqsa_sb_supported((int) n_kept)) {
        return;
    }
    const int64_t G = width / GQSA_GROUP_SIZE;
    const size_t nbytes = (size_t) (nrows * n_kept) * (g3 ? sizeof(block_gqsa3) : sizeof(block_gqsa4));
    uint8_t * rp   = xmalloc(nbytes);
    uint8_t * back = xmalloc(nbytes);
    if (g3) {
        ggml_gqsa3_sb_repack(w, rp, (int) n_kept, nrows);
        ggml_gqsa3_sb_unpack(rp, back, (int) n_kept, nrows);
    } else {
        ggml_gqsa_sb_repack(w, rp, (int) n_kept, nrows);
        ggml_gqsa_sb_unpack(rp, back, (int) n_kept, nrows);
    }
    check_same_bytes(g3 ? "ggml_gqsa3_sb_unpack(ggml_gqsa3_sb_repack(rows)) vs rows"
                        : "ggml_gqsa_sb_unpack(ggml_gqsa_sb_repack(rows)) vs rows", back, w, nbytes);

    // decode activations: the SIMD quantizer in two calls (groups [0, gm), [gm, G): the driver splits
    // the groups among threads), the scalar one in one
    const size_t abytes = ggml_gqsa_sb_act_bytes(G);
    uint8_t * ya = xmalloc(abytes);
    uint8_t * yg = xmalloc(abytes);
    const int64_t gm = (int64_t) (seed & 0x7FFF) % (G + 1);
    ggml_gqsa_sb_quantize_act(x, ya, G, 0, gm);
    ggml_gqsa_sb_quantize_act(x, ya, G, gm, G);
    ggml_gqsa_sb_quantize_act_generic(x, yg, G, 0, G);
    check_same_bytes("ggml_gqsa_sb_quantize_act vs _generic", ya, yg, abytes);
    for (int64_t g = 0; g < G; ++g) {           // group g at 32 g: qs[16], then floats d, s, 0, 0
        uint8_t want[GQSA_SB_ACT_GROUP_BYTES];
        const float ds[4] = { act[g].d, act[g].s, 0.0f, 0.0f };
        memcpy(want, act[g].qs, GQSA_GROUP_SIZE);
        memcpy(want + GQSA_GROUP_SIZE, ds, sizeof(ds));
        check_same_bytes("ggml_gqsa_sb_quantize_act_generic vs the gqsa_q8 activations",
                         yg + g * GQSA_SB_ACT_GROUP_BYTES, want, sizeof(want));
    }

    float * out   = xmalloc((size_t) nrows * sizeof(float));
    float * out_g = xmalloc((size_t) nrows * sizeof(float));
    if (g3) {
        ggml_gqsa3_sb_rows(rp, (int) n_kept, nrows, ya, G, out);
        ggml_gqsa3_sb_rows_generic(rp, (int) n_kept, nrows, yg, G, out_g);
    } else {
        ggml_gqsa_sb_rows(rp, (int) n_kept, nrows, ya, G, out);
        ggml_gqsa_sb_rows_generic(rp, (int) n_kept, nrows, yg, G, out_g);
    }
    for (int64_t r = 0; r < nrows; ++r) {
        check_close(g3 ? "ggml_gqsa3_sb_rows vs gqsa3 scalar vec_dot" : "ggml_gqsa_sb_rows vs scalar vec_dot",
                    r, out[r], scalar[r], bound[r], n_kept, 0.0);
        check_close(g3 ? "ggml_gqsa3_sb_rows_generic vs gqsa3 scalar vec_dot"
                       : "ggml_gqsa_sb_rows_generic vs scalar vec_dot",
                    r, out_g[r], scalar[r], bound[r], n_kept, 0.0);
    }
    free(rp); free(back); free(ya); free(yg); free(out); free(out_g);
}

// Runs every gqsa4 kernel entry point on validated data and checks them against each other; every
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
    float * scal  = xmalloc((size_t) nrows * sizeof(float));
    double * bnd  = xmalloc((size_t) nrows * sizeof(double));

    fill_activations(x, P * width, seed);
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
        scal[r] = scalar;
        bnd[r]  = bound;
        if (dense) {
            check_dense("scalar vec_dot vs dequantized dot product", r, scalar, wdq, xdq, width, bound, n_kept);
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

    // repacked rows against column 0
    check_sb(w, false, nrows, n_kept, width, seed, x, act, scal, bnd);
    free(x); free(xdq); free(act); free(panel); free(wdq); free(rows); free(rows_g); free(pout); free(pout_g);
    free(scal); free(bnd);
}

// The gqsa3 kernels on validated data: the file layout's vec_dot (SIMD, scalar) against each other,
// the scalar one against the dequantized dot product and against the gqsa4 scalar vec_dot of the
// rows widened by gqsa3_to_gqsa4; then the repacked rows.
static void check_kernels3(const uint8_t * w, int64_t nrows, int64_t n_kept, int64_t width, uint16_t seed) {
    const int64_t n_groups = width / GQSA_GROUP_SIZE;
    const block_gqsa3 * blocks = (const block_gqsa3 *) w;
    const bool dense = nrows * width <= (1 << 18);      // as for gqsa4
    float * x   = xmalloc((size_t) width * sizeof(float));
    float * xdq = xmalloc((size_t) width * sizeof(float));
    block_gqsa_q8 * act = xmalloc((size_t) n_groups * sizeof(block_gqsa_q8));
    block_gqsa4 * wide  = xmalloc((size_t) (nrows * n_kept) * sizeof(block_gqsa4));
    float * wdq   = xmalloc((size_t) (dense ? nrows * width : 0) * sizeof(float));
    float * scal  = xmalloc((size_t) nrows * sizeof(float));
    double * bnd  = xmalloc((size_t) nrows * sizeof(double));

    fill_activations(x, width, seed);
    quantize_row_gqsa_q8(x, act, width);
    dequantize_row_gqsa_q8(act, xdq, width);
    for (int64_t i = 0; i < nrows * n_kept; ++i) {
        gqsa3_to_gqsa4(blocks + i, wide + i);
    }
    if (dense) {
        ggml_gqsa3_dequantize_rows(w, nrows, n_kept, width, wdq);
    }
    for (int64_t r = 0; r < nrows; ++r) {
        const block_gqsa3 * row  = blocks + r * n_kept;
        const block_gqsa4 * row4 = wide + r * n_kept;
        const int n = (int) (n_kept * GQSA_GROUP_SIZE);
        float simd = 0.0f, scalar = 0.0f, scalar4 = 0.0f;
        ggml_vec_dot_gqsa3_gqsa_q8(n, &simd, 0, row, 0, act, 0, 1);
        ggml_vec_dot_gqsa3_gqsa_q8_generic(n, &scalar, 0, row, 0, act, 0, 1);
        ggml_vec_dot_gqsa4_gqsa_q8_generic(n, &scalar4, 0, row4, 0, act, 0, 1);
        const double bound = gqsa_abs_terms(row4, n_kept, act);
        scal[r] = scalar;
        bnd[r]  = bound;
        if (dense) {
            check_dense("gqsa3 scalar vec_dot vs dequantized dot product", r, scalar, wdq, xdq, width, bound, n_kept);
        }
        check_close("gqsa3 SIMD vec_dot vs scalar", r, simd, scalar, bound, n_kept, 0.0);
        check_close("gqsa3 scalar vec_dot vs gqsa4 scalar vec_dot of the widened row", r, scalar, scalar4, bound,
                    n_kept, 0.0);
    }
    check_sb(w, true, nrows, n_kept, width, seed, x, act, scal, bnd);
    free(x); free(xdq); free(act); free(wide); free(wdq); free(scal); free(bnd);
}

int LLVMFuzzerTestOneInput(const uint8_t * in, size_t size) {
    if (size < 8) {
        return 0;
    }
    const int64_t groups  = (in[0] | (in[1] << 8)) & 0x1FFF;
    const int64_t n_kept  = (in[2] | (in[3] << 8)) & 0x1FFF;
    const bool    g3      = (in[3] & 0x80) != 0;        // bit 15 of the n_kept field: gqsa3
    const int64_t width   = groups * GQSA_GROUP_SIZE + (in[4] & 15);
    const int64_t ne0     = n_kept * GQSA_GROUP_SIZE + (in[4] >> 4);
    const int64_t max_rows = (int64_t) in[5] + 1;
    const uint16_t seed   = (uint16_t) (in[6] | (in[7] << 8));
    const size_t bbytes   = g3 ? sizeof(block_gqsa3) : sizeof(block_gqsa4);
    const size_t row_bytes = (size_t) (ne0 / GQSA_GROUP_SIZE) * bbytes;
    const size_t avail = size - 8;
    int64_t nrows = row_bytes ? (int64_t) (avail / row_bytes) : max_rows;
    nrows = nrows < max_rows ? nrows : max_rows;

    const size_t nbytes = (size_t) nrows * row_bytes;
    uint8_t * data = malloc(nbytes ? nbytes : 1);      // exactly the tensor's bytes
    memcpy(data, in + 8, nbytes);

    struct ggml_tensor t;
    memset(&t, 0, sizeof(t));
    t.type  = g3 ? GGML_TYPE_GQSA3 : GGML_TYPE_GQSA4;
    t.ne[0] = ne0; t.ne[1] = nrows; t.ne[2] = 1; t.ne[3] = 1;
    t.nb[0] = bbytes;
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
    } else if (g3) {
        check_kernels3(data, nrows, n_kept, width, seed);
    } else {
        check_kernels(data, nrows, n_kept, width, seed);
    }
    // The dequantizer promises to stay in bounds on unvalidated data too, for any shape it is
    // given that fits its buffers (a positive width that is a multiple of 16).
    if (!ok && width > 0 && width % GQSA_GROUP_SIZE == 0 && nrows * width <= (1 << 16)) {
        float * out = malloc((size_t) (nrows * width) * sizeof(float) + 1);
        (g3 ? ggml_gqsa3_dequantize_rows : ggml_gqsa_dequantize_rows)(data, nrows, ne0 / GQSA_GROUP_SIZE, width, out);
        free(out);
    }
    free(data);
    return 0;
}
