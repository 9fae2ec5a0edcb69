#pragma once
/// \file
/// `MlaLayer`: DeepSeek's Multi-Head Latent Attention for chunks of new tokens of one or many
/// sequences, over a LatentCache or an engine's paged buffers, with a reusable `MlaWorkspace`
/// (mla/workspace.hpp).

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "mla/attention.hpp"
#include "mla/config.hpp"
#include "mla/decode.hpp"
#include "mla/detail/forward_targets.hpp"
#include "mla/error.hpp"
#include "mla/executor.hpp"
#include "mla/latent_cache.hpp"
#include "mla/matrix.hpp"
#include "mla/norm.hpp"
#include "mla/projection.hpp"
#include "mla/rope.hpp"
#include "mla/run_options.hpp"
#include "mla/sparse.hpp"
#include "mla/weights.hpp"
#include "mla/workspace.hpp"

namespace mla {

template <class T>
class MlaLayer;

/// One sequence's share of a mixed batch (MlaLayer::forward over a LatentCache): the next `tokens`
/// rows of x, the next tokens of sequence `seq`, at positions start_pos, start_pos + 1, ... A
/// prefill chunk has many tokens, a decode step one.
struct BatchEntry {
  SequenceId seq = 0;
  std::int64_t start_pos = 0;
  Index tokens = 1;
};

/// One MLA layer: weights, their absorbed forms, and the forward pass. Holds no per-sequence
/// state: one layer serves any number of caches and sequences.
template <class T>
class MlaLayer {
 public:
  /// Checks the config and the weights' shapes (throws mla::Error naming what is wrong).
  /// `layer_index` selects this layer's slots in a LatentCache shared by the layers of a model.
  MlaLayer(const MlaConfig& config, MlaWeights<T> weights, Index layer_index = 0)
      : config_(config), rope_(config), index_rope_(index_rope(config)), layer_index_(layer_index) {
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
    const IndexerWeights<T>& ix = weights_.indexer;
    for (const Linear<T>* l :
         {&weights_.wq, &weights_.wq_a, &weights_.wq_b, &weights_.wkv_a, &weights_.wkv_b,
          &weights_.wo, &weights_.wg, &ix.wq_b, &ix.wk, &ix.weights_proj}) {
      n += l->weight_bytes();
    }
    return n +
           sizeof(T) * static_cast<std::size_t>(weights_.q_norm.size() + weights_.kv_norm.size() +
                                                ix.k_norm.size() + ix.k_norm_bias.size());
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
  /// DeepSeek-V3.2 layers (config.has_indexer()) also cache each token's index key, and a token
  /// that sees more than index_topk cached tokens attends only to the index_topk the indexer
  /// selects (mla/sparse.hpp), on the absorbed path whatever `path` says; tokens that see at
  /// most index_topk attend densely on `path`, which is the same thing. The cache must then keep
  /// index keys (a LatentCache made with the same config does). A layer whose config has
  /// index_shared has no indexer: its sparse rows attend over ws.topk_selection(), the
  /// selection the previous layer with an indexer made for the same rows (checked: the same
  /// rows, each seeing as many keys); in a cache with index keys it leaves zeros in its slots.
  ///
  /// `run` says which path, which threads and which arithmetic (mla/run_options.hpp; an
  /// AttentionPath converts to it).
  ///
  /// Throws mla::Error for wrong shapes, an unknown sequence, a layer index the cache does not
  /// have, a cache of other dimensions, a start_pos that does not continue the sequence, or a
  /// pool too full for the tokens; the cache is then left as it was.
  void forward(ConstMatrixRef<T> x, std::int64_t start_pos, LatentCache& cache, SequenceId seq,
               MatrixRef<T> y, MlaWorkspace<T>& ws, const RunOptions& run = {}) const {
    check_io(x, y, cache, "forward");
    detail::require(start_pos >= 0 && start_pos <= kMaxPosition - x.rows(),
                    "MlaLayer::forward: start_pos must be in [0, 2^52 - tokens], got ", start_pos);
    if (x.rows() == 0) return;
    ws.parts.assign(1, {0, x.rows(), start_pos, run.path});
    ws.part_ids.assign(1, seq);
    run_on_cache(x, cache, y, ws, run);
  }

  /// The layer's one door: a mixed ragged batch (continuous batching) over the library's cache.
  /// Entry i owns the next entries[i].tokens rows of `x` [sum of tokens, hidden_size] and of
  /// `y`, the next tokens of its sequence. Prefill chunks and decode tokens may be mixed
  /// freely; the sequences must be distinct. The projections run once for all rows; each
  /// sequence attends only to its own cache, on the path that suits its chunk (run.path kAuto:
  /// choose_path(tokens, cached), so decode tokens take the absorbed path) or on run.path for
  /// all. Each entry's result equals a forward() of it alone. Atomic: every entry's position
  /// and the room for all of them are checked, and their blocks taken, under the cache's lock
  /// before anything is written; on an error (mla::Error naming the entry) the cache is left as
  /// it was.
  void forward(ConstMatrixRef<T> x, const std::vector<BatchEntry>& entries, LatentCache& cache,
               MatrixRef<T> y, MlaWorkspace<T>& ws, const RunOptions& run = {}) const {
    check_io(x, y, cache, "forward");
    set_parts(
        x.rows(), entries.size(),
        [&](std::size_t i) {
          return std::pair<std::int64_t, Index>(entries[i].start_pos, entries[i].tokens);
        },
        run.path, ws);
    if (x.rows() == 0) return;
    ws.part_ids.resize(entries.size());
    for (std::size_t i = 0; i < entries.size(); ++i) ws.part_ids[i] = entries[i].seq;
    run_on_cache(x, cache, y, ws, run);
  }

  /// The same door over an engine's own paged cache (`cache`: this layer's buffers, see
  /// PagedCache): for each entry, its new tokens' records are written into its blocks (slots
  /// entry.cached, ...) and its rows attend over its entry.cached + entry.tokens records;
  /// otherwise as above. The engine keeps positions and block tables: the layer checks that
  /// every table entry used is a block of the buffers and that the formats match this layer,
  /// and writes only the new tokens' slots (distinct entries must not share those blocks).
  /// DeepSeek-V3.2 layers with an indexer of their own need cache.index_keys: the new tokens'
  /// index keys are written there, and tokens that see more than index_topk records attend to
  /// the ones the indexer selects. Throws mla::Error before writing anything when a check
  /// fails.
  void forward(ConstMatrixRef<T> x, const std::vector<PagedEntry>& entries, const PagedCache& cache,
               MatrixRef<T> y, MlaWorkspace<T>& ws, const RunOptions& run = {}) const {
    check_shapes(x, y, "forward");
    detail::require(cache.latents != nullptr,
                    "MlaLayer::forward: the PagedCache names no latent buffer");
    if (config_.has_indexer()) {
      detail::require(cache.index_keys != nullptr, "MlaLayer::forward: this layer's indexer ",
                      "(index_topk ", config_.index_topk, ") needs index keys: the PagedCache ",
                      "names no index-key buffer (index_keys, a PagedIndexBuffer)");
      const PagedIndexBuffer& keys = *cache.index_keys;
      detail::require(keys.format.dim() == config_.index_head_dim,
                      "MlaLayer::forward: the index-key buffer holds keys of ", keys.format.dim(),
                      " values, this layer's indexer ", config_.index_head_dim);
      detail::require(keys.block_tokens == cache.latents->block_tokens,
                      "MlaLayer::forward: the index-key buffer has blocks of ", keys.block_tokens,
                      " tokens, the latent buffer of ", cache.latents->block_tokens,
                      " (one block table serves both)");
    } else {
      detail::require(cache.index_keys == nullptr, "MlaLayer::forward: an index-key buffer was ",
                      "given, but this layer has no indexer of its own (index_topk ",
                      config_.index_topk, config_.index_shared ? ", index_shared" : "", ")");
    }
    run_paged(x, *cache.latents, cache.index_keys, entries, y, ws, run);
  }

  /// forward over a batch of BatchEntry (the same call under its earlier name).
  void forward_batch(ConstMatrixRef<T> x, const std::vector<BatchEntry>& entries,
                     LatentCache& cache, MatrixRef<T> y, MlaWorkspace<T>& ws,
                     const RunOptions& run = {}) const {
    forward(x, entries, cache, y, ws, run);
  }

  /// One decode step for several sequences at once: row b of `x` [batch, hidden_size] is the
  /// next token of `seqs[b]`, at position `positions[b]`, and row b of `y` receives its output
  /// (the mixed forward_batch with one token per entry).
  void forward_batch(ConstMatrixRef<T> x, const std::vector<std::int64_t>& positions,
                     LatentCache& cache, const std::vector<SequenceId>& seqs, MatrixRef<T> y,
                     MlaWorkspace<T>& ws, const RunOptions& run = {}) const {
    const Index batch = x.rows();
    check_io(x, y, cache, "forward_batch");
    detail::require(
        static_cast<Index>(positions.size()) == batch && static_cast<Index>(seqs.size()) == batch,
        "MlaLayer::forward_batch: x has ", batch, " rows but ", seqs.size(), " sequences and ",
        positions.size(), " positions were given");
    set_parts(
        batch, seqs.size(),
        [&](std::size_t i) { return std::pair<std::int64_t, Index>(positions[i], 1); }, run.path,
        ws);
    if (batch == 0) return;
    ws.part_ids.assign(seqs.begin(), seqs.end());
    run_on_cache(x, cache, y, ws, run);
  }

  /// forward over an engine's paged cache without index keys (dense layers and index_shared
  /// ones), under its earlier name.
  void forward_paged(ConstMatrixRef<T> x, const PagedLatentBuffer& buffer,
                     const std::vector<PagedEntry>& entries, MatrixRef<T> y, MlaWorkspace<T>& ws,
                     const RunOptions& run = {}) const {
    forward(x, entries, PagedCache{&buffer, nullptr}, y, ws, run);
  }

  /// forward over an engine's paged cache with index keys (DeepSeek-V3.2 layers), under its
  /// earlier name.
  void forward_paged(ConstMatrixRef<T> x, const PagedLatentBuffer& buffer,
                     const PagedIndexBuffer& index_buffer, const std::vector<PagedEntry>& entries,
                     MatrixRef<T> y, MlaWorkspace<T>& ws, const RunOptions& run = {}) const {
    forward(x, entries, PagedCache{&buffer, &index_buffer}, y, ws, run);
  }

  /// The layer with an attention of the caller's own, for layers whose cache lives elsewhere
  /// (mla::mpi shards it over processes): the projections and RoPE of `x`'s tokens at
  /// positions start_pos, ..., the absorbed queries, then
  ///   attend(latents, q_latent, o_latent, lse)
  /// with latents [tokens, d_c + R] (the new tokens' c^KV and k^R, RoPE applied: what a cache
  /// would store), q_latent [tokens * H, d_c + R] (as decode_absorbed takes them, with the
  /// scale softmax_scale()), and o_latent [tokens * H, d_c] and lse [tokens, H] to be filled
  /// (token t attends to its own key and everything before it); then W_UV and W_o into y.
  /// `run` as for forward (its path is ignored: the attention is the caller's).
  template <class Attend>
  void forward_with_attention(ConstMatrixRef<T> x, std::int64_t start_pos, MatrixRef<T> y,
                              MlaWorkspace<T>& ws, Attend&& attend,
                              const RunOptions& run = {}) const {
    check_shapes(x, y, "forward_with_attention");
    require_dense("forward_with_attention");
    if (x.rows() == 0) return;
    set_parts(
        x.rows(), 1,
        [&](std::size_t) { return std::pair<std::int64_t, Index>(start_pos, x.rows()); },
        AttentionPath::kAbsorbed, ws);
    const Index tokens = x.rows(), H = config_.num_attention_heads;
    RunOptions absorbed = run;
    absorbed.path = AttentionPath::kAbsorbed;
    ws.reserve(config_, tokens, absorbed);
    project_queries_and_latents(x, ws, run);
    absorb_queries(0, tokens, ws, run);
    attend(ConstMatrixRef<T>(ws.kv.topRows(tokens)),
           ConstMatrixRef<T>(ws.q_latent.topRows(tokens * H)),
           MatrixRef<T>(ws.o_latent.topRows(tokens * H)), MatrixRef<T>(ws.lse.topRows(tokens)));
    finish(y, tokens, ws, run);
  }

 private:
  static constexpr std::int64_t kMaxPosition = std::int64_t{1} << 52;  // exact in double
  /// Query tokens per decode_absorbed call on the absorbed path of float layers.
  static constexpr Index kDecodeChunk = 8;
  using Part = typename MlaWorkspace<T>::Part;

  /// Fills ws.parts from n entries (entry(i) = {start_pos, tokens}), checking that they cover
  /// the `rows` rows and that the positions are in range.
  template <class Entry>
  void set_parts(Index rows, std::size_t n, Entry&& entry, AttentionPath path,
                 MlaWorkspace<T>& ws) const {
    ws.parts.resize(n);
    Index row = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const auto [pos, tokens] = entry(i);
      detail::require(tokens >= 1, "MlaLayer: batch entry ", i, " has ", tokens,
                      " tokens; every entry needs at least one");
      detail::require(pos >= 0 && pos <= kMaxPosition - tokens, "MlaLayer: batch entry ", i,
                      ": positions must be in [0, 2^52), got ", pos, " + ", tokens, " tokens");
      ws.parts[i] = {row, tokens, pos, path};
      row += tokens;
    }
    detail::require(row == rows, "MlaLayer: the batch entries hold ", row, " tokens but x has ",
                    rows, " rows");
  }

