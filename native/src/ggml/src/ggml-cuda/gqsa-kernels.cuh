// GQSA CUDA kernels: decode GEMV over the kept 12-byte gqsa4 blocks, activation quantization and
// dequantization to fp16 (docs/FORMAT.md is the format; gqsa-partition.h the work split).
//
// Self-contained (CUDA runtime and cuda_fp16.h only): gqsa.cu wires these into ggml-cuda, and the
// standalone harness native/cuda/gqsa_harness.cu runs the same templates against a CPU reference.
//
// GEMV, y[r, c] = sum over row r's kept blocks of d * sum_j (q[j] - z) * x[c, 16*g + j]:
// * a warp computes one row segment: lane l reads blocks l, l+32, ... of it (three 32-bit loads
//   per 12-byte block, so the warp's loads cover a contiguous run of the row), GQSA_GEMV_UNROLL
//   blocks per lane in flight, and reduces with shuffles; only kept blocks are read;
// * every block read serves all NCOLS (1..8) activation columns from registers;
// * activations: GQSA_ACT_Q8 (default) is the CPU path's 16-wide int8 type, laid out for the GPU as
//   qs[c][K] int8 (one 16-byte load per block and column) plus ds[c][K/16] = (d, d*sum qs):
//       acc += d_w * (d_x * dp4a(q, qs) - z * s_x)
//   GQSA_ACT_F16 reads fp16 activations (32 bytes per block and column) and accumulates
//   d_w * (sum q*x - z * sum x) in fp32. The harness times both; ggml uses Q8 (FIXME: measure on
//   a GPU which is faster, see the README's CUDA section).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "gqsa-partition.h"

#define GQSA_CUDA_GROUP       16
#define GQSA_CUDA_BLOCK_WORDS 3    // 12-byte block: word 0 = d | iz << 16, words 1-2 = qs[0..7]
#define GQSA_CUDA_MAX_NCOLS   8    // the GEMV's batch limit; more columns go to dequant + cuBLAS
#define GQSA_GEMV_WARPS       4    // warps per thread block (both decompositions)
#define GQSA_GEMV_UNROLL      4    // blocks in flight per lane

enum gqsa_cuda_act {
    GQSA_ACT_Q8  = 0,
    GQSA_ACT_F16 = 1,
};

enum gqsa_cuda_decomp {
    GQSA_DECOMP_DATA = 0,   // one thread block per tile of GQSA_GEMV_WARPS rows
    GQSA_DECOMP_TASK = 1,   // Stream-K: equal unit ranges per warp, partial sums fixed up
};

// Activations of one mul_mat, in the layout the GEMV reads.
struct gqsa_cuda_act_buf {
    const int8_t * qs;      // Q8: [ncols][width]
    const float2 * ds;      // Q8: [ncols][width/16] (d, s)
    const half   * xh;      // F16: [ncols][width]
    int64_t        width;   // K (a multiple of 16)
};

// ---------------------------------------------------------------------------------------------
// Activation preparation: src is column c at src + c*col_stride floats (elements contiguous).

// One thread per 16-wide group of one column (bit-exact with quantize_row_gqsa_q8_ref, barring
// the float division, which is IEEE round-to-nearest here as there).
static __global__ void gqsa_quantize_act_q8(const float * __restrict__ src, int64_t col_stride, int64_t width,
                                            int64_t ncols, int8_t * __restrict__ qs, float2 * __restrict__ ds) {
    const int64_t n_groups = width / GQSA_CUDA_GROUP;
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_groups * ncols) {
        return;
    }
    const int64_t c = i / n_groups;
    const int64_t g = i % n_groups;
    const float * x = src + c * col_stride + g * GQSA_CUDA_GROUP;
    float v[GQSA_CUDA_GROUP];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < GQSA_CUDA_GROUP; ++j) {
        v[j] = x[j];
        amax = fmaxf(amax, fabsf(v[j]));
    }
    const float d = __fdiv_rn(amax, 127.0f);
    int sum = 0;
    uint32_t packed[GQSA_CUDA_GROUP / 4];
#pragma unroll
    for (int j = 0; j < GQSA_CUDA_GROUP / 4; ++j) {
        packed[j] = 0;
    }
#pragma unroll
    for (int j = 0; j < GQSA_CUDA_GROUP; ++j) {
        const int q = d == 0.0f ? 0 : (int) rintf(__fdiv_rn(v[j], d));
        sum += q;
        packed[j / 4] |= (uint32_t) (q & 0xFF) << (8 * (j % 4));
    }
    *(uint4 *) (qs + c * width + g * GQSA_CUDA_GROUP) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    ds[c * n_groups + g] = make_float2(d, d * (float) sum);
}

