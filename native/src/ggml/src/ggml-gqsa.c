// GQSA group-sparse weights (gqsa4, gqsa3): reference quantization, dequantization and validation
// (ggml-base). Kernels live in ggml-cpu/ggml-cpu-gqsa.c and ggml-cpu/arch/{x86,arm}/ggml-cpu-gqsa.c.
// Specification: docs/FORMAT.md.
#include "ggml-gqsa.h"
#include "gqsa.h"
#include "gguf.h"

#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <inttypes.h>

static inline float gqsa_clampf(float v, float lo, float hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// docs/FORMAT.md "Reference quantizer" with codes 0..qmax; bit-exact with gqsa_gguf.codec.quantize_groups:
// float32 arithmetic, nearbyintf = round half to even (the default rounding mode).
static void gqsa_quantize_minmax(const float * GGML_RESTRICT x, int qmax, uint8_t * GGML_RESTRICT q,
                                 ggml_fp16_t * d_out, uint32_t * z_out) {
    float lo = 0.0f;
    float hi = 0.0f;
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        lo = x[j] < lo ? x[j] : lo;
        hi = x[j] > hi ? x[j] : hi;
    }
    const float s = (hi - lo) / (float) qmax;
    ggml_fp16_t dh = GGML_FP32_TO_FP16(s);
    float     d  = GGML_FP16_TO_FP32(dh);
    if (s > 0.0f && d == 0.0f) {
        dh = GQSA_FP16_MIN_SUBNORMAL_BITS;
        d  = GGML_FP16_TO_FP32(dh);
    }
    if (!(d <= GQSA_FP16_MAX)) {
        dh = GQSA_FP16_MAX_BITS;
        d  = GQSA_FP16_MAX;
    }

    uint32_t z = 0;
    if (d == 0.0f) {
        memset(q, 0, GQSA_GROUP_SIZE);
    } else {
        z = (uint32_t) gqsa_clampf(nearbyintf(-lo / d), 0.0f, (float) qmax);
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            q[j] = (uint8_t) gqsa_clampf(nearbyintf(x[j] / d) + (float) z, 0.0f, (float) qmax);
        }
    }
    *d_out = dh;
    *z_out = z;
}

void gqsa_quantize_group(const float * GGML_RESTRICT x, block_gqsa4 * GGML_RESTRICT y, uint32_t g) {
    uint8_t q[GQSA_GROUP_SIZE];
    uint32_t z;
    gqsa_quantize_minmax(x, GQSA_QMAX, q, &y->d, &z);
    y->iz = (uint16_t) ((g & GQSA_INDEX_MASK) | (z << GQSA_INDEX_BITS));
    for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
        y->qs[j] = (uint8_t) (q[j] | (q[j + GQSA_GROUP_SIZE / 2] << 4));
    }
}

void gqsa3_quantize_group(const float * GGML_RESTRICT x, block_gqsa3 * GGML_RESTRICT y, uint32_t g) {
    uint8_t q[GQSA_GROUP_SIZE];
    uint32_t z;
    gqsa_quantize_minmax(x, GQSA3_QMAX, q, &y->d, &z);
    y->iz = (uint16_t) ((g & GQSA_INDEX_MASK) | (z << GQSA_INDEX_BITS));
    uint32_t qh = 0;
    for (int j = 0; j < GQSA_GROUP_SIZE / 4; ++j) {
        y->ql[j] = (uint8_t) ((q[j] & 3) | (q[j + 4] & 3) << 2 | (q[j + 8] & 3) << 4 | (q[j + 12] & 3) << 6);
    }
    for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
        qh |= (uint32_t) (q[j] >> 2) << j;
    }
    y->qh = (uint16_t) qh;
}

// ---- the row loops of the type traits, written once for both block types ----------------------

// One group of 16 floats into a block of either type (index g); one block into its 16 weights
typedef void (*gqsa_quantize_block_fn)(const float * GGML_RESTRICT x, void * GGML_RESTRICT block, uint32_t g);
typedef void (*gqsa_dequantize_block_fn)(const void * GGML_RESTRICT block, float * GGML_RESTRICT y);

static void gqsa4_quantize_block(const float * GGML_RESTRICT x, void * GGML_RESTRICT block, uint32_t g) {
    gqsa_quantize_group(x, (block_gqsa4 *) block, g);
}

static void gqsa3_quantize_block(const float * GGML_RESTRICT x, void * GGML_RESTRICT block, uint32_t g) {
    gqsa3_quantize_group(x, (block_gqsa3 *) block, g);
}

