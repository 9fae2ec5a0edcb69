#pragma once
/// \file
/// DeepSeek-V3.2's sparse attention (DSA) on MLA: the lightning indexer scores every cached
/// position for a query token, the top k positions are selected, and the absorbed attention
/// runs over those positions only. MLA itself is unchanged.
///
/// The indexer, for a token at position t (H_I heads of d_I; R = qk_rope_head_dim):
///   q = (wq_b c^Q) as [H_I, d_I];  k = LayerNorm(wk x)  (with bias, eps 1e-6)
///   RoPE on the first R values of each q_h and of k, with MLA's frequencies on the indexer's
///   own pairs (half-split (x[i], x[i + R/2]) in V3.2, interleaved in GLM-5); then the
///   orthonormal Hadamard rotation of each vector;
///   q_h and k quantised to E4M3 with one scale each (DeepSeek's act_quant);
///   w_h = weights_proj(x)_h * H_I^-1/2 * scale(q_h) * d_I^-1/2;
///   score(s) = scale(k_s) * sum_h w_h relu(<q8_h, k8_s>)  over cached s <= t (FP32);
///   S_t = the k = index_topk best positions (all of them when t + 1 <= k).
/// The layer (MlaLayer) runs all of this; the pieces are free functions here, on views, for
/// engines that schedule them themselves.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "mla/attention.hpp"
#include "mla/config.hpp"
#include "mla/decode.hpp"
#include "mla/detail/bit_cast.hpp"
#include "mla/error.hpp"
#include "mla/executor.hpp"
#include "mla/index_keys.hpp"
#include "mla/latent_cache.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"
#include "mla/rope.hpp"

namespace mla {

/// In place, the orthonormal Walsh-Hadamard transform of x[0, n), n a power of two:
/// butterflies (a + b, a - b) at strides 1, 2, ..., n / 2, then times n^-1/2 (the Sylvester
/// matrix H_n / sqrt(n), H_2n = [[H_n, H_n], [H_n, -H_n]]). It preserves dot products.
template <class T>
void hadamard_transform(T* x, Index n) {
  MLA_ASSERT(n > 0 && (n & (n - 1)) == 0);
  for (Index h = 1; h < n; h *= 2) {
    for (Index i = 0; i < n; i += 2 * h) {
      for (Index j = i; j < i + h; ++j) {
        const T a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  }
  const T s = T(1) / std::sqrt(static_cast<T>(n));
  for (Index i = 0; i < n; ++i) x[i] *= s;
}

/// The indexer's RoPE: MLA's frequencies (config's theta and YaRN) on the indexer's own pairing
/// (MlaConfig::index_rope_layout: half-split in DeepSeek-V3.2, interleaved in GLM-5).
inline Rope index_rope(const MlaConfig& config) {
  MlaConfig c = config;
  c.rope_layout = config.index_rope_layout;
  return Rope(c);
}

/// One token's index key, in place: k [index_head_dim] = LayerNorm(wk x) becomes the key the
/// cache quantises (RoPE on its first R values at `pos`, then the Hadamard rotation).
/// `scratch` holds R floats.
inline void prepare_index_key(const MlaConfig& c, const Rope& rope, std::int64_t pos, float* k,
                              float* scratch) {
  const Index D = c.index_head_dim;
  rope.apply<float>(Eigen::Map<RowMatrix<float>>(k, 1, D), pos, 0, 1, D, scratch);
  hadamard_transform(k, D);
}

/// One token's index queries and head weights, in place: q [index_n_heads * index_head_dim]
/// = wq_b c^Q (head h at h * index_head_dim) becomes, per head, RoPE'd (first R values, at
/// `pos`), rotated, quantised to E4M3 (one scale per head), and left as the E4M3 values
/// float(code); w [index_n_heads] = weights_proj x becomes the head weights with the query
/// scales and both normalisations folded in (w_h H_I^-1/2 scale_h d_I^-1/2). `scratch` holds
/// R floats and `codes` index_head_dim bytes.
inline void prepare_index_queries(const MlaConfig& c, const Rope& rope, std::int64_t pos, float* q,
                                  float* w, float* scratch, unsigned char* codes) {
  const Index H = c.index_n_heads, D = c.index_head_dim;
  rope.apply<float>(Eigen::Map<RowMatrix<float>>(q, 1, H * D), pos, 0, H, D, scratch);
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(H) * D));
  auto* q8 = reinterpret_cast<float8_e4m3fn*>(codes);
  for (Index h = 0; h < H; ++h) {
    float* qh = q + h * D;
    hadamard_transform(qh, D);
    float scale = 1.0f;
    quantize_e4m3_tiles(qh, D, D, kActivationAmaxFloor, c.index_scales, q8, &scale);
    from_fp8(q8, static_cast<std::size_t>(D), qh);
    w[h] *= scale * norm;
  }
}

/// Scratch of index_scores: the queries transposed, and per worker the GEMM kernel's panel and
/// a block's dot products. Grown by the calls that need more, reused after.
class IndexerWorkspace {
 public:
  void reserve(int workers, Index block_tokens, Index dim, Index query_rows) {
    detail::grow(qt, dim * ((query_rows + 15) / 16 * 16));
    detail::grow(qt_pairs, (dim + 1) / 2 * ((query_rows + 15) / 16 * 16));
    if (static_cast<int>(workers_.size()) < workers) {
      workers_.resize(static_cast<std::size_t>(workers));
    }
    for (Worker& w : workers_) {
      detail::grow(w.panel, detail::isa::kGemmScratchFloats);
      detail::grow(w.dots, query_rows * block_tokens);
      detail::grow(w.sum, block_tokens);
    }
  }