  /// Each part's path: `path`, or for kAuto the cheaper one for its chunk after past(i) tokens.
  /// Parts with sparse rows (DeepSeek-V3.2: more than index_topk keys) take the absorbed path.
  /// Then the top-k selection: a layer with an indexer starts its own (every row's visible
  /// count), a layer that shares one checks that the workspace's fits this call (throws
  /// before anything is written).
  template <class Past>
  void choose_paths(Past&& past, AttentionPath path, Index rows, MlaWorkspace<T>& ws) const {
    ws.index_queries = false;
    for (std::size_t i = 0; i < ws.parts.size(); ++i) {
      Part& p = ws.parts[i];
      p.path = path == AttentionPath::kAuto ? choose_path(p.tokens, past(i)) : path;
      if (config_.has_sparse_attention() && past(i) + p.tokens > config_.index_topk) {
        p.path = AttentionPath::kAbsorbed;
        ws.index_queries = true;
      }
    }
    if (!config_.has_sparse_attention()) return;
    TopkSelection& sel = ws.selection;
    const Index topk = config_.index_topk;
    if (config_.index_shared) {
      detail::require(
          sel.topk == topk && sel.rows() == rows, "MlaLayer: this layer shares the top-k of ",
          "the previous layer with an indexer (index_shared), but the workspace's selection has ",
          sel.rows(), " rows of top-", sel.topk, ", this call ", rows, " rows of top-", topk,
          " (run the full layer on the same batch first, or copy its topk_selection())");
      for (std::size_t i = 0; i < ws.parts.size(); ++i) {
        const Part& p = ws.parts[i];
        for (Index t = 0; t < p.tokens; ++t) {
          const Index r = p.row0 + t, visible = past(i) + t + 1;
          detail::require(sel.visible[static_cast<std::size_t>(r)] == visible,
                          "MlaLayer: the shared top-k selection's row ", r, " saw ",
                          sel.visible[static_cast<std::size_t>(r)], " keys, this call's ", visible);
          if (!sel.sparse(r)) continue;
          const std::int32_t* pos = sel.row(r);
          Index valid = 0;
          for (Index k = 0; k < topk; ++k) {
            detail::require(pos[k] >= -1 && pos[k] < visible, "MlaLayer: the shared top-k ",
                            "selection's row ", r, " names position ", pos[k], " outside its [0, ",
                            visible, ") keys");
            valid += pos[k] >= 0;
          }
          detail::require(valid > 0, "MlaLayer: the shared top-k selection's row ", r,
                          " names no position");
        }
      }
      return;
    }
    sel.topk = topk;
    sel.visible.resize(static_cast<std::size_t>(rows));
    for (std::size_t i = 0; i < ws.parts.size(); ++i) {
      const Part& p = ws.parts[i];
      for (Index t = 0; t < p.tokens; ++t) {
        sel.visible[static_cast<std::size_t>(p.row0 + t)] = past(i) + t + 1;
      }
    }
    if (ws.index_queries) sel.positions.resize(static_cast<std::size_t>(rows * topk));
  }

