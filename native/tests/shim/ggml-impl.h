// Shim of ggml-impl.h for native/tests/test_kernels.c: IEEE binary16 conversions (round to nearest
// even), bit-exact with ggml's (F16C / __fp16 / its portable bit version).
#pragma once

#include "ggml.h"

#include <string.h>

static inline float gqsa_shim_fp16_to_fp32(ggml_fp16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    const uint32_t e    = (h >> 10) & 0x1F;
    const uint32_t m    = h & 0x3FF;
    uint32_t bits;
    if (e == 0) {                                   // zero or subnormal: m * 2^-24 is exact
        const float v = (float) m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    bits = e == 31 ? (sign | 0x7F800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static inline ggml_fp16_t gqsa_shim_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof(x));
    const uint32_t sign = (x >> 16) & 0x8000;
    const uint32_t ax   = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) {                        // inf, NaN
        return (ggml_fp16_t) (sign | (ax > 0x7F800000u ? 0x7E00 : 0x7C00));
    }
    if (ax >= 0x477FF000u) {                        // >= 65520 rounds to inf
        return (ggml_fp16_t) (sign | 0x7C00);
    }
    if (ax < 0x38800000u) {                         // below 2^-14: subnormal result
        const uint32_t e = ax >> 23;
        const uint32_t shift = 126 - e;             // value = mant * 2^-shift in units of 2^-24
        if (shift > 24) {
            return (ggml_fp16_t) sign;              // at most half of 2^-24: rounds to zero (even)
        }
        const uint32_t mant = (ax & 0x7FFFFFu) | 0x800000u;
        uint32_t q = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        q += rem > half || (rem == half && (q & 1));
        return (ggml_fp16_t) (sign | q);
    }
    uint32_t h = (((ax >> 23) - 112) << 10) | ((ax & 0x7FFFFFu) >> 13);
    const uint32_t rem = ax & 0x1FFF;
    h += rem > 0x1000 || (rem == 0x1000 && (h & 1));
    return (ggml_fp16_t) (sign | h);
}

#define GGML_FP16_TO_FP32(x) gqsa_shim_fp16_to_fp32(x)
#define GGML_FP32_TO_FP16(x) gqsa_shim_fp32_to_fp16(x)