  /// (internal) One worker's scratch.
  struct Worker {
    detail::AlignedVector<float> panel;  // the GEMM kernel's scratch
    detail::AlignedVector<float> dots;   // scale_s <q8, k8_s>, [rows * H_I][block_tokens]
    std::vector<float> sum;              // one query's scores of the block
  };
  Worker& worker(int w) { return workers_[static_cast<std::size_t>(w)]; }
  detail::AlignedVector<float> qt;  ///< (internal) the queries transposed, [d_I][rows padded]
  /// (internal) the same as BF16 pairs of consecutive k (exact: E4M3 values), for VDPBF16PS.
  detail::AlignedVector<std::uint32_t> qt_pairs;

 private:
  std::vector<Worker> workers_;
};

/// The indexer's scores of `rows` query tokens: scores(r, s) = scale(k_s) * sum_h
/// w(r, h) relu(<q(r H_I + h), k8_s>) for s < visible[r] (entries beyond are left as they
/// are). q [rows * H_I, d_I] holds the E4M3 query values and w [rows, H_I] the folded head
/// weights, as prepare_index_queries leaves them; scores is [>= rows, >= max visible]. FP32
/// sums of exact products (E4M3 values), each cache block's index keys multiplied in place as
/// an FP8 matrix with one scale per row, by the projection GEMM kernel of the active
/// instruction set, the blocks on `executor`'s workers. Throws mla::Error for shapes that do not
/// match or a visible count outside [0, keys.tokens()].
inline void index_scores(const IndexKeyView& keys, ConstMatrixRef<float> q, ConstMatrixRef<float> w,
                         const Index* visible, MatrixRef<float> scores, IndexerWorkspace& ws,
                         Executor* executor = nullptr) {
  const Index rows = w.rows(), H = w.cols(), D = keys.dim(), bt = keys.block_tokens();
  detail::require(q.cols() == D && q.rows() == rows * H && scores.rows() >= rows,
                  "index_scores: q is [", q.rows(), ", ", q.cols(), "], w [", rows, ", ", H,
                  "], scores [", scores.rows(), ", ", scores.cols(), "]; expected q [rows * ", H,
                  ", ", D, "] and scores with at least ", rows, " rows");
  Index longest = 0;
  for (Index r = 0; r < rows; ++r) {
    detail::require(visible[r] >= 0 && visible[r] <= keys.tokens(), "index_scores: query ", r,
                    " sees ", visible[r], " keys, the cache holds ", keys.tokens());
    longest = std::max(longest, visible[r]);
  }
  detail::require(scores.cols() >= longest, "index_scores: scores has ", scores.cols(),
                  " columns, the longest query sees ", longest, " keys");
  if (longest == 0) return;
  const Index M = rows * H, mp = (M + 15) / 16 * 16;
  ws.reserve(mla::concurrency(executor), bt, D, M);
  const detail::isa::Kernels& kernels = detail::isa::kernels();
  // E4M3 values are exact in BF16 and their products in FP32: where the CPU has VDPBF16PS the
  // dot products take it (twice the FMA rate), with the same FP32 sums.
  // (Up to 8 query rows the kernel streams the key rows against FP32 queries instead.)
  const bool dp = kernels.fast_dp_bf16 && rows * H > 8;
  // The kernel broadcasts key rows against query rows held in vector lanes: q transposed.
  for (Index k = 0; k < D; ++k) {
    for (Index m = 0; m < mp; ++m)
      ws.qt[static_cast<std::size_t>(k * mp + m)] = m < M ? q(m, k) : 0.0f;
  }
  if (dp) {
    const auto bits = [&](Index m, Index k) -> std::uint16_t {
      return m < M && k < D
                 ? static_cast<std::uint16_t>(detail::bit_cast<std::uint32_t>(q(m, k)) >> 16)
                 : 0;
    };
    for (Index k = 0; k < D; k += 2) {
      for (Index m = 0; m < mp; ++m) {
        ws.qt_pairs[static_cast<std::size_t>(k / 2 * mp + m)] =
            detail::bf16_pair(bits(m, k), bits(m, k + 1));
      }
    }
  }
  using detail::isa::GemmArgs;
  GemmArgs a;
  a.layout = GemmArgs::Layout::kTransposedRows;
  a.format = GemmArgs::Format::kFp8;
  a.w_stride = D;
  a.scale_stride = 1;
  a.block_rows = 1;
  a.block_cols = D;
  a.M = M;
  a.K = D;
  a.x = q.data();
  a.x_stride = q.outerStride();
  a.xt = ws.qt.data();
  a.xt_pairs = ws.qt_pairs.data();
  a.dp = dp;
  a.xt_stride = mp;
  a.y_stride = bt;
  const Index blocks = (longest + bt - 1) / bt;
  const auto task = [&](Index b, int worker) {
    IndexerWorkspace::Worker& wk = ws.worker(worker);
    const Index first = b * bt, n = std::min(bt, longest - first);
    GemmArgs at = a;
    at.w = keys.codes(b);
    at.scales = keys.scales(b);
    at.N = n;
    at.n_begin = 0;
    at.n_end = n;
    at.y = wk.dots.data();
    at.scratch = wk.panel.data();
    kernels.gemm(at);  // dots[m][i] = scale_i <q_m, k8_i>
    float* sum = wk.sum.data();
    for (Index r = 0; r < rows; ++r) {
      const Index m = std::min(n, visible[r] - first);
      if (m <= 0) continue;
      std::fill(sum, sum + m, 0.0f);
      for (Index h = 0; h < H; ++h) {
        const float wh = w(r, h);
        const float* d = wk.dots.data() + (r * H + h) * bt;
        for (Index i = 0; i < m; ++i) sum[i] += std::max(d[i], 0.0f) * wh;
      }
      for (Index i = 0; i < m; ++i) scores(r, first + i) = sum[i];
    }
  };
  mla::parallel_for(executor, blocks, task);
}

/// The positions of the `k` highest of scores[0, n), in ascending order: all n positions when
/// n <= k. Ties: of equal scores the earlier position is taken; NaN counts as lower than every
/// number (and -0 equals +0). Writes min(n, k) positions to `out` and returns that count.
/// `scratch` is grown to n entries (reuse it across calls to allocate nothing).
inline Index select_top_k(const float* scores, Index n, Index k, std::int32_t* out,
                          std::vector<std::uint64_t>& scratch) {
  detail::require(n >= 0 && n <= std::numeric_limits<std::int32_t>::max() && k >= 0,
                  "select_top_k: n must be in [0, 2^31) and k >= 0, got ", n, " and ", k);
  if (n <= k) {
    for (Index s = 0; s < n; ++s) out[s] = static_cast<std::int32_t>(s);
    return n;
  }
  if (k == 0) return 0;
  // One integer key per position, larger is better: the score's bits in an order-preserving
  // map (NaN lowest), then the complement of the position (earlier wins ties).
  detail::grow(scratch, n);
  for (Index s = 0; s < n; ++s) {
    const float v = scores[s] == 0.0f ? 0.0f : scores[s];  // -0 == +0
    const auto bits = detail::bit_cast<std::uint32_t>(v);
    const std::uint32_t order = std::isnan(v)          ? 0u
                                : (bits & 0x80000000u) ? ~bits
                                                       : (bits | 0x80000000u);
    scratch[static_cast<std::size_t>(s)] =
        (std::uint64_t{order} << 32) | (0xffffffffu - static_cast<std::uint32_t>(s));
  }
  const auto first = scratch.begin(), last = scratch.begin() + n;
  std::nth_element(first, first + (k - 1), last, std::greater<std::uint64_t>());
  for (Index i = 0; i < k; ++i) {
    out[i] = static_cast<std::int32_t>(
        0xffffffffu - static_cast<std::uint32_t>(scratch[static_cast<std::size_t>(i)]));
  }
  std::sort(out, out + k);
  return k;
}

/// The positions each query row of one layer call attended to, for the layers that reuse
/// them (GLM-5.1's IndexShare: a layer with MlaConfig::index_shared attends over the selection
/// of the previous layer that has an indexer). MlaLayer writes it in its workspace
/// (MlaWorkspace::topk_selection) on every call of a layer with an indexer and reads it in a
/// shared layer; an engine that runs the layers on other workspaces passes it on by copying.
///
/// Row r is row r of the call's input (all entries of a batch, in order). A row that saw at
/// most topk keys attends to all of them and stores no positions; the others store
/// count(r) == topk positions in the sequence's cache, ascending.
struct TopkSelection {
  Index topk = 0;                       ///< the layer's index_topk
  std::vector<Index> visible;           ///< [rows] keys row r saw (its past and itself)
  std::vector<std::int32_t> positions;  ///< [rows * topk]: row r's from r * topk

