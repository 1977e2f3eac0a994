// GQSA: group-quantized, group-sparse 4-bit (gqsa4) and 3-bit (gqsa3) weights (gqsa-gguf, arXiv 2412.17560 §3.2).
// docs/FORMAT.md is the specification; gqsa_gguf/format.py holds the same numbers for Python,
// and tests/test_format.py checks that all three agree.
#pragma once

#include "ggml.h"
#include "ggml-impl.h"
#include "gqsa.h"

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

// The 3-bit type (docs/FORMAT.md "The 3-bit type gqsa3"): same groups, index, scale and rules
#define GQSA3_TYPE_ID        130   // GGML_TYPE_GQSA3
#define GQSA3_BLOCK_BYTES    10
#define GQSA3_BITS           3
#define GQSA3_QMAX           ((1 << GQSA3_BITS) - 1)  // 7: the largest code q and zero point z

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

// One kept group of 16 weights with 3-bit codes: w[16*g + j] = (q[j] - z) * d, q[j] and z in 0..7.
// 16 + 12 + 4 + 48 = 80 bits per 16 stored weights: 5 bits per stored weight, 5*keep per logical
// weight (3.0 at 40 % sparsity). The CPU backend repacks rows of 8 blocks or more into 80-byte
// superblocks with kernels of their own (ggml-cpu-gqsa.c), and widens the file layout's blocks to
// gqsa4 ones (gqsa3_to_gqsa4) for the gqsa4 kernels.
typedef struct {
    ggml_fp16_t d;                        // scale
    uint16_t  iz;                       // bits 0..11: group index g; bits 12..14: zero point z (bit 15: 0)
    uint8_t   ql[GQSA_GROUP_SIZE / 4];  // low two bits: q[j] | q[j+4] << 2 | q[j+8] << 4 | q[j+12] << 6
    uint16_t  qh;                       // third bits: bit j = q[j] >> 2
} block_gqsa3;
static_assert(sizeof(block_gqsa3) == GQSA3_BLOCK_BYTES, "wrong gqsa3 block size/padding");

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

// code j (0..15) of a gqsa3 block
static inline int gqsa3_code(const block_gqsa3 * b, int j) {
    return ((b->ql[j & 3] >> (2 * (j >> 2))) & 3) | ((b->qh >> j) & 1) << 2;
}

// A gqsa3 block as the gqsa4 block of the same weights: same d and iz, codes widened to nibbles.
// qs[j] = q[j] | q[j+8] << 4: ql[j & 3] (shifted by 2 for j >= 4) holds the low bits of both at
// bits 0-1 and 4-5 (mask 0x33); qh bits j and j+8 go to bits 2 and 6.
static inline void gqsa3_to_gqsa4(const block_gqsa3 * GGML_RESTRICT x, block_gqsa4 * GGML_RESTRICT y) {
    y->d  = x->d;
    y->iz = x->iz;
    for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
        const int lo = (x->ql[j & 3] >> (j & 4 ? 2 : 0)) & 0x33;
        const int hi = ((x->qh >> j) & 1) << 2 | ((x->qh >> (j + GQSA_GROUP_SIZE / 2)) & 1) << 6;
        y->qs[j] = (uint8_t) (lo | hi);
    }
}

// The inverse for a gqsa4 block whose codes and zero point are <= 7 (higher bits are dropped)
static inline void gqsa4_to_gqsa3(const block_gqsa4 * GGML_RESTRICT x, block_gqsa3 * GGML_RESTRICT y) {
    y->d  = x->d;
    y->iz = (uint16_t) (x->iz & 0x7FFF);
    uint32_t qh = 0;
    for (int j = 0; j < GQSA_GROUP_SIZE / 4; ++j) {
        y->ql[j] = 0;
    }
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        const int q = j < GQSA_GROUP_SIZE / 2 ? x->qs[j] & 0x0F : x->qs[j - GQSA_GROUP_SIZE / 2] >> 4;
        y->ql[j & 3] |= (uint8_t) ((q & 3) << (2 * (j >> 2)));
        qh |= (uint32_t) ((q >> 2) & 1) << j;
    }
    y->qh = (uint16_t) qh;
}

// ggml type-trait functions. A gqsa4 "row" handed to them holds k/16 blocks; quantizing a dense
// row keeps every group (index j for block j), dequantizing gives the stored weights in storage
// order (use ggml_gqsa_dequantize_row_dense for the logical row).
void   quantize_row_gqsa4_ref(const float * GGML_RESTRICT x, block_gqsa4 * GGML_RESTRICT y, int64_t k);
void   dequantize_row_gqsa4  (const block_gqsa4 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
size_t quantize_gqsa4(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrow,
                      int64_t n_per_row, const float * imatrix);

void   quantize_row_gqsa3_ref(const float * GGML_RESTRICT x, block_gqsa3 * GGML_RESTRICT y, int64_t k);
void   dequantize_row_gqsa3  (const block_gqsa3 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);
size_t quantize_gqsa3(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrow,
                      int64_t n_per_row, const float * imatrix);

void   quantize_row_gqsa_q8_ref(const float * GGML_RESTRICT x, block_gqsa_q8 * GGML_RESTRICT y, int64_t k);
void   dequantize_row_gqsa_q8  (const block_gqsa_q8 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k);

// Min-max quantization of one group (docs/FORMAT.md "Reference quantizer"), bit-exact with
// gqsa_gguf.codec.quantize_groups.
void   gqsa_quantize_group(const float * GGML_RESTRICT x, block_gqsa4 * GGML_RESTRICT y, uint32_t g);
// The same with QMAX = 7, bit-exact with gqsa_gguf.codec (bits=3)
void   gqsa3_quantize_group(const float * GGML_RESTRICT x, block_gqsa3 * GGML_RESTRICT y, uint32_t g);

// Row-data check used by ggml_validate_row_data: finite scales only (the width is unknown there).
bool   gqsa4_validate_blocks(const void * data, size_t nbytes);
// The same for gqsa3 blocks, and zero points <= 7
bool   gqsa3_validate_blocks(const void * data, size_t nbytes);

#ifdef __cplusplus
}
#endif
