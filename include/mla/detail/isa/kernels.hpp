#pragma once
/// \file
/// The kernel table: what every instruction-set target provides, as plain functions over
/// plain arguments, so that the width-independent headers can call whichever target the
/// process chose. Internal.

#include <cstddef>
#include <cstdint>

#include "mla/detail/decode_workspace.hpp"
#include "mla/detail/latent_blocks.hpp"
#include "mla/isa.hpp"
#include "mla/matrix.hpp"
#include "mla/thread_pool.hpp"

namespace mla::detail::isa {

/// One absorbed decode step (see decode_absorbed): the H absorbed queries of each of `tokens`
/// consecutive query tokens over the cache; the last token sees the first `keys` records and
/// token t the first keys - (tokens - 1 - t).
struct DecodeArgs {
  LatentBlocks cache;
  Index heads = 0;
  Index tokens = 1;
  const float* q = nullptr;  ///< [tokens * H][d_c + R], rows q_stride apart, token-major
  Index q_stride = 0;
  float scale = 1.0f;
  float* out = nullptr;  ///< [tokens * H][d_c], rows out_stride apart
  Index out_stride = 0;
  float* lse = nullptr;  ///< [tokens][H], rows lse_stride apart
  Index lse_stride = 0;
  decode::Buffers* buffers = nullptr;
  ThreadPool* pool = nullptr;
  DecodeOptions options;
  Index keys = 0;
};

/// A few tokens times a block-FP8 weight: y [tokens][N] = x [tokens][K] W^T, W as e4m3 codes
/// [N][K] with one scale per block_rows x block_cols block; x_scales (W8A8: one per token per
/// K block, row-major [tokens][col_blocks]) or nullptr (W8A32).
struct Fp8RowsArgs {
  const std::uint8_t* codes = nullptr;
  const float* scales = nullptr;  ///< [ceil(N / block_rows)][col_blocks]
  Index rows = 0, cols = 0, block_rows = 0, block_cols = 0, col_blocks = 0;
  Index tokens = 0;
  const float* x = nullptr;
  Index x_stride = 0;
  const float* x_scales = nullptr;
  float* y = nullptr;
  Index y_stride = 0;
};

/// The kernels of one target.
struct Kernels {
  Isa isa = Isa::kPortable;
  int width = 1;  ///< floats per SIMD vector

  /// dst[i] = code(src[i] / scale) (no division when scale == 1), saturating or not.
  void (*encode_e4m3)(const float* src, std::size_t n, std::uint8_t* dst, float scale,
                      bool saturate) = nullptr;
  void (*encode_e5m2)(const float* src, std::size_t n, std::uint8_t* dst, float scale,
                      bool saturate) = nullptr;
  /// dst[i] = float(code[i]) * scale (exact when scale == 1).
  void (*decode_e4m3)(const std::uint8_t* src, std::size_t n, float* dst, float scale) = nullptr;
  void (*decode_e5m2)(const std::uint8_t* src, std::size_t n, float* dst, float scale) = nullptr;
  /// dst[i] = float(bf16 at src + 2 i) (exact); src may be unaligned.
  void (*widen_bf16)(const unsigned char* src, std::size_t n, float* dst) = nullptr;
  /// dst[i] = e^src[i] with the kernels' vector exp (within 2 ulp for src <= 88; 0 below
  /// -87.33; NaN stays NaN).
  void (*exp)(const float* src, std::size_t n, float* dst) = nullptr;
  /// The absorbed decode step in FP32 (DecodePrecision::kFp32).
  void (*decode_absorbed)(const DecodeArgs& args) = nullptr;
  /// The absorbed decode step with queries and softmax weights in BF16 (kBf16).
  void (*decode_absorbed_bf16)(const DecodeArgs& args) = nullptr;
  /// The block-FP8 matmul for 1 .. kFp8RowsMaxTokens tokens.
  void (*fp8_rows)(const Fp8RowsArgs& args) = nullptr;
};

/// Most tokens Kernels::fp8_rows takes in one call.
inline constexpr Index kFp8RowsMaxTokens = 8;

}  // namespace mla::detail::isa
