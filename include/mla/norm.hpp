#pragma once
/// \file
/// RMSNorm, applied to the query latent c^Q and to the KV latent c^KV (before it is cached).

#include <cmath>

#include "mla/error.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// In place, for every row x of `rows`: x_i <- x_i / sqrt(mean(x^2) + eps) * weight_i
/// (DeepSeek's RMSNorm). Computed in T (float or double), whatever the storage of the result.
/// Throws mla::Error when weight's size differs from the row width.
template <class T>
void rms_norm(MatrixRef<detail::identity_t<T>> rows, const Vector<T>& weight, double eps) {
  detail::require(weight.size() == rows.cols(), "rms_norm: weight has ", weight.size(),
                  " values, rows have ", rows.cols());
  if (rows.cols() == 0) return;
  const T n = static_cast<T>(rows.cols());
  for (Index t = 0; t < rows.rows(); ++t) {
    auto x = rows.row(t);
    const T inv_rms = T(1) / std::sqrt(x.squaredNorm() / n + static_cast<T>(eps));
    x = (x.array() * inv_rms * weight.transpose().array()).matrix();
  }
}

}  // namespace mla
