#pragma once
/// \file
/// The projection concept: a weight object with `rows()`, `cols()` and `apply(x, y)`, and the
/// free function `project(w, x, y)` that the layer calls for every matrix it applies
/// (x -> c^Q, x -> [c^KV ; k_raw], c^Q -> q, c^KV -> [k_nope ; v], o -> u).

#include <utility>

#include "mla/error.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// A linear map stored as a weight [out, in] (the checkpoints' layout): y = W x for each
/// token x. Tokens are rows, so `apply` computes Y = X W^T.
template <class T>
class Linear {
 public:
  using Scalar = T;

  /// An empty projection (0 x 0), e.g. wq when the query is compressed.
  Linear() = default;

  /// Takes ownership of a dense weight [out, in].
  explicit Linear(RowMatrix<T> weight) : weight_(std::move(weight)) {}

  /// Output width (the weight's rows).
  Index rows() const { return weight_.rows(); }
  /// Input width (the weight's columns).
  Index cols() const { return weight_.cols(); }
  bool empty() const { return weight_.size() == 0; }

  /// y = x W^T for x [tokens, cols()] and y [tokens, rows()]; y must not overlap x.
  /// Throws mla::Error when the shapes do not match.
  void apply(ConstMatrixRef<T> x, MatrixRef<T> y) const {
    detail::require(x.cols() == cols() && y.cols() == rows() && y.rows() == x.rows(),
                    "Linear::apply: weight is [", rows(), ", ", cols(), "], input is [", x.rows(),
                    ", ", x.cols(), "], output is [", y.rows(), ", ", y.cols(), "]; expected [",
                    x.rows(), ", ", cols(), "] -> [", x.rows(), ", ", rows(), "]");
    // Eigen picks GEMV for a single token (no heap allocation) and GEMM otherwise.
    y.noalias() = x * weight_.transpose();
  }

  /// The weight [out, in] as a dense matrix of T.
  const RowMatrix<T>& dense() const { return weight_; }

 private:
  RowMatrix<T> weight_;
};

/// Applies a projection: y = x W^T (see Linear::apply).
template <class W>
void project(const W& w, ConstMatrixRef<typename W::Scalar> x, MatrixRef<typename W::Scalar> y) {
  w.apply(x, y);
}

}  // namespace mla
