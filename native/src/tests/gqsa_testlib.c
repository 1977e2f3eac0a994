// libgqsa_native: a thin C entry point into the patched ggml for the Python tests (ctypes).
// Every function runs the real library code paths: ggml_mul_mat through the CPU backend's
// multi-threaded graph compute, the registered type traits, and the load-time validator.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "gqsa.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define GQSA_TESTLIB_API __attribute__((visibility("default")))

// The scalar reference kernel and the kernels' ISA name live in ggml-cpu (not part of its public API).
void ggml_vec_dot_gqsa4_gqsa_q8_generic(int n, float * s, size_t bs, const void * vx, size_t bx,
                                        const void * vy, size_t by, int nrc);
void ggml_vec_dot_gqsa3_gqsa_q8_generic(int n, float * s, size_t bs, const void * vx, size_t bx,
                                        const void * vy, size_t by, int nrc);
const char * ggml_gqsa_cpu_kernels(void);
const char * ggml_gqsa_sb_kernel(void);
void ggml_gqsa_sb_repack(const void * src, void * dst, int n_kept, int64_t nrows);
void ggml_gqsa_sb_quantize_act(const float * x, void * y, int64_t G, int64_t g0, int64_t g1);
void ggml_gqsa_sb_rows(const void * x, int n_kept, int64_t nrows, const void * y, int64_t G, float * out);

// Which GQSA kernels the ggml-cpu these hooks call was compiled with ("avx2", "avx512vnni", ...).
GQSA_TESTLIB_API const char * gqsa_test_cpu_kernels(void) {
    return ggml_gqsa_cpu_kernels();
}

// The decode step the repacked (superblock) weights run: "avx512" (two superblocks per step in
// 512-bit registers), "avx2" (one per step, 256-bit), or "none" (this build does not repack).
GQSA_TESTLIB_API const char * gqsa_test_sb_kernel(void) {
    return ggml_gqsa_sb_kernel();
}

static struct ggml_context * gqsa_test_ctx(size_t data_bytes) {
    struct ggml_init_params params = {
        /*.mem_size   =*/ data_bytes + 16 * ggml_tensor_overhead() + ggml_graph_overhead() + (1 << 20),
        /*.mem_buffer =*/ NULL,
        /*.no_alloc   =*/ false,
    };
    return ggml_init(params);
}

typedef void (*gqsa_test_vec_dot_fn)(int n, float * s, size_t bs, const void * vx, size_t bx, const void * vy,
                                     size_t by, int nrc);

// The GQSA weight types these hooks take, each with its scalar reference kernel (its block bytes:
// ggml_type_size). Every hook takes the type (GGML_TYPE_GQSA4 or GGML_TYPE_GQSA3) and returns 6
// for any other (but the validator's, which hands any type to the validator).
typedef struct {
    int                  type;
    gqsa_test_vec_dot_fn vec_dot_generic;
} gqsa_test_type;

static const gqsa_test_type * gqsa_test_type_of(int type) {
    static const gqsa_test_type types[] = {
        { GGML_TYPE_GQSA4, ggml_vec_dot_gqsa4_gqsa_q8_generic },
        { GGML_TYPE_GQSA3, ggml_vec_dot_gqsa3_gqsa_q8_generic },
    };
    for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); ++i) {
        if (types[i].type == type) {
            return &types[i];
        }
    }
    return NULL;
}

