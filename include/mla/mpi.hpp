#pragma once
/// \file
/// `mla::mpi`: one MLA layer sharded over the ranks of an MPI communicator (optional target
/// `mla::mpi`; needs an MPI implementation, e.g. Debian's OpenMPI).
///
/// - `ContextParallelLayer`: every rank holds the whole layer and a shard of every sequence's
///   latent cache: the sequence's blocks of `block_tokens` tokens go to the ranks round-robin
///   (block b to rank b mod N), so the shards differ by at most one block at every length.
///   Each rank computes the queries (the inputs are replicated), appends the tokens that fall
///   in its blocks, attends over its shard, and the partial results (o~ and log-sum-exp per
///   head and token) are merged exactly across ranks by one MPI_Allreduce with a log-sum-exp
///   operation: H x (d_c + 1) floats per rank per decode token, whatever the context length.
/// - `HeadParallelLayer`: the heads are split across ranks (Megatron-style: wq / wq_b and wkv_b
///   by output rows, wo by input columns); every rank caches the whole latent (it is shared by
///   all heads), computes its heads' outputs, and one MPI_Allreduce sums W_o's partial products.
///
/// Every call is collective: all ranks of the communicator call it with the same arguments
/// (the same input rows, positions and sequence). Arguments are checked on every rank before
/// anything changes, and a check that fails on one rank fails on all of them (an mla::Error
/// on every rank, never a hang).

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "mla/config.hpp"
#include "mla/decode.hpp"
#include "mla/detail/lse_merge.hpp"
#include "mla/error.hpp"
#include "mla/latent_cache.hpp"
#include "mla/layer.hpp"
#include "mla/weights.hpp"

namespace mla::mpi {

/// Rank and size of a communicator.
inline int rank(MPI_Comm comm) {
  int r = 0;
  MPI_Comm_rank(comm, &r);
  return r;
}
inline int size(MPI_Comm comm) {
  int n = 1;
  MPI_Comm_size(comm, &n);
  return n;
}

/// Throws mla::Error on every rank unless `ok` holds on every rank; the ranks where it does
/// not hold say why (`why`), the others name the first failing rank.
inline void agree(MPI_Comm comm, bool ok, const std::string& why) {
  int bad_rank = ok ? std::numeric_limits<int>::max() : rank(comm);
  int first_bad = 0;
  MPI_Allreduce(&bad_rank, &first_bad, 1, MPI_INT, MPI_MIN, comm);
  if (first_bad == std::numeric_limits<int>::max()) return;
  if (!ok) detail::fail("mla::mpi rank ", rank(comm), ": ", why);
  detail::fail("mla::mpi: rank ", first_bad, " failed a check (see its message); no rank went on");
}

/// Runs f() on every rank and makes its mla::Error collective: when it throws on any rank,
/// every rank throws (the failing ranks their own message).
template <class F>
void collectively(MPI_Comm comm, F&& f) {
  std::string why;
  bool ok = true;
  try {
    f();
  } catch (const Error& e) {
    ok = false;
    why = e.what();
  }
  agree(comm, ok, why);
}

/// A fingerprint of a config's fields, equal on ranks with equal configs.
inline std::uint64_t fingerprint(const MlaConfig& c) {
  std::uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](std::uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= (v >> (8 * i)) & 0xffu;
      h *= 1099511628211ull;
    }
  };
  const auto bits = [](double d) {
    std::uint64_t u = 0;
    std::memcpy(&u, &d, sizeof(u));
    return u;
  };
  for (std::int64_t v :
       {c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
        c.qk_rope_head_dim, c.v_head_dim, c.max_position_embeddings,
        c.rope_scaling.original_max_position_embeddings, c.index_n_heads, c.index_head_dim,
        c.index_topk, c.llama_4_scaling.original_max_position_embeddings}) {
    mix(static_cast<std::uint64_t>(v));
  }
  for (double d :
       {c.rms_norm_eps, c.rope_theta, c.rope_scaling.factor, c.rope_scaling.beta_fast,
        c.rope_scaling.beta_slow, c.rope_scaling.mscale, c.rope_scaling.mscale_all_dim,
        c.rope_scaling.attention_factor, c.llama_4_scaling.beta, c.q_lora_scale, c.kv_lora_scale}) {
    mix(bits(d));
  }
  mix(static_cast<std::uint64_t>(c.rope_scaling.type));
  mix(static_cast<std::uint64_t>(c.rope_layout));
  mix(c.kv_latent_norm ? 1u : 0u);
  mix(static_cast<std::uint64_t>(c.index_scales));
  mix(static_cast<std::uint64_t>(c.index_rope_layout));
  mix((c.index_shared ? 1u : 0u) | (c.mla_use_nope ? 2u : 0u) | (c.mla_use_output_gate ? 4u : 0u));
  for (double f : c.rope_inv_freq) mix(bits(f));
  return h;
}

