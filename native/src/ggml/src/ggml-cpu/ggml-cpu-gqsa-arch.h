// Which ISA kernels a GQSA CPU build uses (gqsa-gguf), as upstream's arch-fallback.h picks them:
//
//   arch/x86/ggml-cpu-gqsa.c   GQSA_CPU_X86: AVX2 (with AVX-512 VNNI or AVX-VNNI dot products where
//                              present); every kernel, superblocks (repacked weights) included
//   arch/arm/ggml-cpu-gqsa.c   GQSA_CPU_ARM: NEON on aarch64 (with the dot-product instructions
//                              where present); every kernel but the superblock ones, gqsa3's
//                              file-layout ones included
//
// An ISA file is compiled on its architecture only (the patch adds it to ggml-cpu's x86 or ARM
// source list) and holds code only where its ISA is enabled. ggml-cpu-gqsa.c holds the scalar
// *_generic kernels, and defines the public names itself for what no ISA file provides here.
// Shared by those files (and native/tests/test_kernels.c, which asks it what a build runs);
// ggml-cpu-gqsa.h is the interface to the rest of ggml-cpu.
//
// Below, the loops that every ISA file runs around its own kernels are written once, as "walks"
// that take the kernel as an argument. An ISA file calls a walk with its static inline kernel, a
// constant: the walk is inlined, the kernel becomes a direct call with constant arguments, and the
// compiler treats it as in the loop written out in the ISA file (e.g. specializes a panel kernel
// for each constant panel count).
#pragma once

#include "ggml-cpu-gqsa.h"
#include "ggml-gqsa.h"

#include <assert.h>
#include <string.h>

#if defined(__AVX2__)
#define GQSA_CPU_X86 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define GQSA_CPU_ARM 1
#endif

#if defined(GQSA_CPU_X86) || defined(GQSA_CPU_ARM)
#define GQSA_CPU_PANELS 1       // the ISA file has the panel kernels: the mul_mat driver runs
#else
#define GQSA_CPU_PANELS 0       // ggml's vec_dot loop runs mul_mat, with the generic kernels
#endif

#if defined(GQSA_CPU_ARM)
#define GQSA_CPU_GQSA3_FILE 1   // the ISA file reads gqsa3 blocks in the file layout (ggml_gqsa3_row, ..._panel_pass)
#else
#define GQSA_CPU_GQSA3_FILE 0   // ggml-cpu-gqsa.c widens them to gqsa4 blocks for the gqsa4 kernels
#endif

// The walks are inlined wherever they are called, before the compiler decides what else to inline
// or specialize (without this, GCC 12 inlined gqsa_panel_pass too late and left the panel kernel
// out of line with a variable panel count: its accumulators in memory).
#if defined(__GNUC__) || defined(__clang__)
#define GQSA_WALK static inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define GQSA_WALK static __forceinline
#else
#define GQSA_WALK static inline
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Bytes per group of a panel (layout: "Panels" in ggml-cpu-gqsa.c)
#define GQSA_PANEL_GROUP_BYTES (GQSA_ACT_BLOCK_BYTES * GQSA_PANEL)

// The mul_mat driver's panel kernels, from the ISA files only (GQSA_CPU_PANELS; without them the
// driver leaves mul_mat to ggml's vec_dot loop). One call runs one K window for a pass of nr weight
// rows (row i at x + i*row_bytes, n units): for each row, the units from cur[i] on whose group is
// < gend (a row's units are sorted by group), acc[i][p][c] += those units . column c of panel p for
// np = 1..4 panels, and cur[i] moves past them. Units are blocks (ggml_gqsa_panel_pass) or
// superblocks (ggml_gqsa_sb_panel_pass, ggml_gqsa3_sb_panel_pass of gqsa3 superblocks; GQSA_CPU_X86
// only; a superblock goes by the group of its first block). Coarse on purpose: a call per row and
// window measured 10-30 % slower on 64-column prompts. The ISA files define them with the walk
// gqsa_panel_pass.
void ggml_gqsa_panel_pass    (const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                              const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]);
void ggml_gqsa_sb_panel_pass (const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                              const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]);
void ggml_gqsa3_sb_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                              const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]);

// One gqsa4 row of nb blocks . one decode activation row (gqsa_q8), from the ISA files only: the
// kernel of ggml_vec_dot_gqsa4_gqsa_q8, which ggml-cpu-gqsa.c defines
float ggml_gqsa_row(const void * GGML_RESTRICT x, int nb, const void * GGML_RESTRICT y);