// out[c, r] = sum_k W[r, k] * x[c, k]: W is `nrows` rows of n_kept blocks of `type` (gqsa4 or gqsa3;
// logical width `width`), x is `ncols` rows of `width` floats. Returns 0 on success.
GQSA_TESTLIB_API int gqsa_test_mul_mat_type(int type, const void * w, int64_t n_kept, int64_t nrows, int64_t width,
                                            const float * x, int64_t ncols, int n_threads, float * out) {
    if (!gqsa_test_type_of(type)) {
        return 6;
    }
    const size_t w_bytes = (size_t) (nrows * n_kept) * ggml_type_size((enum ggml_type) type);
    const size_t x_bytes = (size_t) (ncols * width) * sizeof(float);
    struct ggml_context * ctx = gqsa_test_ctx(w_bytes + x_bytes + (size_t) (nrows * ncols) * sizeof(float));
    if (!ctx) {
        return 1;
    }
    struct ggml_tensor * tw = ggml_new_tensor_2d(ctx, (enum ggml_type) type, n_kept * 16, nrows);
    struct ggml_tensor * tx = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, width, ncols);
    memcpy(tw->data, w, w_bytes);
    memcpy(tx->data, x, x_bytes);

    struct ggml_tensor * ty = ggml_mul_mat(ctx, tw, tx);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, ty);
    const enum ggml_status st = ggml_graph_compute_with_ctx(ctx, gf, n_threads);
    if (st == GGML_STATUS_SUCCESS) {
        memcpy(out, ty->data, (size_t) (nrows * ncols) * sizeof(float));
    }
    ggml_free(ctx);
    return st == GGML_STATUS_SUCCESS ? 0 : 2;
}

// One row of `type` through the dispatched (SIMD) kernel or the scalar reference, activations
// quantized by the registered from_float of the row type's vec_dot_type.
GQSA_TESTLIB_API int gqsa_test_vec_dot_type(int type, const void * w_row, int64_t n_kept, const float * x,
                                            int64_t width, int generic, float * out) {
    const gqsa_test_type * T = gqsa_test_type_of(type);
    if (!T) {
        return 6;
    }
    ggml_cpu_init();    // the fp16 table the scalar kernel reads (idempotent; graph compute does it too)
    const struct ggml_type_traits_cpu * tw = ggml_get_type_traits_cpu((enum ggml_type) type);
    const struct ggml_type_traits_cpu * ta = ggml_get_type_traits_cpu(tw->vec_dot_type);
    const size_t act_bytes = ggml_row_size(tw->vec_dot_type, width);
    unsigned char act[65536 / 16 * 64];
    if (act_bytes > sizeof(act)) {
        return 1;
    }
    ta->from_float(x, act, width);
    (generic ? T->vec_dot_generic : tw->vec_dot)((int) (n_kept * 16), out, 0, w_row, 0, act, 0, 1);
    return 0;
}

// The registered activation quantizer (gqsa_q8 from_float), for bit-exactness with NumPy.
GQSA_TESTLIB_API void gqsa_test_quantize_act(const float * x, int64_t width, void * out) {
    ggml_cpu_init();
    const struct ggml_type_traits_cpu * tw = ggml_get_type_traits_cpu(GGML_TYPE_GQSA4);
    ggml_get_type_traits_cpu(tw->vec_dot_type)->from_float(x, out, width);
}

// The load-time validator on a tensor of the given type and shape (any type: the validator refuses
// what is not a GQSA weight type). Returns 1 if valid, 0 with `err` set.
GQSA_TESTLIB_API int gqsa_test_validate_type(int type, const void * data, int64_t ne0, int64_t nrows, int64_t width,
                                             char * err, size_t err_size) {
    struct ggml_init_params params = { ggml_tensor_overhead() * 2, NULL, true };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * t = ggml_new_tensor_2d(ctx, (enum ggml_type) type, ne0, nrows);
    ggml_set_name(t, "test.weight");
    const int ok = ggml_gqsa_validate(t, data, width, err, err_size) ? 1 : 0;
    ggml_free(ctx);
    return ok;
}

static double gqsa_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + 1e-9 * (double) ts.tv_nsec;
}