  void require_dense(const char* what) const {
    detail::require(
        !config_.has_sparse_attention(), "MlaLayer::", what, ": sparse attention (index_topk ",
        config_.index_topk,
        ") is not supported here: use forward (or its other names forward_batch, forward_paged)");
  }

  /// The path the workspace must be sized for: the parts' common path, or kAuto (both).
  static AttentionPath batch_path(const MlaWorkspace<T>& ws) {
    AttentionPath common = ws.parts.front().path;
    for (const Part& p : ws.parts) {
      if (p.path != common) return AttentionPath::kAuto;
    }
    return common;
  }

  /// forward over a PagedCache (index_buffer: V3.2 layers' index keys, else nullptr): the
  /// checks, then run.
  void run_paged(const ConstMatrixRef<T>& x, const PagedLatentBuffer& buffer,
                 const PagedIndexBuffer* index_buffer, const std::vector<PagedEntry>& entries,
                 MatrixRef<T> y, MlaWorkspace<T>& ws, const RunOptions& run) const {
    const MlaConfig& c = config_;
    detail::require(buffer.format.kv_lora_rank() == c.kv_lora_rank &&
                        buffer.format.rope_dim() == c.qk_rope_head_dim,
                    "MlaLayer::forward: the paged buffer's records hold [",
                    buffer.format.kv_lora_rank(), " + ", buffer.format.rope_dim(),
                    "] per token, this layer [", c.kv_lora_rank, " + ", c.qk_rope_head_dim, "]");
    set_parts(
        x.rows(), entries.size(),
        [&](std::size_t i) {
          return std::pair<std::int64_t, Index>(entries[i].start_pos, entries[i].tokens);
        },
        run.path, ws);
    for (std::size_t i = 0; i < entries.size(); ++i) {
      detail::require(entries[i].cached >= 0, "MlaLayer::forward: paged entry ", i,
                      " has a negative cached length ", entries[i].cached);
      // Checks the buffers and the table over the records the call writes and reads.
      const Index n = entries[i].cached + entries[i].tokens;
      (void)LatentView(buffer, entries[i].block_table, n);
      if (index_buffer) (void)IndexKeyView(*index_buffer, entries[i].block_table, n);
    }
    if (x.rows() == 0) return;
    detail::PagedTarget<T> target{buffer, index_buffer, entries};
    this->run(x, target, y, ws, run);
  }

