#pragma once
/// \file
/// RMSNorm, applied to the query latent c^Q and to the KV latent c^KV (before it is cached), and
/// LayerNorm (with bias), applied to DeepSeek-V3.2's index keys.

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

/// In place, for every row x of `rows`: x_i <- (x_i - mean(x)) / sqrt(var(x) + eps) * weight_i
/// + bias_i (LayerNorm with the biased variance, as torch's). Computed in T. Throws mla::Error
/// when weight's or bias's size differs from the row width.
template <class T>
void layer_norm(MatrixRef<detail::identity_t<T>> rows, const Vector<T>& weight,
                const Vector<T>& bias, double eps) {
  detail::require(weight.size() == rows.cols() && bias.size() == rows.cols(),
                  "layer_norm: weight has ", weight.size(), " and bias ", bias.size(),
                  " values, rows have ", rows.cols());
  if (rows.cols() == 0) return;
  const T n = static_cast<T>(rows.cols());
  for (Index t = 0; t < rows.rows(); ++t) {
    auto x = rows.row(t);
    const T mean = x.sum() / n;
    x.array() -= mean;
    const T inv = T(1) / std::sqrt(x.squaredNorm() / n + static_cast<T>(eps));
    x = (x.array() * inv * weight.transpose().array() + bias.transpose().array()).matrix();
  }
}

}  // namespace mla