/// Throws mla::Error on every rank unless every rank has the same config.
inline void require_same_config(MPI_Comm comm, const MlaConfig& c) {
  const auto mine = static_cast<unsigned long long>(fingerprint(c));
  unsigned long long lo = 0, hi = 0;
  MPI_Allreduce(&mine, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, comm);
  MPI_Allreduce(&mine, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, comm);
  detail::require(lo == hi, "mla::mpi: the ranks were given different configs (rank ", rank(comm),
                  " has H = ", c.num_attention_heads, ", d_c = ", c.kv_lora_rank,
                  ", hidden = ", c.hidden_size, ")");
}

// ------------------------------------------------------------------------------------------
// The log-sum-exp merge

/// Merges partial absorbed-attention results of `n` (token, head) pairs, each stored as
/// [lse, o~_0 .. o~_{d_c - 1}] (d_c + 1 floats): in (one part) into inout (another part) by the
/// library's one log-sum-exp merge (detail::lse_merge): w_i = exp(l_i - m) / sum_j exp(l_j - m),
/// o = w1 o1 + w2 o2, l = m + log(sum_j exp(l_j - m)) with m = max(l1, l2). A part over no keys
/// has lse = -inf (and any o~) and leaves the other as it is. Exact up to FP32 rounding: the
/// merged o~ and lse equal the softmax over the union of the keys.
inline void merge_partials(const float* in, float* inout, Index n, Index d_c) {
  for (Index i = 0; i < n; ++i) {
    const float* a = in + i * (d_c + 1);
    float* b = inout + i * (d_c + 1);
    const float lse[2] = {a[0], b[0]};
    float w[2];
    const float merged = detail::lse_merge(2, lse, nullptr, 1, w);
    if (w[0] == 0.0f && w[1] != 0.0f) continue;  // a over no keys (or negligible): b stays
    if (w[1] == 0.0f && w[0] != 0.0f) {
      std::copy(a + 1, a + d_c + 1, b + 1);
    } else if (merged != -std::numeric_limits<float>::infinity()) {
      for (Index k = 1; k <= d_c; ++k) b[k] = w[0] * a[k] + w[1] * b[k];
    }
    b[0] = merged;
  }
}

/// The MPI datatype (d_c + 1 contiguous floats) and operation of merge_partials. Creating it
/// is collective only in that every rank needs one with the same d_c.
class LseMerge {
 public:
  explicit LseMerge(Index d_c) {
    MPI_Type_contiguous(static_cast<int>(d_c + 1), MPI_FLOAT, &type_);
    MPI_Type_commit(&type_);
    // Not commutative, so that MPI combines the ranks in rank order: every run and every rank
    // gets the same bits.
    MPI_Op_create(&LseMerge::apply, 0, &op_);
  }
  ~LseMerge() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    MPI_Op_free(&op_);
    MPI_Type_free(&type_);
  }
  LseMerge(const LseMerge&) = delete;
  LseMerge& operator=(const LseMerge&) = delete;

  /// Merges `n` parts in place across the ranks of `comm` (MPI_Allreduce).
  void allreduce(float* parts, Index n, MPI_Comm comm) const {
    MPI_Allreduce(MPI_IN_PLACE, parts, static_cast<int>(n), type_, op_, comm);
  }

 private:
  static void apply(void* in, void* inout, int* len, MPI_Datatype* type) {
    int bytes = 0;
    MPI_Type_size(*type, &bytes);
    const Index d_c = bytes / static_cast<int>(sizeof(float)) - 1;
    merge_partials(static_cast<const float*>(in), static_cast<float*>(inout), *len, d_c);
  }

  MPI_Datatype type_{};
  MPI_Op op_{};
};

