// Standalone harness for the GQSA CUDA kernels (nvcc only; no ggml): the kernels ggml-cuda runs
// (native/src/ggml/src/ggml-cuda/gqsa-kernels.cuh), checked against a CPU reference and timed
// against a dense fp16 GEMV through cuBLAS (when built with it) and a Q4_0-style GEMV written here
// (llama.cpp's own Q4_0 path is measured end to end by llama-bench in scripts/gpu_check.sh).
//
//   gqsa_harness info              the device; exit 3 when there is none
//   gqsa_harness check [--quick]   NMSE against the CPU reference for widths 576/4096/11008,
//                                  sparsity 25/50/75 %, 1-8 columns, both decompositions, both
//                                  activation types, odd Stream-K part counts; the fp16
//                                  dequantization bit-exact; exit 1 on any failure
//   gqsa_harness bench [--reps N]  timings (CUDA events, L2 flushed before every run, median) on
//                                  4096x4096, 11008x4096 and 4096x11008 (rows x width) at W4S50
//
// Build: native/cuda/build.sh (or nvcc -O3 -std=c++17 -arch=sm_90 -I native/src/ggml/src/ggml-cuda
// native/cuda/gqsa_harness.cu [-DGQSA_HARNESS_CUBLAS -lcublas]).
#include "gqsa-kernels.cuh"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gqsa_nmse.h"

#ifdef GQSA_HARNESS_CUBLAS
#include <cublas_v2.h>
#endif

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
    fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, cudaGetErrorString(e_)); \
    exit(2); } } while (0)

static const double NMSE_MAX = 5e-4;   // ggml's test-backend-ops threshold for mul_mat

// ---------------------------------------------------------------------------------------------
// Random data and the CPU reference

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
    uint64_t next() { s ^= s << 13; s ^= s >> 7; s ^= s << 17; return s; }
    uint32_t below(uint32_t n) { return (uint32_t) (next() % n); }
    float uniform() { return (float) ((next() >> 11) * (1.0 / 9007199254740992.0)); }   // [0, 1)
};

struct Gqsa {
    int64_t rows, width, n_kept;
    std::vector<uint32_t> words;   // rows * n_kept * 3
};

// Random valid gqsa4 tensor: each row keeps n_kept of width/16 groups (sorted), random q and z,
// fp16 scales in [0.002, 0.02).
static Gqsa make_gqsa(int64_t rows, int64_t width, double sparsity, Rng & rng) {
    const int64_t groups = width / 16;
    Gqsa t{rows, width, std::max<int64_t>(1, (int64_t) llround(groups * (1.0 - sparsity))), {}};
    t.words.resize(rows * t.n_kept * 3);
    std::vector<int> idx(groups);
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < groups; ++g) idx[g] = (int) g;
        for (int64_t i = 0; i < t.n_kept; ++i) std::swap(idx[i], idx[i + rng.below((uint32_t) (groups - i))]);
        std::sort(idx.begin(), idx.begin() + t.n_kept);
        for (int64_t i = 0; i < t.n_kept; ++i) {
            const half d = __float2half(0.002f + 0.018f * rng.uniform());
            const uint32_t z = rng.below(16);
            uint32_t * w = &t.words[(r * t.n_kept + i) * 3];
            w[0] = (uint32_t) __half_as_ushort(d) | ((uint32_t) idx[i] << 16) | (z << 28);
            w[1] = (uint32_t) rng.next();
            w[2] = (uint32_t) rng.next();
        }
    }
    return t;
}

// Dense float [rows][width] of a gqsa4 tensor (docs/FORMAT.md: w = (q - z) * d, 0 when pruned).
static std::vector<float> dense_ref(const Gqsa & t) {
    std::vector<float> w(t.rows * t.width, 0.0f);
    for (int64_t r = 0; r < t.rows; ++r) {
        for (int64_t i = 0; i < t.n_kept; ++i) {
            const uint32_t * b = &t.words[(r * t.n_kept + i) * 3];
            const float d = __half2float(__ushort_as_half((unsigned short) (b[0] & 0xFFFF)));
            const int g = (b[0] >> 16) & 0xFFF, z = (int) (b[0] >> 28);
            const uint8_t * qs = (const uint8_t *) &b[1];
            for (int j = 0; j < 8; ++j) {
                w[r * t.width + 16 * g + j]     = (float) ((qs[j] & 0xF) - z) * d;
                w[r * t.width + 16 * g + j + 8] = (float) ((qs[j] >> 4) - z) * d;
            }
        }
    }
    return w;
}