// One thread per 2 values of one column.
static __global__ void gqsa_convert_act_f16(const float * __restrict__ src, int64_t col_stride, int64_t width,
                                            int64_t ncols, half * __restrict__ xh) {
    const int64_t i = ((int64_t) blockIdx.x * blockDim.x + threadIdx.x) * 2;
    if (i >= width * ncols) {
        return;
    }
    const int64_t c = i / width;
    const int64_t k = i % width;
    const float * x = src + c * col_stride + k;
    *(half2 *) (xh + c * width + k) = __floats2half2_rn(x[0], x[1]);
}

// ---------------------------------------------------------------------------------------------
// Dot products of one weight block with one activation column.

// Four int8 products summed into c: the dp4a instruction from sm_61 on; byte by byte before (ggml-cuda
// still builds virtual architectures below sm_61 with CUDA < 13).
static __device__ __forceinline__ int gqsa_dp4a(int a, int b, int c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 610
    const char4 va = *(const char4 *) &a, vb = *(const char4 *) &b;
    return c + va.x * vb.x + va.y * vb.y + va.z * vb.z + va.w * vb.w;
#else
    return __dp4a(a, b, c);
#endif
}

template <int ACT>
struct gqsa_block_dot;

template <>
struct gqsa_block_dot<GQSA_ACT_Q8> {
    static __device__ __forceinline__ float dot(uint32_t w1, uint32_t w2, float z, uint32_t g,
                                                const gqsa_cuda_act_buf & a, int c) {
        const int4   x  = __ldg((const int4 *) (a.qs + c * a.width) + g);
        const float2 ds = __ldg(a.ds + c * (a.width / GQSA_CUDA_GROUP) + g);
        // byte j of w1/w2 is q[j] | q[j+8] << 4 (FORMAT.md): low nibbles weights 0..7, high 8..15
        int s = gqsa_dp4a((int) (w1 & 0x0F0F0F0Fu),        x.x, 0);
        s     = gqsa_dp4a((int) (w2 & 0x0F0F0F0Fu),        x.y, s);
        s     = gqsa_dp4a((int) ((w1 >> 4) & 0x0F0F0F0Fu), x.z, s);
        s     = gqsa_dp4a((int) ((w2 >> 4) & 0x0F0F0F0Fu), x.w, s);
        return ds.x * (float) s - z * ds.y;
    }
};

template <>
struct gqsa_block_dot<GQSA_ACT_F16> {
    static __device__ __forceinline__ float dot(uint32_t w1, uint32_t w2, float z, uint32_t g,
                                                const gqsa_cuda_act_buf & a, int c) {
        const uint4 * p = (const uint4 *) (a.xh + c * a.width) + 2 * g;
        const uint4 lo = __ldg(p), hi = __ldg(p + 1);         // x[0..7], x[8..15]
        const uint32_t xl[4] = {lo.x, lo.y, lo.z, lo.w};
        const uint32_t xu[4] = {hi.x, hi.y, hi.z, hi.w};
        float qx = 0.0f, sx = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            // weights 2j, 2j+1 are the low nibbles of bytes 2j, 2j+1; weights 8+2j, 9+2j the high ones
            const uint32_t wb = (j < 2 ? w1 : w2) >> (16 * (j % 2));
            const float2 a0 = __half22float2(*(const half2 *) &xl[j]);
            const float2 a1 = __half22float2(*(const half2 *) &xu[j]);
            qx = fmaf((float) (wb & 0xF),         a0.x, qx);
            qx = fmaf((float) ((wb >> 8) & 0xF),  a0.y, qx);
            qx = fmaf((float) ((wb >> 4) & 0xF),  a1.x, qx);
            qx = fmaf((float) ((wb >> 12) & 0xF), a1.y, qx);
            sx += (a0.x + a0.y) + (a1.x + a1.y);
        }
        return qx - z * sx;
    }
};

