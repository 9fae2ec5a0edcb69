#pragma once
/// \file
/// The projection concept: a weight object with `rows()`, `cols()` and `apply(x, y)`, and the
/// free function `project(w, x, y)` that the layer calls for every matrix it applies
/// (x -> c^Q, x -> [c^KV ; k_raw], c^Q -> q, c^KV -> [k_nope ; v], o -> u). A Linear holds its
/// weight either dense in the compute type or in DeepSeek-V3's block-scaled FP8; the call site
/// is the same.

#include <optional>
#include <utility>

#include "mla/detail/fp8_gemm.hpp"
#include "mla/error.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"

namespace mla {

/// How a block-FP8 weight is multiplied.
enum class Fp8Matmul : std::uint8_t {
  kW8A32,  ///< activations stay in the compute type; weights are FP8
  kW8A8,   ///< activations are quantised to e4m3 per token per 128 channels (DeepSeek's fp8_gemm)
};

/// How to quantise a dense weight to block FP8 (Linear::quantize_fp8).
struct Fp8Options {
  Fp8Matmul matmul = Fp8Matmul::kW8A32;
  Index block_rows = 128;  ///< DeepSeek-V3: weight_block_size [128, 128]
  Index block_cols = 128;
  ScaleFormat weight_scales = ScaleFormat::kFloat32;
  ScaleFormat activation_scales = ScaleFormat::kFloat32;  ///< W8A8 only
};

/// A linear map stored as a weight [out, in] (the checkpoints' layout): y = W x for each
/// token x. Tokens are rows, so `apply` computes Y = X W^T.
template <class T>
class Linear {
 public:
  using Scalar = T;

  /// An empty projection (0 x 0), e.g. wq when the query is compressed.
  Linear() = default;

  /// Takes ownership of a dense weight [out, in].
  explicit Linear(RowMatrix<T> weight) : dense_(std::move(weight)) {}

  /// A block-FP8 weight (for instance a checkpoint's codes and weight_scale_inv), multiplied
  /// W8A32 or W8A8.
  explicit Linear(BlockFp8Matrix weight, Fp8Matmul matmul = Fp8Matmul::kW8A32,
                  ScaleFormat activation_scales = ScaleFormat::kFloat32)
      : fp8_(std::move(weight)), matmul_(matmul), activation_scales_(activation_scales) {}

  /// Quantises a dense weight [out, in] to block FP8 (from its float values).
  static Linear quantize_fp8(const RowMatrix<T>& weight, const Fp8Options& options = {}) {
    const RowMatrix<float> w = weight.template cast<float>();
    return Linear(BlockFp8Matrix::quantize(w.data(), w.rows(), w.cols(), options.block_rows,
                                           options.block_cols, options.weight_scales),
                  options.matmul, options.activation_scales);
  }

  /// Output width (the weight's rows).
  Index rows() const { return fp8_ ? fp8_->rows() : dense_.rows(); }
  /// Input width (the weight's columns).
  Index cols() const { return fp8_ ? fp8_->cols() : dense_.cols(); }
  bool empty() const { return rows() == 0 || cols() == 0; }
  /// True when the weight is stored in block FP8.
  bool is_fp8() const { return fp8_.has_value(); }
  Fp8Matmul fp8_matmul() const { return matmul_; }

  /// y = x W^T for x [tokens, cols()] and y [tokens, rows()]; y must not overlap x.
  /// Throws mla::Error when the shapes do not match. FP8 weights are decoded tile by tile
  /// into a per-thread scratch that grows on first use (later calls of the same size do not
  /// allocate).
  void apply(ConstMatrixRef<T> x, MatrixRef<T> y) const {
    detail::require(x.cols() == cols() && y.cols() == rows() && y.rows() == x.rows(),
                    "Linear::apply: weight is [", rows(), ", ", cols(), "], input is [", x.rows(),
                    ", ", x.cols(), "], output is [", y.rows(), ", ", y.cols(), "]; expected [",
                    x.rows(), ", ", cols(), "] -> [", x.rows(), ", ", rows(), "]");
    if (fp8_) {
      detail::fp8_block_gemm<T>(x, *fp8_, matmul_ == Fp8Matmul::kW8A8, activation_scales_, y);
    } else {
      // Eigen picks GEMV for a single token (no heap allocation) and GEMM otherwise.
      y.noalias() = x * dense_.transpose();
    }
  }

  /// The dense weight. Throws mla::Error for an FP8 weight (use to_dense()).
  const RowMatrix<T>& dense() const {
    detail::require(!fp8_, "Linear::dense: the weight is stored in block FP8; use to_dense()");
    return dense_;
  }
  /// The block-FP8 weight. Throws mla::Error for a dense weight.
  const BlockFp8Matrix& fp8() const {
    detail::require(fp8_.has_value(), "Linear::fp8: the weight is stored dense");
    return *fp8_;
  }
  /// The weight [out, in] as a dense matrix of T, dequantised for FP8 storage.
  RowMatrix<T> to_dense() const { return fp8_ ? fp8_->template dequantize<T>() : dense_; }

  /// The same projection in another compute type (FP8 codes and scales are kept as they are).
  template <class U>
  Linear<U> cast() const {
    if (fp8_) return Linear<U>(*fp8_, matmul_, activation_scales_);
    return Linear<U>(RowMatrix<U>(dense_.template cast<U>()));
  }

 private:
  RowMatrix<T> dense_;
  std::optional<BlockFp8Matrix> fp8_;
  Fp8Matmul matmul_ = Fp8Matmul::kW8A32;
  ScaleFormat activation_scales_ = ScaleFormat::kFloat32;
};

/// Applies a projection: y = x W^T (see Linear::apply).
template <class W>
void project(const W& w, ConstMatrixRef<typename W::Scalar> x, MatrixRef<typename W::Scalar> y) {
  w.apply(x, y);
}

}  // namespace mla
