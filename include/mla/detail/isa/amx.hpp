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
#include <cstring>

#include "mla/detail/isa/avx512.hpp"
#include "mla/detail/isa/tile_counts.hpp"

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

/// The tile instructions themselves. The tile intrinsics take tile numbers as immediates (GCC
/// 12 pastes them into the instruction text), hence one branch per tile number. GCC's tile
/// loads and LDTILECFG do not tell the compiler which memory they read, so a compiler barrier
/// goes before each: the stores that filled that memory are not moved past them.
struct HardwareTiles {
  static constexpr bool kEmulated = false;
  static void barrier() { __asm__ __volatile__("" ::: "memory"); }
  void configure(const TileConfig& c) {
    barrier();
    _tile_loadconfig(&c);
  }
  void release() { _tile_release(); }
  template <int T>
  MLA_KERNEL_INLINE void zero() {
    static_assert(T >= 0 && T < 4, "accumulator tiles are 0..3");
    if constexpr (T == 0) _tile_zero(0);
    if constexpr (T == 1) _tile_zero(1);
    if constexpr (T == 2) _tile_zero(2);
    if constexpr (T == 3) _tile_zero(3);
  }
  template <int T>
  MLA_KERNEL_INLINE void load(const void* p, Index stride) {
    static_assert(T >= 0 && T < 8, "tiles are 0..7");
    barrier();
    if constexpr (T == 0) _tile_loadd(0, p, stride);
    if constexpr (T == 1) _tile_loadd(1, p, stride);
    if constexpr (T == 2) _tile_loadd(2, p, stride);
    if constexpr (T == 3) _tile_loadd(3, p, stride);
    if constexpr (T == 4) _tile_loadd(4, p, stride);
    if constexpr (T == 5) _tile_loadd(5, p, stride);
    if constexpr (T == 6) _tile_loadd(6, p, stride);
    if constexpr (T == 7) _tile_loadd(7, p, stride);
  }
  template <int T>
  MLA_KERNEL_INLINE void store(void* p, Index stride) {
    static_assert(T >= 0 && T < 4, "accumulator tiles are 0..3");
    if constexpr (T == 0) _tile_stored(0, p, stride);
    if constexpr (T == 1) _tile_stored(1, p, stride);
    if constexpr (T == 2) _tile_stored(2, p, stride);
    if constexpr (T == 3) _tile_stored(3, p, stride);
  }
  /// C += A B (TDPBF16PS) for the combinations the kernels use: C = 2 i + j, A = 4 + i, B = 6 + j.
  template <int C, int A, int B>
  MLA_KERNEL_INLINE void dp() {
    static_assert(C == 2 * (A - 4) + (B - 6) && A >= 4 && A < 6 && B >= 6 && B < 8,
                  "C = 2 i + j, A = 4 + i, B = 6 + j");
    if constexpr (C == 0) _tile_dpbf16ps(0, 4, 6);
    if constexpr (C == 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (C == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (C == 3) _tile_dpbf16ps(3, 5, 7);
  }
};

/// A software model of the same instructions, for running (and testing) the tile kernels on
/// CPUs without AMX (the amx_model target, see mla/isa.hpp): eight tiles of 16 rows x 64 bytes
/// in memory, loads and stores of whole rows as configured, and the tile product on VDPBF16PS
/// (AVX512-BF16), which computes the same sums of BF16 pair products in FP32 (BF16 subnormal
/// inputs as zero, nearest-even rounding), one 16-column row of C at a time.
struct EmulatedTiles {
  static constexpr bool kEmulated = true;
  TileConfig cfg;
  alignas(64) unsigned char t[8][16][64] = {};

  void configure(const TileConfig& c) { cfg = c; }
  void release() {}
  template <int T>
  void zero() {
    tile_counts().c_zeros += 1;
    std::memset(t[T], 0, sizeof(t[T]));
  }
  template <int T>
  void load(const void* p, Index stride) {
    (T < 4 ? tile_counts().c_load_bytes : tile_counts().operand_bytes) +=
        std::int64_t{cfg.rows[T]} * cfg.colsb[T];
    std::memset(t[T], 0, sizeof(t[T]));
    for (int r = 0; r < cfg.rows[T]; ++r) {
      std::memcpy(t[T][r], static_cast<const unsigned char*>(p) + r * stride, cfg.colsb[T]);
    }
  }
  template <int T>
  void store(void* p, Index stride) {
    tile_counts().c_store_bytes += std::int64_t{cfg.rows[T]} * cfg.colsb[T];
    for (int r = 0; r < cfg.rows[T]; ++r) {
      std::memcpy(static_cast<unsigned char*>(p) + r * stride, t[T][r], cfg.colsb[T]);
    }
  }
  template <int C, int A, int B>
  void dp() {
    tile_counts().products += 1;
    const int pairs = cfg.colsb[A] / 4;
    for (int m = 0; m < cfg.rows[C]; ++m) {
      __m512 acc = _mm512_loadu_ps(t[C][m]);
      for (int k = 0; k < pairs; ++k) {
        std::int32_t a;
        std::memcpy(&a, t[A][m] + 4 * k, 4);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(a),
                               (__m512bh)_mm512_loadu_si512(t[B][k]));
      }
      _mm512_storeu_ps(t[C][m], acc);
    }
  }
};

/// Every tile 16 rows of 64 bytes (the kernels pad their operands to whole tiles).
inline TileConfig full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}

