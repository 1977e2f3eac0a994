// Compile-only stand-in for cuBLAS's header, for checking that the GQSA sources of ggml-cuda
// compile on a machine whose CUDA toolkit has nvcc but no cuBLAS (this project's CI). It declares
// only what ggml-cuda's common.cuh names; nothing built with it is ever linked or run. A real
// build (scripts/gpu_check.sh) uses the toolkit's cuBLAS. native/cuda/build.sh puts this folder on
// the include path only when the toolkit has no cublas_v2.h.
#pragma once

#include <cuda_runtime.h>
#include <library_types.h>
#include <stddef.h>

#define CUBLAS_VER_MAJOR 13
#define CUBLAS_VER_MINOR 0

typedef struct cublasContext * cublasHandle_t;

typedef enum {
    CUBLAS_STATUS_SUCCESS          = 0,
    CUBLAS_STATUS_NOT_INITIALIZED  = 1,
    CUBLAS_STATUS_ALLOC_FAILED     = 3,
    CUBLAS_STATUS_INVALID_VALUE    = 7,
    CUBLAS_STATUS_ARCH_MISMATCH    = 8,
    CUBLAS_STATUS_MAPPING_ERROR    = 11,
    CUBLAS_STATUS_EXECUTION_FAILED = 13,
    CUBLAS_STATUS_INTERNAL_ERROR   = 14,
    CUBLAS_STATUS_NOT_SUPPORTED    = 15,
} cublasStatus_t;

typedef enum { CUBLAS_DEFAULT_MATH = 0, CUBLAS_TF32_TENSOR_OP_MATH = 3 } cublasMath_t;

extern "C" {
cublasStatus_t cublasCreate(cublasHandle_t * handle);
cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode);
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream);
cublasStatus_t cublasSetWorkspace(cublasHandle_t handle, void * workspace, size_t size);
const char *   cublasGetStatusString(cublasStatus_t status);
}