static void gqsa4_dequantize_block(const void * GGML_RESTRICT block, float * GGML_RESTRICT y) {
    const block_gqsa4 * b = (const block_gqsa4 *) block;
    const float d = GGML_FP16_TO_FP32(b->d);
    const int   z = (int) gqsa_block_zero(b);
    for (int j = 0; j < GQSA_GROUP_SIZE / 2; ++j) {
        y[j]                       = (float) ((b->qs[j] & 0x0F) - z) * d;
        y[j + GQSA_GROUP_SIZE / 2] = (float) ((b->qs[j] >>   4) - z) * d;
    }
}

// the gqsa4 block of the same weights, dequantized: the same (q - z) * d in float
static void gqsa3_dequantize_block(const void * GGML_RESTRICT block, float * GGML_RESTRICT y) {
    block_gqsa4 b4;
    gqsa3_to_gqsa4((const block_gqsa3 *) block, &b4);
    gqsa4_dequantize_block(&b4, y);
}

// A dense row of k floats into k/16 blocks of block_bytes, every group kept (block i: index i)
static void gqsa_quantize_row_ref(gqsa_quantize_block_fn quantize, size_t block_bytes, const float * GGML_RESTRICT x,
                                  void * GGML_RESTRICT y, int64_t k) {
    assert(k % GQSA_GROUP_SIZE == 0);
    const int64_t nb = k / GQSA_GROUP_SIZE;
    assert(nb <= GQSA_MAX_GROUPS);
    for (int64_t i = 0; i < nb; ++i) {
        quantize(x + i * GQSA_GROUP_SIZE, (uint8_t *) y + i * block_bytes, (uint32_t) i);
    }
}

// k/16 blocks of block_bytes into their stored weights, in storage order
static void gqsa_dequantize_row(gqsa_dequantize_block_fn dequantize, size_t block_bytes, const void * GGML_RESTRICT x,
                                float * GGML_RESTRICT y, int64_t k) {
    assert(k % GQSA_GROUP_SIZE == 0);
    const int64_t nb = k / GQSA_GROUP_SIZE;
    for (int64_t i = 0; i < nb; ++i) {
        dequantize((const uint8_t *) x + i * block_bytes, y + i * GQSA_GROUP_SIZE);
    }
}

// ggml's quantize_chunk: nrow dense rows of n_per_row floats into rows of `type`
static size_t gqsa_quantize_chunk(enum ggml_type type, gqsa_quantize_block_fn quantize, size_t block_bytes,
                                  const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrow,
                                  int64_t n_per_row) {
    const size_t row_size = ggml_row_size(type, n_per_row);
    for (int64_t r = 0; r < nrow; ++r) {
        gqsa_quantize_row_ref(quantize, block_bytes, src + r * n_per_row, (char *) dst + r * row_size, n_per_row);
    }
    return nrow * row_size;
}

void quantize_row_gqsa4_ref(const float * GGML_RESTRICT x, block_gqsa4 * GGML_RESTRICT y, int64_t k) {
    gqsa_quantize_row_ref(gqsa4_quantize_block, sizeof(block_gqsa4), x, y, k);
}

void dequantize_row_gqsa4(const block_gqsa4 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    gqsa_dequantize_row(gqsa4_dequantize_block, sizeof(block_gqsa4), x, y, k);
}

size_t quantize_gqsa4(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrow,
                      int64_t n_per_row, const float * imatrix) {
    GGML_UNUSED(imatrix);
    return gqsa_quantize_chunk(GGML_TYPE_GQSA4, gqsa4_quantize_block, sizeof(block_gqsa4), src, dst, nrow, n_per_row);
}

void quantize_row_gqsa3_ref(const float * GGML_RESTRICT x, block_gqsa3 * GGML_RESTRICT y, int64_t k) {
    gqsa_quantize_row_ref(gqsa3_quantize_block, sizeof(block_gqsa3), x, y, k);
}

void dequantize_row_gqsa3(const block_gqsa3 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    gqsa_dequantize_row(gqsa3_dequantize_block, sizeof(block_gqsa3), x, y, k);
}

size_t quantize_gqsa3(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrow,
                      int64_t n_per_row, const float * imatrix) {
    GGML_UNUSED(imatrix);
    return gqsa_quantize_chunk(GGML_TYPE_GQSA3, gqsa3_quantize_block, sizeof(block_gqsa3), src, dst, nrow, n_per_row);
}