  /// The batch in ws.parts (sequences in ws.part_ids) over a LatentCache.
  void run_on_cache(const ConstMatrixRef<T>& x, LatentCache& cache, MatrixRef<T> y,
                    MlaWorkspace<T>& ws, const RunOptions& run) const {
    detail::CacheTarget<T, Part> target{cache,       layer_index_,   ws.parts,
                                        ws.part_ids, ws.part_counts, ws.part_positions};
    this->run(x, target, y, ws, run);
  }

  /// The one forward pass, for the parts in ws.parts over `target`: each part's path, the
  /// checks and reservations that can fail (before anything is written), the projections, the
  /// new records written, every part's attention over its records, and the output projection.
  template <class Target>
  void run(const ConstMatrixRef<T>& x, Target& target, MatrixRef<T> y, MlaWorkspace<T>& ws,
           const RunOptions& run) const {
    choose_paths([&](std::size_t i) { return target.cached(i); }, run.path, x.rows(), ws);
    RunOptions sized = run;
    sized.path = batch_path(ws);
    ws.reserve(config_, x.rows(), sized);
    target.prepare();  // nothing fails after this
    project_queries_and_latents(x, ws, run);
    const Index D = config_.kv_lora_rank, R = config_.qk_rope_head_dim;
    const Index DI = target.index_key_dim();
    if (DI > 0 && !config_.has_indexer()) {
      // A layer that shares its top-k computes no index keys: zeros fill its slots.
      detail::grow(ws.index_k, x.rows(), DI);
      ws.index_k.topRows(x.rows()).setZero();
    }
    for (std::size_t i = 0; i < ws.parts.size(); ++i) {
      const Part& p = ws.parts[i];
      target.write(
          i, ws.kv.block(p.row0, 0, p.tokens, D), ws.kv.block(p.row0, D, p.tokens, R),
          DI > 0 ? ws.index_k.block(p.row0, 0, p.tokens, DI) : ws.index_k.block(0, 0, 0, 0));
    }
    attend_parts(
        ws, run, [&](std::size_t i) { return target.view(i); },
        [&](std::size_t i) { return target.index_view(i); });
    finish(y, x.rows(), ws, run);
  }

