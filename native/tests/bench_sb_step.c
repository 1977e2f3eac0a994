// A/B of two builds of the superblock decode kernel (ggml_gqsa_sb_rows) in one process: the x86
// kernel file compiled twice with different flags (native/tests/Makefile, target bench_sb_step:
// A="-D..." B="-D..."), the two alternating call by call on the same repacked weights, so a busy or
// frequency-shifting machine slows both alike. Prints the median thread CPU time per block of each
// and the median of the per-call ratios B / A with its quartiles, after checking that both give
// the scalar reference's results to float rounding.
//
//   bench_sb_step WIDTH N_KEPT ROWS CALLS     e.g. 4096 128 256 400 (0.4 MB: in cache),
//                                                  4096 128 524288 15 (805 MB: from memory)
#include "ggml-gqsa.h"
#include "ggml-cpu-gqsa.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

void        a_ggml_gqsa_sb_rows(const void * x, int n_kept, int64_t nrows, const void * y, int64_t G, float * out);
void        b_ggml_gqsa_sb_rows(const void * x, int n_kept, int64_t nrows, const void * y, int64_t G, float * out);
const char * a_ggml_gqsa_sb_kernel(void);
const char * b_ggml_gqsa_sb_kernel(void);

static double cpu_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double) t.tv_sec * 1e9 + (double) t.tv_nsec;
}

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static uint32_t rng_state = 1;
static uint32_t rnd(void) {                      // xorshift32: the same weights on every run
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 17; rng_state ^= rng_state << 5;
    return rng_state;
}

int main(int argc, char ** argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s WIDTH N_KEPT ROWS CALLS\n", argv[0]);
        return 2;
    }
    const int width = atoi(argv[1]), n_kept = atoi(argv[2]), nrows = atoi(argv[3]), calls = atoi(argv[4]);
    const int G = width / GQSA_GROUP_SIZE;
    if (width % GQSA_GROUP_SIZE || n_kept < 8 || n_kept % 8 || n_kept > G || nrows < 1 || calls < 1) {
        fprintf(stderr, "need WIDTH %% 16 == 0, N_KEPT a multiple of 8 and <= WIDTH/16, ROWS and CALLS >= 1\n");
        return 2;
    }
    const size_t nb = (size_t) nrows * n_kept;
    block_gqsa4 * x = malloc(nb * sizeof(block_gqsa4));
    gqsa_sb8 * t = aligned_alloc(64, (nb * sizeof(block_gqsa4) + 63) / 64 * 64);
    for (int r = 0; r < nrows; ++r) {             // sorted random groups, random nibbles and zero points
        int g = 0;
        for (int k = 0; k < n_kept; ++k) {
            block_gqsa4 * b = x + (size_t) r * n_kept + k;
            const int room = G - g - (n_kept - k);  // groups that may be skipped before this one
            g += room > 0 ? (int) (rnd() % (uint32_t) (2 * room / (n_kept - k) + 1)) : 0;
            g = g > G - (n_kept - k) ? G - (n_kept - k) : g;
            for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
                b->qs[j] = (uint8_t) rnd();
            }
            b->d  = (ggml_fp16_t) (0x2000 + (rnd() & 0x3FF));
            b->iz = (uint16_t) (g | (rnd() & 15) << GQSA_INDEX_BITS);
            ++g;
        }
    }
    ggml_gqsa_sb_repack(x, t, n_kept, nrows);
    float * act = malloc(sizeof(float) * width);
    for (int i = 0; i < width; ++i) {
        act[i] = (float) ((i * 7919) % 2001 - 1000) * 1e-3f;
    }
    void * y = aligned_alloc(64, ggml_gqsa_sb_act_bytes(G));
    ggml_gqsa_sb_quantize_act_generic(act, y, G, 0, G);
    float * oa = malloc(sizeof(float) * nrows), * ob = malloc(sizeof(float) * nrows), * ref = malloc(sizeof(float) * nrows);
    ggml_gqsa_sb_rows_generic(t, n_kept, nrows, y, G, ref);
    a_ggml_gqsa_sb_rows(t, n_kept, nrows, y, G, oa);
    b_ggml_gqsa_sb_rows(t, n_kept, nrows, y, G, ob);
    float scale = 0.0f;                           // the results' magnitude: float rounding is relative to it
    for (int r = 0; r < nrows; ++r) {
        scale = fabsf(ref[r]) > scale ? fabsf(ref[r]) : scale;
    }
    for (int r = 0; r < nrows; ++r) {
        if (fabsf(oa[r] - ref[r]) > 1e-4f * scale || fabsf(ob[r] - ref[r]) > 1e-4f * scale) {
            printf("row %d: scalar %.9g, A %.9g, B %.9g: the kernels disagree\n", r, (double) ref[r], (double) oa[r], (double) ob[r]);
            return 1;
        }
    }
    double * da = malloc(sizeof(double) * calls), * db = malloc(sizeof(double) * calls), * q = malloc(sizeof(double) * calls);
    for (int c = 0; c < calls; ++c) {
        const double t0 = cpu_ns();
        a_ggml_gqsa_sb_rows(t, n_kept, nrows, y, G, oa);
        const double t1 = cpu_ns();
        b_ggml_gqsa_sb_rows(t, n_kept, nrows, y, G, ob);
        const double t2 = cpu_ns();
        da[c] = (t1 - t0) / (double) nb;
        db[c] = (t2 - t1) / (double) nb;
        q[c]  = db[c] / da[c];
    }
    qsort(da, (size_t) calls, sizeof(double), cmp_double);
    qsort(db, (size_t) calls, sizeof(double), cmp_double);
    qsort(q, (size_t) calls, sizeof(double), cmp_double);
    printf("%d rows x %d wide, %d kept (%.1f MB), %d calls each: A (%s) %.3f ns/block, B (%s) %.3f ns/block "
           "(median thread CPU time); B / A median %.3f, quartiles %.3f-%.3f\n",
           nrows, width, n_kept, (double) (nb * sizeof(block_gqsa4)) / 1e6, calls, a_ggml_gqsa_sb_kernel(), da[calls / 2],
           b_ggml_gqsa_sb_kernel(), db[calls / 2], q[calls / 2], q[calls / 4], q[3 * calls / 4]);
    free(x); free(t); free(act); free(y); free(oa); free(ob); free(ref); free(da); free(db); free(q);
    return 0;
}
