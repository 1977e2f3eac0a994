// Which ISA kernels a GQSA CPU build uses (gqsa-gguf), as upstream's arch-fallback.h picks them:
//
//   arch/x86/ggml-cpu-gqsa.c   GQSA_CPU_X86: AVX2 (with AVX-512 VNNI or AVX-VNNI dot products where
//                              present); every kernel, superblocks (repacked weights) included
//   arch/arm/ggml-cpu-gqsa.c   GQSA_CPU_ARM: NEON on aarch64 (with the dot-product instructions
//                              where present); every kernel but the superblock ones
//
// An ISA file is compiled on its architecture only (the patch adds it to ggml-cpu's x86 or ARM
// source list) and holds code only where its ISA is enabled. ggml-cpu-gqsa.c holds the scalar
// *_generic kernels, and defines the public names itself for what no ISA file provides here.
// Shared by those files only; ggml-cpu-gqsa.h is the interface to the rest of ggml-cpu.
#pragma once

#include "ggml-cpu-gqsa.h"
#include "ggml-gqsa.h"

#if defined(__AVX2__)
#define GQSA_CPU_X86 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#define GQSA_CPU_ARM 1
#endif

#ifdef __cplusplus
extern "C" {
#endif

// Bytes per group of a panel (layout: "Panels" in ggml-cpu-gqsa.c)
#define GQSA_PANEL_GROUP_BYTES (GQSA_ACT_BLOCK_BYTES * GQSA_PANEL)

// The mul_mat driver's panel kernels, from the ISA files only (without them the driver leaves
// mul_mat to ggml's vec_dot loop). One call runs one K window for a pass of nr weight rows (row i at
// x + i*row_bytes, n units): for each row, the units from cur[i] on whose group is < gend (a row's
// units are sorted by group), acc[i][p][c] += those units . column c of panel p for np = 1..4
// panels, and cur[i] moves past them. Units are blocks (ggml_gqsa_panel_pass) or superblocks
// (ggml_gqsa_sb_panel_pass, GQSA_CPU_X86 only; a superblock goes by the group of its first block).
// Coarse on purpose: a call per row and window measured 10-30 % slower on 64-column prompts.
void ggml_gqsa_panel_pass   (const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                             const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]);
void ggml_gqsa_sb_panel_pass(const uint8_t * GGML_RESTRICT x, size_t row_bytes, int n, int nr, int * cur, uint32_t gend,
                             const uint8_t * const * panels, int np, float acc[][4][GQSA_PANEL]);

#ifdef __cplusplus
}
#endif
