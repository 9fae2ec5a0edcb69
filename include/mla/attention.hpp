#pragma once
/// \file
/// MLA attention over the latent cache, two ways that compute the same thing:
///
/// - expanded: rebuild per-head keys k_h = [W_UK^(h) c ; k^R] and values v_h = W_UV^(h) c from
///   the cached latent, then ordinary causal multi-head attention (cheap for prefill);
/// - absorbed: attend with the absorbed query q~_h = W_UK^(h)^T q_h^nope directly over the
///   cached [c ; k^R] (MQA with head width d_c + R), producing o~_h = sum_j p_hj c_j; the
///   caller applies W_UV^(h) (the decode path).
///
/// Both read the cache tile by tile, use a numerically stable softmax in the compute type with
/// a running maximum, and return the log-sum-exp of every (token, head) so that partial
/// results over different key ranges can be merged exactly.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "mla/config.hpp"
#include "mla/detail/isa/dispatch.hpp"
#include "mla/error.hpp"
#include "mla/executor.hpp"
#include "mla/latent_cache.hpp"
#include "mla/matrix.hpp"
#include "mla/precision.hpp"
#include "mla/projection.hpp"
#include "mla/run_options.hpp"

namespace mla {

/// The path AttentionPath::kAuto takes for `tokens` new tokens after `past` cached ones:
/// absorbed for a single token; otherwise the one with fewer multiply-adds. Rebuilding K and V
/// costs H (P + V) d_c per cached token, absorbed attention H (2 d_c + R) per (query, key)
/// pair, so a fresh prefill is expanded and a short chunk after a long history absorbed.
inline AttentionPath auto_attention_path(const MlaConfig& c, Index tokens, Index past) {
  if (tokens <= 1) return AttentionPath::kAbsorbed;
  const auto H = static_cast<double>(c.num_attention_heads);
  const auto P = static_cast<double>(c.qk_nope_head_dim);
  const auto R = static_cast<double>(c.qk_rope_head_dim);
  const auto V = static_cast<double>(c.v_head_dim);
  const auto D = static_cast<double>(c.kv_lora_rank);
  const auto t = static_cast<double>(tokens);
  const auto n = static_cast<double>(past + tokens);
  // Expanded: rebuild every cached token's keys and values, then attend with P + R and V.
  const double expanded = n * H * (P + V) * D + t * n * H * (P + R + V);
  // Absorbed: absorb W_UK into the queries and W_UV into the outputs, attend with 2 d_c + R.
  const double absorbed = t * H * (P + V) * D + t * n * H * (2 * D + R);
  return absorbed < expanded ? AttentionPath::kAbsorbed : AttentionPath::kExpanded;
}

/// Scratch memory of the attention kernels, sized once for a chunk length and reused; a
/// kernel call with a chunk that fits allocates nothing.
template <class T>
struct AttentionWorkspace {
  /// Keys read from the cache per tile.
  static constexpr Index kTileTokens = 64;
  /// Keys per block of the float expanded kernel: tiles gathered across cache blocks, so that
  /// each query row's output is rescaled and rewritten once per 256 keys.
  static constexpr Index kKeyBlock = 256;

  RowMatrix<T> c_tile;     ///< [kTileTokens, d_c]
  RowMatrix<T> kpe_tile;   ///< [kTileTokens, R]
  RowMatrix<T> kv_tile;    ///< [kTileTokens (float: kKeyBlock), H * (P + V)], expanded only
  RowMatrix<T> c_block;    ///< [kKeyBlock, d_c], float expanded only: the gathered tiles
  RowMatrix<T> kpe_block;  ///< [kKeyBlock, R]
  RowMatrix<T> scores;     ///< [tokens, kTileTokens]
  Vector<T> running_max;   ///< [tokens * H]
  Vector<T> running_sum;   ///< [tokens * H]
  Vector<T> correction;    ///< [tokens]
  Eigen::VectorXf convert_scratch;  ///< [d_c], for converting FP8 tiles
  /// Per thread of the pool: the expanded kernel's scratch (float only).
  std::vector<detail::AlignedVector<float>> thread_scratch;

