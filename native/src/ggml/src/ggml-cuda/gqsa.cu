// gqsa-gguf: gqsa4 mul_mat in ggml-cuda. The weights were validated on the host at load
// (llama-model-loader.cpp: group indices below width/16 and increasing, finite scales), so the
// kernels trust every group index.
//
// Up to GQSA_CUDA_MAX_NCOLS columns: activations quantized to the 16-wide int8 layout (or fp16),
// then the GEMV over the kept blocks, data- or task-centric. More columns: the weight expanded to
// a dense fp16 matrix (zeros in pruned groups) in the memory pool, then upstream's cuBLAS path.
//
// Switches (read once, for A/B runs; native/README.md):
//   GGML_CUDA_GQSA_DECOMP = task (default: Stream-K) | data
//   GGML_CUDA_GQSA_ACT    = q8 (default) | f16
#include "gqsa.cuh"
#include "gqsa-kernels.cuh"

#include <cstdlib>
#include <cstring>

#define GQSA_TASK_WARPS_PER_SM 16   // Stream-K parts per multiprocessor (FIXME: tune on a GPU)

static int gqsa_env_choice(const char * name, const char * alt, int alt_value, int default_value) {
    const char * v = getenv(name);
    if (v == nullptr || *v == '\0') {
        return default_value;
    }
    if (strcmp(v, alt) == 0) {
        return alt_value;
    }
    return default_value;
}

static int gqsa_decomp() {
    static const int d = gqsa_env_choice("GGML_CUDA_GQSA_DECOMP", "data", GQSA_DECOMP_DATA, GQSA_DECOMP_TASK);
    return d;
}

static int gqsa_act() {
    static const int a = gqsa_env_choice("GGML_CUDA_GQSA_ACT", "f16", GQSA_ACT_F16, GQSA_ACT_Q8);
    return a;
}

bool ggml_cuda_gqsa_supports_op(const ggml_tensor * op) {
    const ggml_tensor * a = op->src[0];
    const ggml_tensor * b = op->src[1];
    return op->op == GGML_OP_MUL_MAT && a->type == GGML_TYPE_GQSA4 &&
           ggml_is_contiguous(a) && a->ne[2] == 1 && a->ne[3] == 1 &&
           b->type == GGML_TYPE_F32 && b->nb[0] == sizeof(float) &&
           b->ne[0] % GQSA_CUDA_GROUP == 0 && b->ne[0] >= a->ne[0] && b->ne[0] / GQSA_CUDA_GROUP <= 4096 &&
           op->type == GGML_TYPE_F32 && ggml_is_contiguous(op);
}

void ggml_cuda_gqsa_mul_mat(ggml_backend_cuda_context & ctx, const ggml_tensor * src0, const ggml_tensor * src1,
                            ggml_tensor * dst, ggml_cuda_gqsa_dense_mul_mat_t dense_mul_mat) {
    GGML_TENSOR_BINARY_OP_LOCALS
    GGML_ASSERT(ggml_cuda_gqsa_supports_op(dst));

    cudaStream_t  stream = ctx.stream();
    const int64_t n_kept = ne00 / GQSA_CUDA_GROUP;
    const int64_t width  = ne10;

    if (ne11 > GQSA_CUDA_MAX_NCOLS) {
        ggml_cuda_pool_alloc<half> w16(ctx.pool(), (size_t) ne01 * (size_t) width);
        gqsa_cuda_dequantize_f16(src0->data, ne01, n_kept, width, w16.get(), stream);
        CUDA_CHECK(cudaGetLastError());
        ggml_tensor w = *src0;
        w.type     = GGML_TYPE_F16;
        w.ne[0]    = width;
        w.nb[0]    = sizeof(half);
        w.nb[1]    = w.nb[0] * width;
        w.nb[2]    = w.nb[1] * ne01;
        w.nb[3]    = w.nb[2];
        w.data     = w16.get();
        w.view_src = nullptr;
        dense_mul_mat(ctx, &w, src1, dst);
        return;
    }

    const int act    = gqsa_act();
    const int decomp = gqsa_decomp();
    const int n_sm   = ggml_cuda_info().devices[ctx.device].nsm;
    const int64_t n_parts = gqsa_cuda_task_parts(n_sm, ne01, n_kept, GQSA_TASK_WARPS_PER_SM);

    ggml_cuda_pool_alloc<char>  act_buf(ctx.pool(), gqsa_cuda_act_bytes(act, width, ne11));
    ggml_cuda_pool_alloc<float> partial(ctx.pool());
    if (decomp == GQSA_DECOMP_TASK) {
        partial.alloc(2 * (size_t) n_parts * (size_t) ne11);
    }
    // one GEMV per (i12, i13) matrix of src1; src0 is 2-D and broadcast over them
    for (int64_t i13 = 0; i13 < ne13; ++i13) {
        for (int64_t i12 = 0; i12 < ne12; ++i12) {
            const float * x = (const float *) ((const char *) src1->data + i12 * nb12 + i13 * nb13);
            float       * y = (float *) ((char *) dst->data + i12 * nb2 + i13 * nb3);
            const gqsa_cuda_act_buf a = gqsa_cuda_prepare_act(act, x, nb11 / sizeof(float), width, ne11,
                                                              act_buf.get(), stream);
            if (act == GQSA_ACT_Q8) {
                gqsa_cuda_gemv<GQSA_ACT_Q8>(decomp, src0->data, ne01, n_kept, n_parts, a, (int) ne11, y,
                                            nb1 / sizeof(float), partial.get(), stream);
            } else {
                gqsa_cuda_gemv<GQSA_ACT_F16>(decomp, src0->data, ne01, n_kept, n_parts, a, (int) ne11, y,
                                             nb1 / sizeof(float), partial.get(), stream);
            }
            CUDA_CHECK(cudaGetLastError());
        }
    }
}
