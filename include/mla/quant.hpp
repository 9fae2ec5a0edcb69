#pragma once
/// \file
/// Bulk FP8 conversions (to_fp8 / from_fp8, on the active instruction set's kernels) and
/// scaled FP8 quantisation: values are stored as e4m3 codes q with one FP32 dequantisation
/// multiplier per tile or block, x ~ float(q) * scale. The FP8 latent cache uses 128-value tiles
/// per token (FlashMLA's layout); DeepSeek-V3 quantises activations the same way (1 x 128
/// tiles, amax floored at 1e-4) and ships weights in 128 x 128 blocks (BlockFp8Matrix).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "mla/detail/isa/dispatch.hpp"
#include "mla/detail/record_layout.hpp"
#include "mla/error.hpp"
#include "mla/fp8.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// Bulk narrowing: `dst[i] = F8(src[i] / scale, mode)` for i < n, where `scale` is the
/// dequantisation multiplier (the stored values times `scale` approximate `src`). With
/// scale == 1 no division happens, so the result is exactly the scalar conversion; otherwise
/// `src[i] / scale` is first rounded to float, as DeepSeek's act_quant does. The ranges must
/// not overlap. Runs on the active instruction set (mla/isa.hpp); element by element it equals
/// the scalar conversion on every one.
template <class F8>
inline std::enable_if_t<is_float8_v<F8>> to_fp8(const float* src, std::size_t n, F8* dst,
                                                float scale = 1.0f,
                                                Fp8Overflow mode = Fp8Overflow::kSaturate) {
  // An FP8 object is one byte with no padding; its object representation is its code.
  auto* out = reinterpret_cast<std::uint8_t*>(dst);
  const detail::isa::Kernels& k = detail::isa::kernels();
  const bool saturate = mode == Fp8Overflow::kSaturate;
  if constexpr (std::is_same_v<F8, float8_e4m3fn>) {
    k.encode_e4m3(src, n, out, scale, saturate);
  } else {
    k.encode_e5m2(src, n, out, scale, saturate);
  }
}

/// Bulk widening: `dst[i] = float(src[i]) * scale` for i < n (exact when scale == 1; otherwise
/// the product rounds once). The ranges must not overlap. Runs on the active instruction set.
template <class F8>
inline std::enable_if_t<is_float8_v<F8>> from_fp8(const F8* src, std::size_t n, float* dst,
                                                  float scale = 1.0f) {
  const auto* in = reinterpret_cast<const std::uint8_t*>(src);
  const detail::isa::Kernels& k = detail::isa::kernels();
  if constexpr (std::is_same_v<F8, float8_e4m3fn>) {
    k.decode_e4m3(in, n, dst, scale);
  } else {
    k.decode_e5m2(in, n, dst, scale);
  }
}

/// Largest finite e4m3 value, the target of a tile's absolute maximum.
inline constexpr float kE4M3Max = 448.0f;

/// Rounds a positive finite scale up to the next power of two (2^ceil(log2 s)); exact powers of
/// two are kept. Rounding up keeps |x| / scale <= 448, so nothing saturates.
inline float round_scale_up_to_power_of_two(float s) {
  int e = 0;
  const float m = std::frexp(s, &e);  // s = m * 2^e, m in [0.5, 1)
  return m == 0.5f ? s : std::ldexp(1.0f, e);
}

/// The dequantisation multiplier of a tile whose absolute maximum is `amax`:
/// max(amax, amax_floor) / 448, rounded up to a power of two for kPowerOfTwo. A tile with
/// nothing to scale (amax and floor 0) gets 1, so it stores exact zeros.
inline float e4m3_scale(float amax, float amax_floor, ScaleFormat format) {
  float s = std::max(amax, amax_floor) / kE4M3Max;
  if (!(s > 0.0f)) return 1.0f;  // 0 (all-zero tile, no floor); NaN cannot arise from max
  if (format == ScaleFormat::kPowerOfTwo && std::isfinite(s)) s = round_scale_up_to_power_of_two(s);
  return s;
}

