// Shim of gguf.h for native/tests/test_kernels.c (declarations only; the kernels never call them)
#pragma once

#include "ggml.h"

enum gguf_type {
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY  = 9,
};

struct gguf_context;

const char *   gguf_type_name(enum gguf_type type);
int64_t        gguf_find_key(const struct gguf_context * ctx, const char * key);
enum gguf_type gguf_get_kv_type(const struct gguf_context * ctx, int64_t key_id);
uint32_t       gguf_get_val_u32(const struct gguf_context * ctx, int64_t key_id);
enum gguf_type gguf_get_arr_type(const struct gguf_context * ctx, int64_t key_id);
size_t         gguf_get_arr_n(const struct gguf_context * ctx, int64_t key_id);
const void *   gguf_get_arr_data(const struct gguf_context * ctx, int64_t key_id);
const char *   gguf_get_arr_str(const struct gguf_context * ctx, int64_t key_id, size_t i);
