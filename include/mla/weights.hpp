#pragma once
/// \file
/// `MlaWeights`: the weights of one MLA layer, stored [out, in] as in DeepSeek's checkpoints,
/// with shape checks against an MlaConfig and a seeded random initialiser.

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include "mla/config.hpp"
#include "mla/error.hpp"
#include "mla/matrix.hpp"
#include "mla/projection.hpp"

namespace mla {

/// The lightning indexer of DeepSeek-V3.2's sparse attention (checkpoint names under
/// `self_attn.indexer.`). No projection has a bias; k_norm is a LayerNorm with bias.
template <class T>
struct IndexerWeights {
  Linear<T> wq_b;          ///< [index_n_heads * index_head_dim, q_lora_rank]  (wq_b)
  Linear<T> wk;            ///< [index_head_dim, hidden]                       (wk)
  Vector<T> k_norm;        ///< [index_head_dim]                               (k_norm.weight)
  Vector<T> k_norm_bias;   ///< [index_head_dim]                               (k_norm.bias)
  Linear<T> weights_proj;  ///< [index_n_heads, hidden]                        (weights_proj)

  /// True when no tensor is set (a dense MLA layer).
  bool empty() const {
    return wq_b.empty() && wk.empty() && weights_proj.empty() && k_norm.size() == 0 &&
           k_norm_bias.size() == 0;
  }
};

/// Weights of one MLA layer (names as in DeepSeek's inference code; checkpoint names in
/// brackets). Either wq (no query compression) or wq_a, q_norm and wq_b are set; `indexer` is
/// set exactly when the config has one (MlaConfig::has_indexer), `wg` exactly when it has the
/// output gate (MlaConfig::mla_use_output_gate).
template <class T>
struct MlaWeights {
  Linear<T> wq;       ///< [H * (P + R), hidden]            (q_proj), when q_lora_rank == 0
  Linear<T> wq_a;     ///< [q_lora_rank, hidden]            (q_a_proj)
  Vector<T> q_norm;   ///< [q_lora_rank]                    (q_a_layernorm)
  Linear<T> wq_b;     ///< [H * (P + R), q_lora_rank]       (q_b_proj)
  Linear<T> wkv_a;    ///< [kv_lora_rank + R, hidden]       (kv_a_proj_with_mqa)
  Vector<T> kv_norm;  ///< [kv_lora_rank], empty without kv_latent_norm (kv_a_layernorm)
  Linear<T> wkv_b;    ///< [H * (P + V), kv_lora_rank]      (kv_b_proj)
  Linear<T> wo;       ///< [hidden, H * V]                  (o_proj)
  /// [H * V, hidden] (g_proj): the output gate, exactly when MlaConfig::mla_use_output_gate.
  Linear<T> wg;
  IndexerWeights<T> indexer;  ///< DeepSeek-V3.2's indexer           (indexer.*)

  /// Throws mla::Error naming the first tensor whose shape does not match `config`, with the
  /// expected and the given shape.
  void check(const MlaConfig& config) const;

  /// Seeded random weights for examples and tests, identical on every platform: projections
  /// uniform with variance 1/in (so activations stay O(1)), norm weights uniform in [0.5, 1.5].
  static MlaWeights random(const MlaConfig& config, std::uint64_t seed);

  /// The same weights in another compute type (FP8 projections keep their codes).
  template <class U>
  MlaWeights<U> cast() const;

  /// Which projections quantize_fp8 converts (all by default).
  struct Fp8Selection {
    bool wq = true, wq_a = true, wq_b = true, wkv_a = true, wkv_b = true, wo = true, wg = true;
    /// The indexer's wq_b and wk (FP8 in V3.2's checkpoint; weights_proj stays as it is).
    bool indexer = true;
  };

  /// A copy with the selected projections in block FP8 (DeepSeek-V3's 128 x 128 blocks by
  /// default); norms stay in T, as do RoPE and softmax in the layer.
  MlaWeights quantize_fp8(const Fp8Selection& which, const Fp8Options& options = {}) const {
    MlaWeights w = *this;
    const auto q = [&](bool on, Linear<T>& l) {
      if (on && !l.empty() && !l.is_fp8()) l = Linear<T>::quantize_fp8(l.to_dense(), options);
    };
    q(which.wq, w.wq);
    q(which.wq_a, w.wq_a);
    q(which.wq_b, w.wq_b);
    q(which.wkv_a, w.wkv_a);
    q(which.wkv_b, w.wkv_b);
    q(which.wo, w.wo);
    q(which.wg, w.wg);
    q(which.indexer, w.indexer.wq_b);
    q(which.indexer, w.indexer.wk);
    return w;
  }

