// CPU_GQSA buffer type (gqsa-gguf): repacked gqsa4 weights; see ggml-cpu-gqsa-repack.cpp
#pragma once

#include "ggml-backend.h"

// nullptr where this build has no superblock kernels or GGML_GQSA_REPACK=0
ggml_backend_buffer_type_t ggml_backend_cpu_gqsa_buffer_type(void);
