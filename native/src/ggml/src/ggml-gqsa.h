// GQSA: group-quantized, group-sparse 4-bit weights (gqsa-gguf, arXiv 2412.17560 §3.2).
// docs/FORMAT.md is the specification; gqsa_gguf/format.py holds the same numbers for Python,
// and tests/test_format.py checks that all three agree.
#pragma once

#include "ggml.h"
#include "ggml-impl.h"

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>

#define GQSA_FORMAT_VERSION  1
#define GQSA_TYPE_ID         128   // GGML_TYPE_GQSA4
#define GQSA_Q8_TYPE_ID      129   // GGML_TYPE_GQSA_Q8 (runtime activations, never in files)
#define GQSA_GROUP_SIZE      16
#define GQSA_BLOCK_BYTES     12
#define GQSA_ACT_BLOCK_BYTES 24
#define GQSA_BITS            4     // bits per stored weight
#define GQSA_QMAX            ((1 << GQSA_BITS) - 1)   // 15: the largest code q and zero point z
#define GQSA_INDEX_BITS      12
#define GQSA_INDEX_MASK      ((1u << GQSA_INDEX_BITS) - 1)
#define GQSA_MAX_GROUPS      (1 << GQSA_INDEX_BITS)

// fp16 limits of a block's scale d (docs/FORMAT.md "Reference quantizer"): a nonzero range never
// rounds to d = 0, and a range beyond fp16 is clamped to the largest finite value
#define GQSA_FP16_MAX                65504.0f  // largest finite fp16
#define GQSA_FP16_MAX_BITS           0x7bff    // GQSA_FP16_MAX as ggml_fp16_t bits
#define GQSA_FP16_MIN_SUBNORMAL_BITS 0x0001    // 2^-24, the smallest positive fp16, as ggml_fp16_t bits

// GGUF metadata keys the loader checks (docs/FORMAT.md "GGUF metadata")
#define GQSA_KEY_FORMAT_VERSION "gqsa.format_version"
#define GQSA_KEY_BITS           "gqsa.bits"
#define GQSA_KEY_GROUP_SIZE     "gqsa.group_size"
#define GQSA_KEY_TENSOR_NAMES   "gqsa.tensor_names"
#define GQSA_KEY_TENSOR_WIDTHS  "gqsa.tensor_widths"

#ifdef __cplusplus
extern "C" {
#endif

// One kept group of 16 weights: w[16*g + j] = (q[j] - z) * d.
// 16 + 12 + 4 + 64 = 96 bits per 16 stored weights: 6 bits per stored weight, so 6*keep bits per
// logical weight (3.0 at 50 % sparsity). Rows keep the same number of groups, sorted by index g.
typedef struct {
    ggml_fp16_t d;                        // scale
    uint16_t  iz;                       // bits 0..11: group index g in the row; bits 12..15: zero point z
    uint8_t   qs[GQSA_GROUP_SIZE / 2];  // q[j] | q[j+8] << 4
} block_gqsa4;
static_assert(sizeof(block_gqsa4) == GQSA_BLOCK_BYTES, "wrong gqsa4 block size/padding");

// Activations for gqsa4 dot products, 16 per block so any width divisible by 16 works:
// x[j] ~ d * qs[j]; s = d * sum(qs) serves the zero-point term.
typedef struct {
    float  d;
    float  s;
    int8_t qs[GQSA_GROUP_SIZE];
} block_gqsa_q8;
static_assert(sizeof(block_gqsa_q8) == GQSA_ACT_BLOCK_BYTES, "wrong gqsa_q8 block size/padding");

static inline uint32_t gqsa_block_index(const block_gqsa4 * b) { return b->iz & GQSA_INDEX_MASK; }
static inline uint32_t gqsa_block_zero (const block_gqsa4 * b) { return b->iz >> GQSA_INDEX_BITS; }

// ggml type-trait functions. A gqsa4 "row" handed to them holds k/16 blocks; quantizing a dense
// row keeps every group (index j for block j), dequantizing gives the stored weights in storage
// order (use ggml_gqsa_dequantize_row_dense for the logical row).
void   quantize_row_gqsa4_ref(const float * GGML_RESTRICT x, block_gqsa4 * GGML_RESTRICT y, int64_t k);
void   dequantize_row_gqsa4  (const block_gqsa4 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
size_t quantize_gqsa4(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrow,
                      int64_t n_per_row, const float * imatrix);

void   quantize_row_gqsa_q8_ref(const float * GGML_RESTRICT x, block_gqsa_q8 * GGML_RESTRICT y, int64_t k);
void   dequantize_row_gqsa_q8  (const block_gqsa_q8 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);

// Min-max quantization of one group (docs/FORMAT.md "Reference quantizer"), bit-exact with
// gqsa_gguf.codec.quantize_groups.
void   gqsa_quantize_group(const float * GGML_RESTRICT x, block_gqsa4 * GGML_RESTRICT y, uint32_t g);

// Row-data check used by ggml_validate_row_data: finite scales only (the width is unknown there).
bool   gqsa4_validate_blocks(const void * data, size_t nbytes);

#ifdef __cplusplus
}
#endif
