// Shim of ggml-cpu/simd-mappings.h for native/tests/test_kernels.c
#pragma once

#include "ggml-cpu-impl.h"

#define GGML_CPU_FP16_TO_FP32(x) GGML_FP16_TO_FP32(x)
