#pragma once
/// \file
/// The kernel table: what every instruction-set target provides, as plain functions over
/// plain arguments, so that the width-independent headers can call whichever target the
/// process chose. Internal.

#include <cstddef>
#include <cstdint>

#include "mla/detail/decode_workspace.hpp"
#include "mla/detail/latent_blocks.hpp"
#include "mla/executor.hpp"
#include "mla/isa.hpp"
#include "mla/matrix.hpp"

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
  Executor* pool = nullptr;
  DecodeOptions options;
  Index keys = 0;
};

/// y [M][n_begin, n_end) (+)= x [M][K] B, B [K][N] given by a weight matrix W (row-major,
/// w_stride elements per row) in FP32, BF16 or block FP8:
///   kTransposedRows: B = W^T (W [N][K], the checkpoints' [out, in] layout): y = x W^T;
///   kRowSlice:       B = W[row0, row0 + K) (W [*][N]): y = x W[rows]
/// (the absorbed query q W_UK^(h) reads a head's rows of wkv_b that way). FP8 weights carry one
/// scale per block_rows x block_cols block of W; the products of each block along K are summed
/// in FP32, then scaled and added (DeepSeek's fp8_gemm). Activations are FP32 (x) for FMA
/// products, or BF16 values (x16: kBf16 activations, or W8A8's e4m3 codes with x_scales per
/// token and K block) for BF16 dot products.
struct GemmArgs {
  enum class Layout : std::uint8_t { kTransposedRows, kRowSlice };
  enum class Format : std::uint8_t { kF32, kBf16, kFp8 };
  Layout layout = Layout::kTransposedRows;
  Format format = Format::kF32;
  const void* w = nullptr;
  Index w_stride = 0;
  Index row0 = 0;
  const float* scales = nullptr;  ///< FP8: [ceil(rows / block_rows)][scale_stride]
  Index scale_stride = 0, block_rows = 0, block_cols = 0;
  Index M = 0, N = 0, K = 0;
  const float* x = nullptr;  ///< [M][K], rows x_stride apart (FMA products)
  Index x_stride = 0;
  const std::uint16_t* x16 = nullptr;  ///< [M][K rounded up to even], BF16 (dot products)
  Index x16_stride = 0;
  const float* x_scales = nullptr;  ///< W8A8: [M][x_scale_stride], one per token and K block
  Index x_scale_stride = 0;
  /// kTransposedRows with more than 8 tokens: the activations transposed, [K][xt_stride] FP32
  /// (FMA) or [ceil(K / 2)][xt_stride] BF16 pairs of consecutive k (dot products), tokens padded
  /// with zeros to xt_stride (a multiple of 16); W8A8 scales transposed too, [K blocks][xt_stride].
  const float* xt = nullptr;
  const std::uint32_t* xt_pairs = nullptr;
  const float* xt_scales = nullptr;
  Index xt_stride = 0;
  bool dp = false;          ///< BF16 dot products on x16, else FMA on x
  bool accumulate = false;  ///< y += instead of y =
  float* y = nullptr;
  Index y_stride = 0;
  Index n_begin = 0, n_end = 0;
  float* scratch = nullptr;  ///< gemm_scratch_floats() floats, for the decoded weight panel
};

/// Floats of GemmArgs::scratch the kernels need (for any target and block size up to 256): the
/// decoded weight panel and the panel's accumulators (and for the AMX kernel, padded
/// activation pairs and four accumulator tiles).
inline constexpr Index kGemmScratchFloats = 2 * 256 * 64 + 16 * 256 + 4 * 256 + 64;

/// One head's causal attention of M query rows over a block of `keys` rebuilt keys and values
/// (the expanded prefill path). Query row i sees the first visible(i) = min(keys, visible0 + i)
/// keys (visible0 >= 1) and takes one online softmax step over them: its running maximum m and
/// sum l are updated and its output row o (unnormalised, FP32) is rescaled and added to. The
/// keys a row does not see are never multiplied into its output.
struct AttentionTileArgs {
  Index M = 0;
  Index P = 0, R = 0, V = 0;  ///< widths of k^nope, k^R and v
  const float* q = nullptr;   ///< row i: [q^nope (P) ; q^pe (R)], rows q_stride apart
  Index q_stride = 0;
  const float* k = nullptr;  ///< key j's k^nope (P), rows k_stride apart
  Index k_stride = 0;
  const float* kpe = nullptr;  ///< key j's k^R (R), rows kpe_stride apart
  Index kpe_stride = 0;
  const float* v = nullptr;  ///< key j's value (V), rows v_stride apart
  Index v_stride = 0;
  Index keys = 0, visible0 = 1;
  float scale = 1.0f;  ///< multiplies every score
  /// Precision::kBf16: the queries times the scale, the keys, the values and the softmax
  /// weights rounded to BF16 once, BF16 dot products with FP32 sums.
  bool bf16 = false;
  float* m = nullptr;  ///< row i's running maximum at m[i * ml_stride], sum at l[i * ml_stride]
  float* l = nullptr;
  Index ml_stride = 1;
  float* o = nullptr;  ///< row i's output (V), rows o_stride apart
  Index o_stride = 0;
  float* scratch = nullptr;  ///< attention_tile_scratch_floats(P + R, V, keys) floats
};

/// Floats of AttentionTileArgs::scratch the kernels need (for any target).
inline constexpr Index attention_tile_scratch_floats(Index qk, Index v, Index keys) {
  const Index kp = (keys + 31) / 32 * 32, vp = (v + 31) / 32 * 32, qk2 = (qk + 1) / 2;
  // keys transposed (FP32, then BF16 pairs), scores, the values' pairs and BF16 rows, the
  // queries and the weights: see attention.inl.
  return 2 * qk2 * kp + qk2 * kp + 8 * kp + (kp / 2) * vp + kp * vp / 2 + 8 * qk2 + 4 * kp + 64;
}

/// The kernels of one target.
struct Kernels {
  Isa isa = Isa::kPortable;
  int width = 1;  ///< floats per SIMD vector
  /// Keys per block of the absorbed decode step when DecodeOptions::tile_tokens is 0.
  Index decode_block = 64;
  bool tiles = false;  ///< the decode steps may run on AMX tiles (their buffers need room)
  /// BF16 dot products (GemmArgs::dp) run in hardware (VDPBF16PS), at twice the FMA rate; where
  /// they are emulated, callers that may choose FP32 FMA instead (the indexer) do so.
  bool fast_dp_bf16 = false;

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
  /// Makes room in `b` for this target's decode steps with these dimensions (the scratch of its
  /// own SIMD width, and of the tile kernels where it has them).
  void (*reserve_decode)(decode::Buffers& b, const MlaConfig& c, const DecodeOptions& o,
                         int threads, Index tokens) = nullptr;
  /// The absorbed decode step in FP32 (Precision::kFp32).
  void (*decode_absorbed)(const DecodeArgs& args) = nullptr;
  /// The absorbed decode step with queries and softmax weights in BF16 (kBf16).
  void (*decode_absorbed_bf16)(const DecodeArgs& args) = nullptr;
  /// One thread's columns of a projection (see GemmArgs).
  void (*gemm)(const GemmArgs& args) = nullptr;
  /// One head's expanded attention over a block of keys (see AttentionTileArgs).
  void (*attention_tile)(const AttentionTileArgs& args) = nullptr;
};

}  // namespace mla::detail::isa
