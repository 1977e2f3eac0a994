// The few ggml/gguf symbols the GQSA sources reference, for the standalone fuzz target
// (native/fuzz/fuzz_gqsa_validate.c), which compiles ggml-gqsa.c and the ggml-cpu-gqsa.c kernels
// (generic and this machine's arch/ file) without the rest of ggml. Each does what ggml does for
// the inputs the target uses; the others are never reached (the gguf ones serve
// ggml_gqsa_check_metadata and ggml_gqsa_check_tensor_width, the threadpool ones the mul_mat driver
// ggml_gqsa_mul_mat; neither is fuzzed here) and abort if they are.
#include "ggml.h"
#include "ggml-impl.h"
#include "ggml-cpu-impl.h"
#include "gguf.h"

#include <stdlib.h>

float ggml_table_f32_f16[1 << 16];   // filled by gqsa_fuzz_init_tables, as ggml_cpu_init does

void gqsa_fuzz_init_tables(void) {
    for (int i = 0; i < (1 << 16); ++i) {
        ggml_table_f32_f16[i] = GGML_COMPUTE_FP16_TO_FP32((ggml_fp16_t) i);
    }
}

int64_t ggml_nrows(const struct ggml_tensor * t) {
    return t->ne[1] * t->ne[2] * t->ne[3];
}

size_t ggml_row_size(enum ggml_type type, int64_t ne) {
    if (type != GGML_TYPE_GQSA4) {
        abort();
    }
    return (size_t) (ne / 16) * 12;
}

int64_t gguf_find_key(const struct gguf_context * ctx, const char * key) { (void) ctx; (void) key; abort(); }
enum gguf_type gguf_get_kv_type(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
uint32_t gguf_get_val_u32(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
const char * gguf_type_name(enum gguf_type type) { (void) type; abort(); }
enum gguf_type gguf_get_arr_type(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
size_t gguf_get_arr_n(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
const void * gguf_get_arr_data(const struct gguf_context * ctx, int64_t id) { (void) ctx; (void) id; abort(); }
const char * gguf_get_arr_str(const struct gguf_context * ctx, int64_t id, size_t i) { (void) ctx; (void) id; (void) i; abort(); }

bool ggml_is_contiguous(const struct ggml_tensor * t) { (void) t; abort(); }
void ggml_barrier(struct ggml_threadpool * tp) { (void) tp; abort(); }
int ggml_threadpool_chunk_add(struct ggml_threadpool * tp, int value) { (void) tp; (void) value; abort(); }
void ggml_threadpool_chunk_set(struct ggml_threadpool * tp, int value) { (void) tp; (void) value; abort(); }
void ggml_abort(const char * file, int line, const char * fmt, ...) { (void) file; (void) line; (void) fmt; abort(); }
