#pragma once
/// \file
/// Conversion of multi-head (MHA) or grouped-query (GQA) attention into MLA, and the GQA
/// baseline at equal cache size.
///
/// Source: an attention layer whose H query heads share G key/value heads (G == H for MHA),
/// head widths d_k and d_v, RoPE on the last R dimensions of every query and key head.
///
/// MLA target (`convert_to_mla`), latent rank r:
/// - Non-rotary part. The key rows without RoPE and the value rows of every KV head are
///   stacked, M = [W_K^nope(0); W_V(0); ...; W_K^nope(G-1); W_V(G-1)]  ([G (P + d_v), hidden]),
///   and factored as M ~ U_r (U_r^T M): W_DKV = U_r^T M ([r, hidden]) makes the cached latent,
///   U_r's rows give every head's W_UK and W_UV. U_r holds the r leading eigenvectors of
///   M M^T, or of M C M^T with C = X^T X / n the covariance of calibration activations X, so
///   that the loss is least on inputs like X. The subspaces are nested, so the error of the
///   reconstructed keys and values never grows with r, and at r = G (P + d_v) it is zero.
/// - Rotary part. MLA caches one rotary key k^R of width R for all heads. RoPE turns each
///   pair of dimensions (frequency i) like a complex number, so a complex factor per head
///   commutes with it: if head g's rotary key for pair i is a_gi (s_i x), the factor moves
///   into the queries (q_i <- conj(a_gi) q_i) exactly. The converter takes per pair i the
///   principal direction of the G heads' complex key rows K_i ([G, hidden]): the leading
///   eigenvector a_i of K_i K_i^H (or K_i C K_i^H), s_i = a_i^H K_i. This is exact when the
///   heads' rotary keys are complex multiples of one shared key per pair (always for G == 1,
///   i.e. MQA); otherwise the part of the rotary keys outside that direction is lost, at every
///   latent rank. `MlaConversion::rotary_retained` reports the fraction of the rotary keys'
///   energy kept.
/// - Partial RoPE (ConvertOptions::rope_keep < R, MHA2MLA's idea). Only rope_keep of the R
///   rotary dimensions stay rotary (the shared key above); the other pairs become ordinary key
///   dimensions, stacked with the non-rotary keys into M, so the latent holds them for every
///   head (exactly at full rank). What that costs is the rotation they no longer get: a pair of
///   frequency theta moved into the latent is exact for tokens at the same position and off by
///   an angle (t - s) theta between positions s and t, so it suits low frequencies and short
///   contexts. Which pairs stay: the highest frequencies (kHighestFrequency), or those with the
///   largest contribution (kContribution: per pair, sum over query heads of the query part's
///   norm times its KV head's key part's norm, RMS over the calibration inputs, or over
///   isotropic inputs without calibration: MHA2MLA's 2-norm criterion, summed over heads since
///   MLA's rotary key is shared). The converted layer keeps its source's frequencies for the
///   kept pairs (MlaConfig::rope_inv_freq) and puts the moved dimensions after the non-rotary
///   ones in each head.
/// The target layer has no RMSNorm on the latent (MlaConfig::kv_latent_norm false), since a
/// norm is no linear map, and no query compression; RoPE settings are the source's.
///
/// GQA baseline (`pool_kv_heads`): the KV heads are mean-pooled into g groups of consecutive
/// heads, the initialisation from MHA of the GQA paper (Ainslie et al., 2023).

#include <Eigen/Eigenvalues>
#include <algorithm>
#include <cmath>
#include <complex>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "mla/config.hpp"
#include "mla/error.hpp"
#include "mla/matrix.hpp"
#include "mla/rope.hpp"
#include "mla/weights.hpp"

namespace mla {

/// Dimensions of a multi-head or grouped-query attention layer.
struct MhaConfig {
  Index hidden_size = 0;
  Index num_heads = 0;     ///< H, query heads
  Index num_kv_heads = 0;  ///< G, key/value heads; H for MHA, 1 for MQA; divides H
  Index head_dim = 0;      ///< d_k, query and key width per head
  Index v_head_dim = 0;    ///< d_v
  Index rope_dim = 0;      ///< R, rotated dimensions at the end of each query/key head (even)
  double rope_theta = 10000.0;
  RopeLayout rope_layout = RopeLayout::kInterleaved;
  /// Explicit frequencies of the R/2 pairs instead of rope_theta's (see MlaConfig); empty: from
  /// rope_theta.
  std::vector<double> rope_inv_freq;