  /// A copy with every projection in plain dense T (FP8 ones dequantised).
  MlaWeights dequantized() const {
    MlaWeights w = *this;
    for (Linear<T>* l : {&w.wq, &w.wq_a, &w.wq_b, &w.wkv_a, &w.wkv_b, &w.wo, &w.wg, &w.indexer.wq_b,
                         &w.indexer.wk, &w.indexer.weights_proj}) {
      if (l->is_fp8()) *l = Linear<T>(l->to_dense());
    }
    return w;
  }
};

namespace detail {

/// Uniform doubles in [lo, hi) from a std::mt19937_64 stream (whose output the standard fixes),
/// mapped by hand so that the values do not depend on the standard library.
class Uniform {
 public:
  explicit Uniform(std::uint64_t seed) : engine_(seed) {}
  double operator()(double lo, double hi) {
    const double u = static_cast<double>(engine_() >> 11) * 0x1p-53;  // [0, 1)
    return lo + (hi - lo) * u;
  }

 private:
  std::mt19937_64 engine_;
};

template <class T>
Linear<T> random_linear(Uniform& rng, Index out, Index in) {
  const double a = std::sqrt(3.0 / static_cast<double>(in));
  RowMatrix<T> w(out, in);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<T>(rng(-a, a));
  return Linear<T>(std::move(w));
}

template <class T>
Vector<T> random_norm(Uniform& rng, Index n) {
  Vector<T> v(n);
  for (Index i = 0; i < n; ++i) v(i) = static_cast<T>(rng(0.5, 1.5));
  return v;
}

template <class T>
void check_linear(const Linear<T>& w, Index rows, Index cols, const char* name,
                  const char* expected) {
  require(w.rows() == rows && w.cols() == cols, "MlaWeights.", name, " is [", w.rows(), ", ",
          w.cols(), "], expected ", expected, " = [", rows, ", ", cols, "]");
}

template <class T>
void check_vector(const Vector<T>& v, Index n, const char* name, const char* expected) {
  require(v.size() == n, "MlaWeights.", name, " has ", v.size(), " values, expected ", expected,
          " = ", n);
}

}  // namespace detail

template <class T>
void MlaWeights<T>::check(const MlaConfig& c) const {
  c.validate();
  const Index H = c.num_attention_heads;
  const Index q_out = H * c.qk_head_dim();
  if (c.has_q_lora()) {
    detail::require(wq.empty(), "MlaWeights.wq must be empty when q_lora_rank > 0 (the query goes ",
                    "through wq_a, q_norm and wq_b), but it is [", wq.rows(), ", ", wq.cols(), "]");
    detail::check_linear(wq_a, c.q_lora_rank, c.hidden_size, "wq_a", "[q_lora_rank, hidden_size]");
    detail::check_vector(q_norm, c.q_lora_rank, "q_norm", "q_lora_rank");
    detail::check_linear(wq_b, q_out, c.q_lora_rank, "wq_b",
                         "[heads * (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank]");
  } else {
    detail::require(wq_a.empty() && wq_b.empty() && q_norm.size() == 0,
                    "MlaWeights.wq_a, q_norm and wq_b must be empty when q_lora_rank == 0 (the ",
                    "query uses wq)");
    detail::check_linear(wq, q_out, c.hidden_size, "wq",
                         "[heads * (qk_nope_head_dim + qk_rope_head_dim), hidden_size]");
  }
  detail::check_linear(wkv_a, c.latent_cache_width(), c.hidden_size, "wkv_a",
                       "[kv_lora_rank + qk_rope_head_dim, hidden_size]");
  if (c.kv_latent_norm) {
    detail::check_vector(kv_norm, c.kv_lora_rank, "kv_norm", "kv_lora_rank");
  } else {
    detail::require(kv_norm.size() == 0, "MlaWeights.kv_norm must be empty when ",
                    "MlaConfig.kv_latent_norm is false, but it has ", kv_norm.size(), " values");
  }
  detail::check_linear(wkv_b, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank, "wkv_b",
                       "[heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]");
  detail::check_linear(wo, c.hidden_size, H * c.v_head_dim, "wo",
                       "[hidden_size, heads * v_head_dim]");
  if (c.mla_use_output_gate) {
    detail::check_linear(wg, H * c.v_head_dim, c.hidden_size, "wg",
                         "[heads * v_head_dim, hidden_size]");
  } else {
    detail::require(wg.empty(), "MlaWeights.wg (the output gate) must be empty when ",
                    "MlaConfig.mla_use_output_gate is false, but it is [", wg.rows(), ", ",
                    wg.cols(), "]");
  }
  if (!c.has_indexer()) {
    detail::require(indexer.empty(), "MlaWeights.indexer must be empty when the config has no ",
                    "indexer of its own (index_topk == 0 or index_shared)");
    return;
  }
  const Index HI = c.index_n_heads, DI = c.index_head_dim;
  detail::check_linear(indexer.wq_b, HI * DI, c.q_lora_rank, "indexer.wq_b",
                       "[index_n_heads * index_head_dim, q_lora_rank]");
  detail::check_linear(indexer.wk, DI, c.hidden_size, "indexer.wk",
                       "[index_head_dim, hidden_size]");
  detail::check_vector(indexer.k_norm, DI, "indexer.k_norm", "index_head_dim");
  detail::check_vector(indexer.k_norm_bias, DI, "indexer.k_norm_bias", "index_head_dim");
  detail::check_linear(indexer.weights_proj, HI, c.hidden_size, "indexer.weights_proj",
                       "[index_n_heads, hidden_size]");
}

template <class T>
MlaWeights<T> MlaWeights<T>::random(const MlaConfig& c, std::uint64_t seed) {
  c.validate();
  detail::Uniform rng(seed);
  const Index H = c.num_attention_heads;
  MlaWeights w;
  if (c.has_q_lora()) {
    w.wq_a = detail::random_linear<T>(rng, c.q_lora_rank, c.hidden_size);
    w.q_norm = detail::random_norm<T>(rng, c.q_lora_rank);
    w.wq_b = detail::random_linear<T>(rng, H * c.qk_head_dim(), c.q_lora_rank);
  } else {
    w.wq = detail::random_linear<T>(rng, H * c.qk_head_dim(), c.hidden_size);
  }
  w.wkv_a = detail::random_linear<T>(rng, c.latent_cache_width(), c.hidden_size);
  if (c.kv_latent_norm) w.kv_norm = detail::random_norm<T>(rng, c.kv_lora_rank);
  w.wkv_b = detail::random_linear<T>(rng, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank);
  w.wo = detail::random_linear<T>(rng, c.hidden_size, H * c.v_head_dim);
  if (c.has_indexer()) {
    const Index HI = c.index_n_heads, DI = c.index_head_dim;
    w.indexer.wq_b = detail::random_linear<T>(rng, HI * DI, c.q_lora_rank);
    w.indexer.wk = detail::random_linear<T>(rng, DI, c.hidden_size);
    w.indexer.k_norm = detail::random_norm<T>(rng, DI);
    w.indexer.k_norm_bias = detail::random_norm<T>(rng, DI);
    for (Index i = 0; i < DI; ++i) w.indexer.k_norm_bias(i) -= T(1);  // [-0.5, 0.5)
    w.indexer.weights_proj = detail::random_linear<T>(rng, HI, c.hidden_size);
  }
  // Drawn last, so that the other weights of a seed do not depend on the gate.
  if (c.mla_use_output_gate) w.wg = detail::random_linear<T>(rng, H * c.v_head_dim, c.hidden_size);
  return w;
}

template <class T>
template <class U>
MlaWeights<U> MlaWeights<T>::cast() const {
  const auto lin = [](const Linear<T>& l) { return l.template cast<U>(); };
  MlaWeights<U> w;
  w.wq = lin(wq);
  w.wq_a = lin(wq_a);
  w.q_norm = q_norm.template cast<U>();
  w.wq_b = lin(wq_b);
  w.wkv_a = lin(wkv_a);
  w.kv_norm = kv_norm.template cast<U>();
  w.wkv_b = lin(wkv_b);
  w.wo = lin(wo);
  w.wg = lin(wg);
  w.indexer.wq_b = lin(indexer.wq_b);
  w.indexer.wk = lin(indexer.wk);
  w.indexer.k_norm = indexer.k_norm.template cast<U>();
  w.indexer.k_norm_bias = indexer.k_norm_bias.template cast<U>();
  w.indexer.weights_proj = lin(indexer.weights_proj);
  return w;
}

}  // namespace mla