// y[c][r] = sum_k w[r][k] * x[c][k], in double.
static std::vector<double> gemm_ref(const std::vector<float> & w, int64_t rows, int64_t width,
                                    const std::vector<float> & x, int64_t ncols) {
    std::vector<double> y(ncols * rows);
    for (int64_t c = 0; c < ncols; ++c) {
        for (int64_t r = 0; r < rows; ++r) {
            double s = 0.0;
            const float * wr = &w[r * width];
            const float * xc = &x[c * width];
            for (int64_t k = 0; k < width; ++k) s += (double) wr[k] * xc[k];
            y[c * rows + r] = s;
        }
    }
    return y;
}

template <typename T>
struct Dev {
    T * p = nullptr;
    size_t n = 0;
    explicit Dev(size_t count) : n(count) { CK(cudaMalloc(&p, std::max<size_t>(count, 1) * sizeof(T))); }
    Dev(const std::vector<T> & h) : Dev(h.size()) { CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
    ~Dev() { cudaFree(p); }
    std::vector<T> get() const { std::vector<T> h(n); CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost)); return h; }
    Dev(const Dev &) = delete;
    Dev & operator=(const Dev &) = delete;
};

// One GQSA mul_mat as ggml runs it: activation preparation, GEMV (+ Stream-K fix-up).
struct GqsaOp {
    int act, decomp;
    int64_t n_parts;
    Dev<char>  act_buf;
    Dev<float> partial;
    GqsaOp(int act_, int decomp_, int64_t width, int64_t ncols, int64_t n_parts_)
        : act(act_), decomp(decomp_), n_parts(n_parts_), act_buf(gqsa_cuda_act_bytes(act_, width, ncols)),
          partial(2 * (size_t) n_parts_ * (size_t) ncols) {}
    void run(const Dev<uint32_t> & w, const Gqsa & t, const Dev<float> & x, int ncols, Dev<float> & y, cudaStream_t st) {
        const gqsa_cuda_act_buf a = gqsa_cuda_prepare_act(act, x.p, t.width, t.width, ncols, act_buf.p, st);
        if (act == GQSA_ACT_Q8) {
            gqsa_cuda_gemv<GQSA_ACT_Q8>(decomp, w.p, t.rows, t.n_kept, n_parts, a, ncols, y.p, t.rows, partial.p, st);
        } else {
            gqsa_cuda_gemv<GQSA_ACT_F16>(decomp, w.p, t.rows, t.n_kept, n_parts, a, ncols, y.p, t.rows, partial.p, st);
        }
    }
};

static int n_sm() {
    int dev = 0, n = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
}

static const char * act_name(int a) { return a == GQSA_ACT_Q8 ? "q8" : "f16"; }
static const char * decomp_name(int d) { return d == GQSA_DECOMP_DATA ? "data" : "task"; }

// ---------------------------------------------------------------------------------------------
// check