  /// Throws mla::Error naming the first field that is out of range.
  void validate() const {
    detail::require(
        hidden_size > 0 && num_heads > 0 && num_kv_heads > 0 && head_dim > 0 && v_head_dim > 0,
        "MhaConfig: hidden_size, num_heads, num_kv_heads, head_dim and v_head_dim ",
        "must be > 0, got ", hidden_size, ", ", num_heads, ", ", num_kv_heads, ", ", head_dim, ", ",
        v_head_dim);
    detail::require(num_heads % num_kv_heads == 0, "MhaConfig.num_kv_heads (", num_kv_heads,
                    ") must divide num_heads (", num_heads, ")");
    detail::require(rope_dim >= 0 && rope_dim <= head_dim && rope_dim % 2 == 0,
                    "MhaConfig.rope_dim must be even and in [0, head_dim = ", head_dim, "], got ",
                    rope_dim);
  }

  /// Bytes a plain KV cache holds per token (keys and values of every KV head) for elements
  /// of `element_bytes`.
  Index cache_bytes_per_token(Index element_bytes = 4) const {
    return num_kv_heads * (head_dim + v_head_dim) * element_bytes;
  }
};

/// Weights of an MHA/GQA layer, [out, in]: rows h * d_k .. of wq are query head h, rows
/// g * d_k .. of wk and g * d_v .. of wv KV head g; query head h reads KV head h / (H / G).
template <class T>
struct MhaWeights {
  RowMatrix<T> wq;  ///< [H d_k, hidden]
  RowMatrix<T> wk;  ///< [G d_k, hidden]
  RowMatrix<T> wv;  ///< [G d_v, hidden]
  RowMatrix<T> wo;  ///< [hidden, H d_v]

