#pragma once
/// \file
/// The one log-sum-exp merge: softmax states over disjoint sets of keys combined into the state
/// over their union. The decode kernels merge their splits with it (detail/isa/decode_frame.inl)
/// and mla::mpi its ranks. Internal.

#include <algorithm>
#include <cmath>
#include <limits>

#include "mla/matrix.hpp"

namespace mla::detail {

/// For n partial softmax states over disjoint key sets, state i with running maximum m_i and sum
/// l_i (its output o_i unnormalised: sum_j exp(s_j - m_i) v_j), or l == nullptr and m_i its
/// log-sum-exp (o_i normalised), writes the weights w_i such that sum_i w_i o_i is the softmax
/// output over the union:
///   M = max_i m_i, L = sum_i l_i exp(m_i - M), w_i = exp(m_i - M) / L (normalised: l_i = 1),
/// and returns the union's log-sum-exp M + log L. States over no keys (m_i = -inf) get weight 0;
/// if every state is empty, every weight is 0 and the result is -inf. The sum is kept in double.
/// m and w are read and written `stride` apart, l the same; w may alias m.
inline float lse_merge(Index n, const float* m, const float* l, Index stride, float* w) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float mx = -kInf;
  bool empty = true;  // (a NaN state is not empty: it makes the result NaN)
  for (Index i = 0; i < n; ++i) {
    mx = std::max(mx, m[i * stride]);
    empty = empty && m[i * stride] == -kInf;
  }
  if (empty) {
    for (Index i = 0; i < n; ++i) w[i * stride] = 0.0f;
    return -kInf;
  }
  double sum = 0;
  for (Index i = 0; i < n; ++i) {
    const float e = std::exp(m[i * stride] - mx);
    sum += static_cast<double>(e) * (l ? l[i * stride] : 1.0f);
    w[i * stride] = e;
  }
  const auto inv = static_cast<float>(1.0 / sum);
  for (Index i = 0; i < n; ++i) w[i * stride] *= inv;
  return mx + static_cast<float>(std::log(sum));
}

}  // namespace mla::detail