void quantize_row_gqsa_q8_ref(const float * GGML_RESTRICT x, block_gqsa_q8 * GGML_RESTRICT y, int64_t k) {
    assert(k % GQSA_GROUP_SIZE == 0);
    const int64_t nb = k / GQSA_GROUP_SIZE;
    for (int64_t i = 0; i < nb; ++i) {
        const float * xb = x + i * GQSA_GROUP_SIZE;
        float amax = 0.0f;
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            const float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f;
        int sum = 0;
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            const int v = d == 0.0f ? 0 : (int) nearbyintf(xb[j] / d);
            y[i].qs[j] = (int8_t) v;
            sum += v;
        }
        y[i].d = d;
        y[i].s = d * (float) sum;
    }
}

void dequantize_row_gqsa_q8(const block_gqsa_q8 * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k) {
    assert(k % GQSA_GROUP_SIZE == 0);
    const int64_t nb = k / GQSA_GROUP_SIZE;
    for (int64_t i = 0; i < nb; ++i) {
        for (int j = 0; j < GQSA_GROUP_SIZE; ++j) {
            y[i * GQSA_GROUP_SIZE + j] = x[i].d * (float) x[i].qs[j];
        }
    }
}

static inline bool gqsa_fp16_is_finite(ggml_fp16_t h) {
    return (h & 0x7c00) != 0x7c00;
}

bool gqsa4_validate_blocks(const void * data, size_t nbytes) {
    const block_gqsa4 * b = (const block_gqsa4 *) data;
    const size_t nb = nbytes / sizeof(block_gqsa4);
    for (size_t i = 0; i < nb; ++i) {
        if (!gqsa_fp16_is_finite(b[i].d)) {
            fprintf(stderr, "ggml_validate_row_data: gqsa4 block %zu has a non-finite scale (0x%04x)\n",
                    i, (unsigned) b[i].d);
            return false;
        }
    }
    return true;
}

bool gqsa3_validate_blocks(const void * data, size_t nbytes) {
    const block_gqsa3 * b = (const block_gqsa3 *) data;
    const size_t nb = nbytes / sizeof(block_gqsa3);
    for (size_t i = 0; i < nb; ++i) {
        if (!gqsa_fp16_is_finite(b[i].d)) {
            fprintf(stderr, "ggml_validate_row_data: gqsa3 block %zu has a non-finite scale (0x%04x)\n",
                    i, (unsigned) b[i].d);
            return false;
        }
        if ((b[i].iz >> GQSA_INDEX_BITS) > GQSA3_QMAX) {
            fprintf(stderr, "ggml_validate_row_data: gqsa3 block %zu has zero point %u > %d\n",
                    i, (unsigned) (b[i].iz >> GQSA_INDEX_BITS), GQSA3_QMAX);
            return false;
        }
    }
    return true;
}