  /// The attention of every part (view(i): its cache after the append), absorbing the queries
  /// of runs of absorbed parts together.
  template <class View, class IndexView>
  void attend_parts(MlaWorkspace<T>& ws, const RunOptions& run, View&& view,
                    IndexView&& index_view) const {
    const std::size_t n = ws.parts.size();
    for (std::size_t i = 0; i < n;) {
      std::size_t j = i + 1;
      const bool absorbed = ws.parts[i].path == AttentionPath::kAbsorbed;
      if (absorbed) {
        while (j < n && ws.parts[j].path == AttentionPath::kAbsorbed) ++j;
        const Index row0 = ws.parts[i].row0;
        absorb_queries(row0, ws.parts[j - 1].row0 + ws.parts[j - 1].tokens - row0, ws, run);
      }
      for (std::size_t k = i; k < j; ++k) {
        const Part& p = ws.parts[k];
        const LatentView v = view(k);
        if (config_.has_sparse_attention() && v.tokens() > config_.index_topk) {
          attend_sparse(v, config_.has_indexer() ? index_view(k) : IndexKeyView(), p.row0, p.tokens,
                        ws, run);
        } else {
          attend(v, p.row0, p.tokens, p.path, ws, run);
        }
      }
      i = j;
    }
  }

  void check_shapes(const ConstMatrixRef<T>& x, const MatrixRef<T>& y, const char* what) const {
    const MlaConfig& c = config_;
    detail::require(x.cols() == c.hidden_size, "MlaLayer::", what, ": x has ", x.cols(),
                    " columns, expected hidden_size = ", c.hidden_size);
    detail::require(y.rows() == x.rows() && y.cols() == c.hidden_size, "MlaLayer::", what,
                    ": y is [", y.rows(), ", ", y.cols(), "], expected [", x.rows(), ", ",
                    c.hidden_size, "]");
  }