/// Quantises x[0, n) in tiles of `tile` consecutive values (the last tile may be shorter):
/// scales[k] = e4m3_scale(max |x| over tile k, amax_floor, format) and
/// q[i] = e4m3(x[i] / scales[i / tile]), saturating. NaN inputs stay NaN and do not enter amax.
inline void quantize_e4m3_tiles(const float* x, Index n, Index tile, float amax_floor,
                                ScaleFormat format, float8_e4m3fn* q, float* scales) {
  for (Index k = 0, first = 0; first < n; ++k, first += tile) {
    const Index len = std::min(tile, n - first);
    float amax = 0.0f;
    for (Index i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[first + i]));
    scales[k] = e4m3_scale(amax, amax_floor, format);
    to_fp8(x + first, static_cast<std::size_t>(len), q + first, scales[k]);
  }
}

/// x[i] = float(q[i]) * scales[i / tile] for i < n.
inline void dequantize_e4m3_tiles(const float8_e4m3fn* q, const float* scales, Index n, Index tile,
                                  float* x) {
  for (Index k = 0, first = 0; first < n; ++k, first += tile) {
    from_fp8(q + first, static_cast<std::size_t>(std::min(tile, n - first)), x + first, scales[k]);
  }
}

/// DeepSeek-V3's floor on an activation tile's amax (act_quant: max(amax, 1e-4) / 448).
inline constexpr float kActivationAmaxFloor = 1e-4f;

/// Quantises each row of x [rows, cols] per token per `tile` channels (DeepSeek-V3's 1 x 128
/// activation tiles): scale = max(amax, 1e-4) / 448 per tile, optionally a power of two.
/// q is [rows, cols] (row-major), scales [rows, ceil(cols / tile)] (row-major).
inline void quantize_activations(const float* x, Index rows, Index cols, Index tile,
                                 ScaleFormat format, float8_e4m3fn* q, float* scales) {
  const Index tiles = (cols + tile - 1) / tile;
  for (Index r = 0; r < rows; ++r) {
    quantize_e4m3_tiles(x + r * cols, cols, tile, kActivationAmaxFloor, format, q + r * cols,
                        scales + r * tiles);
  }
}

/// A matrix [rows, cols] stored as e4m3 codes with one FP32 dequantisation multiplier per
/// block of block_rows x block_cols (DeepSeek-V3 checkpoints: 128 x 128, the scales being the
/// `weight_scale_inv` tensor [ceil(rows / 128), ceil(cols / 128)]): w = float(q) * scale of
/// its block. Edge blocks may be smaller. The codes and scales are owned, or borrowed from
/// memory someone else keeps alive (a memory-mapped checkpoint: see borrow()).
class BlockFp8Matrix {
 public:
  BlockFp8Matrix() = default;

  /// Takes codes (row-major [rows, cols]) and scales (row-major [ceil(rows / block_rows),
  /// ceil(cols / block_cols)]) as a checkpoint stores them. Throws mla::Error when the sizes
  /// do not match or a scale is negative or not finite.
  BlockFp8Matrix(Index rows, Index cols, Index block_rows, Index block_cols,
                 std::vector<float8_e4m3fn> codes, std::vector<float> scales)
      : rows_(rows),
        cols_(cols),
        block_rows_(block_rows),
        block_cols_(block_cols),
        owned_codes_(std::move(codes)),
        owned_scales_(std::move(scales)) {
    check_shape("BlockFp8Matrix", rows, cols, block_rows, block_cols);
    detail::require(static_cast<Index>(owned_codes_.size()) == rows * cols,
                    "BlockFp8Matrix: ", owned_codes_.size(), " codes for a [", rows, ", ", cols,
                    "] matrix");
    detail::require(static_cast<Index>(owned_scales_.size()) == row_blocks() * col_blocks(),
                    "BlockFp8Matrix: ", owned_scales_.size(), " scales, expected [", row_blocks(),
                    ", ", col_blocks(), "] for [", rows, ", ", cols, "] in blocks of [", block_rows,
                    ", ", block_cols, "]");
    codes_ = owned_codes_.data();
    scales_ = owned_scales_.data();
    check_scales();
  }

