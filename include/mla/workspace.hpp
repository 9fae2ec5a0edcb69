#pragma once
/// \file
/// `MlaWorkspace`: the scratch memory of MlaLayer's forward passes, sized by the longest chunk
/// seen and reused. How a call runs (threads, arithmetic) is its RunOptions
/// (mla/run_options.hpp), not the workspace's.

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "mla/attention.hpp"
#include "mla/config.hpp"
#include "mla/decode.hpp"
#include "mla/executor.hpp"
#include "mla/latent_cache.hpp"
#include "mla/matrix.hpp"
#include "mla/projection.hpp"
#include "mla/run_options.hpp"
#include "mla/sparse.hpp"

namespace mla {

template <class T>
class MlaLayer;

/// Scratch memory of MlaLayer::forward: sized by the longest chunk seen so far and reused.
/// Once it has been sized (by a call or by reserve), a call with a chunk that fits and the same
/// RunOptions allocates nothing. One workspace can serve every layer of a model, one call at a
/// time.
template <class T>
class MlaWorkspace {
 public:
  /// Makes room for chunks of up to `tokens` tokens of `config` run with `run` (run.path
  /// kAuto: room for both paths; the executor's threads, the precisions and the decode
  /// options size the per-thread and decode scratch).
  void reserve(const MlaConfig& c, Index tokens, const RunOptions& run = {}) {
    const AttentionPath path = run.path;
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
    if (c.mla_use_output_gate) grow(gate, tokens, H * c.v_head_dim);
    grow(lse, tokens, H);
    grow(rope_scratch, 1, c.qk_rope_head_dim);
    if (c.has_indexer()) {
      const Index HI = c.index_n_heads, DI = c.index_head_dim;
      grow(index_q, tokens * HI, DI);
      grow(index_w, tokens, HI);
      grow(index_k, tokens, DI);
      if constexpr (!std::is_same_v<T, float>) {
        grow(index_t, tokens, std::max(HI * DI, HI));
      }
      grow(index_codes, DI);
      grow(index_rope, std::max<Index>(c.qk_rope_head_dim, 1));
      grow(index_visible, kSparseChunk);
      selection.visible.reserve(static_cast<std::size_t>(tokens));
    }
    attention.reserve(c, tokens, path);
    // A batch has at most one sequence per token.
    const auto entries = static_cast<std::size_t>(std::max<Index>(tokens, 1));
    parts.reserve(entries);
    part_ids.reserve(entries);
    part_counts.reserve(entries);
    part_positions.reserve(entries);
    const int threads = mla::concurrency(run.executor);
    if (static_cast<int>(per_thread.size()) < threads) {
      per_thread.resize(static_cast<std::size_t>(threads));
    }
    // Projections: the pool's panels, and BF16 activations of the decode shapes.
    const bool bf16 = run.projection_precision == Precision::kBf16;
    const Index widest = std::max({c.hidden_size, c.q_lora_rank, c.kv_lora_rank, H * c.v_head_dim});
    projection.reserve(threads, std::min<Index>(tokens, 8), widest, bf16);
    for (ProjectionWorkspace& p : per_thread) {
      p.reserve(1, std::min<Index>(tokens, 8), std::max(c.qk_nope_head_dim, c.kv_lora_rank), bf16);
    }
    if constexpr (std::is_same_v<T, float>) {
      if (path != AttentionPath::kAbsorbed) attention.reserve_threads(c, threads);
      if (path != AttentionPath::kExpanded) {
        decode.reserve(c, run.decode, threads, std::min<Index>(tokens, 8));
      }
    }
  }

  /// Query tokens whose indexer scores are computed together (DeepSeek-V3.2 layers).
  static constexpr Index kSparseChunk = 8;

  /// Log-sum-exp of the last forward call's attention, [tokens, H] in the top rows.
  const RowMatrix<T>& last_lse() const { return lse; }

  /// The top-k positions of the last call of a layer with an indexer of its own, row by row
  /// of its input, which a following layer with MlaConfig::index_shared reads (GLM-5.1's
  /// IndexShare). A model that runs its layers on one workspace passes it on as it is; to run a
  /// shared layer on another workspace, copy it there.
  const TopkSelection& topk_selection() const { return selection; }
  TopkSelection& topk_selection() { return selection; }

 private:
  friend class MlaLayer<T>;

  RowMatrix<T> cq;        // [tokens, q_lora_rank]       c^Q
  RowMatrix<T> q;         // [tokens, H * (P + R)]        q
  RowMatrix<T> kv;        // [tokens, d_c + R]            [c^KV ; k^R]
  RowMatrix<T> q_latent;  // [tokens * H, d_c + R]        [q~ ; q^pe] per (token, head)
  RowMatrix<T> o_latent;  // [tokens * H, d_c]            o~
  RowMatrix<T> o;         // [tokens, H * V]              o
  RowMatrix<T> gate;      // [tokens, H * V]              sigmoid(W_g x) (output gate)
  RowMatrix<T> lse;       // [tokens, H]
  RowMatrix<T> rope_scratch;
  // DeepSeek-V3.2's indexer (layers with one): FP32, as the reference computes it.
  RowMatrix<float> index_q;       // [tokens * H_I, d_I]  E4M3 query values per (token, head)
  RowMatrix<float> index_w;       // [tokens, H_I]        folded head weights
  RowMatrix<float> index_k;       // [tokens, d_I]        keys before quantisation
  RowMatrix<T> index_t;           // projections in T (non-float layers)
  RowMatrix<float> index_scores;  // [kSparseChunk, context]
  std::vector<unsigned char> index_codes;
  std::vector<float> index_rope;
  std::vector<Index> index_visible;
  TopkSelection selection;  // the selection of the last call of a layer with an indexer
  std::vector<std::uint64_t> topk_scratch;
  IndexerWorkspace indexer;
  SparseWorkspace<T> sparse;
  bool index_queries = false;  // whether this call needs the index queries (sparse rows)
  AttentionWorkspace<T> attention;
  DecodeWorkspace decode;
  ProjectionWorkspace projection;
  std::vector<ProjectionWorkspace> per_thread;  // the per-head products on the pool's threads
  struct Part {
    Index row0 = 0, tokens = 0;
    std::int64_t start_pos = 0;
    AttentionPath path = AttentionPath::kAbsorbed;
  };
  std::vector<Part> parts;  // the sequences of a batch, in row order
  std::vector<SequenceId> part_ids;
  std::vector<Index> part_counts;
  std::vector<std::int64_t> part_positions;

  /// Whole projections: on the call's executor, with this workspace's scratch.
  ProjectionContext context(const RunOptions& run) {
    return {run.executor, run.projection_precision, &projection};
  }
  /// One thread's part of the per-head products (the threads run heads, not columns).
  ProjectionContext thread_context(const RunOptions& run, int thread) {
    return {nullptr, run.projection_precision, &per_thread[static_cast<std::size_t>(thread)]};
  }
};

}  // namespace mla