// ------------------------------------------------------------------------------------------
// Context parallelism

/// One MLA layer whose latent cache is sharded over the ranks of `comm` (see the file comment).
/// Float layers; FP32, BF16 or FP8 cache storage.
class ContextParallelLayer {
 public:
  /// Collective. `cache_options` are this rank's (num_blocks is the rank's own pool;
  /// num_layers must be 1). Throws mla::Error on every rank when the configs differ or the
  /// options are wrong on any rank.
  ContextParallelLayer(MPI_Comm comm, const MlaConfig& config, MlaWeights<float> weights,
                       const LatentCacheOptions& cache_options)
      : comm_(comm), rank_(mpi::rank(comm)), ranks_(mpi::size(comm)), merge_(config.kv_lora_rank) {
    require_same_config(comm, config);
    collectively(comm, [&] {
      detail::require(!config.has_sparse_attention(), "ContextParallelLayer: sparse attention ",
                      "(index_topk ", config.index_topk, ") is not supported: the index keys ",
                      "would have to be sharded too (HeadParallelLayer runs it)");
      detail::require(
          cache_options.num_layers == 1,
          "ContextParallelLayer: one layer per cache, got num_layers = ", cache_options.num_layers);
      layer_ = std::make_unique<MlaLayer<float>>(config, std::move(weights));
      cache_ = std::make_unique<LatentCache>(config, cache_options);
    });
  }

  const MlaLayer<float>& layer() const { return *layer_; }
  /// This rank's shard.
  const LatentCache& local_cache() const { return *cache_; }
  int rank() const { return rank_; }
  int ranks() const { return ranks_; }

  /// Collective: a new empty sequence (the same id on every rank).
  SequenceId add_sequence() {
    const SequenceId id = cache_->add_sequence();
    sequences_[id] = Sequence{};
    return id;
  }
  /// Collective: removes a sequence and its shards.
  void remove_sequence(SequenceId id) {
    collectively(comm_, [&] { (void)find(id); });
    cache_->remove_sequence(id);
    sequences_.erase(id);
  }
  /// Tokens of the sequence over all ranks, and on this rank.
  Index length(SequenceId id) const { return find(id).length; }
  Index local_length(SequenceId id) const { return cache_->length(id, 0); }
  /// The rank that holds token `index` (0-based) of a sequence.
  int owner(Index index) const {
    return static_cast<int>((index / cache_->options().block_tokens) % ranks_);
  }

