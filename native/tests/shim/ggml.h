// Shim of ggml.h for native/tests/test_kernels.c: just what ggml-gqsa.c and ggml-cpu-gqsa.c use,
// so the kernels build and run standalone (host and aarch64 under qemu) without a llama.cpp tree.
// The enum values and struct fields mirror the patched ggml.h; test_kernels.c defines the functions.
#pragma once

#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define GGML_API
#define GGML_RESTRICT __restrict__
#define GGML_UNUSED(x) (void) (x)
#define GGML_ABORT(...) (fprintf(stderr, __VA_ARGS__), fputc('\n', stderr), abort())
#define GGML_MAX_DIMS 4
#define GGML_MAX_SRC  10

typedef uint16_t ggml_fp16_t;

enum ggml_type {
    GGML_TYPE_F32     = 0,
    GGML_TYPE_F16     = 1,
    GGML_TYPE_GQSA4   = 128,
    GGML_TYPE_GQSA_Q8 = 129,
    GGML_TYPE_GQSA3   = 130,
};

struct ggml_tensor {
    enum ggml_type       type;
    int64_t              ne[GGML_MAX_DIMS];
    size_t               nb[GGML_MAX_DIMS];
    struct ggml_tensor * src[GGML_MAX_SRC];
    void *               data;
    char                 name[64];
};

size_t  ggml_type_size(enum ggml_type type);
size_t  ggml_row_size(enum ggml_type type, int64_t ne);
int64_t ggml_nrows(const struct ggml_tensor * t);
bool    ggml_is_contiguous(const struct ggml_tensor * t);
