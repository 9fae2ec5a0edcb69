#pragma once
/// \file
/// `MlaLayer`: DeepSeek's Multi-Head Latent Attention for a chunk of new tokens of one
/// sequence, over a LatentCache, with a reusable `MlaWorkspace`.

#include <algorithm>
#include <cstdint>
#include <utility>

#include "mla/attention.hpp"
#include "mla/config.hpp"
#include "mla/error.hpp"
#include "mla/latent_cache.hpp"
#include "mla/matrix.hpp"
#include "mla/norm.hpp"
#include "mla/projection.hpp"
#include "mla/rope.hpp"
#include "mla/weights.hpp"

namespace mla {

template <class T>
class MlaLayer;

/// Scratch memory of MlaLayer::forward: sized by the longest chunk seen so far and reused.
/// Once it has been sized (by a call or by reserve), a call with a chunk that fits allocates
/// nothing. One workspace can serve every layer of a model, one call at a time.
template <class T>
class MlaWorkspace {
 public:
  /// Makes room for chunks of up to `tokens` tokens of `config` on `path` (kAuto: both).
  void reserve(const MlaConfig& c, Index tokens, AttentionPath path = AttentionPath::kAuto) {
    const Index H = c.num_attention_heads;
    grow(cq, tokens, c.q_lora_rank);
    grow(q, tokens, H * c.qk_head_dim());
    grow(kv, tokens, c.latent_cache_width());
    if (path != AttentionPath::kExpanded) {
      grow(q_latent, tokens * H, c.latent_cache_width());
      grow(o_latent, tokens * H, c.kv_lora_rank);
    }
    grow(o, tokens, H * c.v_head_dim);
    grow(lse, tokens, H);
    grow(rope_scratch, 1, c.qk_rope_head_dim);
    attention.reserve(c, tokens, path);
  }

  /// Log-sum-exp of the last forward call's attention, [tokens, H] in the top rows.
  const RowMatrix<T>& last_lse() const { return lse; }

 private:
  friend class MlaLayer<T>;
  static void grow(RowMatrix<T>& m, Index rows, Index cols) {
    if (m.rows() < rows || m.cols() != cols) m.resize(std::max(rows, m.rows()), cols);
  }

  RowMatrix<T> cq;        // [tokens, q_lora_rank]       c^Q
  RowMatrix<T> q;         // [tokens, H * (P + R)]        q
  RowMatrix<T> kv;        // [tokens, d_c + R]            [c^KV ; k^R]
  RowMatrix<T> q_latent;  // [tokens * H, d_c + R]        [q~ ; q^pe] per (token, head)
  RowMatrix<T> o_latent;  // [tokens * H, d_c]            o~
  RowMatrix<T> o;         // [tokens, H * V]              o
  RowMatrix<T> lse;       // [tokens, H]
  RowMatrix<T> rope_scratch;
  AttentionWorkspace<T> attention;
};

/// One MLA layer: weights, their absorbed forms, and the forward pass. Holds no per-sequence
/// state: one layer serves any number of caches and sequences.
template <class T>
class MlaLayer {
 public:
  /// Checks the config and the weights' shapes (throws mla::Error naming what is wrong) and
  /// precomputes the absorbed matrices. `layer_index` selects this layer's slots in a
  /// LatentCache shared by the layers of a model.
  MlaLayer(const MlaConfig& config, MlaWeights<T> weights, Index layer_index = 0)
      : config_(config), rope_(config), layer_index_(layer_index) {
    detail::require(layer_index >= 0, "MlaLayer: layer_index must be >= 0, got ", layer_index);
    set_weights(std::move(weights));
  }

  const MlaConfig& config() const { return config_; }
  const MlaWeights<T>& weights() const { return weights_; }
  Index layer_index() const { return layer_index_; }
  const Rope& rope() const { return rope_; }
  /// sigma = (P + R)^-1/2 * mscale^2.
  double softmax_scale() const { return softmax_scale_; }

  /// Replaces the weights (shape-checked) and recomputes the absorbed matrices, once.
  void set_weights(MlaWeights<T> weights) {
    weights.check(config_);
    weights_ = std::move(weights);
    softmax_scale_ = mla::softmax_scale(config_);
    // Split W_kvb [H * (P + V), d_c] into per-head W_UK^(h) (P rows) and W_UV^(h) (V rows),
    // each stacked over heads, so the decode path never slices the checkpoint layout.
    const Index H = config_.num_attention_heads, P = config_.qk_nope_head_dim;
    const Index V = config_.v_head_dim, D = config_.kv_lora_rank;
    const RowMatrix<T>& wkv_b = weights_.wkv_b.dense();
    w_uk_.resize(H * P, D);
    w_uv_.resize(H * V, D);
    for (Index h = 0; h < H; ++h) {
      w_uk_.middleRows(h * P, P) = wkv_b.middleRows(h * (P + V), P);
      w_uv_.middleRows(h * V, V) = wkv_b.middleRows(h * (P + V) + P, V);
    }
  }

  /// W_UK^(h) of every head, stacked: [H * P, d_c]. The absorbed query is q~_h = W_UK^(h)^T q.
  const RowMatrix<T>& w_uk() const { return w_uk_; }
  /// W_UV^(h) of every head, stacked: [H * V, d_c]. The head output is o_h = W_UV^(h) o~_h.
  const RowMatrix<T>& w_uv() const { return w_uv_; }

  /// The path kAuto takes for `tokens` new tokens after `past` cached ones (see
  /// auto_attention_path).
  AttentionPath choose_path(Index tokens, Index past) const {
    return auto_attention_path(config_, tokens, past);
  }