  void check_io(const ConstMatrixRef<T>& x, const MatrixRef<T>& y, const LatentCache& cache,
                const char* what) const {
    const MlaConfig& c = config_;
    check_shapes(x, y, what);
    detail::require(
        cache.kv_lora_rank() == c.kv_lora_rank && cache.rope_dim() == c.qk_rope_head_dim,
        "MlaLayer::", what, ": the cache stores [", cache.kv_lora_rank(), " + ", cache.rope_dim(),
        "] per token, this layer [", c.kv_lora_rank, " + ", c.qk_rope_head_dim, "]");
    // A layer that shares its top-k (index_shared) takes a cache with index keys or without.
    const Index keys = c.has_indexer() ? c.index_head_dim : 0;
    detail::require(c.index_shared || cache.index_key_format().dim() == keys, "MlaLayer::", what,
                    ": the cache keeps index keys of width ", cache.index_key_format().dim(),
                    ", this layer's indexer needs ", keys,
                    " (0: none; make the cache with the layer's config)");
  }

  /// q and [c^KV ; k^R] for every row of x, RoPE applied at the positions of ws.parts.
  void project_queries_and_latents(const ConstMatrixRef<T>& x, MlaWorkspace<T>& ws,
                                   const RunOptions& run) const {
    const MlaConfig& c = config_;
    const Index tokens = x.rows();
    const Index H = c.num_attention_heads, P = c.qk_nope_head_dim, D = c.kv_lora_rank;
    // Query: q = W_qb RMSNorm(W_qa x), or q = W_q x.
    auto q = ws.q.topRows(tokens);  // (T, H * (P + R))
    if (c.has_q_lora()) {
      auto cq = ws.cq.topRows(tokens);  // (T, q_lora_rank)
      project(weights_.wq_a, x, cq, ws.context(run));
      rms_norm<T>(cq, weights_.q_norm, c.rms_norm_eps);
      if (c.q_lora_scale != 1.0) cq *= static_cast<T>(c.q_lora_scale);  // LongCat's s_q
      project(weights_.wq_b, cq, q, ws.context(run));
    } else {
      project(weights_.wq, x, q, ws.context(run));
    }
    // Keys and values: [c_raw ; k_raw] = W_kva x; c^KV = RMSNorm(c_raw), normalised before
    // it is cached; k^R = RoPE(k_raw), one rotary key shared by all heads.
    auto kv = ws.kv.topRows(tokens);  // (T, d_c + R)
    project(weights_.wkv_a, x, kv, ws.context(run));
    if (c.kv_latent_norm) rms_norm<T>(kv.leftCols(D), weights_.kv_norm, c.rms_norm_eps);
    // LongCat's s_kv: the cache holds the scaled latent (so keys and values carry it).
    if (c.kv_lora_scale != 1.0) kv.leftCols(D) *= static_cast<T>(c.kv_lora_scale);
    T* scratch = ws.rope_scratch.data();
    for (const Part& part : ws.parts) {
      for (Index i = 0; i < part.tokens; ++i) {
        const Index t = part.row0 + i;
        const std::int64_t pos = part.start_pos + i;
        rope_.apply<T>(kv.middleRows(t, 1), pos, D, 1, 0, scratch);
        rope_.apply<T>(q.middleRows(t, 1), pos, P, H, c.qk_head_dim(), scratch);  // q^pe
        // Llama-4 scaling: one factor for the whole query of this position, after RoPE. It
        // commutes with the absorption (a scalar per query row); keys are untouched.
        if (c.llama_4_scaling.enabled()) {
          q.row(t) *= static_cast<T>(c.llama_4_scaling.factor(pos));
        }
      }
    }
    // The output gate sigmoid(W_g x), applied in finish().
    if (c.mla_use_output_gate) {
      auto g = ws.gate.topRows(tokens);  // (T, H * V)
      project(weights_.wg, x, g, ws.context(run));
      g = (T(1) + (-g.array()).exp()).inverse().matrix();
    }
    if (c.has_indexer()) project_indexer(x, ws, run);
  }