  /// Throws mla::Error naming the first matrix whose shape does not match `c`.
  void check(const MhaConfig& c) const {
    c.validate();
    const auto shape = [](const RowMatrix<T>& m, Index rows, Index cols, const char* name) {
      detail::require(m.rows() == rows && m.cols() == cols, "MhaWeights.", name, " is [", m.rows(),
                      ", ", m.cols(), "], expected [", rows, ", ", cols, "]");
    };
    shape(wq, c.num_heads * c.head_dim, c.hidden_size, "wq");
    shape(wk, c.num_kv_heads * c.head_dim, c.hidden_size, "wk");
    shape(wv, c.num_kv_heads * c.v_head_dim, c.hidden_size, "wv");
    shape(wo, c.hidden_size, c.num_heads * c.v_head_dim, "wo");
  }
};

namespace detail::convert {

/// The MLA config of a conversion with latent rank r: the source's heads, widths and RoPE.
inline MlaConfig mla_shape(const MhaConfig& c, Index rank) {
  MlaConfig m;
  m.hidden_size = c.hidden_size;
  m.num_attention_heads = c.num_heads;
  m.q_lora_rank = 0;
  m.kv_lora_rank = rank;
  m.qk_nope_head_dim = c.head_dim - c.rope_dim;
  m.qk_rope_head_dim = c.rope_dim;
  m.v_head_dim = c.v_head_dim;
  m.rope_theta = c.rope_theta;
  m.rope_layout = c.rope_layout;
  m.rope_inv_freq = c.rope_inv_freq;
  m.kv_latent_norm = false;
  return m;
}

/// Eigenvectors of a self-adjoint matrix by decreasing eigenvalue, and the eigenvalues.
template <class Matrix>
void leading_eigenvectors(const Matrix& a, Matrix& vectors, Eigen::VectorXd& values) {
  Eigen::SelfAdjointEigenSolver<Matrix> es(a);
  require(es.info() == Eigen::Success, "convert_to_mla: eigendecomposition failed");
  vectors = es.eigenvectors().rowwise().reverse();
  values = es.eigenvalues().reverse().cwiseMax(0.0);
}

}  // namespace detail::convert

/// Causal MHA/GQA attention of the rows of x (consecutive tokens at positions pos0, pos0 + 1,
/// ...) with softmax scale 1 / sqrt(d_k): the layer the conversions approximate. [T, hidden].
template <class T>
RowMatrix<T> mha_forward(const MhaConfig& c, const MhaWeights<T>& w,
                         ConstMatrixRef<detail::identity_t<T>> x, Index pos0 = 0) {
  w.check(c);
  detail::require(x.cols() == c.hidden_size, "mha_forward: x has ", x.cols(),
                  " columns, expected hidden_size = ", c.hidden_size);
  const Index n = x.rows(), H = c.num_heads, G = c.num_kv_heads, dk = c.head_dim, dv = c.v_head_dim,
              R = c.rope_dim;
  RowMatrix<T> q = x * w.wq.transpose(), k = x * w.wk.transpose(), v = x * w.wv.transpose();
  if (R > 0) {
    const Rope rope(detail::convert::mla_shape(c, 1));
    std::vector<T> scratch(static_cast<std::size_t>(R));
    for (Index t = 0; t < n; ++t) {
      rope.apply<T>(q.middleRows(t, 1), pos0 + t, dk - R, H, dk, scratch.data());
      rope.apply<T>(k.middleRows(t, 1), pos0 + t, dk - R, G, dk, scratch.data());
    }
  }
  const T scale = T(1) / std::sqrt(static_cast<T>(dk));
  RowMatrix<T> o(n, H * dv);
  for (Index h = 0; h < H; ++h) {
    const Index g = h / (H / G);
    const RowMatrix<T> s = scale * q.middleCols(h * dk, dk) * k.middleCols(g * dk, dk).transpose();
    for (Index t = 0; t < n; ++t) {
      const auto row = s.row(t).head(t + 1);
      const T mx = row.maxCoeff();
      const Eigen::Matrix<T, 1, Eigen::Dynamic> p = (row.array() - mx).exp().matrix();
      o.block(t, h * dv, 1, dv) = (p * v.block(0, g * dv, t + 1, dv)) / p.sum();
    }
  }
  return o * w.wo.transpose();
}

/// The MHA layer with its KV heads mean-pooled into `groups` groups of consecutive heads
/// (groups divides num_kv_heads): the GQA baseline. Returns the new config through `out`.
template <class T>
MhaWeights<T> pool_kv_heads(const MhaConfig& c, const MhaWeights<T>& w, Index groups,
                            MhaConfig& out) {
  w.check(c);
  detail::require(groups >= 1 && c.num_kv_heads % groups == 0, "pool_kv_heads: groups (", groups,
                  ") must divide num_kv_heads (", c.num_kv_heads, ")");
  const Index per = c.num_kv_heads / groups, dk = c.head_dim, dv = c.v_head_dim;
  MhaWeights<T> p{w.wq, RowMatrix<T>::Zero(groups * dk, c.hidden_size),
                  RowMatrix<T>::Zero(groups * dv, c.hidden_size), w.wo};
  for (Index g = 0; g < groups; ++g) {
    for (Index j = 0; j < per; ++j) {
      p.wk.middleRows(g * dk, dk) += w.wk.middleRows((g * per + j) * dk, dk) / T(per);
      p.wv.middleRows(g * dv, dv) += w.wv.middleRows((g * per + j) * dv, dv) / T(per);
    }
  }
  out = c;
  out.num_kv_heads = groups;
  return p;
}

/// Which rotary pairs stay rotary under partial RoPE (see the file comment).
enum class RopeKeep : std::uint8_t {
  kHighestFrequency,  ///< the rope_keep / 2 pairs of highest frequency
  kContribution,      ///< the pairs with the largest query-norm x key-norm contribution
};

/// Options of convert_to_mla.
struct ConvertOptions {
  /// Rotary dimensions that stay rotary (an even number in [0, rope_dim]); the others move into
  /// the latent. -1 (the default): all of them, the conversion without partial RoPE.
  Index rope_keep = -1;
  RopeKeep criterion = RopeKeep::kHighestFrequency;
  /// Shared rotary directions per kept pair, in [1, num_kv_heads]: the leading eigenvectors of
  /// the heads' complex keys of the pair (TransMLA-style; num_kv_heads keeps every head's
  /// rotary key exactly). The cached k^R is rope_keep * rope_rank wide. 1 (the default): one
  /// shared key per pair.
  Index rope_rank = 1;
};

/// An MLA layer made from an MHA/GQA layer.
template <class T>
struct MlaConversion {
  MlaConfig config;       ///< kv_lora_rank = r, qk_rope_head_dim = R, no latent norm
  MlaWeights<T> weights;  ///< wq, wkv_a, wkv_b, wo (no query compression)
  /// Fraction of the (calibration-weighted) energy of the non-rotary keys and values that the
  /// rank-r latent keeps, in [0, 1]; 1 at full rank.
  double latent_retained = 1.0;
  /// Fraction of the rotary keys' energy the shared rotary key keeps (moved pairs count as kept:
  /// their energy goes to the latent, see latent_retained); 1 when exact.
  double rotary_retained = 1.0;
  /// The source's rotary pairs (indices into its R / 2 pairs) that stay rotary, in the order of
  /// the converted layer's pairs; the others moved into the latent.
  std::vector<Index> rope_pairs_kept;
};

namespace detail::convert {

/// The pairs that stay rotary: `keep` of the R / 2, by the criterion; ascending pair index
/// (descending frequency).
template <class T, class Gram>
std::vector<Index> kept_pairs(const MhaConfig& c, const MhaWeights<T>& w, Index keep,
                              RopeKeep criterion, Gram&& gram) {
  const Index pairs = c.rope_dim / 2, H = c.num_heads, G = c.num_kv_heads, dk = c.head_dim,
              P = dk - c.rope_dim;
  std::vector<Index> order(static_cast<std::size_t>(pairs));
  for (Index i = 0; i < pairs; ++i) order[static_cast<std::size_t>(i)] = i;
  if (criterion == RopeKeep::kContribution) {
    // Per pair: sum_h RMS norm of head h's query part x RMS norm of its KV head's key part.
    std::vector<double> score(static_cast<std::size_t>(pairs), 0.0);
    const auto norm = [&](const RowMatrix<T>& m, Index row0, Index i) {
      const RopePair p = rope_pair(c.rope_layout, c.rope_dim, i);
      Eigen::MatrixXd rows(2, c.hidden_size);
      rows.row(0) = m.row(row0 + P + p.first).template cast<double>();
      rows.row(1) = m.row(row0 + P + p.second).template cast<double>();
      return std::sqrt(std::max(0.0, gram(rows).trace()));
    };
    for (Index i = 0; i < pairs; ++i) {
      for (Index h = 0; h < H; ++h) {
        const Index g = h / (H / G);
        score[static_cast<std::size_t>(i)] += norm(w.wq, h * dk, i) * norm(w.wk, g * dk, i);
      }
    }
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) {
      return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)];
    });
  }
  order.resize(static_cast<std::size_t>(keep / 2));
  std::sort(order.begin(), order.end());
  return order;
}

}  // namespace detail::convert