// acc[c] += the dot products of blocks [b0, b1) of one row (starting at `row`, in 32-bit words)
// with the NCOLS activation columns; the caller reduces acc over the warp.
template <int NCOLS, int ACT>
static __device__ __forceinline__ void gqsa_warp_segment(const uint32_t * __restrict__ row, int64_t b0, int64_t b1,
                                                         const gqsa_cuda_act_buf & a, float acc[NCOLS]) {
    const int lane = threadIdx.x % 32;
    for (int64_t base = b0 + lane; base < b1; base += 32 * GQSA_GEMV_UNROLL) {
        uint32_t w[GQSA_GEMV_UNROLL][GQSA_CUDA_BLOCK_WORDS];
#pragma unroll
        for (int u = 0; u < GQSA_GEMV_UNROLL; ++u) {       // all loads first: UNROLL blocks in flight
            const int64_t b = base + 32 * u;
            const uint32_t * blk = row + GQSA_CUDA_BLOCK_WORDS * b;
#pragma unroll
            for (int k = 0; k < GQSA_CUDA_BLOCK_WORDS; ++k) {
                w[u][k] = b < b1 ? __ldg(blk + k) : 0u;
            }
        }
#pragma unroll
        for (int u = 0; u < GQSA_GEMV_UNROLL; ++u) {
            if (base + 32 * u >= b1) {
                break;
            }
            const float    d = __half2float(__ushort_as_half((unsigned short) (w[u][0] & 0xFFFF)));
            const uint32_t g = (w[u][0] >> 16) & 0xFFF;
            const float    z = (float) (w[u][0] >> 28);
#pragma unroll
            for (int c = 0; c < NCOLS; ++c) {
                acc[c] = fmaf(d, gqsa_block_dot<ACT>::dot(w[u][1], w[u][2], z, g, a, c), acc[c]);
            }
        }
    }
}

template <int NCOLS>
static __device__ __forceinline__ void gqsa_warp_reduce(float acc[NCOLS]) {
#pragma unroll
    for (int c = 0; c < NCOLS; ++c) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            acc[c] += __shfl_xor_sync(0xFFFFFFFFu, acc[c], off);
        }
    }
}

// Lane c < NCOLS of the warp writes column c (out + c*stride).
template <int NCOLS>
static __device__ __forceinline__ void gqsa_warp_store(const float acc[NCOLS], float * out, int64_t stride) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int c = 0; c < NCOLS; ++c) {
        if (lane == c) {
            out[c * stride] = acc[c];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GEMV kernels. w: the gqsa4 tensor (n_rows rows of n_kept 12-byte blocks, 4-byte aligned);
// dst: column c, row r at dst[c*dst_stride + r].

// Data-centric: grid gqsa_dc_n_tiles(n_rows, GQSA_GEMV_WARPS), GQSA_GEMV_WARPS warps per block.
template <int NCOLS, int ACT>
static __global__ void __launch_bounds__(32 * GQSA_GEMV_WARPS)
gqsa_gemv_data(const uint32_t * __restrict__ w, int64_t n_rows, int64_t n_kept, gqsa_cuda_act_buf a,
               float * __restrict__ dst, int64_t dst_stride) {
    const int64_t row = gqsa_dc_row(n_rows, GQSA_GEMV_WARPS, blockIdx.x, threadIdx.x / 32);
    if (row < 0) {
        return;
    }
    float acc[NCOLS] = {0.0f};
    gqsa_warp_segment<NCOLS, ACT>(w + row * n_kept * GQSA_CUDA_BLOCK_WORDS, 0, n_kept, a, acc);
    gqsa_warp_reduce<NCOLS>(acc);
    gqsa_warp_store<NCOLS>(acc, dst + row, dst_stride);
}

// Task-centric: n_parts warps in blocks of GQSA_GEMV_WARPS; partial: [2*n_parts][NCOLS] floats.
template <int NCOLS, int ACT>
static __global__ void __launch_bounds__(32 * GQSA_GEMV_WARPS)
gqsa_gemv_task(const uint32_t * __restrict__ w, int64_t n_rows, int64_t n_kept, int64_t n_parts, gqsa_cuda_act_buf a,
               float * __restrict__ dst, int64_t dst_stride, float * __restrict__ partial) {
    const int64_t p = (int64_t) blockIdx.x * GQSA_GEMV_WARPS + threadIdx.x / 32;
    if (p >= n_parts) {
        return;
    }
    const int64_t n_units = n_rows * n_kept;
    const int64_t end = gqsa_sk_begin(n_units, n_parts, p + 1);
    for (int64_t u = gqsa_sk_begin(n_units, n_parts, p); u < end; ) {
        const gqsa_sk_segment s = gqsa_sk_segment_at(n_kept, n_units, n_parts, p, u);
        float acc[NCOLS] = {0.0f};
        gqsa_warp_segment<NCOLS, ACT>(w + s.row * n_kept * GQSA_CUDA_BLOCK_WORDS, s.b0, s.b1, a, acc);
        gqsa_warp_reduce<NCOLS>(acc);
        if (s.slot < 0) {
            gqsa_warp_store<NCOLS>(acc, dst + s.row, dst_stride);
        } else {
            gqsa_warp_store<NCOLS>(acc, partial + s.slot * NCOLS, 1);
        }
        u += s.b1 - s.b0;
    }
}

// Fix-up after gqsa_gemv_task: one thread per part and column.
static __global__ void gqsa_gemv_task_fixup(int64_t n_rows, int64_t n_kept, int64_t n_parts, int ncols,
                                            const float * __restrict__ partial, float * __restrict__ dst,
                                            int64_t dst_stride) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_parts * ncols) {
        return;
    }
    const int64_t p = i / ncols;
    const int     c = (int) (i % ncols);
    const int64_t n_units = n_rows * n_kept;
    int64_t first = 0;
    const int64_t row = gqsa_sk_finished_row(n_kept, n_units, n_parts, p, &first);
    if (row < 0) {
        return;
    }
    float sum = 0.0f;
    for (int64_t q = first; q <= p; ++q) {
        const int64_t slot = gqsa_sk_slot(n_kept, n_units, n_parts, q, row);
        if (slot >= 0) {
            sum += partial[slot * ncols + c];
        }
    }
    dst[c * dst_stride + row] = sum;
}