  /// DeepSeek-V3.2's indexer for every row: the index keys (always: the cache keeps them) and,
  /// when a row attends sparsely, the index queries and head weights.
  void project_indexer(const ConstMatrixRef<T>& x, MlaWorkspace<T>& ws,
                       const RunOptions& run) const {
    const MlaConfig& c = config_;
    const IndexerWeights<T>& ix = weights_.indexer;
    const Index tokens = x.rows(), HI = c.index_n_heads, DI = c.index_head_dim;
    // Projections into FP32 (through T for other layers).
    const auto into_float = [&](const Linear<T>& w, const auto& in, Index cols,
                                RowMatrix<float>& out, auto&& before_cast) {
      if constexpr (std::is_same_v<T, float>) {
        auto o = out.topRows(tokens);
        project(w, in, o, ws.context(run));
        before_cast(o);
      } else {
        auto t = ws.index_t.block(0, 0, tokens, cols);
        project(w, in, t, ws.context(run));
        before_cast(t);
        out.topRows(tokens) = t.template cast<float>();
      }
    };
    // k = LayerNorm(wk x) (in T), RoPE and the rotation (in FP32).
    into_float(ix.wk, x, DI, ws.index_k,
               [&](auto& k) { layer_norm<T>(k, ix.k_norm, ix.k_norm_bias, 1e-6); });
    float* rs = ws.index_rope.data();
    for (const Part& part : ws.parts) {
      for (Index i = 0; i < part.tokens; ++i) {
        prepare_index_key(c, index_rope_, part.start_pos + i, ws.index_k.row(part.row0 + i).data(),
                          rs);
      }
    }
    if (!ws.index_queries) return;
    const auto none = [](auto&) {};
    // q [tokens, H_I * d_I] viewed as [tokens * H_I, d_I]: rows are contiguous.
    {
      Eigen::Map<RowMatrix<float>> qrows(ws.index_q.data(), tokens, HI * DI);
      if constexpr (std::is_same_v<T, float>) {
        project(ix.wq_b, ws.cq.topRows(tokens), qrows, ws.context(run));
      } else {
        auto t = ws.index_t.block(0, 0, tokens, HI * DI);
        project(ix.wq_b, ws.cq.topRows(tokens), t, ws.context(run));
        qrows = t.template cast<float>();
      }
    }
    into_float(ix.weights_proj, x, HI, ws.index_w, none);
    for (const Part& part : ws.parts) {
      for (Index i = 0; i < part.tokens; ++i) {
        const Index t = part.row0 + i;
        prepare_index_queries(c, index_rope_, part.start_pos + i, ws.index_q.data() + t * HI * DI,
                              ws.index_w.row(t).data(), rs, ws.index_codes.data());
      }
    }
  }

  /// q~_h = W_UK^(h)^T q_h^nope and q^pe for rows [row0, row0 + tokens): q_latent
  /// [tokens * H, d_c + R] from row row0 * H. The heads run on the pool's threads, each
  /// multiplying its rows of wkv_b in place.
  void absorb_queries(Index row0, Index tokens, MlaWorkspace<T>& ws, const RunOptions& run) const {
    const Index H = config_.num_attention_heads, P = config_.qk_nope_head_dim;
    const Index D = config_.kv_lora_rank, R = config_.qk_rope_head_dim, QK = P + R;
    const Index V = config_.v_head_dim;
    const Eigen::OuterStride<> per_token(H * (D + R));
    auto q = ws.q.middleRows(row0, tokens);
    auto q_latent = ws.q_latent.middleRows(row0 * H, tokens * H);
    // Absorb W_UK into the query: <q, W_UK c> = <W_UK^T q, c>, so scores read the cache.
    for_each_head(run, [&](Index h, int thread) {
      Strided q_abs(q_latent.data() + h * (D + R), tokens, D, per_token);
      Strided q_pe(q_latent.data() + h * (D + R) + D, tokens, R, per_token);
      weights_.wkv_b.apply_rows_transposed(h * (P + V), P, q.middleCols(h * QK, P), q_abs,
                                           ws.thread_context(run, thread));
      q_pe = q.middleCols(h * QK + P, R);
    });
  }

  /// Calls f(h, thread) for every head, on the call's executor when it has one.
  template <class F>
  void for_each_head(const RunOptions& run, F&& f) const {
    const Index H = config_.num_attention_heads;
    mla::parallel_for(run.executor, H, f);
  }

  /// Attention of rows [row0, row0 + n), the last n tokens of `view`.
  void attend(const LatentView& view, Index row0, Index n, AttentionPath path, MlaWorkspace<T>& ws,
              const RunOptions& run) const {
    const Index H = config_.num_attention_heads, V = config_.v_head_dim;
    auto lse = ws.lse.middleRows(row0, n);
    if (path == AttentionPath::kExpanded) {
      attention_expanded<T>(config_, view, ws.q.middleRows(row0, n), weights_.wkv_b, softmax_scale_,
                            ws.o.block(row0, 0, n, H * V), lse, ws.attention, ws.context(run),
                            run.decode.precision);
    } else if constexpr (std::is_same_v<T, float>) {
      // The SIMD kernel, up to kDecodeChunk query tokens per pass over the cache: token t sees
      // the first past + t + 1 keys.
      const Index past = view.tokens() - n;
      for (Index t0 = 0; t0 < n; t0 += kDecodeChunk) {
        const Index m = std::min(kDecodeChunk, n - t0);
        const Index r = (row0 + t0) * H;
        decode_absorbed(config_, view, ws.q_latent.middleRows(r, m * H), softmax_scale_,
                        ws.o_latent.middleRows(r, m * H), lse.middleRows(t0, m), ws.decode,
                        run.executor, run.decode, past + t0 + m);
      }
    } else {
      attention_absorbed<T>(config_, view, ws.q_latent.middleRows(row0 * H, n * H), softmax_scale_,
                            ws.o_latent.middleRows(row0 * H, n * H), lse, ws.attention);
    }
  }