/// MLA weights with latent rank `rank` (1 <= rank <= G (d_k - rope_keep + d_v)) from MHA/GQA
/// weights. `calibration` ([n, hidden], may be empty) weights the factorisation (and the
/// kContribution criterion) by the activations' covariance; `options` chooses partial RoPE.
/// Computed in double. Throws mla::Error for shapes, ranks or options out of range.
template <class T>
MlaConversion<T> convert_to_mla(const MhaConfig& c, const MhaWeights<T>& w, Index rank,
                                ConstMatrixRef<detail::identity_t<T>> calibration = RowMatrix<T>(),
                                const ConvertOptions& options = {}) {
  using Mat = Eigen::MatrixXd;
  using CMat = Eigen::MatrixXcd;
  w.check(c);
  const Index H = c.num_heads, G = c.num_kv_heads, dk = c.head_dim, dv = c.v_head_dim,
              R = c.rope_dim, P = dk - R, hid = c.hidden_size;
  const Index keep = options.rope_keep < 0 ? R : options.rope_keep;
  detail::require(keep >= 0 && keep <= R && keep % 2 == 0,
                  "convert_to_mla: rope_keep must be an even number in [0, rope_dim = ", R,
                  "] (or -1: all), got ", options.rope_keep);
  const Index rk = options.rope_rank;
  detail::require(rk >= 1 && rk <= G, "convert_to_mla: rope_rank must be in [1, num_kv_heads = ", G,
                  "], got ", rk);
  const Index moved = R - keep, P2 = P + moved, width = G * (P2 + dv);
  detail::require(rank >= 1 && rank <= width, "convert_to_mla: rank must be in [1, ",
                  "num_kv_heads * (head_dim - rope_keep + v_head_dim) = ", width, "], got ", rank);
  detail::require(calibration.size() == 0 || calibration.cols() == hid,
                  "convert_to_mla: calibration has ", calibration.cols(),
                  " columns, expected hidden_size = ", hid);
  // The input-space weight: C = X^T X / n, or the identity.
  Mat cov;
  const bool weighted = calibration.size() > 0;
  if (weighted) {
    const Mat x = calibration.template cast<double>();
    cov = x.transpose() * x / static_cast<double>(x.rows());
  }
  const auto gram = [&](const auto& m) {  // m C m^H, or m m^H
    using M = std::decay_t<decltype(m)>;
    return weighted ? M(m * cov * m.adjoint()) : M(m * m.adjoint());
  };

  MlaConversion<T> out;
  out.rope_pairs_kept = detail::convert::kept_pairs(c, w, keep, options.criterion, gram);
  const std::vector<Index>& kept = out.rope_pairs_kept;
  std::vector<Index> gone;  // the moved pairs, ascending
  for (Index i = 0, k = 0; i < R / 2; ++i) {
    if (k < static_cast<Index>(kept.size()) && kept[static_cast<std::size_t>(k)] == i) {
      ++k;
    } else {
      gone.push_back(i);
    }
  }
  // Row r (< P2) of a head's key or query in the converted layer, as a row of the source head:
  // the non-rotary rows, then both dimensions of each moved pair.
  const auto nope_row = [&](Index r) {
    if (r < P) return r;
    const RopePair p = rope_pair(c.rope_layout, R, gone[static_cast<std::size_t>((r - P) / 2)]);
    return P + ((r - P) % 2 == 0 ? p.first : p.second);
  };
  // Non-rotary keys (with the moved pairs) and values of every KV head, stacked.
  Mat m(width, hid);
  for (Index g = 0; g < G; ++g) {
    for (Index r = 0; r < P2; ++r) {
      m.row(g * (P2 + dv) + r) = w.wk.row(g * dk + nope_row(r)).template cast<double>();
    }
    m.middleRows(g * (P2 + dv) + P2, dv) = w.wv.middleRows(g * dv, dv).template cast<double>();
  }
  Mat u;
  Eigen::VectorXd energy;
  detail::convert::leading_eigenvectors(gram(m), u, energy);
  const Mat ur = u.leftCols(rank);
  const Mat down = ur.transpose() * m;  // W_DKV [r, hidden]
  const double total = energy.sum();
  out.latent_retained = total > 0 ? energy.head(rank).sum() / total : 1.0;

  // Shared rotary key: per kept pair, the rope_rank principal directions of the KV heads'
  // complex keys; direction d of kept pair j sits at the converted layer's pair j * rk + d.
  const Index K2 = keep * rk;
  Mat kr(K2, hid);                             // rows of the shared rotary key, in the RoPE layout
  CMat factor(G, std::max<Index>(K2 / 2, 1));  // a_g of each of the layer's pairs
  double rot_total = 0.0, rot_kept = 0.0;
  for (Index i = 0; i < R / 2; ++i) {
    const auto [a, b] = rope_pair(c.rope_layout, R, i);
    CMat ki(G, hid);
    for (Index g = 0; g < G; ++g) {
      for (Index j = 0; j < hid; ++j) {
        ki(g, j) = std::complex<double>(w.wk(g * dk + P + a, j), w.wk(g * dk + P + b, j));
      }
    }
    CMat vecs;
    Eigen::VectorXd vals;
    detail::convert::leading_eigenvectors(gram(ki), vecs, vals);
    rot_total += vals.sum();
    const auto at = std::find(kept.begin(), kept.end(), i);
    if (at == kept.end()) {  // moved into the latent: kept there (up to the rank)
      rot_kept += vals.sum();
      continue;
    }
    for (Index d = 0; d < rk; ++d) {
      rot_kept += vals(d);
      const Index jj = (at - kept.begin()) * rk + d;
      const auto [ka, kb] = rope_pair(c.rope_layout, K2, jj);
      factor.col(jj) = vecs.col(d);
      const Eigen::Matrix<std::complex<double>, 1, Eigen::Dynamic> s = vecs.col(d).adjoint() * ki;
      kr.row(ka) = s.real();
      kr.row(kb) = s.imag();
    }
  }
  out.rotary_retained = rot_total > 0 ? rot_kept / rot_total : 1.0;

  out.config = detail::convert::mla_shape(c, rank);
  out.config.qk_nope_head_dim = P2;
  out.config.qk_rope_head_dim = K2;
  if (keep < R || rk > 1) {  // the kept pairs' own frequencies, once per direction
    const std::vector<double> source = Rope(detail::convert::mla_shape(c, 1)).inv_freq();
    out.config.rope_inv_freq.clear();
    for (Index i : kept) {
      for (Index d = 0; d < rk; ++d) {
        out.config.rope_inv_freq.push_back(source[static_cast<std::size_t>(i)]);
      }
    }
  }

  // Queries: the non-rotary rows (with the moved pairs) as they are, the kept rotary pairs
  // times conj(a_gj).
  RowMatrix<T> wq(H * (P2 + K2), hid);
  // MLA scales scores by (P2 + K2)^-1/2, the source by d_k^-1/2: the queries make up the
  // difference (a factor of exactly 1 unless rope_rank > 1).
  const T qscale =
      static_cast<T>(std::sqrt(static_cast<double>(P2 + K2) / static_cast<double>(dk)));
  RowMatrix<T> wkv_b(H * (P2 + dv), rank);
  for (Index h = 0; h < H; ++h) {
    const Index g = h / (H / G);
    const Index qk = P2 + K2;  // the converted head's width (dk unless rope_rank > 1)
    for (Index r = 0; r < P2; ++r) wq.row(h * qk + r) = w.wq.row(h * dk + nope_row(r)) * qscale;
    for (Index jj = 0; jj < K2 / 2; ++jj) {
      const auto [a, b] = rope_pair(c.rope_layout, R, kept[static_cast<std::size_t>(jj / rk)]);
      const auto [ka, kb] = rope_pair(c.rope_layout, K2, jj);
      const std::complex<double> f = std::conj(factor(g, jj));
      for (Index j = 0; j < hid; ++j) {
        const std::complex<double> qv(w.wq(h * dk + P + a, j), w.wq(h * dk + P + b, j));
        const std::complex<double> r = f * qv * static_cast<double>(qscale);
        wq(h * qk + P2 + ka, j) = static_cast<T>(r.real());
        wq(h * qk + P2 + kb, j) = static_cast<T>(r.imag());
      }
    }
    wkv_b.middleRows(h * (P2 + dv), P2 + dv) =
        ur.middleRows(g * (P2 + dv), P2 + dv).template cast<T>();
  }
  RowMatrix<T> wkv_a(rank + K2, hid);
  wkv_a.topRows(rank) = down.template cast<T>();
  wkv_a.bottomRows(K2) = kr.template cast<T>();
  out.weights.wq = Linear<T>(std::move(wq));
  out.weights.wkv_a = Linear<T>(std::move(wkv_a));
  out.weights.wkv_b = Linear<T>(std::move(wkv_b));
  out.weights.wo = Linear<T>(RowMatrix<T>(w.wo));
  out.weights.check(out.config);
  return out;
}

}  // namespace mla