// ---------------------------------------------------------------------------------------------
// Dequantization to a dense fp16 [n_rows][width] matrix, for the cuBLAS path. The caller zeroes
// dst first (pruned groups); one thread per kept block writes its 16 values (32 bytes).
static __global__ void gqsa_dequantize_f16(const uint32_t * __restrict__ w, int64_t n_rows, int64_t n_kept,
                                           int64_t width, half * __restrict__ dst) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * n_kept) {
        return;
    }
    const int64_t row = i / n_kept;
    const uint32_t w0 = __ldg(w + GQSA_CUDA_BLOCK_WORDS * i);
    const uint32_t qs[2] = {__ldg(w + GQSA_CUDA_BLOCK_WORDS * i + 1), __ldg(w + GQSA_CUDA_BLOCK_WORDS * i + 2)};
    const float d = __half2float(__ushort_as_half((unsigned short) (w0 & 0xFFFF)));
    const int   g = (w0 >> 16) & 0xFFF;
    const int   z = (int) (w0 >> 28);
    uint32_t out[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        // halves 2j, 2j+1 (weights from the low nibbles) and 8+2j, 9+2j (high nibbles)
        const uint32_t b = qs[j / 2] >> (16 * (j % 2));
        const half2 lo = __floats2half2_rn((float) ((int) (b & 0xF) - z) * d, (float) ((int) ((b >> 8) & 0xF) - z) * d);
        const half2 hi = __floats2half2_rn((float) ((int) ((b >> 4) & 0xF) - z) * d, (float) ((int) ((b >> 12) & 0xF) - z) * d);
        out[j]     = *(const uint32_t *) &lo;
        out[4 + j] = *(const uint32_t *) &hi;
    }
    uint4 * o = (uint4 *) (dst + row * width + (int64_t) g * GQSA_CUDA_GROUP);
    o[0] = make_uint4(out[0], out[1], out[2], out[3]);
    o[1] = make_uint4(out[4], out[5], out[6], out[7]);
}

// ---------------------------------------------------------------------------------------------
// Host-side launch helpers (stream-ordered, no synchronization, no allocation: usable while a
// CUDA graph is captured). act/partial buffers belong to the caller.

// Bytes of the activation buffer for `ncols` columns of `width`.
static inline size_t gqsa_cuda_act_bytes(int act, int64_t width, int64_t ncols) {
    return act == GQSA_ACT_Q8
        ? (size_t) ncols * (size_t) width + (size_t) ncols * (size_t) (width / GQSA_CUDA_GROUP) * sizeof(float2)
        : (size_t) ncols * (size_t) width * sizeof(half);
}

// Fills `buf` (gqsa_cuda_act_bytes, 16-byte aligned) from fp32 columns; returns the view.
static inline gqsa_cuda_act_buf gqsa_cuda_prepare_act(int act, const float * src, int64_t col_stride, int64_t width,
                                                      int64_t ncols, void * buf, cudaStream_t stream) {
    gqsa_cuda_act_buf a = {nullptr, nullptr, nullptr, width};
    const int threads = 256;
    if (act == GQSA_ACT_Q8) {
        int8_t * qs = (int8_t *) buf;
        float2 * ds = (float2 *) (qs + ncols * width);     // width % 16 == 0: 16-byte aligned
        const int64_t n = ncols * (width / GQSA_CUDA_GROUP);
        gqsa_quantize_act_q8<<<(unsigned) ((n + threads - 1) / threads), threads, 0, stream>>>(
            src, col_stride, width, ncols, qs, ds);
        a.qs = qs;
        a.ds = ds;
    } else {
        half * xh = (half *) buf;
        const int64_t n = ncols * width / 2;
        gqsa_convert_act_f16<<<(unsigned) ((n + threads - 1) / threads), threads, 0, stream>>>(
            src, col_stride, width, ncols, xh);
        a.xh = xh;
    }
    return a;
}

