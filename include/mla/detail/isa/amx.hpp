#pragma once
/// \file
/// The AMX target: the AVX-512 kernels plus Intel AMX-BF16 tile kernels. Compiled in every
/// build on GCC/Clang x86-64 (a function-target region); run only where the CPU has AMX-TILE and
/// AMX-BF16 and Linux granted the process the tile state (detail/isa/cpu.hpp). Internal.
///
/// AMX facts the kernels rely on: 8 tile registers of up to 16 rows x 64 bytes, shaped by a
/// 64-byte configuration (palette 1); TDPBF16PS C += A B with C [16 x 16] FP32, A [16 x 32]
/// BF16 and B stored in pairs, row k/2 holding (B[k][n], B[k+1][n]) for each column n. Products
/// of BF16 values are exact in FP32 and the accumulation is FP32.

#include <cstdint>

#include "mla/detail/isa/avx512.hpp"

#if MLA_ISA_X86

#if defined(__clang__)
#pragma clang attribute push(                                                       \
    __attribute__((target("amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw,avx512dq," \
                          "avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))),        \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target( \
    "amx-tile,amx-bf16,avx512bf16,avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif

namespace mla::detail::isa::amx {

/// The 64-byte tile configuration of LDTILECFG (palette 1).
struct alignas(64) TileConfig {
  std::uint8_t palette = 1;
  std::uint8_t start_row = 0;
  std::uint8_t reserved[14] = {};
  std::uint16_t colsb[16] = {};  ///< bytes per row of each tile
  std::uint8_t rows[16] = {};    ///< rows of each tile
};

/// C [16][16] (row stride c_stride floats) = sum over k blocks of A_k [16][32] B_k, with A's
/// BF16 rows a_stride bytes apart and B_k [16 pair rows][16 columns][2] in pair layout, 1024
/// bytes per block, blocks contiguous. The building block of the AMX kernels; also what the
/// tests use to check that the tile state is usable.
inline void tile_dot_bf16(const std::uint16_t* a, Index a_stride_bytes, const std::uint16_t* b,
                          Index k_blocks, float* c, Index c_stride) {
  TileConfig cfg;
  for (int t = 0; t < 3; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  // The tile intrinsics are statement macros in GCC 12 and take tile numbers as immediates.
  _tile_zero(0);
  for (Index k = 0; k < k_blocks; ++k) {
    _tile_loadd(1, reinterpret_cast<const unsigned char*>(a) + k * 64, a_stride_bytes);
    _tile_loadd(2, b + k * 512, 64);
    _tile_dpbf16ps(0, 1, 2);
  }
  _tile_stored(0, c, c_stride * static_cast<Index>(sizeof(float)));
  _tile_release();
}

/// The AVX-512 kernels, reported as the AMX target (the tile kernels are called directly).
inline const Kernels& table() {
  static const Kernels k = [] {
    Kernels t = avx512::table_for_cpu();
    t.isa = Isa::kAmx;
    return t;
  }();
  return k;
}

}  // namespace mla::detail::isa::amx

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // MLA_ISA_X86
