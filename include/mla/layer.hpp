#pragma once
/// \file
/// `MlaLayer`: DeepSeek's Multi-Head Latent Attention for a chunk of new tokens of one
/// sequence, over a LatentCache, with a reusable `MlaWorkspace`.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "mla/attention.hpp"
#include "mla/config.hpp"
#include "mla/decode.hpp"
#include "mla/error.hpp"
#include "mla/executor.hpp"
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
    using detail::grow;
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
    const int threads = mla::concurrency(pool_);
    if (static_cast<int>(per_thread.size()) < threads) {
      per_thread.resize(static_cast<std::size_t>(threads));
    }
    // Projections: the pool's panels, and BF16 activations of the decode shapes.
    const bool bf16 = projection_precision_ == Precision::kBf16;
    const Index widest = std::max({c.hidden_size, c.q_lora_rank, c.kv_lora_rank, H * c.v_head_dim});
    projection.reserve(threads, std::min<Index>(tokens, 8), widest, bf16);
    for (ProjectionWorkspace& p : per_thread) {
      p.reserve(1, std::min<Index>(tokens, 8), std::max(c.qk_nope_head_dim, c.kv_lora_rank), bf16);
    }
    if constexpr (std::is_same_v<T, float>) {
      if (path != AttentionPath::kAbsorbed) attention.reserve_threads(c, threads);
      if (path != AttentionPath::kExpanded) {
        decode.reserve(c, decode_options_, mla::concurrency(pool_), std::min<Index>(tokens, 8));
      }
    }
  }

  /// Log-sum-exp of the last forward call's attention, [tokens, H] in the top rows.
  const RowMatrix<T>& last_lse() const { return lse; }

  /// Threads for the projections, the absorbed per-head products and the decode attention of
  /// float layers: the pool is used, not owned, and must outlive the calls; nullptr (the
  /// default) runs on the calling thread.
  void set_executor(Executor* executor) { pool_ = executor; }
  Executor* executor() const { return pool_; }
  /// The same as set_executor (an mla::ThreadPool is an Executor).
  void set_thread_pool(Executor* pool) { pool_ = pool; }

  /// The arithmetic of the projections of float layers whose weights are BF16 or FP8
  /// (Precision::kFp32, the default, or kBf16: activations rounded to BF16 once). The decode
  /// attention's precision is DecodeOptions::precision.
  void set_projection_precision(Precision p) { projection_precision_ = p; }
  Precision projection_precision() const { return projection_precision_; }

  /// How decode_absorbed divides its work and which arithmetic it uses (float layers; the
  /// default is Precision::kFp32).
  void set_decode_options(const DecodeOptions& options) { decode_options_ = options; }
  const DecodeOptions& decode_options() const { return decode_options_; }

 private:
  friend class MlaLayer<T>;

  RowMatrix<T> cq;        // [tokens, q_lora_rank]       c^Q
  RowMatrix<T> q;         // [tokens, H * (P + R)]        q
  RowMatrix<T> kv;        // [tokens, d_c + R]            [c^KV ; k^R]
  RowMatrix<T> q_latent;  // [tokens * H, d_c + R]        [q~ ; q^pe] per (token, head)
  RowMatrix<T> o_latent;  // [tokens * H, d_c]            o~
  RowMatrix<T> o;         // [tokens, H * V]              o
  RowMatrix<T> lse;       // [tokens, H]
  RowMatrix<T> rope_scratch;
  AttentionWorkspace<T> attention;
  DecodeWorkspace decode;
  ProjectionWorkspace projection;
  std::vector<ProjectionWorkspace> per_thread;  // the per-head products on the pool's threads
  Executor* pool_ = nullptr;
  DecodeOptions decode_options_;
  Precision projection_precision_ = Precision::kFp32;

  /// Whole projections: on the pool, with this workspace's scratch.
  ProjectionContext context() { return {pool_, projection_precision_, &projection}; }
  /// One thread's part of the per-head products (the threads run heads, not columns).
  ProjectionContext thread_context(int thread) {
    return {nullptr, projection_precision_, &per_thread[static_cast<std::size_t>(thread)]};
  }
};

/// One MLA layer: weights, their absorbed forms, and the forward pass. Holds no per-sequence
/// state: one layer serves any number of caches and sequences.
template <class T>
class MlaLayer {
 public:
  /// Checks the config and the weights' shapes (throws mla::Error naming what is wrong).
  /// `layer_index` selects this layer's slots in a LatentCache shared by the layers of a model.
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

