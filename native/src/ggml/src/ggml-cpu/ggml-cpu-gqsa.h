// GQSA CPU kernels (gqsa-gguf). See ggml-gqsa.h for the block layouts.
#pragma once

#include "ggml.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// from_float of the activation type gqsa_q8 (k % 16 == 0)
void quantize_row_gqsa_q8(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);
// from_float of gqsa4 itself: a dense row, every group kept
void quantize_row_gqsa4(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k);

// Dot product of one gqsa4 row of n stored weights (n/16 blocks) with a gqsa_q8 activation row of
// the full logical width: each block reads the activation group its index names.
void ggml_vec_dot_gqsa4_gqsa_q8(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);
// The scalar reference of the above; every SIMD path is tested against it.
void ggml_vec_dot_gqsa4_gqsa_q8_generic(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx,
                                        size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc);

#ifdef __cplusplus
}
#endif