  /// Makes room for chunks of up to `tokens` new tokens (grows, never shrinks), for `path`
  /// (kAuto reserves for both).
  void reserve(const MlaConfig& c, Index tokens, AttentionPath path = AttentionPath::kAuto) {
    using detail::grow;
    const Index heads = c.num_attention_heads;
    grow(c_tile, kTileTokens, c.kv_lora_rank);
    grow(kpe_tile, kTileTokens, c.qk_rope_head_dim);
    if (path != AttentionPath::kAbsorbed) {
      const Index keys = std::is_same_v<T, float> ? kKeyBlock : kTileTokens;
      grow(kv_tile, keys, heads * (c.qk_nope_head_dim + c.v_head_dim));
      if constexpr (std::is_same_v<T, float>) {
        grow(c_block, kKeyBlock, c.kv_lora_rank);
        grow(kpe_block, kKeyBlock, c.qk_rope_head_dim);
      }
    }
    grow(scores, std::max<Index>(tokens, 1), kTileTokens);
    grow(running_max, tokens * heads);
    grow(running_sum, tokens * heads);
    grow(correction, tokens);
    grow(convert_scratch, c.kv_lora_rank);
  }

  /// Makes room for the expanded kernel's scratch on `threads` threads (grows, never shrinks).
  void reserve_threads(const MlaConfig& c, int threads) {
    const auto floats = static_cast<std::size_t>(detail::isa::attention_tile_scratch_floats(
        c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim, kKeyBlock));
    if (thread_scratch.size() < static_cast<std::size_t>(threads)) {
      thread_scratch.resize(static_cast<std::size_t>(threads));
    }
    for (auto& s : thread_scratch) {
      if (s.size() < floats) s.resize(floats);
    }
  }
};

namespace detail {

/// One step of the online softmax for a row of n scores (already scaled), the same step the
/// decode kernels take (detail/isa/primitives.inl, for one softmax row): on return s holds
/// exp(s - m_new), (m, l) are the running maximum and sum over everything seen so far, and the
/// result is the factor exp(m_old - m_new) by which the row's accumulator must be scaled.
template <class T>
T online_softmax_step(T* s, Index n, T& m, T& l) {
  T correction;
  isa::portable::online_softmax_step(s, n, 1, 1, &m, &l, &correction);
  return correction;
}

inline void check_attention_shapes(const MlaConfig& c, const LatentView& cache, Index tokens) {
  require(cache.kv_lora_rank() == c.kv_lora_rank && cache.rope_dim() == c.qk_rope_head_dim,
          "attention: the cache holds [", cache.kv_lora_rank(), " + ", cache.rope_dim(),
          "] per token, the config [", c.kv_lora_rank, " + ", c.qk_rope_head_dim, "]");
  require(tokens >= 1 && tokens <= cache.tokens(), "attention: ", tokens,
          " query tokens, but the cache holds ", cache.tokens(),
          " (the queries are the last tokens of the cache)");
}

/// Resets the running maximum and sum of `rows` softmax rows in the workspace.
template <class T>
void begin_softmax(AttentionWorkspace<T>& ws, Index rows) {
  ws.running_max.head(rows).setConstant(-std::numeric_limits<T>::infinity());
  ws.running_sum.head(rows).setZero();
}

/// Calls tile(j0, n, c_tile, kpe_tile) for the cache's keys in tiles of at most kTileTokens
/// that never cross a block: read in place when the cache stores T, converted tile by tile
/// into the workspace otherwise.
template <class T, class F>
void for_each_key_tile(const LatentView& cache, AttentionWorkspace<T>& ws, F&& tile) {
  cache.for_each_tile<T>(AttentionWorkspace<T>::kTileTokens, ws.c_tile, ws.kpe_tile,
                         ws.convert_scratch.data(), tile);
}

/// Divides the accumulator of every (token, head) by its softmax sum and stores the
/// log-sum-exp m + log(l). acc(t, h) returns that row's accumulator (a writable block).
template <class T, class Acc>
void finish_softmax(AttentionWorkspace<T>& ws, Index heads, MatrixRef<T> lse, Acc&& acc) {
  for (Index t = 0; t < lse.rows(); ++t) {
    for (Index h = 0; h < heads; ++h) {
      const T m = ws.running_max(t * heads + h), l = ws.running_sum(t * heads + h);
      acc(t, h) /= l;
      lse(t, h) = m + std::log(l);
    }
  }
}

}  // namespace detail

/// Expanded causal attention. The queries are the last `tokens` tokens of `cache` (they were
/// appended before the call): query t sees cache tokens 0 .. past + t, past = cache.tokens() -
/// tokens.
///
/// - q: [tokens, H * (P + R)], per head [q^nope (P) ; q^pe (R)], RoPE already applied;
/// - wkv_b: [H * (P + V), d_c], per head [W_UK^(h) (P rows) ; W_UV^(h) (V rows)];
/// - out: [tokens, H * V], the per-head outputs o_h;
/// - lse: [tokens, H], log sum_j exp(scale * <q_h, k_hj>);
/// - projection: where the rebuilding of K and V runs (threads, precision, scratch); the heads
///   of the attention run on the same pool;
/// - precision: kFp32, or kBf16 (float only, double computes in double: queries times the scale,
/// keys, values and softmax
///   weights rounded to BF16 once, BF16 dot products with FP32 sums; see README "Prefill").
template <class T>
void attention_expanded(const MlaConfig& c, const LatentView& cache,
                        ConstMatrixRef<detail::identity_t<T>> q, const Linear<T>& wkv_b,
                        double scale, MatrixRef<detail::identity_t<T>> out,
                        MatrixRef<detail::identity_t<T>> lse, AttentionWorkspace<T>& ws,
                        const ProjectionContext& projection = {},
                        Precision precision = Precision::kFp32) {
  const Index H = c.num_attention_heads, P = c.qk_nope_head_dim, R = c.qk_rope_head_dim;
  const Index V = c.v_head_dim, QK = P + R, KV = P + V;
  const Index tokens = q.rows();
  detail::check_attention_shapes(c, cache, tokens);
  detail::require(q.cols() == H * QK && out.rows() == tokens && out.cols() == H * V &&
                      lse.rows() == tokens && lse.cols() == H,
                  "attention_expanded: wrong shapes q [", q.rows(), ", ", q.cols(), "], out [",
                  out.rows(), ", ", out.cols(), "], lse [", lse.rows(), ", ", lse.cols(), "]");
  detail::require(wkv_b.rows() == H * KV && wkv_b.cols() == c.kv_lora_rank,
                  "attention_expanded: wkv_b is [", wkv_b.rows(), ", ", wkv_b.cols(),
                  "], expected [", H * KV, ", ", c.kv_lora_rank, "]");
  ws.reserve(c, tokens, AttentionPath::kExpanded);
  const Index past = cache.tokens() - tokens;
  const T sigma = static_cast<T>(scale);
  detail::begin_softmax(ws, tokens * H);
  auto m = ws.running_max.head(tokens * H);
  auto l = ws.running_sum.head(tokens * H);
  out.setZero();
  if constexpr (std::is_same_v<T, float>) {
    // The per-target kernel, one task per head and block of keys.
    Executor* pool = projection.pool;
    const int threads = mla::concurrency(pool);
    ws.reserve_threads(c, threads);
    const auto& kernels = detail::isa::kernels();
    // Keys [j0, j0 + n), gathered in c_block and kpe_block: rebuild their keys and values,
    // then every head attends to them.
    const auto block = [&](Index j0, Index n) {
      const auto c_tile = ws.c_block.topRows(n);
      const auto kpe = ws.kpe_block.topRows(n);
      auto kv = ws.kv_tile.topRows(n);
      project(wkv_b, c_tile, kv, projection);
      // Queries before the block's first key skip it; query t0 + i sees its first
      // past + t0 + i + 1 - j0 keys.
      const Index t0 = std::max<Index>(0, j0 - past);
      const auto head = [&](Index h, int thread) {
        detail::isa::AttentionTileArgs a;
        a.M = tokens - t0;
        a.P = P;
        a.R = R;
        a.V = V;
        a.q = q.data() + t0 * q.outerStride() + h * QK;
        a.q_stride = q.outerStride();
        a.k = kv.data() + h * KV;
        a.k_stride = kv.outerStride();
        a.kpe = kpe.data();
        a.kpe_stride = kpe.outerStride();
        a.v = kv.data() + h * KV + P;
        a.v_stride = kv.outerStride();
        a.keys = n;
        a.visible0 = past + t0 + 1 - j0;
        a.scale = sigma;
        a.bf16 = precision == Precision::kBf16;
        a.m = m.data() + t0 * H + h;
        a.l = l.data() + t0 * H + h;
        a.ml_stride = H;
        a.o = out.data() + t0 * out.outerStride() + h * V;
        a.o_stride = out.outerStride();
        a.scratch = ws.thread_scratch[static_cast<std::size_t>(thread)].data();
        kernels.attention_tile(a);
      };
      mla::parallel_for(pool, H, head);
    };
    Index j0 = 0, gathered = 0;
    detail::for_each_key_tile(cache, ws, [&](Index first, Index n, auto c_tile, auto kpe) {
      if (gathered + n > AttentionWorkspace<T>::kKeyBlock) {
        block(j0, gathered);
        j0 = first;
        gathered = 0;
      }
      ws.c_block.middleRows(gathered, n) = c_tile;
      ws.kpe_block.middleRows(gathered, n) = kpe;
      gathered += n;
    });
    if (gathered > 0) block(j0, gathered);
    detail::finish_softmax(ws, H, lse, [&](Index t, Index h) { return out.block(t, h * V, 1, V); });
    return;
  }

  detail::for_each_key_tile(cache, ws, [&](Index j0, Index n, auto c_tile, auto kpe) {
    // Rebuild [k^nope ; v] of every head for this tile: [n, H * (P + V)].
    auto kv = ws.kv_tile.topRows(n);
    project(wkv_b, c_tile, kv, projection);
    // Queries t < t0 end before this tile starts (causal), so they skip it. Of the others,
    // the first `partial` see only the first past + t + 1 - j0 keys of the tile (the tile holds
    // their future); the rest see all n keys.
    const Index t0 = std::max<Index>(0, j0 - past);
    const Index rows = tokens - t0;
    const Index partial = std::clamp<Index>(j0 + n - 1 - past - t0, 0, rows);
    auto s = ws.scores.topLeftCorner(rows, n);
    auto corr = ws.correction.head(rows);
    for (Index h = 0; h < H; ++h) {
      const auto k_nope = kv.middleCols(h * KV, P);
      const auto v = kv.middleCols(h * KV + P, V);
      // Scores: <q^nope, W_UK c> + <q^pe, k^R>, the shared rotary key serving every head.
      // Future keys are never multiplied (not even by a zero weight: 0 x NaN is NaN), so a
      // non-finite token cannot reach the answers before it.
      const auto score = [&](Index i0, Index ni, Index keys) {
        auto si = s.block(i0, 0, ni, keys);
        si.setZero();
        if (P > 0)
          si.noalias() += q.block(t0 + i0, h * QK, ni, P) * k_nope.topRows(keys).transpose();
        if (R > 0)
          si.noalias() += q.block(t0 + i0, h * QK + P, ni, R) * kpe.topRows(keys).transpose();
        si *= sigma;
      };
      for (Index i = 0; i < partial; ++i) score(i, 1, past + t0 + i + 1 - j0);
      if (partial < rows) score(partial, rows - partial, n);
      for (Index i = 0; i < rows; ++i) {
        const Index t = t0 + i;
        const Index visible = std::min(n, past + t + 1 - j0);  // >= 1 since t >= t0
        corr(i) = detail::online_softmax_step(s.row(i).data(), visible, m(t * H + h), l(t * H + h));
      }
      auto o = out.block(t0, h * V, rows, V);
      o = corr.asDiagonal() * o;
      for (Index i = 0; i < partial; ++i) {
        const Index visible = past + t0 + i + 1 - j0;
        o.row(i).noalias() += s.row(i).head(visible) * v.topRows(visible);
      }
      if (partial < rows) {
        o.bottomRows(rows - partial).noalias() += s.bottomRows(rows - partial) * v;
      }
    }
  });
  detail::finish_softmax(ws, H, lse, [&](Index t, Index h) { return out.block(t, h * V, 1, V); });
}

/// Absorbed causal attention over the latent cache (MQA with head width d_c + R). The queries
/// are the last `tokens` tokens of `cache`, as for attention_expanded.
///
/// - q_latent: [tokens * H, d_c + R], row t * H + h = [q~_h (d_c) ; q^pe_h (R)] of token t,
///   with q~_h = W_UK^(h)^T q_h^nope and RoPE applied to q^pe;
/// - out_latent: [tokens * H, d_c], o~_h = sum_j p_hj c_j (apply W_UV^(h) to get o_h);
/// - lse: [tokens, H], log sum_j exp(scale * (<q~_h, c_j> + <q^pe_h, k^R_j>)).
template <class T>
void attention_absorbed(const MlaConfig& c, const LatentView& cache,
                        ConstMatrixRef<detail::identity_t<T>> q_latent, double scale,
                        MatrixRef<detail::identity_t<T>> out_latent,
                        MatrixRef<detail::identity_t<T>> lse, AttentionWorkspace<T>& ws) {
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim;
  detail::require(q_latent.rows() % H == 0 && q_latent.cols() == D + R,
                  "attention_absorbed: q_latent is [", q_latent.rows(), ", ", q_latent.cols(),
                  "], expected [tokens * ", H, ", ", D + R, "]");
  const Index tokens = q_latent.rows() / H;
  detail::check_attention_shapes(c, cache, tokens);
  detail::require(out_latent.rows() == tokens * H && out_latent.cols() == D &&
                      lse.rows() == tokens && lse.cols() == H,
                  "attention_absorbed: out_latent is [", out_latent.rows(), ", ", out_latent.cols(),
                  "] and lse [", lse.rows(), ", ", lse.cols(), "]; expected [", tokens * H, ", ", D,
                  "] and [", tokens, ", ", H, "]");
  ws.reserve(c, tokens, AttentionPath::kAbsorbed);
  const Index past = cache.tokens() - tokens;
  const T sigma = static_cast<T>(scale);
  detail::begin_softmax(ws, tokens * H);
  auto m = ws.running_max.head(tokens * H);
  auto l = ws.running_sum.head(tokens * H);
  out_latent.setZero();

  detail::for_each_key_tile(cache, ws, [&](Index j0, Index n, auto c_tile, auto kpe) {
    for (Index t = std::max<Index>(0, j0 - past); t < tokens; ++t) {
      const Index visible = std::min(n, past + t + 1 - j0);
      for (Index h = 0; h < H; ++h) {
        const Index r = t * H + h;
        // Scores read the cache directly: <q~, c_j> + <q^pe, k^R_j> = <q_h, k_hj>.
        // (Written as column-vector products into s^T so that Eigen evaluates them in place.)
        auto s = ws.scores.row(0).head(visible);
        s.transpose().noalias() = c_tile.topRows(visible) * q_latent.row(r).head(D).transpose();
        if (R > 0) {
          s.transpose().noalias() += kpe.topRows(visible) * q_latent.row(r).tail(R).transpose();
        }
        s *= sigma;
        const T corr = detail::online_softmax_step(s.data(), visible, m(r), l(r));
        // o~ accumulates the latent rows themselves; W_UV is applied once, after the sum.
        out_latent.row(r) *= corr;
        out_latent.row(r).noalias() += s * c_tile.topRows(visible);
      }
    }
  });
  detail::finish_softmax(ws, H, lse, [&](Index t, Index h) { return out_latent.row(t * H + h); });
}

}  // namespace mla