  /// Attention of rows [row0, row0 + n), the last n tokens of `view`, in a DeepSeek-V3.2 layer:
  /// rows that see at most index_topk keys densely, the others over the positions the indexer
  /// selects from `keys` (the index keys of the same tokens).
  void attend_sparse(const LatentView& view, const IndexKeyView& keys, Index row0, Index n,
                     MlaWorkspace<T>& ws, const RunOptions& run) const {
    const Index H = config_.num_attention_heads, HI = config_.index_n_heads;
    const Index topk = config_.index_topk, past = view.tokens() - n;
    const Index dense = std::clamp<Index>(topk - past, 0, n);
    if (dense > 0) {
      attend(view.subview(0, past + dense), row0, dense, AttentionPath::kAbsorbed, ws, run);
    }
    TopkSelection& sel = ws.selection;
    const bool own = config_.has_indexer();  // else: the shared selection, checked already
    if (own && ws.index_scores.cols() < view.tokens()) {  // grows geometrically with the context
      ws.index_scores.resize(MlaWorkspace<T>::kSparseChunk,
                             std::max(view.tokens(), 2 * ws.index_scores.cols()));
    }
    for (Index t0 = dense; t0 < n; t0 += MlaWorkspace<T>::kSparseChunk) {
      const Index rows = std::min(MlaWorkspace<T>::kSparseChunk, n - t0);
      const Index row = row0 + t0;
      if (own) {
        for (Index r = 0; r < rows; ++r)
          ws.index_visible[static_cast<std::size_t>(r)] = past + t0 + r + 1;
        index_scores(keys, ws.index_q.middleRows(row * HI, rows * HI),
                     ws.index_w.middleRows(row, rows), ws.index_visible.data(), ws.index_scores,
                     ws.indexer, run.executor);
        for (Index r = 0; r < rows; ++r) {
          select_top_k(ws.index_scores.row(r).data(), past + t0 + r + 1, topk, sel.row(row + r),
                       ws.topk_scratch);
        }
      }
      for (Index r = 0; r < rows; ++r) {
        sparse_attention_absorbed<T>(
            config_, view, sel.row(row + r), topk, ws.q_latent.middleRows((row + r) * H, H),
            softmax_scale_, ws.o_latent.middleRows((row + r) * H, H), ws.lse.middleRows(row + r, 1),
            ws.sparse, run.executor, run.decode);
      }
    }
  }

  /// Absorbed path: o_h = W_UV^(h) o~_h for every row. Then u = W_o o.
  void finish(MatrixRef<T> y, Index tokens, MlaWorkspace<T>& ws, const RunOptions& run) const {
    const Index H = config_.num_attention_heads, D = config_.kv_lora_rank, V = config_.v_head_dim;
    const Index P = config_.qk_nope_head_dim;
    auto o = ws.o.topRows(tokens);  // (T, H * V)
    // Absorbed parts: apply W_UV after the weighted sum: sum_j p W c = W sum_j p c (W_UV^(h):
    // the V rows of wkv_b after the head's P rows of W_UK, multiplied in place), over runs of
    // consecutive absorbed parts.
    const std::size_t n = ws.parts.size();
    for (std::size_t i = 0; i < n;) {
      if (ws.parts[i].path != AttentionPath::kAbsorbed) {
        ++i;
        continue;
      }
      std::size_t j = i + 1;
      while (j < n && ws.parts[j].path == AttentionPath::kAbsorbed) ++j;
      const Index row0 = ws.parts[i].row0;
      const Index rows = ws.parts[j - 1].row0 + ws.parts[j - 1].tokens - row0;
      const Eigen::OuterStride<> per_token(H * D);
      for_each_head(run, [&](Index h, int thread) {
        const Strided o_lat(ws.o_latent.data() + row0 * H * D + h * D, rows, D, per_token);
        weights_.wkv_b.apply_rows(h * (P + V) + P, V, o_lat, o.block(row0, h * V, rows, V),
                                  ws.thread_context(run, thread));
      });
      i = j;
    }
    // The output gate: o (.) sigmoid(W_g x), per head and value, before W_o.
    if (config_.mla_use_output_gate) o.array() *= ws.gate.topRows(tokens).array();
    project(weights_.wo, o, y, ws.context(run));  // (T, hidden)
  }

  using Strided = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;

  MlaConfig config_;
  Rope rope_;
  Rope index_rope_;  // the indexer's: MLA's frequencies on its own pairs
  Index layer_index_;
  MlaWeights<T> weights_;
  double softmax_scale_ = 0.0;
};

}  // namespace mla