// Best-of-`reps` seconds for y = W x through ggml_mul_mat on the CPU backend, for any weight type:
// W is `nrows` rows of `ne0` elements of `type` (raw bytes in `w`), x is `ncols` x `width` floats.
// Used by the kernel benchmark to time gqsa4 against stock types side by side in one process.
GQSA_TESTLIB_API double gqsa_test_time_mul_mat(int type, const void * w, int64_t ne0, int64_t nrows, int64_t width,
                                               int64_t ncols, int n_threads, int reps) {
    const size_t w_bytes = ggml_row_size((enum ggml_type) type, ne0) * (size_t) nrows;
    struct ggml_context * ctx = gqsa_test_ctx(w_bytes + (size_t) (ncols * width + nrows * ncols) * sizeof(float));
    if (!ctx) {
        return -1.0;
    }
    struct ggml_tensor * tw = ggml_new_tensor_2d(ctx, (enum ggml_type) type, ne0, nrows);
    struct ggml_tensor * tx = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, width, ncols);
    memcpy(tw->data, w, w_bytes);
    float * xd = (float *) tx->data;
    for (int64_t i = 0; i < ncols * width; ++i) {
        xd[i] = (float) ((i * 7919) % 2001 - 1000) * 1e-3f;
    }
    struct ggml_tensor * ty = ggml_mul_mat(ctx, tw, tx);
    struct ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, ty);
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        const double t0 = gqsa_now();
        if (ggml_graph_compute_with_ctx(ctx, gf, n_threads) != GGML_STATUS_SUCCESS) {
            best = -1.0;
            break;
        }
        const double dt = gqsa_now() - t0;
        best = dt < best ? dt : best;
    }
    ggml_free(ctx);
    return best;
}

// ---- read bandwidth (gqsa-gguf bench: the bound of each format's decode speed) ----------------

#include <pthread.h>
#include <stdlib.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

typedef struct {
    const uint64_t * p;
    size_t           n;      // words
    uint64_t         sum;
} gqsa_bw_part;

static void * gqsa_bw_read(void * arg) {
    gqsa_bw_part * part = (gqsa_bw_part *) arg;
    uint64_t s[8] = {0};
    for (size_t i = 0; i + 8 <= part->n; i += 8) {       // 8 independent chains: bound by memory
        for (int k = 0; k < 8; ++k) {
            s[k] += part->p[i + k];
        }
    }
    part->sum = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
    return NULL;
}

