// ggml_mul_mat on gqsa4 weights through the patched ggml's CUDA backend, against the CPU backend
// and a double-precision reference from the dense expansion (gqsa.h). Where gqsa_harness checks
// the kernels alone, this checks the wiring in ggml-cuda: supports_op, the activation layout and
// strides, the GEMV for up to 8 columns and the fp16 + cuBLAS path above that.
//
//   gqsa_ggml_check     exit 0 when every NMSE <= 5e-4, 1 otherwise, 3 without a CUDA device
//
// Run it once per GGML_CUDA_GQSA_DECOMP (task, data): the switch is read once per process.
// Built by scripts/gpu_check.sh against the CUDA build's libraries (plain C++, no nvcc needed).
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-cuda.h"
#include "gqsa.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "gqsa_nmse.h"

static std::vector<float> mul_mat(ggml_backend_t backend, int64_t rows, int64_t n_kept, int64_t width, int64_t ncols,
                                  const std::vector<uint8_t> & w, const std::vector<float> & x, bool * supported) {
    ggml_init_params params = {ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true};
    ggml_context * ctx = ggml_init(params);
    ggml_tensor * tw = ggml_new_tensor_2d(ctx, GGML_TYPE_GQSA4, n_kept * 16, rows);
    ggml_tensor * tx = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, width, ncols);
    ggml_tensor * ty = ggml_mul_mat(ctx, tw, tx);
    ggml_cgraph * gf = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, ty);
    *supported = ggml_backend_supports_op(backend, ty);
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
    ggml_backend_tensor_set(tw, w.data(), 0, w.size());
    ggml_backend_tensor_set(tx, x.data(), 0, x.size() * sizeof(float));
    std::vector<float> y(rows * ncols, NAN);
    if (*supported && ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS) {
        ggml_backend_tensor_get(ty, y.data(), 0, y.size() * sizeof(float));
    }
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    return y;
}

int main() {
    ggml_backend_t cuda = ggml_backend_cuda_init(0);
    if (cuda == nullptr) {
        fprintf(stderr, "gqsa_ggml_check: no CUDA device\n");
        return 3;
    }
    ggml_backend_t cpu = ggml_backend_cpu_init();
    const char * decomp = getenv("GGML_CUDA_GQSA_DECOMP");
    printf("ggml_mul_mat on gqsa4, CUDA backend (%s, GGML_CUDA_GQSA_DECOMP=%s) and CPU backend vs reference\n\n",
           ggml_backend_name(cuda), decomp ? decomp : "(default)");
    printf("| rows | width | kept | ncols | CUDA supports_op | NMSE CUDA | NMSE CPU |\n|---|---|---|---|---|---|---|\n");
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    int failures = 0;
    for (int64_t width : {576, 4096, 11008}) {
        const int64_t rows = 160, groups = width / 16;
        for (double sparsity : {0.25, 0.75}) {
            const int64_t n_kept = std::max<int64_t>(1, (int64_t) llround(groups * (1.0 - sparsity)));
            std::vector<float> dense(rows * width);
            for (float & v : dense) v = 0.02f * normal(rng);
            std::vector<int32_t> kept(rows * n_kept);
            std::vector<int32_t> all(groups);
            for (int64_t r = 0; r < rows; ++r) {
                std::iota(all.begin(), all.end(), 0);
                std::shuffle(all.begin(), all.end(), rng);
                std::sort(all.begin(), all.begin() + n_kept);
                std::copy(all.begin(), all.begin() + n_kept, kept.begin() + r * n_kept);
            }
            std::vector<uint8_t> w(rows * n_kept * 12);
            if (ggml_gqsa_quantize_rows(dense.data(), rows, width, kept.data(), n_kept, w.data()) != w.size()) {
                fprintf(stderr, "ggml_gqsa_quantize_rows refused the test data\n");
                return 1;
            }
            std::vector<float> wd(rows * width);
            ggml_gqsa_dequantize_rows(w.data(), rows, n_kept, width, wd.data());
            for (int64_t ncols : {1, 3, 8, 9, 40}) {      // GEMV up to 8 columns, fp16 + cuBLAS above
                std::vector<float> x(width * ncols);
                for (float & v : x) v = normal(rng);
                std::vector<double> ref(rows * ncols);
                for (int64_t c = 0; c < ncols; ++c) {
                    for (int64_t r = 0; r < rows; ++r) {
                        double s = 0.0;
                        for (int64_t k = 0; k < width; ++k) s += (double) wd[r * width + k] * x[c * width + k];
                        ref[c * rows + r] = s;
                    }
                }
                bool sup_cuda = false, sup_cpu = false;
                const double e_cuda = gqsa_nmse(mul_mat(cuda, rows, n_kept, width, ncols, w, x, &sup_cuda), ref);
                const double e_cpu  = gqsa_nmse(mul_mat(cpu,  rows, n_kept, width, ncols, w, x, &sup_cpu),  ref);
                const bool ok = sup_cuda && e_cuda <= 5e-4 && e_cpu <= 5e-4;
                failures += !ok;
                printf("| %lld | %lld | %lld | %lld | %s | %.2e | %.2e |%s\n", (long long) rows, (long long) width,
                       (long long) n_kept, (long long) ncols, sup_cuda ? "yes" : "NO", e_cuda, e_cpu, ok ? "" : " FAIL");
            }
        }
    }
    printf("\ngqsa_ggml_check: %d failure(s)\n", failures);
    ggml_backend_free(cpu);
    ggml_backend_free(cuda);
    return failures ? 1 : 0;
}