  /// Runs the layer on `x` [tokens, hidden_size], the next tokens of sequence `seq`, at
  /// positions start_pos, start_pos + 1, ...: appends their c^KV and k^R to `cache` (layer
  /// layer_index()) and writes the attention output u = W_o [o_1 .. o_H] to `y`
  /// [tokens, hidden_size]. Each token attends to everything cached before it and to itself.
  /// `y` may alias `x`.
  ///
  /// Throws mla::Error for wrong shapes, an unknown sequence, a layer index the cache does not
  /// have, a cache of other dimensions, or a pool too full for the tokens; the cache is then
  /// left as it was.
  void forward(ConstMatrixRef<T> x, std::int64_t start_pos, LatentCache& cache, SequenceId seq,
               MatrixRef<T> y, MlaWorkspace<T>& ws,
               AttentionPath path = AttentionPath::kAuto) const {
    const MlaConfig& c = config_;
    const Index tokens = x.rows();
    const Index H = c.num_attention_heads, P = c.qk_nope_head_dim, R = c.qk_rope_head_dim;
    const Index D = c.kv_lora_rank, V = c.v_head_dim, QK = P + R;
    detail::require(x.cols() == c.hidden_size, "MlaLayer::forward: x has ", x.cols(),
                    " columns, expected hidden_size = ", c.hidden_size);
    detail::require(y.rows() == tokens && y.cols() == c.hidden_size, "MlaLayer::forward: y is [",
                    y.rows(), ", ", y.cols(), "], expected [", tokens, ", ", c.hidden_size, "]");
    detail::require(start_pos >= 0 && start_pos <= (std::int64_t{1} << 52) - tokens,
                    "MlaLayer::forward: start_pos must be in [0, 2^52 - tokens], got ", start_pos);
    detail::require(cache.kv_lora_rank() == D && cache.rope_dim() == R,
                    "MlaLayer::forward: the cache stores [", cache.kv_lora_rank(), " + ",
                    cache.rope_dim(), "] per token, this layer [", D, " + ", R, "]");
    if (tokens == 0) return;
    cache.require_room(seq, layer_index_, tokens);  // before anything changes
    const Index past = cache.length(seq, layer_index_);
    if (path == AttentionPath::kAuto) path = choose_path(tokens, past);
    ws.reserve(c, tokens, path);
    T* rope_scratch = ws.rope_scratch.data();

    // Query: q = W_qb RMSNorm(W_qa x), or q = W_q x.
    auto q = ws.q.topRows(tokens);  // (T, H * (P + R))
    if (c.has_q_lora()) {
      auto cq = ws.cq.topRows(tokens);  // (T, q_lora_rank)
      project(weights_.wq_a, x, cq);
      rms_norm<T>(cq, weights_.q_norm, c.rms_norm_eps);
      project(weights_.wq_b, cq, q);
    } else {
      project(weights_.wq, x, q);
    }
    // Keys and values: [c_raw ; k_raw] = W_kva x; c^KV = RMSNorm(c_raw), normalised before
    // it is cached; k^R = RoPE(k_raw), one rotary key shared by all heads.
    auto kv = ws.kv.topRows(tokens);  // (T, d_c + R)
    project(weights_.wkv_a, x, kv);
    rms_norm<T>(kv.leftCols(D), weights_.kv_norm, c.rms_norm_eps);
    rope_.apply<T>(kv, start_pos, D, 1, 0, rope_scratch);
    rope_.apply<T>(q, start_pos, P, H, QK, rope_scratch);  // q^pe of every head
    cache.append<T>(seq, layer_index_, kv.leftCols(D), kv.rightCols(R));
    const LatentView view = cache.view(seq, layer_index_);

    auto o = ws.o.topRows(tokens);  // (T, H * V)
    auto lse = ws.lse.topRows(tokens);
    if (path == AttentionPath::kExpanded) {
      attention_expanded<T>(c, view, q, weights_.wkv_b, softmax_scale_, o, lse, ws.attention);
    } else {
      // Absorb W_UK into the query: <q, W_UK c> = <W_UK^T q, c>, so scores read the cache.
      using Strided = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
      const Eigen::OuterStride<> per_token_q(H * (D + R));
      const Eigen::OuterStride<> per_token_o(H * D);
      auto q_latent = ws.q_latent.topRows(tokens * H);  // (T * H, d_c + R)
      auto o_latent = ws.o_latent.topRows(tokens * H);  // (T * H, d_c)
      for (Index h = 0; h < H; ++h) {
        Strided q_abs(q_latent.data() + h * (D + R), tokens, D, per_token_q);
        Strided q_pe(q_latent.data() + h * (D + R) + D, tokens, R, per_token_q);
        q_abs.noalias() = q.middleCols(h * QK, P) * w_uk_.middleRows(h * P, P);
        q_pe = q.middleCols(h * QK + P, R);
      }
      attention_absorbed<T>(c, view, q_latent, softmax_scale_, o_latent, lse, ws.attention);
      // Apply W_UV after the weighted sum: sum_j p W c = W sum_j p c.
      for (Index h = 0; h < H; ++h) {
        const Strided o_lat(o_latent.data() + h * D, tokens, D, per_token_o);
        o.middleCols(h * V, V).noalias() = o_lat * w_uv_.middleRows(h * V, V).transpose();
      }
    }
    project(weights_.wo, o, y);  // (T, hidden)
  }

 private:
  MlaConfig config_;
  Rope rope_;
  Index layer_index_;
  MlaWeights<T> weights_;
  RowMatrix<T> w_uk_;
  RowMatrix<T> w_uv_;
  double softmax_scale_ = 0.0;
};

}  // namespace mla