  /// Collective: the layer on `x` [tokens, hidden] (the same rows on every rank), the next
  /// tokens of `seq` at positions start_pos, ...; every rank gets the whole output in `y`.
  /// Each token goes to the shard of its block; each attends to every earlier token of the
  /// sequence on every rank. Positions are contiguous as for MlaLayer::forward. Throws
  /// mla::Error on every rank (nothing changed anywhere) for a bad argument on any rank or a
  /// shard without room.
  void forward(ConstMatrixRef<float> x, std::int64_t start_pos, SequenceId seq, MatrixRef<float> y,
               MlaWorkspace<float>& ws, const RunOptions& run = {}) {
    const MlaConfig& c = layer_->config();
    const Index n = x.rows();
    Sequence* s = nullptr;
    Index mine = 0;
    collectively(comm_, [&] {
      s = &find(seq);
      detail::require(x.cols() == c.hidden_size && y.rows() == n && y.cols() == c.hidden_size,
                      "ContextParallelLayer::forward: x is [", n, ", ", x.cols(), "], y [",
                      y.rows(), ", ", y.cols(), "], expected [tokens, ", c.hidden_size, "]");
      detail::require(start_pos >= 0, "ContextParallelLayer::forward: negative position ",
                      start_pos);
      detail::require(s->length == 0 || start_pos == s->first_position + s->length,
                      "ContextParallelLayer::forward: sequence ", seq, " holds ", s->length,
                      " tokens from position ", s->first_position, ", so its next token is at ",
                      s->first_position + s->length, ", got ", start_pos);
      for (Index t = 0; t < n; ++t) mine += owner(s->length + t) == rank_ ? 1 : 0;
      cache_->require_room(seq, 0, mine);
    });
    // Every rank must have been given the same call.
    long long args[2] = {static_cast<long long>(n), static_cast<long long>(start_pos)};
    long long lo[2], hi[2];
    MPI_Allreduce(args, lo, 2, MPI_LONG_LONG, MPI_MIN, comm_);
    MPI_Allreduce(args, hi, 2, MPI_LONG_LONG, MPI_MAX, comm_);
    detail::require(lo[0] == hi[0] && lo[1] == hi[1],
                    "ContextParallelLayer::forward: the ranks were called with different token "
                    "counts or positions (rank ",
                    rank_, ": ", n, " tokens at ", start_pos, ")");
    if (n == 0) return;
    const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim;
    parts_.resize(static_cast<std::size_t>(n * H * (D + 1)));
    layer_->forward_with_attention(
        x, start_pos, y, ws,
        [&](ConstMatrixRef<float> latents, ConstMatrixRef<float> q, MatrixRef<float> o,
            MatrixRef<float> lse) {
          for (Index t = 0; t < n; ++t) {
            const Index index = s->length + t;
            if (owner(index) == rank_) {
              // Shards are not contiguous in position (RoPE is already applied): each rank's
              // cache numbers its own tokens 0, 1, ...
              cache_->append<float>(seq, 0, latents.block(t, 0, 1, D), latents.block(t, D, 1, R));
            }
            // This token's partial attention over every key of the shard so far (all of them
            // come before it or are it).
            float* part = parts_.data() + t * H * (D + 1);
            const LatentView view = cache_->view(seq, 0);
            if (view.tokens() == 0) {
              for (Index h = 0; h < H; ++h) {
                part[h * (D + 1)] = -std::numeric_limits<float>::infinity();
                std::fill(part + h * (D + 1) + 1, part + (h + 1) * (D + 1), 0.0f);
              }
              continue;
            }
            decode_absorbed(c, view, q.middleRows(t * H, H), layer_->softmax_scale(),
                            o.middleRows(t * H, H), lse.middleRows(t, 1), decode_ws_, run.executor,
                            run.decode);
            for (Index h = 0; h < H; ++h) {
              part[h * (D + 1)] = lse(t, h);
              std::copy(o.row(t * H + h).data(), o.row(t * H + h).data() + D,
                        part + h * (D + 1) + 1);
            }
          }
          merge_.allreduce(parts_.data(), n * H, comm_);
          for (Index t = 0; t < n; ++t) {
            for (Index h = 0; h < H; ++h) {
              const float* part = parts_.data() + (t * H + h) * (D + 1);
              lse(t, h) = part[0];
              std::copy(part + 1, part + 1 + D, o.row(t * H + h).data());
            }
          }
        },
        run);
    if (s->length == 0) s->first_position = start_pos;
    s->length += n;
  }

 private:
  struct Sequence {
    Index length = 0;
    std::int64_t first_position = 0;
  };
  Sequence& find(SequenceId id) {
    const auto it = sequences_.find(id);
    detail::require(it != sequences_.end(), "ContextParallelLayer: unknown sequence id ", id);
    return it->second;
  }
  const Sequence& find(SequenceId id) const {
    return const_cast<ContextParallelLayer*>(this)->find(id);
  }

  MPI_Comm comm_;
  int rank_, ranks_;
  LseMerge merge_;
  std::unique_ptr<MlaLayer<float>> layer_;
  std::unique_ptr<LatentCache> cache_;
  std::unordered_map<SequenceId, Sequence> sequences_;
  std::vector<float> parts_;
  DecodeWorkspace decode_ws_;
};

// ------------------------------------------------------------------------------------------
// Head parallelism

/// The heads [first, first + count) of rank r of N: H split as evenly as possible.
inline std::pair<Index, Index> head_range(Index heads, int r, int ranks) {
  const Index base = heads / ranks, extra = heads % ranks;
  const Index first = r * base + std::min<Index>(r, extra);
  return {first, base + (r < extra ? 1 : 0)};
}