static int check(bool quick) {
    const int nsm = n_sm();
    Rng rng(1234);
    int failures = 0, runs = 0;
    double worst = 0.0;
    const int64_t widths[] = {576, 4096, 11008};
    const double sparsities[] = {0.25, 0.50, 0.75};
    const int ncols_list[] = {1, 2, 3, 8};
    printf("| width | rows | sparsity | n_kept | ncols | act | decomposition | parts | NMSE |\n|---|---|---|---|---|---|---|---|---|\n");
    for (int64_t width : widths) {
        const int64_t rows = quick ? 40 : 300;       // not a multiple of the 4-row tile
        for (double sp : sparsities) {
            const Gqsa t = make_gqsa(rows, width, sp, rng);
            const std::vector<float> wd = dense_ref(t);
            Dev<uint32_t> w(t.words);
            for (int ncols : ncols_list) {
                if (quick && ncols == 3) continue;
                std::vector<float> x(ncols * width);
                for (float & v : x) v = 2.0f * rng.uniform() - 1.0f;
                const std::vector<double> ref = gemm_ref(wd, rows, width, x, ncols);
                Dev<float> xd(x), y(ncols * rows);
                const int64_t n_units = rows * t.n_kept;
                for (int act : {GQSA_ACT_Q8, GQSA_ACT_F16}) {
                    std::vector<std::pair<int, int64_t>> cfgs = {{GQSA_DECOMP_DATA, 0},
                        {GQSA_DECOMP_TASK, gqsa_cuda_task_parts(nsm, rows, t.n_kept, 16)}};
                    if (!quick || (act == GQSA_ACT_Q8 && ncols == 1)) {
                        // odd part counts: one part, parts shorter than a row, one unit per part, more parts than units
                        for (int64_t p : {(int64_t) 1, (int64_t) 7, n_units / 3 + 1, n_units, n_units + 5}) {
                            cfgs.push_back({GQSA_DECOMP_TASK, p});
                        }
                    }
                    for (auto [decomp, parts] : cfgs) {
                        CK(cudaMemset(y.p, 0xFF, y.n * sizeof(float)));   // NaN: an unwritten output fails
                        GqsaOp op(act, decomp, width, ncols, std::max<int64_t>(parts, 1));
                        op.run(w, t, xd, ncols, y, 0);
                        CK(cudaGetLastError());
                        CK(cudaDeviceSynchronize());
                        const double e = gqsa_nmse(y.get(), ref);
                        const bool ok = e <= NMSE_MAX;      // NaN fails too
                        failures += !ok;
                        ++runs;
                        worst = std::max(worst, std::isnan(e) ? INFINITY : e);
                        if (!ok || decomp == GQSA_DECOMP_DATA || parts == gqsa_cuda_task_parts(nsm, rows, t.n_kept, 16)) {
                            printf("| %lld | %lld | %.0f %% | %lld | %d | %s | %s | %lld | %.2e%s |\n", (long long) width,
                                   (long long) rows, 100 * sp, (long long) t.n_kept, ncols, act_name(act),
                                   decomp_name(decomp), (long long) parts, e, ok ? "" : " FAIL");
                        }
                    }
                }
            }
            // dequantization to fp16, bit-exact with the reference rounded to half
            Dev<half> wh(rows * width);
            gqsa_cuda_dequantize_f16(w.p, rows, t.n_kept, width, wh.p, 0);
            CK(cudaGetLastError());
            const std::vector<half> got = wh.get();
            int64_t bad = 0;
            for (size_t i = 0; i < got.size(); ++i) {
                bad += __half_as_ushort(got[i]) != __half_as_ushort(__float2half(wd[i]));
            }
            ++runs;
            failures += bad != 0;
            if (bad) printf("dequantize_f16 width %lld sparsity %.2f: %lld of %zu values differ FAIL\n",
                            (long long) width, sp, (long long) bad, got.size());
        }
    }
    printf("\ncheck: %d runs, %d failures, worst NMSE %.2e (limit %.0e); fp16 dequantization bit-exact: %s\n",
           runs, failures, worst, NMSE_MAX, failures ? "see above" : "yes");
    return failures ? 1 : 0;
}

// ---------------------------------------------------------------------------------------------
// Q4_0-style GEMV (for comparison): 32 weights per 18-byte block, w = (q - 8) * d, activations
// int8 per 32 with (d, d*sum); one warp per row, lane l takes blocks l, l+32, ...

static __global__ void q40_quantize_act(const float * __restrict__ x, int64_t width, int8_t * __restrict__ qs,
                                        float2 * __restrict__ ds) {
    const int64_t g = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= width / 32) return;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[32 * g + j]));
    const float d = amax / 127.0f;
    int sum = 0;
    for (int j = 0; j < 32; ++j) {
        const int q = d == 0.0f ? 0 : (int) rintf(x[32 * g + j] / d);
        qs[32 * g + j] = (int8_t) q;
        sum += q;
    }
    ds[g] = make_float2(d, d * (float) sum);
}