// Best read bandwidth in bytes/s over `repeats` passes of `threads` threads each summing its part of
// a `bytes` buffer (huge pages where the system grants them, like the CPU_GQSA weights): an upper
// estimate of what a decode kernel can stream. Returns a negative value on failure.
GQSA_TESTLIB_API double gqsa_read_bandwidth(int threads, size_t bytes, int repeats) {
    if (threads < 1 || threads > 256 || repeats < 1) {
        return -1.0;
    }
    const size_t page = (size_t) 2 << 20;
    bytes = (bytes + page - 1) / page * page;
    uint64_t * buf = (uint64_t *) aligned_alloc(page, bytes);
    if (buf == NULL) {
        return -1.0;
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(buf, bytes, MADV_HUGEPAGE);
#endif
    memset(buf, 1, bytes);
    const size_t words = bytes / sizeof(uint64_t);
    gqsa_bw_part parts[256];
    pthread_t ids[256];
    double best = 0.0;
    uint64_t check = 0;
    for (int r = 0; r < repeats; ++r) {
        const double t0 = gqsa_now();
        for (int t = 0; t < threads; ++t) {
            parts[t].p = buf + words * (size_t) t / (size_t) threads;
            parts[t].n = words * (size_t) (t + 1) / (size_t) threads - words * (size_t) t / (size_t) threads;
            if (t > 0 && pthread_create(&ids[t], NULL, gqsa_bw_read, &parts[t]) != 0) {
                free(buf);
                return -1.0;
            }
        }
        gqsa_bw_read(&parts[0]);
        for (int t = 1; t < threads; ++t) {
            pthread_join(ids[t], NULL);
        }
        const double dt = gqsa_now() - t0;
        for (int t = 0; t < threads; ++t) {
            check += parts[t].sum;
        }
        if (dt > 0 && (double) bytes / dt > best) {
            best = (double) bytes / dt;
        }
    }
    free(buf);
    return check == 0 ? -1.0 : best;          // the sums are never 0 (memset 1): keeps the reads
}

// The CPU backend's CPU_GQSA buffer type (repacked weights), found as llama.cpp finds it: among the
// extra buffer types the CPU device offers. NULL where the build does not repack.
static ggml_backend_buffer_type_t gqsa_test_repack_buft(ggml_backend_t be) {
    ggml_backend_dev_t dev = ggml_backend_get_device(be);
    typedef ggml_backend_buffer_type_t * (*get_extra_fn)(ggml_backend_dev_t);
    void * proc = ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_dev_get_extra_bufts");
    get_extra_fn get_extra = NULL;
    memcpy(&get_extra, &proc, sizeof(get_extra));          // ISO C has no cast from object to function pointer
    for (ggml_backend_buffer_type_t * b = get_extra ? get_extra(dev) : NULL; b && *b; ++b) {
        if (strcmp(ggml_backend_buft_name(*b), "CPU_GQSA") == 0) {
            return *b;
        }
    }
    return NULL;
}

// A weight of `type` (nrows rows of n_kept blocks) in the CPU_GQSA buffer type of a fresh CPU
// backend, allocated as llama.cpp allocates a model's weights (the buffer type's init_tensor may
// refuse it). gqsa_repacked_open returns 0, or 6 for a type that is not GQSA, 1 if the backend does
// not start, 3 if this build offers no CPU_GQSA buffer type, 4 if it refuses the weight; the
// weight's bytes are written by the caller (ggml_backend_tensor_set repacks them).
// gqsa_repacked_close frees whatever open made, also after it failed.
struct gqsa_repacked {
    ggml_backend_t be;
    ggml_backend_buffer_type_t buft;
    struct ggml_context * wctx;
    struct ggml_tensor * tw;
    ggml_backend_buffer_t wbuf;
};

static int gqsa_repacked_open(struct gqsa_repacked * r, int type, int64_t n_kept, int64_t nrows) {
    memset(r, 0, sizeof(*r));
    if (!gqsa_test_type_of(type)) {
        return 6;
    }
    r->be = ggml_backend_cpu_init();
    if (!r->be) {
        return 1;
    }
    r->buft = gqsa_test_repack_buft(r->be);
    if (!r->buft) {
        return 3;
    }
    struct ggml_init_params params = { 2 * ggml_tensor_overhead(), NULL, true };
    r->wctx = ggml_init(params);
    r->tw = ggml_new_tensor_2d(r->wctx, (enum ggml_type) type, n_kept * 16, nrows);
    r->wbuf = ggml_backend_alloc_ctx_tensors_from_buft(r->wctx, r->buft);
    return r->wbuf ? 0 : 4;
}

static void gqsa_repacked_close(struct gqsa_repacked * r) {
    ggml_backend_buffer_free(r->wbuf);
    if (r->wctx) {
        ggml_free(r->wctx);
    }
    if (r->be) {
        ggml_backend_free(r->be);
    }
}

// gqsa_test_mul_mat_type with the weight in the CPU_GQSA buffer type, as llama.cpp places a model's
// weights: ggml_backend_tensor_set repacks it into superblocks, and the CPU backend's graph compute
// runs the superblock kernels (ggml_gqsa_mul_mat_sb). Returns 0 on success, 3 if this build offers no
// CPU_GQSA buffer type, 4 if it refuses the weight (rows of fewer than 8 blocks), else nonzero.
GQSA_TESTLIB_API int gqsa_test_mul_mat_repacked_type(int type, const void * w, int64_t n_kept, int64_t nrows,
                                                     int64_t width, const float * x, int64_t ncols, int n_threads,
                                                     float * out) {
    struct gqsa_repacked r;
    int rc = gqsa_repacked_open(&r, type, n_kept, nrows);
    if (rc != 0) {
        gqsa_repacked_close(&r);
        return rc;
    }
    struct ggml_init_params params = { 8 * ggml_tensor_overhead() + ggml_graph_overhead(), NULL, true };
    struct ggml_context * ctx = ggml_init(params);
    struct ggml_tensor * tx = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, width, ncols);
    struct ggml_tensor * ty = ggml_mul_mat(ctx, r.tw, tx);
    ggml_backend_buffer_t abuf = ggml_backend_alloc_ctx_tensors(ctx, r.be);
    if (!abuf) {
        rc = 1;
    } else {
        ggml_backend_tensor_set(r.tw, w, 0, ggml_nbytes(r.tw));
        ggml_backend_tensor_set(tx, x, 0, ggml_nbytes(tx));
        struct ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, ty);
        ggml_backend_cpu_set_n_threads(r.be, n_threads);
        if (!ggml_backend_supports_op(r.be, ty)) {
            rc = 5;
        } else if (ggml_backend_graph_compute(r.be, gf) != GGML_STATUS_SUCCESS) {
            rc = 2;
        } else {
            ggml_backend_tensor_get(ty, out, 0, ggml_nbytes(ty));
        }
    }
    ggml_backend_buffer_free(abuf);
    ggml_free(ctx);
    gqsa_repacked_close(&r);
    return rc;
}