  /// Replaces the weights (shape-checked). The absorbed matrices are not copied out: the
  /// absorbed path multiplies each head's rows of wkv_b in place, in wkv_b's own storage
  /// (W_UK^(h): rows [h (P + V), h (P + V) + P); W_UV^(h): the next V rows).
  void set_weights(MlaWeights<T> weights) {
    weights.check(config_);
    weights_ = std::move(weights);
    softmax_scale_ = mla::softmax_scale(config_);
  }

  /// Bytes of the layer's weights (as stored: dense, BF16 or FP8 with scales, owned or
  /// borrowed) plus its norm vectors.
  std::size_t weight_bytes() const {
    std::size_t n = 0;
    for (const Linear<T>* l : {&weights_.wq, &weights_.wq_a, &weights_.wq_b, &weights_.wkv_a,
                               &weights_.wkv_b, &weights_.wo}) {
      n += l->weight_bytes();
    }
    return n +
           sizeof(T) * static_cast<std::size_t>(weights_.q_norm.size() + weights_.kv_norm.size());
  }

  /// The path kAuto takes for `tokens` new tokens after `past` cached ones (see
  /// auto_attention_path).
  AttentionPath choose_path(Index tokens, Index past) const {
    return auto_attention_path(config_, tokens, past);
  }

  /// Runs the layer on `x` [tokens, hidden_size], the next tokens of sequence `seq`, at
  /// positions start_pos, start_pos + 1, ...: appends their c^KV and k^R to `cache` (layer
  /// layer_index()) and writes the attention output u = W_o [o_1 .. o_H] to `y`
  /// [tokens, hidden_size]. Each token attends to everything cached before it and to itself,
  /// never to a later token. `y` may alias `x`.
  ///
  /// Positions are contiguous: the first call on a sequence that holds nothing may start at any
  /// position p0 >= 0; after that start_pos must be p0 + length(seq, layer_index())
  /// (LatentCache::next_position).
  ///
  /// Throws mla::Error for wrong shapes, an unknown sequence, a layer index the cache does not
  /// have, a cache of other dimensions, a start_pos that does not continue the sequence, or a
  /// pool too full for the tokens; the cache is then left as it was.
  void forward(ConstMatrixRef<T> x, std::int64_t start_pos, LatentCache& cache, SequenceId seq,
               MatrixRef<T> y, MlaWorkspace<T>& ws,
               AttentionPath path = AttentionPath::kAuto) const {
    const Index tokens = x.rows();
    check_io(x, y, cache, "forward");
    detail::require(start_pos >= 0 && start_pos <= kMaxPosition - tokens,
                    "MlaLayer::forward: start_pos must be in [0, 2^52 - tokens], got ", start_pos);
    if (tokens == 0) return;
    // Before anything changes: room for the tokens, and positions that continue the sequence.
    cache.require_room(seq, layer_index_, tokens);
    cache.require_position(seq, layer_index_, start_pos);
    if (path == AttentionPath::kAuto) {
      path = choose_path(tokens, cache.length(seq, layer_index_));
    }
    ws.reserve(config_, tokens, path);
    project_queries_and_latents(x, ws, [&](Index t) { return start_pos + t; });
    append_latents(cache, seq, 0, tokens, start_pos, ws);
    if (path == AttentionPath::kAbsorbed) absorb_queries(tokens, ws);
    attend(cache.view(seq, layer_index_), 0, tokens, path, ws);
    finish(y, tokens, path, ws);
  }

  /// One decode step for several sequences at once: row b of `x` [batch, hidden_size] is the
  /// next token of `seqs[b]`, at position `positions[b]`, and row b of `y` receives its output.
  /// The sequences must be distinct and may have any lengths; each attends only to its own
  /// cached tokens, and each position must continue its sequence (as for forward()). The
  /// projections run once for the whole batch, the attention per sequence (absorbed unless `path`
  /// says kExpanded). Atomic like forward(): room for every sequence is checked before anything
  /// changes.
  void forward_batch(ConstMatrixRef<T> x, const std::vector<std::int64_t>& positions,
                     LatentCache& cache, const std::vector<SequenceId>& seqs, MatrixRef<T> y,
                     MlaWorkspace<T>& ws, AttentionPath path = AttentionPath::kAuto) const {
    const Index batch = x.rows();
    check_io(x, y, cache, "forward_batch");
    detail::require(
        static_cast<Index>(positions.size()) == batch && static_cast<Index>(seqs.size()) == batch,
        "MlaLayer::forward_batch: x has ", batch, " rows but ", seqs.size(), " sequences and ",
        positions.size(), " positions were given");
    for (std::int64_t p : positions) {
      detail::require(p >= 0 && p < kMaxPosition,
                      "MlaLayer::forward_batch: positions must be in [0, 2^52), got ", p);
    }
    if (batch == 0) return;
    // All of them, before any change: room, and each position continuing its sequence.
    cache.require_room(seqs.data(), batch, layer_index_, 1);
    for (Index b = 0; b < batch; ++b) {
      cache.require_position(seqs[static_cast<std::size_t>(b)], layer_index_,
                             positions[static_cast<std::size_t>(b)]);
    }
    if (path == AttentionPath::kAuto) path = AttentionPath::kAbsorbed;
    ws.reserve(config_, batch, path);
    project_queries_and_latents(x, ws,
                                [&](Index b) { return positions[static_cast<std::size_t>(b)]; });
    for (Index b = 0; b < batch; ++b) {
      const auto i = static_cast<std::size_t>(b);
      append_latents(cache, seqs[i], b, 1, positions[i], ws);
    }
    if (path == AttentionPath::kAbsorbed) absorb_queries(batch, ws);
    for (Index b = 0; b < batch; ++b) {
      attend(cache.view(seqs[static_cast<std::size_t>(b)], layer_index_), b, 1, path, ws);
    }
    finish(y, batch, path, ws);
  }