  /// A view of codes [rows, cols] and scales [ceil(rows / block_rows), ceil(cols / block_cols)]
  /// (row-major, as a checkpoint stores them) that this object does not own: they must stay
  /// valid and unchanged while it, or any copy of it, is used. `keep_alive`, when given, is held
  /// by every copy for as long as it lives (e.g. the memory-mapped file the pointers are in), so
  /// that the memory cannot go away under them. Throws mla::Error for an invalid shape or a
  /// scale that is negative or not finite.
  static BlockFp8Matrix borrow(Index rows, Index cols, Index block_rows, Index block_cols,
                               const float8_e4m3fn* codes, const float* scales,
                               std::shared_ptr<const void> keep_alive = nullptr) {
    check_shape("BlockFp8Matrix::borrow", rows, cols, block_rows, block_cols);
    detail::require((codes != nullptr || rows * cols == 0) && scales != nullptr,
                    "BlockFp8Matrix::borrow: null codes or scales");
    BlockFp8Matrix m;
    m.rows_ = rows;
    m.cols_ = cols;
    m.block_rows_ = block_rows;
    m.block_cols_ = block_cols;
    m.codes_ = codes;
    m.scales_ = scales;
    m.keep_alive_ = std::move(keep_alive);
    m.check_scales();
    return m;
  }

  BlockFp8Matrix(const BlockFp8Matrix& o) { *this = o; }
  BlockFp8Matrix& operator=(const BlockFp8Matrix& o) {
    if (this == &o) return *this;
    rows_ = o.rows_;
    cols_ = o.cols_;
    block_rows_ = o.block_rows_;
    block_cols_ = o.block_cols_;
    owned_codes_ = o.owned_codes_;
    owned_scales_ = o.owned_scales_;
    keep_alive_ = o.keep_alive_;
    // An owning copy points at its own storage; a view shares the borrowed memory.
    codes_ = o.owns() ? owned_codes_.data() : o.codes_;
    scales_ = o.owns() ? owned_scales_.data() : o.scales_;
    return *this;
  }
  BlockFp8Matrix(BlockFp8Matrix&& o) noexcept { *this = std::move(o); }
  BlockFp8Matrix& operator=(BlockFp8Matrix&& o) noexcept {
    rows_ = o.rows_;
    cols_ = o.cols_;
    block_rows_ = o.block_rows_;
    block_cols_ = o.block_cols_;
    const bool owned = o.owns();
    owned_codes_ = std::move(o.owned_codes_);
    owned_scales_ = std::move(o.owned_scales_);
    keep_alive_ = std::move(o.keep_alive_);
    codes_ = owned ? owned_codes_.data() : o.codes_;
    scales_ = owned ? owned_scales_.data() : o.scales_;
    o.codes_ = nullptr;
    o.scales_ = nullptr;
    o.rows_ = o.cols_ = 0;
    return *this;
  }