/// C [16][16] (row stride c_stride floats) = sum over k blocks of A_k [16][32] B_k, with A's
/// BF16 rows a_stride bytes apart and B_k [16 pair rows][16 columns][2] in pair layout, 1024
/// bytes per block, blocks contiguous, on the tile backend `Tiles`. What the tests use to check
/// the tile state and the tile model against each other.
template <class Tiles>
void tile_dot_bf16(const std::uint16_t* a, Index a_stride_bytes, const std::uint16_t* b,
                   Index k_blocks, float* c, Index c_stride) {
  Tiles tiles;
  tiles.configure(full_tiles());
  tiles.template zero<0>();
  for (Index k = 0; k < k_blocks; ++k) {
    tiles.template load<4>(reinterpret_cast<const unsigned char*>(a) + k * 64, a_stride_bytes);
    tiles.template load<6>(b + k * 512, 64);
    tiles.template dp<0, 4, 6>();
  }
  tiles.template store<0>(c, c_stride * static_cast<Index>(sizeof(float)));
  tiles.release();
}

// The tile kernels run the decode frame on the avx512_bf16 target's operations, primitives and
// BF16 helpers; the frame is compiled here again so that it can inline the tile policy.
using Ops = avx512_bf16::Ops;
using V = Ops::V;
inline constexpr int kW = Ops::kWidth;
using avx512::online_softmax_step;
using avx512::widen_segment;
namespace decode_bf16 = avx512_bf16::decode_bf16;

// clang-format off
#include "mla/detail/isa/decode_frame.inl"
#include "mla/detail/isa/decode_amx.inl"
#include "mla/detail/isa/gemm_amx.inl"
// clang-format on

/// The decode steps' scratch, with room for the tile kernels' operands.
inline void reserve_decode(decode::Buffers& b, const MlaConfig& c, const DecodeOptions& o,
                           int threads, Index tokens) {
  b.reserve(c, o, threads, kW, tokens, true);
}

/// The avx512_bf16 kernels with the decode steps and the projections' BF16 matmul on AMX tiles
/// (`Tiles`: the hardware, the amx target; or its software model, the amx_model target).
template <class Tiles>
const Kernels& table_on() {
  static const Kernels k = [] {
    Kernels t = avx512_bf16::table();
    t.isa = Tiles::kEmulated ? Isa::kAmxModel : Isa::kAmx;
    t.tiles = true;
    t.decode_block = 256;  // a key block per pass of the accumulator tiles (decode_amx.inl)
    t.reserve_decode = &reserve_decode;
    t.decode_absorbed = &decode_amx::decode_absorbed<Tiles>;
    t.decode_absorbed_bf16 = &decode_amx::decode_absorbed_bf16<Tiles>;
    t.gemm = &gemm_amx::gemm<Tiles>;
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