 private:
  static constexpr std::int64_t kMaxPosition = std::int64_t{1} << 52;  // exact in double
  /// Query tokens per decode_absorbed call on the absorbed path of float layers.
  static constexpr Index kDecodeChunk = 8;

  void check_io(const ConstMatrixRef<T>& x, const MatrixRef<T>& y, const LatentCache& cache,
                const char* what) const {
    const MlaConfig& c = config_;
    detail::require(x.cols() == c.hidden_size, "MlaLayer::", what, ": x has ", x.cols(),
                    " columns, expected hidden_size = ", c.hidden_size);
    detail::require(y.rows() == x.rows() && y.cols() == c.hidden_size, "MlaLayer::", what,
                    ": y is [", y.rows(), ", ", y.cols(), "], expected [", x.rows(), ", ",
                    c.hidden_size, "]");
    detail::require(
        cache.kv_lora_rank() == c.kv_lora_rank && cache.rope_dim() == c.qk_rope_head_dim,
        "MlaLayer::", what, ": the cache stores [", cache.kv_lora_rank(), " + ", cache.rope_dim(),
        "] per token, this layer [", c.kv_lora_rank, " + ", c.qk_rope_head_dim, "]");
  }

  /// q and [c^KV ; k^R] for every row of x, RoPE applied at position pos(row).
  template <class Pos>
  void project_queries_and_latents(const ConstMatrixRef<T>& x, MlaWorkspace<T>& ws,
                                   Pos&& pos) const {
    const MlaConfig& c = config_;
    const Index tokens = x.rows();
    const Index H = c.num_attention_heads, P = c.qk_nope_head_dim, D = c.kv_lora_rank;
    // Query: q = W_qb RMSNorm(W_qa x), or q = W_q x.
    auto q = ws.q.topRows(tokens);  // (T, H * (P + R))
    if (c.has_q_lora()) {
      auto cq = ws.cq.topRows(tokens);  // (T, q_lora_rank)
      project(weights_.wq_a, x, cq, ws.context());
      rms_norm<T>(cq, weights_.q_norm, c.rms_norm_eps);
      project(weights_.wq_b, cq, q, ws.context());
    } else {
      project(weights_.wq, x, q, ws.context());
    }
    // Keys and values: [c_raw ; k_raw] = W_kva x; c^KV = RMSNorm(c_raw), normalised before
    // it is cached; k^R = RoPE(k_raw), one rotary key shared by all heads.
    auto kv = ws.kv.topRows(tokens);  // (T, d_c + R)
    project(weights_.wkv_a, x, kv, ws.context());
    if (c.kv_latent_norm) rms_norm<T>(kv.leftCols(D), weights_.kv_norm, c.rms_norm_eps);
    T* scratch = ws.rope_scratch.data();
    for (Index t = 0; t < tokens; ++t) {
      rope_.apply<T>(kv.middleRows(t, 1), pos(t), D, 1, 0, scratch);
      rope_.apply<T>(q.middleRows(t, 1), pos(t), P, H, c.qk_head_dim(), scratch);  // q^pe
    }
  }

  /// Appends rows [row0, row0 + n) of the latents to the cache at positions pos, pos + 1, ...
  /// (room and position were checked).
  void append_latents(LatentCache& cache, SequenceId seq, Index row0, Index n, std::int64_t pos,
                      MlaWorkspace<T>& ws) const {
    const Index D = config_.kv_lora_rank, R = config_.qk_rope_head_dim;
    cache.append<T>(seq, layer_index_, ws.kv.block(row0, 0, n, D), ws.kv.block(row0, D, n, R), pos);
  }