bool ggml_gqsa_validate(const struct ggml_tensor * t, const void * data, int64_t width,
                        char * err, size_t err_size) {
    const char * name = t->name[0] ? t->name : "(unnamed)";
#define GQSA_FAIL(...) do { if (err && err_size) { snprintf(err, err_size, __VA_ARGS__); } return false; } while (0)
    if (!ggml_gqsa_is_type(t->type)) {
        GQSA_FAIL("tensor '%s': type %d is neither gqsa4 (%d) nor gqsa3 (%d)", name, (int) t->type,
                  (int) GGML_TYPE_GQSA4, (int) GGML_TYPE_GQSA3);
    }
    const char * tname  = t->type == GGML_TYPE_GQSA3 ? "gqsa3" : "gqsa4";
    const size_t bbytes = t->type == GGML_TYPE_GQSA3 ? sizeof(block_gqsa3) : sizeof(block_gqsa4);
    const uint32_t zmax = t->type == GGML_TYPE_GQSA3 ? GQSA3_QMAX : GQSA_QMAX;
    const int64_t ne0 = t->ne[0];
    if (width <= 0 || width % GQSA_GROUP_SIZE != 0) {
        GQSA_FAIL("tensor '%s': logical width %" PRId64 " is not a positive multiple of %d",
                  name, width, GQSA_GROUP_SIZE);
    }
    const int64_t n_groups = width / GQSA_GROUP_SIZE;
    if (n_groups > GQSA_MAX_GROUPS) {
        GQSA_FAIL("tensor '%s': logical width %" PRId64 " has %" PRId64 " groups, more than the %d a "
                  "%d-bit group index can address", name, width, n_groups, GQSA_MAX_GROUPS, GQSA_INDEX_BITS);
    }
    if (ne0 <= 0 || ne0 % GQSA_GROUP_SIZE != 0 || ne0 > width) {
        GQSA_FAIL("tensor '%s': %" PRId64 " stored weights per row, expected a positive multiple of %d "
                  "no larger than the logical width %" PRId64 " — the file does not fit this model",
                  name, ne0, GQSA_GROUP_SIZE, width);
    }
    if (t->nb[0] != bbytes || t->nb[1] != (size_t) (ne0 / GQSA_GROUP_SIZE) * bbytes) {
        GQSA_FAIL("tensor '%s': %s rows must be contiguous", name, tname);
    }
    const int64_t n_kept = ne0 / GQSA_GROUP_SIZE;
    const int64_t nrows  = ggml_nrows(t);
    const uint8_t * b = (const uint8_t *) data;
    for (int64_t r = 0; r < nrows; ++r) {
        int64_t prev = -1;
        for (int64_t i = 0; i < n_kept; ++i) {
            // both block types begin with the fp16 scale d and the uint16 iz
            ggml_fp16_t d;
            uint16_t    iz;
            memcpy(&d,  b + (size_t) (r * n_kept + i) * bbytes, sizeof(d));
            memcpy(&iz, b + (size_t) (r * n_kept + i) * bbytes + sizeof(d), sizeof(iz));
            const int64_t  g = iz & GQSA_INDEX_MASK;
            const uint32_t z = iz >> GQSA_INDEX_BITS;
            if (g >= n_groups) {
                GQSA_FAIL("tensor '%s': row %" PRId64 " block %" PRId64 ": group index %" PRId64 " >= %" PRId64
                          " groups in a row of width %" PRId64 " — the file is corrupt or does not fit this model",
                          name, r, i, g, n_groups, width);
            }
            if (g <= prev) {
                GQSA_FAIL("tensor '%s': row %" PRId64 " block %" PRId64 ": group index %" PRId64 " after %" PRId64
                          " — indices must strictly increase within a row; the file is corrupt",
                          name, r, i, g, prev);
            }
            if (!gqsa_fp16_is_finite(d)) {
                GQSA_FAIL("tensor '%s': row %" PRId64 " block %" PRId64 ": scale is not finite (fp16 bits 0x%04x)"
                          " — the file is corrupt", name, r, i, (unsigned) d);
            }
            if (z > zmax) {
                GQSA_FAIL("tensor '%s': row %" PRId64 " block %" PRId64 ": zero point %u > %u, the largest of a "
                          "%s code — the file is corrupt", name, r, i, (unsigned) z, (unsigned) zmax, tname);
            }
            prev = g;
        }
    }
    return true;
#undef GQSA_FAIL
}

// One uint32 key of the gqsa.* metadata: present, of type u32, and equal to `want` or `want2` (the
// format version: at most `want`, at least 1).
static bool gqsa_check_u32_key(const struct gguf_context * ctx, const char * key, uint32_t want, uint32_t want2,
                               bool is_version, char * err, size_t err_size) {
#define GQSA_FAIL(...) do { if (err && err_size) { snprintf(err, err_size, __VA_ARGS__); } return false; } while (0)
    const int64_t id = gguf_find_key(ctx, key);
    if (id < 0) {
        GQSA_FAIL("the file holds gqsa4 or gqsa3 tensors but no '%s' metadata — it was not written by gqsa-gguf, "
                  "or is corrupt", key);
    }
    const enum gguf_type type = gguf_get_kv_type(ctx, id);
    if (type != GGUF_TYPE_UINT32) {
        GQSA_FAIL("metadata '%s' has type %s, expected u32 — the file is corrupt", key, gguf_type_name(type));
    }
    const uint32_t v = gguf_get_val_u32(ctx, id);
    if (is_version && v > want) {
        GQSA_FAIL("metadata '%s' = %u: the file's GQSA format is newer than the %u this llama.cpp build "
                  "supports — upgrade gqsa-gguf", key, v, want);
    }
    if (is_version && v == 0) {
        GQSA_FAIL("metadata '%s' = 0 is invalid (versions start at 1) — the file is corrupt", key);
    }
    if (!is_version && v != want && v != want2) {
        if (want2 != want) {
            GQSA_FAIL("metadata '%s' = %u, but GQSA format version %d only defines %u and %u — the file is corrupt",
                      key, v, GQSA_FORMAT_VERSION, want, want2);
        }
        GQSA_FAIL("metadata '%s' = %u, but GQSA format version %d only defines %u — the file is corrupt",
                  key, v, GQSA_FORMAT_VERSION, want);
    }
    return true;
#undef GQSA_FAIL
}

