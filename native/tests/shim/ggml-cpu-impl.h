// Shim of ggml-cpu/ggml-cpu-impl.h for native/tests/test_kernels.c: the compute parameters and the
// thread-pool calls the gqsa mul_mat driver uses (test_kernels.c implements them with pthreads).
#pragma once

#include "ggml.h"
#include "ggml-impl.h"

struct ggml_threadpool;

struct ggml_compute_params {
    int ith, nth;
    size_t wsize;
    void * wdata;
    struct ggml_threadpool * threadpool;
    bool use_ref;
};

void ggml_barrier(struct ggml_threadpool * tp);
void ggml_threadpool_chunk_set(struct ggml_threadpool * tp, int value);
int  ggml_threadpool_chunk_add(struct ggml_threadpool * tp, int value);