  /// q~_h = W_UK^(h)^T q_h^nope and q^pe for every row: q_latent [tokens * H, d_c + R]. The
  /// heads run on the pool's threads, each multiplying its rows of wkv_b in place.
  void absorb_queries(Index tokens, MlaWorkspace<T>& ws) const {
    const Index H = config_.num_attention_heads, P = config_.qk_nope_head_dim;
    const Index D = config_.kv_lora_rank, R = config_.qk_rope_head_dim, QK = P + R;
    const Index V = config_.v_head_dim;
    const Eigen::OuterStride<> per_token(H * (D + R));
    auto q = ws.q.topRows(tokens);
    auto q_latent = ws.q_latent.topRows(tokens * H);
    // Absorb W_UK into the query: <q, W_UK c> = <W_UK^T q, c>, so scores read the cache.
    for_each_head(ws, [&](Index h, int thread) {
      Strided q_abs(q_latent.data() + h * (D + R), tokens, D, per_token);
      Strided q_pe(q_latent.data() + h * (D + R) + D, tokens, R, per_token);
      weights_.wkv_b.apply_rows_transposed(h * (P + V), P, q.middleCols(h * QK, P), q_abs,
                                           ws.thread_context(thread));
      q_pe = q.middleCols(h * QK + P, R);
    });
  }

  /// Calls f(h, thread) for every head, on the workspace's pool when it has one.
  template <class F>
  void for_each_head(MlaWorkspace<T>& ws, F&& f) const {
    const Index H = config_.num_attention_heads;
    mla::parallel_for(ws.pool_, H, f);
  }

  /// Attention of rows [row0, row0 + n), the last n tokens of `view`.
  void attend(const LatentView& view, Index row0, Index n, AttentionPath path,
              MlaWorkspace<T>& ws) const {
    const Index H = config_.num_attention_heads, V = config_.v_head_dim;
    auto lse = ws.lse.middleRows(row0, n);
    if (path == AttentionPath::kExpanded) {
      attention_expanded<T>(config_, view, ws.q.middleRows(row0, n), weights_.wkv_b, softmax_scale_,
                            ws.o.block(row0, 0, n, H * V), lse, ws.attention, ws.context(),
                            ws.decode_options_.precision);
    } else if constexpr (std::is_same_v<T, float>) {
      // The SIMD kernel, up to kDecodeChunk query tokens per pass over the cache: token t sees
      // the first past + t + 1 keys.
      const Index past = view.tokens() - n;
      for (Index t0 = 0; t0 < n; t0 += kDecodeChunk) {
        const Index m = std::min(kDecodeChunk, n - t0);
        const Index r = (row0 + t0) * H;
        decode_absorbed(config_, view, ws.q_latent.middleRows(r, m * H), softmax_scale_,
                        ws.o_latent.middleRows(r, m * H), lse.middleRows(t0, m), ws.decode,
                        ws.pool_, ws.decode_options_, past + t0 + m);
      }
    } else {
      attention_absorbed<T>(config_, view, ws.q_latent.middleRows(row0 * H, n * H), softmax_scale_,
                            ws.o_latent.middleRows(row0 * H, n * H), lse, ws.attention);
    }
  }

  /// Absorbed path: o_h = W_UV^(h) o~_h for every row. Then u = W_o o.
  void finish(MatrixRef<T> y, Index tokens, AttentionPath path, MlaWorkspace<T>& ws) const {
    const Index H = config_.num_attention_heads, D = config_.kv_lora_rank, V = config_.v_head_dim;
    auto o = ws.o.topRows(tokens);  // (T, H * V)
    if (path == AttentionPath::kAbsorbed) {
      // Apply W_UV after the weighted sum: sum_j p W c = W sum_j p c (W_UV^(h): the V rows of
      // wkv_b after the head's P rows of W_UK, multiplied in place).
      const Index P = config_.qk_nope_head_dim;
      const Eigen::OuterStride<> per_token(H * D);
      for_each_head(ws, [&](Index h, int thread) {
        const Strided o_lat(ws.o_latent.data() + h * D, tokens, D, per_token);
        weights_.wkv_b.apply_rows(h * (P + V) + P, V, o_lat, o.middleCols(h * V, V),
                                  ws.thread_context(thread));
      });
    }
    project(weights_.wo, o, y, ws.context());  // (T, hidden)
  }

  using Strided = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;

  MlaConfig config_;
  Rope rope_;
  Index layer_index_;
  MlaWeights<T> weights_;
  double softmax_scale_ = 0.0;
};

}  // namespace mla