/// The weights of heads [h0, h0 + count) of a layer: wq or wq_b, wkv_b and the output gate wg
/// by output rows, wo by input columns, the rest (wq_a, wkv_a, the norms) whole. Dense FP32
/// (BF16 and FP8 weights are widened exactly).
inline MlaWeights<float> head_shard(const MlaConfig& c, const MlaWeights<float>& w, Index h0,
                                    Index count) {
  const Index QK = c.qk_head_dim(), PV = c.qk_nope_head_dim + c.v_head_dim, V = c.v_head_dim;
  MlaWeights<float> s = w;
  if (c.has_q_lora()) {
    s.wq_b = Linear<float>(RowMatrix<float>(w.wq_b.to_dense().middleRows(h0 * QK, count * QK)));
  } else {
    s.wq = Linear<float>(RowMatrix<float>(w.wq.to_dense().middleRows(h0 * QK, count * QK)));
  }
  s.wkv_b = Linear<float>(RowMatrix<float>(w.wkv_b.to_dense().middleRows(h0 * PV, count * PV)));
  s.wo = Linear<float>(RowMatrix<float>(w.wo.to_dense().middleCols(h0 * V, count * V)));
  if (c.mla_use_output_gate) {
    // The gate multiplies each head's V outputs: its rows go with the head.
    s.wg = Linear<float>(RowMatrix<float>(w.wg.to_dense().middleRows(h0 * V, count * V)));
  }
  return s;
}

/// One MLA layer whose heads are split over the ranks of `comm` (see the file comment). Each
/// rank caches the whole latent: c^KV and k^R are shared by all heads, so a rank with fewer
/// heads needs all of it; the cache costs the same per rank as unsharded, the weights 1/N of
/// wq_b, wkv_b and wo.
class HeadParallelLayer {
 public:
  /// Collective. Throws mla::Error on every rank when the configs differ, there are more ranks
  /// than heads, or anything else is wrong on any rank.
  HeadParallelLayer(MPI_Comm comm, const MlaConfig& config, const MlaWeights<float>& weights,
                    const LatentCacheOptions& cache_options)
      : comm_(comm), rank_(mpi::rank(comm)), ranks_(mpi::size(comm)) {
    require_same_config(comm, config);
    detail::require(ranks_ <= config.num_attention_heads, "HeadParallelLayer: ", ranks_,
                    " ranks for ", config.num_attention_heads,
                    " heads; every rank needs at least one head");
    collectively(comm, [&] {
      weights.check(config);
      const auto [h0, count] = head_range(config.num_attention_heads, rank_, ranks_);
      first_head_ = h0;
      MlaConfig mine = config;
      mine.num_attention_heads = count;
      layer_ = std::make_unique<MlaLayer<float>>(mine, head_shard(config, weights, h0, count));
      cache_ = std::make_unique<LatentCache>(mine, cache_options);
    });
  }

  /// This rank's heads as a layer of their own (its config has their count).
  const MlaLayer<float>& local_layer() const { return *layer_; }
  Index first_head() const { return first_head_; }
  LatentCache& cache() { return *cache_; }

  /// Collective: a new empty sequence (the same id on every rank).
  SequenceId add_sequence() { return cache_->add_sequence(); }
  void remove_sequence(SequenceId id) {
    collectively(comm_, [&] { cache_->remove_sequence(id); });
  }

  /// Collective: as MlaLayer::forward on every rank's heads, then the sum of their W_o
  /// products (one MPI_Allreduce of tokens x hidden floats) in `y` on every rank.
  void forward(ConstMatrixRef<float> x, std::int64_t start_pos, SequenceId seq, MatrixRef<float> y,
               MlaWorkspace<float>& ws, const RunOptions& run = {}) {
    collectively(comm_, [&] { layer_->forward(x, start_pos, *cache_, seq, y, ws, run); });
    if (y.outerStride() == y.cols()) {
      MPI_Allreduce(MPI_IN_PLACE, y.data(), static_cast<int>(y.size()), MPI_FLOAT, MPI_SUM, comm_);
    } else {
      RowMatrix<float> tmp = y;
      MPI_Allreduce(MPI_IN_PLACE, tmp.data(), static_cast<int>(tmp.size()), MPI_FLOAT, MPI_SUM,
                    comm_);
      y = tmp;
    }
  }

 private:
  MPI_Comm comm_;
  int rank_, ranks_;
  Index first_head_ = 0;
  std::unique_ptr<MlaLayer<float>> layer_;
  std::unique_ptr<LatentCache> cache_;
};

}  // namespace mla::mpi
