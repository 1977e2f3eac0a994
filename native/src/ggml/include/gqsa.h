// Public API of the GQSA tensor types gqsa4 and gqsa3 (gqsa-gguf): validation of untrusted tensor
// data and packing of group-sparse rows. The format is specified in docs/FORMAT.md of gqsa-gguf.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// Checks a gqsa4 or gqsa3 tensor's data against its logical input width `width` (rules of
// docs/FORMAT.md): ne[0] % 16 == 0, 0 < ne[0] <= width, width % 16 == 0, width/16 <= 4096; in every
// row the group indices strictly increase and stay below width/16; every scale is finite; every
// zero point is a code of the type (gqsa3: <= 7).
// `data` holds ggml_nbytes(t) bytes laid out as t. Returns true if valid; otherwise writes a message
// naming the tensor, row, block and offending value into err (err_size bytes) and returns false.
GGML_API bool ggml_gqsa_validate(const struct ggml_tensor * t, const void * data, int64_t width,
                                 char * err, size_t err_size);

struct gguf_context;

// Whether a ggml type is one of the GQSA weight types
static inline bool ggml_gqsa_is_type(enum ggml_type type) {
    return type == GGML_TYPE_GQSA4 || type == GGML_TYPE_GQSA3;
}

// Checks the gqsa.* metadata of a file that holds gqsa4 or gqsa3 tensors (docs/FORMAT.md "GGUF metadata"):
// gqsa.format_version, gqsa.bits and gqsa.group_size must be present as uint32 and name what this
// build implements (format version 1, 4 or 3 bits, groups of 16); a file from a newer format is refused
// rather than misread. Returns true if so; otherwise writes a message naming the key, the value or
// type found, and what to do into err (err_size bytes) and returns false.
GGML_API bool ggml_gqsa_check_metadata(const struct gguf_context * ctx, char * err, size_t err_size);

// A file holds one GQSA type, the one its gqsa.bits names (4: gqsa4, 3: gqsa3): `type`, the type of
// its tensor `name`, must be it. Returns true if so; otherwise writes a message naming the tensor, its
// type and the key's value into err and returns false.
GGML_API bool ggml_gqsa_check_tensor_type(const struct gguf_context * ctx, const char * name, enum ggml_type type,
                                          char * err, size_t err_size);

// The file's own record of GQSA tensor `name` agrees with the model: `gqsa.tensor_names` (array of
// strings) lists it once, and the same position of `gqsa.tensor_widths` (array of u32, as long) holds
// `width`, the logical width the model expects. Returns true if so; otherwise writes a message naming
// the key, the tensor and the values into err and returns false.
GGML_API bool ggml_gqsa_check_tensor_width(const struct gguf_context * ctx, const char * name, int64_t width,
                                           char * err, size_t err_size);

// Quantizes the kept groups of `nrows` dense rows of `width` floats into nrows * n_kept gqsa4
// blocks (min-max, bit-exact with the NumPy codec). kept[r*n_kept + i] is the i-th kept group of
// row r; each row's indices strictly increase.
// Returns the bytes written, or 0 if the arguments break the format's rules.
GGML_API size_t ggml_gqsa_quantize_rows(const float * src, int64_t nrows, int64_t width,
                                        const int32_t * kept, int64_t n_kept, void * dst);

// Expands gqsa4 rows into dense rows of `width` floats (zeros in pruned groups).
GGML_API void ggml_gqsa_dequantize_rows(const void * src, int64_t nrows, int64_t n_kept,
                                        int64_t width, float * dst);

// The same two for gqsa3 rows (codes and zero points 0..7, 10-byte blocks)
GGML_API size_t ggml_gqsa3_quantize_rows(const float * src, int64_t nrows, int64_t width,
                                         const int32_t * kept, int64_t n_kept, void * dst);
GGML_API void   ggml_gqsa3_dequantize_rows(const void * src, int64_t nrows, int64_t n_kept,
                                           int64_t width, float * dst);

#ifdef __cplusplus
}
#endif