bool ggml_gqsa_check_metadata(const struct gguf_context * ctx, char * err, size_t err_size) {
    return gqsa_check_u32_key(ctx, GQSA_KEY_FORMAT_VERSION, GQSA_FORMAT_VERSION, GQSA_FORMAT_VERSION, true,
                              err, err_size) &&
           gqsa_check_u32_key(ctx, GQSA_KEY_BITS, GQSA_BITS, GQSA3_BITS, false, err, err_size) &&
           gqsa_check_u32_key(ctx, GQSA_KEY_GROUP_SIZE, GQSA_GROUP_SIZE, GQSA_GROUP_SIZE, false, err, err_size);
}

bool ggml_gqsa_check_tensor_type(const struct gguf_context * ctx, const char * name, enum ggml_type type,
                                 char * err, size_t err_size) {
#define GQSA_FAIL(...) do { if (err && err_size) { snprintf(err, err_size, __VA_ARGS__); } return false; } while (0)
    if (!ggml_gqsa_is_type(type)) {
        GQSA_FAIL("tensor '%s': type %d is neither gqsa4 nor gqsa3", name, (int) type);
    }
    if (!gqsa_check_u32_key(ctx, GQSA_KEY_BITS, GQSA_BITS, GQSA3_BITS, false, err, err_size)) {
        return false;
    }
    const uint32_t bits = gguf_get_val_u32(ctx, gguf_find_key(ctx, GQSA_KEY_BITS));
    const uint32_t want = type == GGML_TYPE_GQSA3 ? GQSA3_BITS : GQSA_BITS;
    if (bits != want) {
        GQSA_FAIL("tensor '%s' is stored as %s, but the file's '%s' = %u names gqsa%u — a file holds one GQSA "
                  "type; the file is corrupt", name, type == GGML_TYPE_GQSA3 ? "gqsa3" : "gqsa4", GQSA_KEY_BITS,
                  bits, bits);
    }
    return true;
#undef GQSA_FAIL
}

bool ggml_gqsa_check_tensor_width(const struct gguf_context * ctx, const char * name, int64_t width,
                                  char * err, size_t err_size) {
#define GQSA_FAIL(...) do { if (err && err_size) { snprintf(err, err_size, __VA_ARGS__); } return false; } while (0)
    const int64_t id_names  = gguf_find_key(ctx, GQSA_KEY_TENSOR_NAMES);
    const int64_t id_widths = gguf_find_key(ctx, GQSA_KEY_TENSOR_WIDTHS);
    if (id_names < 0 || id_widths < 0) {
        GQSA_FAIL("the file holds gqsa4 or gqsa3 tensors but no '%s' / '%s' metadata — it was not written by "
                  "gqsa-gguf, or is corrupt", GQSA_KEY_TENSOR_NAMES, GQSA_KEY_TENSOR_WIDTHS);
    }
    if (gguf_get_kv_type(ctx, id_names) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, id_names) != GGUF_TYPE_STRING) {
        GQSA_FAIL("metadata '%s' is not an array of strings — the file is corrupt", GQSA_KEY_TENSOR_NAMES);
    }
    if (gguf_get_kv_type(ctx, id_widths) != GGUF_TYPE_ARRAY || gguf_get_arr_type(ctx, id_widths) != GGUF_TYPE_UINT32) {
        GQSA_FAIL("metadata '%s' is not an array of u32 — the file is corrupt", GQSA_KEY_TENSOR_WIDTHS);
    }
    const size_t n = gguf_get_arr_n(ctx, id_names);
    if (gguf_get_arr_n(ctx, id_widths) != n) {
        GQSA_FAIL("metadata '%s' has %zu entries but '%s' has %zu — the file is corrupt",
                  GQSA_KEY_TENSOR_WIDTHS, gguf_get_arr_n(ctx, id_widths), GQSA_KEY_TENSOR_NAMES, n);
    }
    const uint32_t * widths = (const uint32_t *) gguf_get_arr_data(ctx, id_widths);
    for (size_t i = 0; i < n; ++i) {
        if (strcmp(gguf_get_arr_str(ctx, id_names, i), name) == 0) {
            if ((int64_t) widths[i] != width) {
                GQSA_FAIL("tensor '%s': '%s' records width %u, but the model's width is %" PRId64
                          " — the file is corrupt or was written for another model", name,
                          GQSA_KEY_TENSOR_WIDTHS, widths[i], width);
            }
            return true;
        }
    }
    GQSA_FAIL("tensor '%s' is stored as a GQSA type but not listed in '%s' — the file is corrupt", name,
              GQSA_KEY_TENSOR_NAMES);
