#pragma once
/// \file
/// The matrix types of the library's interfaces. Activations are row-major [tokens, features]
/// (one token per row, as in the checkpoints' code); weights are row-major [out, in].

#include <Eigen/Core>

namespace mla {

/// Index type of all sizes (Eigen's, signed).
using Index = Eigen::Index;

/// Row-major dynamic matrix: [tokens, features] for activations, [out, in] for weights.
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic column vector (norm weights, per-head scalars).
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Read-only view of a row-major matrix or of a block of one (rows contiguous, any row stride).
template <class T>
using ConstMatrixRef = Eigen::Ref<const RowMatrix<T>>;

/// Writable view of a row-major matrix or of a block of one.
template <class T>
using MatrixRef = Eigen::Ref<RowMatrix<T>>;

namespace detail {
/// Makes a function parameter a non-deduced context, so T comes from another argument and
/// Eigen blocks and maps convert to the Ref parameter.
template <class T>
struct Identity {
  using type = T;
};
template <class T>
using identity_t = typename Identity<T>::type;
}  // namespace detail

}  // namespace mla