// A weight of `type` (gqsa4 or gqsa3: nrows rows of n_kept blocks at `w`) written into the CPU_GQSA
// buffer type and read back (repacked, then unpacked) into `back` (as many bytes as w). *alloc_size:
// the bytes the buffer type allocates for it (the file's: superblocks keep them), *buffer_size: the
// buffer's. Returns 0 on success, 3 if this build offers no CPU_GQSA buffer type, 4 if it refuses
// the weight, else nonzero.
GQSA_TESTLIB_API int gqsa_test_repacked_roundtrip(int type, const void * w, int64_t n_kept, int64_t nrows, void * back,
                                                  size_t * alloc_size, size_t * buffer_size) {
    struct gqsa_repacked r;
    int rc = gqsa_repacked_open(&r, type, n_kept, nrows);
    if (r.tw) {
        *alloc_size = ggml_backend_buft_get_alloc_size(r.buft, r.tw);
    }
    if (rc == 0) {
        *buffer_size = ggml_backend_buffer_get_size(r.wbuf);
        ggml_backend_tensor_set(r.tw, w, 0, ggml_nbytes(r.tw));
        ggml_backend_tensor_get(r.tw, back, 0, ggml_nbytes(r.tw));
    }
    gqsa_repacked_close(&r);
    return rc;
}

// Per-block time of the decode kernel on repacked weights, 1 thread: `w` (nrows gqsa4 rows of
// n_kept >= 8 blocks, logical width `width`) is repacked once, then ggml_gqsa_sb_rows
// runs `reps` times over all rows against one quantized activation row. Returns the median thread
// CPU time per block in nanoseconds (weights larger than the caches: the streaming cost; small ones:
// the in-cache cost), negative on failure.
static int gqsa_cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

GQSA_TESTLIB_API double gqsa_test_time_sb_rows(const void * w, int64_t n_kept, int64_t nrows, int64_t width, int reps) {
    if (n_kept < 8 || reps < 1 || reps > 1000) {
        return -1.0;
    }
    const int64_t G = width / 16;
    const size_t wbytes = (size_t) (n_kept * nrows) * ggml_type_size(GGML_TYPE_GQSA4);
    void * t = aligned_alloc(64, (wbytes + 63) / 64 * 64);
    void * y = aligned_alloc(64, (size_t) G * 32);
    float * x = (float *) malloc(sizeof(float) * (size_t) width);
    float * out = (float *) malloc(sizeof(float) * (size_t) nrows);
    double * dt = (double *) malloc(sizeof(double) * (size_t) reps);
    if (!t || !y || !x || !out || !dt) {
        free(t); free(y); free(x); free(out); free(dt);
        return -1.0;
    }
    ggml_cpu_init();
    for (int64_t i = 0; i < width; ++i) {
        x[i] = (float) ((i * 7919) % 2001 - 1000) * 1e-3f;
    }
    ggml_gqsa_sb_repack(w, t, (int) n_kept, nrows);
    ggml_gqsa_sb_quantize_act(x, y, G, 0, G);
    ggml_gqsa_sb_rows(t, (int) n_kept, nrows, y, G, out);           // warm-up
    for (int r = 0; r < reps; ++r) {
        struct timespec a, b;
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
        ggml_gqsa_sb_rows(t, (int) n_kept, nrows, y, G, out);
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
        dt[r] = (double) (b.tv_sec - a.tv_sec) * 1e9 + (double) (b.tv_nsec - a.tv_nsec);
    }
    qsort(dt, (size_t) reps, sizeof(double), gqsa_cmp_double);
    const double med = dt[reps / 2] / (double) (n_kept * nrows);
    free(t); free(y); free(x); free(out); free(dt);
    return med;
}