  Index rows() const { return static_cast<Index>(visible.size()); }
  /// True when row r attends over a selection (it saw more than topk keys).
  bool sparse(Index r) const { return visible[static_cast<std::size_t>(r)] > topk; }
  const std::int32_t* row(Index r) const { return positions.data() + r * topk; }
  std::int32_t* row(Index r) { return positions.data() + r * topk; }
};

/// Scratch of sparse_attention_absorbed: the valid positions and the dense kernels'
/// workspaces. Grows to the largest selection seen, then allocates nothing.
template <class T>
class SparseWorkspace {
 public:
  DecodeWorkspace decode;              ///< float: decode_absorbed over the selection
  AttentionWorkspace<T> attention;     ///< other T: attention_absorbed
  std::vector<std::int32_t> selected;  ///< (internal) the valid positions, in order
};

/// Absorbed attention of one query token over the cached positions `selected[0, count)` of
/// `cache` (any order; -1 marks an unused slot and is skipped, as engines mark them):
/// o~_h = sum over s in S of softmax_s(scale (<q~_h, c_s> + <q^pe_h, k^R_s>)) c_s. q_latent
/// [H, d_c + R], out_latent [H, d_c], lse [1, H] as for decode_absorbed. The selected records
/// are attended where they are by the dense kernel (LatentView::select), so the result equals
/// dense attention over those positions, with the same precision contract (options.precision,
/// float; other T use attention_absorbed). Throws mla::Error for a position outside
/// [0, cache.tokens()), no valid position, or shapes that do not match; nothing is written then.
template <class T>
void sparse_attention_absorbed(const MlaConfig& c, const LatentView& cache,
                               const std::int32_t* selected, Index count,
                               ConstMatrixRef<detail::identity_t<T>> q_latent, double scale,
                               MatrixRef<detail::identity_t<T>> out_latent,
                               MatrixRef<detail::identity_t<T>> lse, SparseWorkspace<T>& ws,
                               Executor* executor = nullptr, const DecodeOptions& options = {}) {
  detail::require(q_latent.rows() == c.num_attention_heads,
                  "sparse_attention_absorbed: q_latent has ", q_latent.rows(),
                  " rows, expected one query token's ", c.num_attention_heads, " heads");
  detail::require(count >= 0 && (count == 0 || selected != nullptr),
                  "sparse_attention_absorbed: ", count, " positions at ",
                  static_cast<const void*>(selected));
  ws.selected.clear();
  for (Index i = 0; i < count; ++i) {
    const std::int32_t s = selected[i];
    detail::require(s == -1 || (s >= 0 && s < cache.tokens()),
                    "sparse_attention_absorbed: ", "selected position ", s, " (entry ", i,
                    ") is outside the cache's [0, ", cache.tokens(), ") tokens");
    if (s >= 0) ws.selected.push_back(s);
  }
  const auto valid = static_cast<Index>(ws.selected.size());
  detail::require(valid > 0, "sparse_attention_absorbed: no valid position among ", count,
                  " entries");
  // The selected records are read where they are (no copy).
  const LatentView selection = cache.select(ws.selected.data(), valid);
  if constexpr (std::is_same_v<T, float>) {
    decode_absorbed(c, selection, q_latent, scale, out_latent, lse, ws.decode, executor, options);
  } else {
    attention_absorbed<T>(c, selection, q_latent, scale, out_latent, lse, ws.attention);
  }
}

}  // namespace mla