// Number of Stream-K parts (warps) for a device with n_sm multiprocessors.
static inline int64_t gqsa_cuda_task_parts(int n_sm, int64_t n_rows, int64_t n_kept, int warps_per_sm) {
    int64_t p = (int64_t) n_sm * warps_per_sm;
    const int64_t n_units = n_rows * n_kept;
    return p < n_units ? p : n_units;
}

template <int NCOLS, int ACT>
static void gqsa_cuda_gemv_launch(int decomp, const void * w, int64_t n_rows, int64_t n_kept, int64_t n_parts,
                                  const gqsa_cuda_act_buf & a, float * dst, int64_t dst_stride, float * partial,
                                  cudaStream_t stream) {
    const uint32_t * w32 = (const uint32_t *) w;
    if (decomp == GQSA_DECOMP_DATA) {
        const int64_t tiles = gqsa_dc_n_tiles(n_rows, GQSA_GEMV_WARPS);
        gqsa_gemv_data<NCOLS, ACT><<<(unsigned) tiles, 32 * GQSA_GEMV_WARPS, 0, stream>>>(
            w32, n_rows, n_kept, a, dst, dst_stride);
    } else {
        const int64_t blocks = (n_parts + GQSA_GEMV_WARPS - 1) / GQSA_GEMV_WARPS;
        gqsa_gemv_task<NCOLS, ACT><<<(unsigned) blocks, 32 * GQSA_GEMV_WARPS, 0, stream>>>(
            w32, n_rows, n_kept, n_parts, a, dst, dst_stride, partial);
        const int threads = 128;
        const int64_t n = n_parts * NCOLS;
        gqsa_gemv_task_fixup<<<(unsigned) ((n + threads - 1) / threads), threads, 0, stream>>>(
            n_rows, n_kept, n_parts, NCOLS, partial, dst, dst_stride);
    }
}

// Runtime ncols (1..GQSA_CUDA_MAX_NCOLS) to the template.
template <int ACT>
static void gqsa_cuda_gemv(int decomp, const void * w, int64_t n_rows, int64_t n_kept, int64_t n_parts,
                           const gqsa_cuda_act_buf & a, int ncols, float * dst, int64_t dst_stride, float * partial,
                           cudaStream_t stream) {
    switch (ncols) {
        case 1: gqsa_cuda_gemv_launch<1, ACT>(decomp, w, n_rows, n_kept, n_parts, a, dst, dst_stride, partial, stream); break;
        case 2: gqsa_cuda_gemv_launch<2, ACT>(decomp, w, n_rows, n_kept, n_parts, a, dst, dst_stride, partial, stream); break;
        case 3: gqsa_cuda_gemv_launch<3, ACT>(decomp, w, n_rows, n_kept, n_parts, a, dst, dst_stride, partial, stream); break;
        case 4: gqsa_cuda_gemv_launch<4, ACT>(decomp, w, n_rows, n_kept, n_parts, a, dst, dst_stride, partial, stream); break;
        case 5: gqsa_cuda_gemv_launch<5, ACT>(decomp, w, n_rows, n_kept, n_parts, a, dst, dst_stride, partial, stream); break;
        case 6: gqsa_cuda_gemv_launch<6, ACT>(decomp, w, n_rows, n_kept, n_parts, a, dst, dst_stride, partial, stream); break;
        case 7: gqsa_cuda_gemv_launch<7, ACT>(decomp, w, n_rows, n_kept, n_parts, a, dst, dst_stride, partial, stream); break;
        case 8: gqsa_cuda_gemv_launch<8, ACT>(decomp, w, n_rows, n_kept, n_parts, a, dst, dst_stride, partial, stream); break;
        default: break;   // callers check ncols
    }
}

// Dense fp16 copy [n_rows][width] of a gqsa4 tensor into dst (n_rows*width halves).
static inline void gqsa_cuda_dequantize_f16(const void * w, int64_t n_rows, int64_t n_kept, int64_t width, half * dst,
                                            cudaStream_t stream) {
    cudaMemsetAsync(dst, 0, (size_t) n_rows * (size_t) width * sizeof(half), stream);
    const int threads = 256;
    const int64_t n = n_rows * n_kept;
    gqsa_dequantize_f16<<<(unsigned) ((n + threads - 1) / threads), threads, 0, stream>>>(
        (const uint32_t *) w, n_rows, n_kept, width, dst);
}
