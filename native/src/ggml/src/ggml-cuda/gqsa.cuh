// gqsa-gguf: gqsa4 weights in ggml-cuda (kernels: gqsa-kernels.cuh; work split: gqsa-partition.h).
#pragma once

#include "common.cuh"

// The cuBLAS path of ggml-cuda.cu, handed in because it is static there.
typedef void (*ggml_cuda_gqsa_dense_mul_mat_t)(ggml_backend_cuda_context & ctx, const ggml_tensor * src0,
                                               const ggml_tensor * src1, ggml_tensor * dst);

// Whether this backend runs `op`, a GGML_OP_MUL_MAT or GGML_OP_MUL_MAT_ID whose src[0] is gqsa4.
bool ggml_cuda_gqsa_supports_op(const ggml_tensor * op);

// dst = src0 (gqsa4) x src1 (f32): the GQSA GEMV for up to 8 columns per matrix, otherwise a
// dense fp16 copy of src0 through `dense_mul_mat` (cuBLAS).
void ggml_cuda_gqsa_mul_mat(ggml_backend_cuda_context & ctx, const ggml_tensor * src0, const ggml_tensor * src1,
                            ggml_tensor * dst, ggml_cuda_gqsa_dense_mul_mat_t dense_mul_mat);