// The same for gqsa3 rows and the panel pass of their blocks (as ggml_gqsa_panel_pass), from the ISA
// files that read gqsa3's file layout themselves (GQSA_CPU_GQSA3_FILE); ggml-cpu-gqsa.c defines them
// elsewhere, on widened blocks
float ggml_gqsa3_row(const void * GGML_RESTRICT x, int nb, const void * GGML_RESTRICT y);
void  ggml_gqsa3_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                            const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]);

// ---- the kernels an ISA file passes to the walks ----------------------------------------------

// One activation group of 16 floats at x, bit-exact with quantize_row_gqsa_q8_ref: its 16 qs (in
// weight order) to qs, d_x to *d, s_x to *s
typedef void (*gqsa_quantize_group_fn)(const float * GGML_RESTRICT x, int8_t * GGML_RESTRICT qs, float * d, float * s);

// np panels (1..4) against the n units (blocks or superblocks) of a row at x:
// acc_io[p][c] += those units . column c of panel p
typedef void (*gqsa_panel_row_fn)(const void * GGML_RESTRICT x, int n, const uint8_t * const * panels, int np,
                                  float acc_io[][GQSA_PANEL]);

// The group of a unit: of a block; of a superblock, its first block's
typedef uint32_t (*gqsa_unit_group_fn)(const void * unit);

static inline uint32_t gqsa_block_group(const void * unit) {
    return gqsa_block_index((const block_gqsa4 *) unit);
}

static inline uint32_t gqsa3_block_group(const void * unit) {
    return ((const block_gqsa3 *) unit)->iz & GQSA_INDEX_MASK;
}

// ---- the walks -----------------------------------------------------------------------------------

// quantize_row_gqsa_q8: k floats (k % 16 == 0) into gqsa_q8 blocks
GQSA_WALK void gqsa_quantize_row(gqsa_quantize_group_fn quantize, const float * GGML_RESTRICT x,
                                     void * GGML_RESTRICT vy, int64_t k) {
    assert(k % GQSA_GROUP_SIZE == 0);
    block_gqsa_q8 * GGML_RESTRICT y = (block_gqsa_q8 *) vy;
    const int64_t nb = k / GQSA_GROUP_SIZE;
    for (int64_t i = 0; i < nb; ++i) {
        quantize(x + i * GQSA_GROUP_SIZE, y[i].qs, &y[i].d, &y[i].s);
    }
}

// ggml_gqsa_pack_panel: groups [g0, g1) of GQSA_PANEL columns (column c at x + c*ldx) into a panel
GQSA_WALK void gqsa_pack_panel(gqsa_quantize_group_fn quantize, const float * GGML_RESTRICT x, int64_t ldx,
                                   int64_t g0, int64_t g1, void * GGML_RESTRICT vpanel) {
    uint8_t * panel = (uint8_t *) vpanel;
    for (int64_t g = g0; g < g1; ++g) {
        uint8_t * pg = panel + g * GQSA_PANEL_GROUP_BYTES;
        float * pd = (float *) (pg + GQSA_GROUP_SIZE * GQSA_PANEL);
        for (int c = 0; c < GQSA_PANEL; ++c) {
            int8_t qs[GQSA_GROUP_SIZE];
            quantize(x + c * ldx + g * GQSA_GROUP_SIZE, qs, &pd[c], &pd[GQSA_PANEL + c]);
            for (int k = 0; k < 4; ++k) {           // weights 4k..4k+3 of column c
                memcpy(pg + (k * GQSA_PANEL + c) * 4, qs + 4 * k, 4);
            }
        }
    }
}

// ggml_gqsa_panel_pass, ggml_gqsa_sb_panel_pass: one K window of a pass, over units of unit_bytes
GQSA_WALK void gqsa_panel_pass(gqsa_panel_row_fn row, gqsa_unit_group_fn group, size_t unit_bytes,
                                   const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur,
                                   uint32_t gend, const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]) {
    for (int i = 0; i < nr; ++i) {
        const uint8_t * xr = x + i * row_bytes;
        int e = cur[i];
        while (e < n && group(xr + e * unit_bytes) < gend) {
            ++e;
        }
        if (e == cur[i]) {
            continue;
        }
        const uint8_t * u = xr + cur[i] * unit_bytes;
        switch (np) {   // constant panel counts: the accumulators stay in registers
            case 4:  row(u, e - cur[i], panels, 4, acc[i]); break;
            case 3:  row(u, e - cur[i], panels, 3, acc[i]); break;
            case 2:  row(u, e - cur[i], panels, 2, acc[i]); break;
            default: row(u, e - cur[i], panels, 1, acc[i]); break;
        }
        cur[i] = e;
    }
}

#ifdef __cplusplus
}
#endif