static __global__ void __launch_bounds__(128)
q40_gemv(const uint8_t * __restrict__ w, int64_t rows, int64_t width, const int8_t * __restrict__ qs,
         const float2 * __restrict__ ds, float * __restrict__ y) {
    const int64_t row = (int64_t) blockIdx.x * 4 + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int64_t nb = width / 32;
    float acc = 0.0f;
    for (int64_t b = lane; b < nb; b += 32) {
        const uint16_t * blk = (const uint16_t *) (w + (row * nb + b) * 18);   // 2-byte aligned
        const float d = __half2float(__ushort_as_half(__ldg(blk)));
        const int4 x0 = __ldg((const int4 *) (qs + 32 * b)), x1 = __ldg((const int4 *) (qs + 32 * b) + 1);
        const int xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        int s = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const uint32_t v = (uint32_t) __ldg(blk + 1 + 2 * k) | ((uint32_t) __ldg(blk + 2 + 2 * k) << 16);
            s = __dp4a((int) (v & 0x0F0F0F0Fu), xv[k], s);            // weights 4k..4k+3
            s = __dp4a((int) ((v >> 4) & 0x0F0F0F0Fu), xv[4 + k], s); // weights 16+4k..
        }
        const float2 a = __ldg(&ds[b]);
        acc += d * (a.x * (float) s - 8.0f * a.y);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xFFFFFFFFu, acc, off);
    if (lane == 0) y[row] = acc;
}

// ---------------------------------------------------------------------------------------------
// bench

struct Timer {
    Dev<char> flush;
    cudaEvent_t a, b;
    int reps;
    explicit Timer(int reps_) : flush([] { int dev = 0, l2 = 0; CK(cudaGetDevice(&dev));
                                            CK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
                                            return std::max<size_t>(4 * (size_t) l2, 64u << 20); }()),
                                reps(reps_) {
        CK(cudaEventCreate(&a));
        CK(cudaEventCreate(&b));
    }
    // median milliseconds of f(), the L2 flushed (overwritten) before each run
    template <typename F>
    double median_ms(F && f) {
        std::vector<float> t;
        for (int i = 0; i < reps + 3; ++i) {
            CK(cudaMemsetAsync(flush.p, i & 0xFF, flush.n, 0));
            CK(cudaEventRecord(a, 0));
            f();
            CK(cudaEventRecord(b, 0));
            CK(cudaEventSynchronize(b));
            float ms = 0.0f;
            CK(cudaEventElapsedTime(&ms, a, b));
            if (i >= 3) t.push_back(ms);     // 3 warm-up runs
        }
        CK(cudaGetLastError());
        std::sort(t.begin(), t.end());
        return t[t.size() / 2];
    }
};

static double copy_bandwidth_gbs() {
    const size_t n = 1ull << 30;
    Dev<char> src(n), dst(n);
    CK(cudaMemset(src.p, 1, n));
    Timer tm(10);
    const double ms = tm.median_ms([&] { CK(cudaMemcpyAsync(dst.p, src.p, n, cudaMemcpyDeviceToDevice, 0)); });
    return 2.0 * n / (ms * 1e-3) / 1e9;     // bytes read + written
}