#undef GQSA_FAIL
}

// ggml_gqsa_quantize_rows and ggml_gqsa3_quantize_rows: `quantize` packs one group into a block of block_bytes
static size_t gqsa_quantize_rows(gqsa_quantize_block_fn quantize, size_t block_bytes, const float * src, int64_t nrows,
                                 int64_t width, const int32_t * kept, int64_t n_kept, void * dst) {
    if (width <= 0 || width % GQSA_GROUP_SIZE != 0 || width / GQSA_GROUP_SIZE > GQSA_MAX_GROUPS ||
        n_kept <= 0 || n_kept > width / GQSA_GROUP_SIZE || nrows < 0) {
        return 0;
    }
    const int64_t n_groups = width / GQSA_GROUP_SIZE;
    for (int64_t r = 0; r < nrows; ++r) {
        const int32_t * kr = kept + r * n_kept;
        for (int64_t i = 0; i < n_kept; ++i) {
            if (kr[i] < 0 || kr[i] >= n_groups || (i > 0 && kr[i] <= kr[i - 1])) {
                return 0;
            }
        }
        for (int64_t i = 0; i < n_kept; ++i) {
            quantize(src + r * width + (int64_t) kr[i] * GQSA_GROUP_SIZE,
                     (uint8_t *) dst + (size_t) (r * n_kept + i) * block_bytes, (uint32_t) kr[i]);
        }
    }
    return (size_t) (nrows * n_kept) * block_bytes;
}

size_t ggml_gqsa_quantize_rows(const float * src, int64_t nrows, int64_t width,
                               const int32_t * kept, int64_t n_kept, void * dst) {
    return gqsa_quantize_rows(gqsa4_quantize_block, sizeof(block_gqsa4), src, nrows, width, kept, n_kept, dst);
}

size_t ggml_gqsa3_quantize_rows(const float * src, int64_t nrows, int64_t width,
                                const int32_t * kept, int64_t n_kept, void * dst) {
    return gqsa_quantize_rows(gqsa3_quantize_block, sizeof(block_gqsa3), src, nrows, width, kept, n_kept, dst);
}

// ggml_gqsa_dequantize_rows and ggml_gqsa3_dequantize_rows: each block of block_bytes (both types
// begin with d and iz) dequantized by `dequantize` into the group its index names, zeros elsewhere
static void gqsa_dequantize_rows(gqsa_dequantize_block_fn dequantize, size_t block_bytes, const void * src,
                                 int64_t nrows, int64_t n_kept, int64_t width, float * dst) {
    for (int64_t r = 0; r < nrows; ++r) {
        float * row = dst + r * width;
        memset(row, 0, (size_t) width * sizeof(float));
        for (int64_t i = 0; i < n_kept; ++i) {
            const uint8_t * b = (const uint8_t *) src + (size_t) (r * n_kept + i) * block_bytes;
            uint16_t iz;
            memcpy(&iz, b + sizeof(ggml_fp16_t), sizeof(iz));
            const int64_t g = iz & GQSA_INDEX_MASK;
            if ((g + 1) * GQSA_GROUP_SIZE > width) {
                continue; // invalid data: callers validate first; never write out of bounds
            }
            dequantize(b, row + g * GQSA_GROUP_SIZE);
        }
    }
}

void ggml_gqsa_dequantize_rows(const void * src, int64_t nrows, int64_t n_kept, int64_t width, float * dst) {
    gqsa_dequantize_rows(gqsa4_dequantize_block, sizeof(block_gqsa4), src, nrows, n_kept, width, dst);
}

void ggml_gqsa3_dequantize_rows(const void * src, int64_t nrows, int64_t n_kept, int64_t width, float * dst) {
    gqsa_dequantize_rows(gqsa3_dequantize_block, sizeof(block_gqsa3), src, nrows, n_kept, width, dst);
}
