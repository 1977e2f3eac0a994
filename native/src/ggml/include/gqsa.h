// Public API of the GQSA tensor type (gqsa-gguf): validation of untrusted tensor data and packing
// of group-sparse rows. The format is specified in docs/FORMAT.md of gqsa-gguf.
#pragma once

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

// Checks a gqsa4 tensor's data against its logical input width `width` (rules of docs/FORMAT.md):
// ne[0] % 16 == 0, 0 < ne[0] <= width, width % 16 == 0, width/16 <= 4096; in every row the group
// indices strictly increase and stay below width/16; every scale is finite.
// `data` holds ggml_nbytes(t) bytes laid out as t. Returns true if valid; otherwise writes a message
// naming the tensor, row, block and offending value into err (err_size bytes) and returns false.
GGML_API bool ggml_gqsa_validate(const struct ggml_tensor * t, const void * data, int64_t width,
                                 char * err, size_t err_size);

struct gguf_context;

// Checks the gqsa.* metadata of a file that holds gqsa4 tensors (docs/FORMAT.md "GGUF metadata"):
// gqsa.format_version, gqsa.bits and gqsa.group_size must be present as uint32 and name what this
// build implements (format version 1, 4 bits, groups of 16); a file from a newer format is refused
// rather than misread. Returns true if so; otherwise writes a message naming the key, the value or
// type found, and what to do into err (err_size bytes) and returns false.
GGML_API bool ggml_gqsa_check_metadata(const struct gguf_context * ctx, char * err, size_t err_size);

// The file's own record of gqsa4 tensor `name` agrees with the model: `gqsa.tensor_names` (array of
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

#ifdef __cplusplus
}
#endif