  /// Quantises w [rows, cols] (row-major): per block scale = amax / 448 (1 for an all-zero
  /// block; rounded up to a power of two for kPowerOfTwo), codes = e4m3(w / scale).
  static BlockFp8Matrix quantize(const float* w, Index rows, Index cols, Index block_rows = 128,
                                 Index block_cols = 128,
                                 ScaleFormat format = ScaleFormat::kFloat32) {
    detail::require(rows >= 0 && cols >= 0 && block_rows > 0 && block_cols > 0,
                    "BlockFp8Matrix::quantize: invalid shape [", rows, ", ", cols,
                    "] with blocks [", block_rows, ", ", block_cols, "]");
    const Index rb = (rows + block_rows - 1) / block_rows,
                cb = (cols + block_cols - 1) / block_cols;
    std::vector<float8_e4m3fn> codes(static_cast<std::size_t>(rows * cols));
    std::vector<float> scales(static_cast<std::size_t>(rb * cb));
    for (Index i = 0; i < rb; ++i) {
      const Index r0 = i * block_rows, nr = std::min(block_rows, rows - r0);
      for (Index j = 0; j < cb; ++j) {
        const Index c0 = j * block_cols, nc = std::min(block_cols, cols - c0);
        float amax = 0.0f;
        for (Index r = r0; r < r0 + nr; ++r) {
          for (Index c = c0; c < c0 + nc; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
        }
        const float s = e4m3_scale(amax, 0.0f, format);
        scales[static_cast<std::size_t>(i * cb + j)] = s;
        for (Index r = r0; r < r0 + nr; ++r) {
          to_fp8(w + r * cols + c0, static_cast<std::size_t>(nc), codes.data() + r * cols + c0, s);
        }
      }
    }
    return BlockFp8Matrix(rows, cols, block_rows, block_cols, std::move(codes), std::move(scales));
  }

  Index rows() const { return rows_; }
  Index cols() const { return cols_; }
  Index block_rows() const { return block_rows_; }
  Index block_cols() const { return block_cols_; }
  Index row_blocks() const { return (rows_ + block_rows_ - 1) / block_rows_; }
  Index col_blocks() const { return (cols_ + block_cols_ - 1) / block_cols_; }
  /// Codes, row-major [rows, cols].
  const float8_e4m3fn* codes() const { return codes_; }
  /// The dequantisation multiplier of block (i, j).
  float scale(Index i, Index j) const { return scales_[i * col_blocks() + j]; }
  /// All scales, row-major [row_blocks, col_blocks] (the checkpoint's weight_scale_inv).
  const float* scales() const { return scales_; }
  /// row_blocks() * col_blocks().
  Index scale_count() const { return row_blocks() * col_blocks(); }
  /// False for a view made by borrow().
  bool owns() const { return codes_ == nullptr || codes_ == owned_codes_.data(); }
  /// Bytes of the codes and scales (owned or borrowed).
  std::size_t bytes() const {
    return static_cast<std::size_t>(rows_ * cols_) +
           sizeof(float) * static_cast<std::size_t>(scale_count());
  }

  /// The dense matrix float(q) * scale in T (for the absorbed matrices and for checks; the
  /// matmul never builds it). In double the product is exact; in float it is rounded once.
  template <class T = float>
  RowMatrix<T> dequantize() const {
    RowMatrix<T> w(rows_, cols_);
    for (Index r = 0; r < rows_; ++r) {
      for (Index j = 0; j < col_blocks(); ++j) {
        const Index c0 = j * block_cols_, n = std::min(block_cols_, cols_ - c0);
        const float s = scale(r / block_rows_, j);
        const float8_e4m3fn* q = codes_ + r * cols_ + c0;
        if constexpr (std::is_same_v<T, float>) {
          from_fp8(q, static_cast<std::size_t>(n), w.row(r).data() + c0, s);
        } else {
          for (Index c = 0; c < n; ++c) {
            w(r, c0 + c) = static_cast<T>(static_cast<float>(q[c])) * static_cast<T>(s);
          }
        }
      }
    }
    return w;
  }

 private:
  static void check_shape(const char* what, Index rows, Index cols, Index block_rows,
                          Index block_cols) {
    detail::require(rows >= 0 && cols >= 0 && block_rows > 0 && block_cols > 0, what,
                    ": invalid shape [", rows, ", ", cols, "] with blocks [", block_rows, ", ",
                    block_cols, "]");
  }
  void check_scales() const {
    for (Index i = 0; i < scale_count(); ++i) {
      detail::require(std::isfinite(scales_[i]) && scales_[i] >= 0.0f,
                      "BlockFp8Matrix: scales must be finite and >= 0, got ", scales_[i]);
    }
  }

  Index rows_ = 0, cols_ = 0, block_rows_ = 128, block_cols_ = 128;
  const float8_e4m3fn* codes_ = nullptr;
  const float* scales_ = nullptr;
  std::vector<float8_e4m3fn> owned_codes_;
  std::vector<float> owned_scales_;
  std::shared_ptr<const void> keep_alive_;
};

}  // namespace mla