static int bench(int reps) {
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const int nsm = prop.multiProcessorCount;
    const double copy_gbs = copy_bandwidth_gbs();
    printf("device: %s, %d SMs, L2 %d MiB; measured copy bandwidth (read + write) %.0f GB/s\n",
           prop.name, nsm, prop.l2CacheSize >> 20, copy_gbs);
    printf("timing: CUDA events, median of %d runs, L2 overwritten before each run; each op includes its "
           "activation preparation (quantization or fp16 conversion) as in ggml\n\n", reps);
    printf("| rows x width | ncols | kernel | us | weight MB | weight GB/s | %% of copy bw | x Q4_0-style | x cuBLAS fp16 |\n"
           "|---|---|---|---|---|---|---|---|---|\n");
    Timer tm(reps);
    Rng rng(99);
    const int64_t shapes[][2] = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
    for (auto & sh : shapes) {
        const int64_t rows = sh[0], width = sh[1];
        const Gqsa t = make_gqsa(rows, width, 0.5, rng);
        Dev<uint32_t> w(t.words);
        for (int ncols : {1, 8}) {
            std::vector<float> x(ncols * width);
            for (float & v : x) v = 2.0f * rng.uniform() - 1.0f;
            Dev<float> xd(x), y(ncols * rows);
            struct Row { std::string name; double us, mb; };
            std::vector<Row> res;

            // Q4_0-style dense 4-bit GEMV (column by column: it has no batched variant)
            {
                std::vector<uint8_t> q(rows * width / 32 * 18);
                for (size_t i = 0; i < q.size(); ++i) q[i] = (uint8_t) rng.next();
                for (int64_t b = 0; b < rows * width / 32; ++b) {
                    const uint16_t d = __half_as_ushort(__float2half(0.01f));
                    memcpy(&q[b * 18], &d, 2);
                }
                Dev<uint8_t> qd(q);
                Dev<int8_t> aq(width * ncols);
                Dev<float2> ad(width / 32 * ncols);
                const double ms = tm.median_ms([&] {
                    for (int c = 0; c < ncols; ++c) {
                        q40_quantize_act<<<(unsigned) ((width / 32 + 127) / 128), 128>>>(xd.p + c * width, width,
                                                                                          aq.p + c * width, ad.p + c * width / 32);
                        q40_gemv<<<(unsigned) ((rows + 3) / 4), 128>>>(qd.p, rows, width, aq.p + c * width,
                                                                       ad.p + c * width / 32, y.p + c * rows);
                    }
                });
                res.push_back({"Q4_0-style (4.5 bpw)", ms * 1e3, q.size() / 1e6});
            }
#ifdef GQSA_HARNESS_CUBLAS
            {
                cublasHandle_t h;
                cublasCreate(&h);
                Dev<half> wh(rows * width), xh(width * ncols);
                std::vector<half> hw(rows * width);
                for (auto & v : hw) v = __float2half(0.02f * (rng.uniform() - 0.5f));
                CK(cudaMemcpy(wh.p, hw.data(), hw.size() * sizeof(half), cudaMemcpyHostToDevice));
                const float one = 1.0f, zero = 0.0f;
                const double ms = tm.median_ms([&] {
                    gqsa_convert_act_f16<<<(unsigned) ((width * ncols / 2 + 255) / 256), 256>>>(xd.p, width, width, ncols, xh.p);
                    cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int) rows, ncols, (int) width, &one, wh.p, CUDA_R_16F,
                                 (int) width, xh.p, CUDA_R_16F, (int) width, &zero, y.p, CUDA_R_32F, (int) rows,
                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
                });
                cublasDestroy(h);
                res.push_back({"cuBLAS fp16 (16 bpw)", ms * 1e3, rows * width * 2 / 1e6});
            }
#endif
            for (int act : {GQSA_ACT_Q8, GQSA_ACT_F16}) {
                for (int decomp : {GQSA_DECOMP_DATA, GQSA_DECOMP_TASK}) {
                    GqsaOp op(act, decomp, width, ncols, gqsa_cuda_task_parts(nsm, rows, t.n_kept, 16));
                    const double ms = tm.median_ms([&] { op.run(w, t, xd, ncols, y, 0); });
                    res.push_back({std::string("GQSA W4S50 ") + act_name(act) + " " + decomp_name(decomp) + " (3.0 bpw)",
                                   ms * 1e3, t.words.size() * 4 / 1e6});
                }
            }
            const double q40_us = res[0].us;
            double cublas_us = 0.0;
            for (auto & r : res) if (r.name.rfind("cuBLAS", 0) == 0) cublas_us = r.us;
            for (auto & r : res) {
                const double gbs = r.mb * 1e6 / (r.us * 1e-6) / 1e9;
                char cub[32] = "n/a";
                if (cublas_us > 0) snprintf(cub, sizeof(cub), "%.2f", cublas_us / r.us);
                printf("| %lldx%lld | %d | %s | %.2f | %.1f | %.0f | %.0f %% | %.2f | %s |\n", (long long) rows,
                       (long long) width, ncols, r.name.c_str(), r.us, r.mb, gbs, 100.0 * gbs / copy_gbs, q40_us / r.us, cub);
            }
        }
    }
#ifndef GQSA_HARNESS_CUBLAS
    printf("\n(built without cuBLAS: no fp16 comparison)\n");
#endif
    return 0;
}

int main(int argc, char ** argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    bool quick = false;
    int reps = 50;
    for (int i = 2; i < argc; ++i) {
        if (!strcmp(argv[i], "--quick")) quick = true;
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::max(1, atoi(argv[++i]));
        else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
    }
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        fprintf(stderr, "gqsa_harness: no CUDA device\n");
        return 3;
    }
    if (mode == "info") {
        cudaDeviceProp prop;
        CK(cudaGetDeviceProperties(&prop, 0));
        printf("%s, compute capability %d.%d, %d SMs, %.1f GiB\n", prop.name, prop.major, prop.minor,
               prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0);
        return 0;
    }
    if (mode == "check") return check(quick);
    if (mode == "bench") return bench(reps);
    fprintf(stderr, "usage: %s info | check [--quick] | bench [--reps N]\n", argv[0]);
    return 2;
}
