#pragma once
/// \file
/// The fast absorbed decode kernel: attention of one new token's H absorbed queries over the
/// latent cache, in FP32, on SIMD registers and several threads.
///
/// Scores and outputs are two small matrix products per tile of keys,
///   S[j, h] = <K_j, Q_h>          K_j = [c_j ; k^R_j] (d_c + R),  Q_h = sigma [q~_h ; q^pe_h]
///   O[h, d] += sum_j P[j, h] C[j, d]                              C_j = c_j (d_c)
/// on register blocks that read every key tile once for all heads. Scores are vectorised over
/// heads (a key value broadcast against vectors of heads) when a group has several head
/// vectors, and along the key width (one transposing reduction per key) when it has one, as
/// DeepSeek-V2-Lite's 16 heads do; outputs are vectorised along the latent, the softmax weights
/// broadcast. Softmax is online per tile in FP32; the key range is split into parts (and the
/// heads into groups) that threads work on independently and that are merged exactly by their
/// log-sum-exp. BF16 and FP8 caches are converted tile by tile into a small FP32 buffer that
/// stays in cache; FP32 caches are read in place.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "mla/config.hpp"
#include "mla/detail/simd.hpp"
#include "mla/error.hpp"
#include "mla/latent_cache.hpp"
#include "mla/matrix.hpp"
#include "mla/thread_pool.hpp"

namespace mla {

/// How decode_absorbed divides its work.
struct DecodeOptions {
  /// Parts the key range is split into (each merged by log-sum-exp); 0 means one per thread of
  /// the pool. More parts than threads balance uneven progress; each costs d_c x H floats.
  Index splits = 0;
  /// Groups the heads are split into (each reads the cache on its own). 1 reads every key tile
  /// once for all heads, which is what makes the kernel fast; more groups give threads work
  /// when the context is too short to split.
  Index head_groups = 1;
  /// Keys per tile, a multiple of 16 (the softmax and the FP8/BF16 conversion work per tile).
  Index tile_tokens = 64;
};

namespace detail::decode {

/// Rows score_row prefetches ahead of the one it scores: one stream at a time outruns the
/// hardware prefetcher on a cache in DRAM (measured: 2 to 16 ahead alike, 1.6x over none).
inline constexpr Index kAhead = 3;

/// How the heads and keys of one call are laid out and divided.
struct Geometry {
  Index h_pad = 0;    // heads rounded up to the SIMD width (padding heads have zero queries)
  Index h_group = 0;  // heads per group, a multiple of the width
  Index groups = 0;   // head groups
  Index splits = 0;   // key-range parts

  Geometry(Index heads, const DecodeOptions& o, int threads, int width) {
    h_pad = (heads + width - 1) / width * width;
    const Index want = std::max<Index>(1, std::min(o.head_groups, h_pad / width));
    h_group = ((h_pad + want - 1) / want + width - 1) / width * width;
    groups = (h_pad + h_group - 1) / h_group;
    splits = o.splits > 0 ? o.splits : threads;
  }
};
}  // namespace detail::decode

class DecodeWorkspace;
class LatentView;

template <class Isa = simd::Native>
void decode_absorbed(const MlaConfig& c, const LatentView& cache, ConstMatrixRef<float> q_latent,
                     double scale, MatrixRef<float> out_latent, MatrixRef<float> lse,
                     DecodeWorkspace& ws, ThreadPool* pool = nullptr,
                     const DecodeOptions& options = {}, Index keys = -1);

/// Scratch memory of decode_absorbed, sized on first use for a config, options and thread
/// count, and reused: later calls that fit allocate nothing. One workspace serves one call at
/// a time.
class DecodeWorkspace {
 public:
  /// Makes room for decode_absorbed with these dimensions on a pool of `threads` threads, for
  /// SIMD width `width` (Isa::kWidth).
  void reserve(const MlaConfig& c, const DecodeOptions& o, int threads, int width) {
    const Index D = c.kv_lora_rank, K = c.latent_cache_width();
    const detail::decode::Geometry g(c.num_attention_heads, o, threads, width);
    const Index h_group = g.h_group, parts = g.splits * g.groups;
    grow(q, (K + width - 1) / width * width * g.h_pad);
    grow(partial_o, parts * D * h_group);
    grow(partial_m, parts * h_group);
    grow(partial_l, parts * h_group);
    if (static_cast<Index>(per_thread.size()) < threads) {
      per_thread.resize(static_cast<std::size_t>(threads));
    }
    for (auto& t : per_thread) {
      grow(t.scores, o.tile_tokens * h_group);
      grow(t.correction, h_group);
      grow(t.new_max, h_group);
      grow(t.tile, o.tile_tokens * K);
      grow(t.scratch, D);
      if (static_cast<Index>(t.rows.size()) < o.tile_tokens + detail::decode::kAhead) {
        t.rows.resize(static_cast<std::size_t>(o.tile_tokens + detail::decode::kAhead));
      }
    }
  }

 private:
  template <class Isa>
  friend void decode_absorbed(const MlaConfig&, const LatentView&, ConstMatrixRef<float>, double,
                              MatrixRef<float>, MatrixRef<float>, DecodeWorkspace&, ThreadPool*,
                              const DecodeOptions&, Index);

  struct PerThread {
    Eigen::VectorXf scores;      // [tile][h_group]: scores, then softmax weights
    Eigen::VectorXf correction;  // [h_group]
    Eigen::VectorXf new_max;     // [h_group]
    Eigen::VectorXf tile;        // [tile][d_c + R], converted keys (BF16 / FP8 caches)
    Eigen::VectorXf scratch;     // [d_c], for record conversion
    std::vector<const float*> rows;
  };

  static void grow(Eigen::VectorXf& v, Index n) {
    if (v.size() < n) v.resize(n);
  }

  // sigma * queries, padded with zero heads, in the order the score kernel reads them.
  Eigen::VectorXf q;
  Eigen::VectorXf partial_o;  // per (split, group): [h_group][d_c], unnormalised
  Eigen::VectorXf partial_m;  // per (split, group): [h_group], running max
  Eigen::VectorXf partial_l;  // per (split, group): [h_group], running sum
  std::vector<PerThread> per_thread;
};

namespace detail::decode {

/// S[r][h] (+)= sum_{k0 <= k < k1} rows[r][k] * qt[k][h] for MR key rows and NR head vectors:
/// starts from 0 on the first chunk of k (k0 == 0), adds to S on later ones. qt and s point at
/// the first head of the block; qt_stride and s_stride are their row lengths. Vectorised over
/// heads: a key value broadcast once serves NR vectors of heads.
template <class Isa, int MR, int NR>
inline void score_block(const float* const* rows, Index k0, Index k1, const float* qt,
                        Index qt_stride, float* s, Index s_stride) {
  using V = typename Isa::V;
  constexpr int W = Isa::kWidth;
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v)
      acc[r][v] = k0 == 0 ? Isa::zero() : Isa::load(s + r * s_stride + v * W);
  const float* row[MR];
  for (int r = 0; r < MR; ++r) row[r] = rows[r];
  for (Index k = k0; k < k1; ++k) {
    const float* q = qt + k * qt_stride;
    V b[NR];
    for (int v = 0; v < NR; ++v) b[v] = Isa::load(q + v * W);
    for (int r = 0; r < MR; ++r) {
      const V a = Isa::set1(row[r][k]);
      for (int v = 0; v < NR; ++v) acc[r][v] = Isa::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) Isa::store(s + r * s_stride + v * W, acc[r][v]);
}

/// Register blocks of score_block: MR x NR accumulators, half the vector registers (16 of
/// AVX-512's 32, 8 of AVX2's 16), with NR at most 2 head vectors: measured fastest for 128
/// heads, as two head vectors leave room for 8 key rows per block.
template <class Isa, int NR>
inline constexpr int kRows = (Isa::kWidth == 16 ? 16 : 8) / NR;

/// Scores of n key rows against the head vectors [h, h + NR) of a group; returns h + NR.
template <class Isa, int NR>
inline Index score_heads(const float* const* rows, Index n, Index width, const float* qt,
                         Index qt_stride, float* s, Index s_stride, Index h) {
  constexpr int W = Isa::kWidth, MR = kRows<Isa, NR>;
  // Chunks of the key width whose slice of Q^T (KC x NR vectors, 24 KiB) stays in L1 while
  // every row group of the tile uses it.
  constexpr Index KC = 24576 / (NR * W * static_cast<Index>(sizeof(float)));
  for (Index k0 = 0; k0 < width; k0 += KC) {
    const Index k1 = std::min(width, k0 + KC);
    Index r = 0;
    for (; r + MR <= n; r += MR) {
      score_block<Isa, MR, NR>(rows + r, k0, k1, qt + h * W, qt_stride, s + r * s_stride + h * W,
                               s_stride);
    }
    for (; r < n; ++r) {
      score_block<Isa, 1, NR>(rows + r, k0, k1, qt + h * W, qt_stride, s + r * s_stride + h * W,
                              s_stride);
    }
  }
  return h + NR;
}

/// s[v] = sum_k row[k] q_v[k] for the W heads of one vector: vectorised along the key width,
/// for groups of a single head vector (16 heads on AVX-512), where broadcasting key values
/// would cost a load for every multiply. The W partial sums are added across their lanes by
/// one transposing reduction per key. q holds the heads interleaved by vectors of the width,
/// [ceil(width / W)][W heads][W], so that one pointer reaches all of them (with a runtime
/// stride between heads the address arithmetic costs half the speed). `ahead` is a row to
/// prefetch.
template <class Isa>
inline void score_row(const float* row, Index width, const float* q, float* s, const float* ahead) {
  using V = typename Isa::V;
  constexpr int W = Isa::kWidth;
  V acc[W];
  for (int v = 0; v < W; ++v) acc[v] = Isa::zero();
  Index k = 0;
  for (; k + W <= width; k += W, q += W * W) {
    __builtin_prefetch(ahead + k);
    const V a = Isa::load(row + k);
    for (int v = 0; v < W; ++v) acc[v] = Isa::fmadd(a, Isa::load(q + v * W), acc[v]);
  }
  Isa::store(s, Isa::transpose_sum(acc));
  for (Index i = 0; k + i < width; ++i) {
    for (int v = 0; v < W; ++v) s[v] += row[k + i] * q[v * W + i];
  }
}

#if defined(__AVX512F__)
/// score_row for one BF16 or FP8 record, widened in registers as it is scored (16 heads, AVX-512):
/// the widened [c ; k^R] is also stored at `row` for the output pass, so the record is read
/// once and no separate conversion pass runs. Needs d_c and R multiples of 16 (checked by the
/// caller) and, for FP8, tile scales with |scale| <= 2^100 (the FP16 route's range); returns
/// false, having done nothing, when a scale is outside it. `ahead` is a record to prefetch.
inline bool score_record_avx512(const detail::LatentLayout& l, const unsigned char* rec,
                                const float* q, float* s, float* row, const unsigned char* ahead) {
  constexpr int W = 16;
  const Index D = l.kv_lora_rank, R = l.rope_dim;
  const bool fp8 = l.storage == CacheStorage::kFp8E4M3;
  float scales[64];  // d_c <= 8192 (checked by the cache)
  if (fp8) {
    const Index tiles = detail::LatentLayout::fp8_tiles(D);
    std::memcpy(scales, rec + l.scales_offset, sizeof(float) * static_cast<std::size_t>(tiles));
    for (Index t = 0; t < tiles; ++t) {
      if (!fp16_route_covers(scales[t])) return false;
      scales[t] *= 256.0f;  // the FP16 route yields value / 2^8
    }
  }
  for (std::size_t b = 0; b < l.token_bytes; b += 64) __builtin_prefetch(ahead + b);
  __m512 acc[W];
  for (int v = 0; v < W; ++v) acc[v] = _mm512_setzero_ps();
  const auto bf16 = [](const unsigned char* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  };
  const auto step = [&](__m512 a, Index k) {
    _mm512_storeu_ps(row + k, a);
    for (int v = 0; v < W; ++v) acc[v] = _mm512_fmadd_ps(a, _mm512_loadu_ps(q + v * W), acc[v]);
    q += W * W;
  };
  Index k = 0;
  if (fp8) {
    for (; k < D; k += W) {
      const __m512 mul = _mm512_set1_ps(scales[k / detail::LatentLayout::kFp8Tile]);
#if defined(__AVX512BW__)
      if (k + 2 * W <= D) {  // 32 codes share a scale tile (128 values)
        __m512 lo, hi;
        widen32_e4m3_avx512(rec + k, mul, lo, hi);
        step(lo, k);
        step(hi, k += W);
        continue;
      }
#endif
      step(widen16_e4m3_avx512(rec + k, mul), k);
    }
  } else {
    for (; k < D; k += W) step(bf16(rec + 2 * static_cast<std::size_t>(k)), k);
  }
  for (; k < D + R; k += W) step(bf16(rec + l.kpe_offset + 2 * static_cast<std::size_t>(k - D)), k);
  _mm512_storeu_ps(s, simd::Avx512::transpose_sum(acc));
  return true;
}
#endif

/// O[h][d0 + i] = corr[h] O[h][d0 + i] + sum_j p[j][h] rows[j][d0 + i] for MR heads and the
/// NR vectors of latent dimensions from d0: vectorised along the latent, so each key row is
/// read as vectors and its softmax weights are broadcast. p, o and corr point at the first
/// head of the block; o's rows (heads) are o_stride apart.
template <class Isa, int MR, int NR>
inline void output_block(const float* const* rows, Index n, Index d0, const float* p,
                         Index p_stride, float* o, Index o_stride, const float* corr) {
  using V = typename Isa::V;
  constexpr int W = Isa::kWidth;
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
    const V c = Isa::set1(corr[r]);
    for (int v = 0; v < NR; ++v) acc[r][v] = Isa::mul(Isa::load(o + r * o_stride + d0 + v * W), c);
  }
  for (Index j = 0; j < n; ++j) {
    const float* cj = rows[j] + d0;
    V b[NR];
    for (int v = 0; v < NR; ++v) b[v] = Isa::load(cj + v * W);
    const float* pj = p + j * p_stride;
    for (int r = 0; r < MR; ++r) {
      const V a = Isa::set1(pj[r]);
      for (int v = 0; v < NR; ++v) acc[r][v] = Isa::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) Isa::store(o + r * o_stride + d0 + v * W, acc[r][v]);
}

/// Heads per output block: 8 x 2 vectors (16 accumulators) on AVX-512, measured fastest for 16
/// and 128 heads; 4 x 2 on the narrower sets. Divides the SIMD width, so every group's width.
template <class Isa>
inline constexpr int kOutputHeads = Isa::kWidth == 16 ? 8 : 4;

/// O [hw][D] (rows o_stride apart) = corr O + P^T C for the heads [0, hw) of a group, hw a
/// multiple of the SIMD width.
template <class Isa>
inline void output_heads(const float* const* rows, Index n, Index D, const float* p, Index p_stride,
                         float* o, Index o_stride, const float* corr, Index hw) {
  constexpr int W = Isa::kWidth, MR = kOutputHeads<Isa>;
  for (Index h = 0; h < hw; h += MR) {
    const float* ph = p + h;
    const float* ch = corr + h;
    float* oh = o + h * o_stride;
    Index d = 0;
    for (; d + 2 * W <= D; d += 2 * W)
      output_block<Isa, MR, 2>(rows, n, d, ph, p_stride, oh, o_stride, ch);
    for (; d + W <= D; d += W) output_block<Isa, MR, 1>(rows, n, d, ph, p_stride, oh, o_stride, ch);
    for (; d < D; ++d) {  // latent widths that are not a multiple of the SIMD width
      for (int r = 0; r < MR; ++r) {
        float acc = oh[r * o_stride + d] * ch[r];
        for (Index j = 0; j < n; ++j) acc += rows[j][d] * ph[j * p_stride + r];
        oh[r * o_stride + d] = acc;
      }
    }
  }
}

}  // namespace detail::decode

/// Absorbed attention of one query token over the first `keys` tokens of `cache` (all of them
/// when keys < 0), the decode step's attention. FP32 throughout; the cache may be FP32 (read in
/// place), BF16 or FP8 (converted tile by tile), or FP64 (rounded to float).
///
/// - q_latent: [H, d_c + R], row h = [q~_h ; q^pe_h] with q~_h = W_UK^(h)^T q_h^nope and RoPE
///   applied to q^pe_h (as for attention_absorbed);
/// - out_latent: [H, d_c], o~_h = sum_j p_hj c_j;
/// - lse: [1, H], log sum_j exp(scale * (<q~_h, c_j> + <q^pe_h, k^R_j>)).
///
/// Runs on `pool` when given (its threads take the (split, head group) parts), otherwise on the
/// calling thread. After the first call with given dimensions, options and pool size it
/// allocates nothing. Throws mla::Error for shapes that do not match.
template <class Isa>
void decode_absorbed(const MlaConfig& c, const LatentView& cache, ConstMatrixRef<float> q_latent,
                     double scale, MatrixRef<float> out_latent, MatrixRef<float> lse,
                     DecodeWorkspace& ws, ThreadPool* pool, const DecodeOptions& options,
                     Index keys) {
  namespace dd = detail::decode;
  constexpr int W = Isa::kWidth;
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim, K = D + R;
  if (keys < 0) keys = cache.tokens();
  detail::require(cache.kv_lora_rank() == D && cache.rope_dim() == R,
                  "decode_absorbed: the cache holds [", cache.kv_lora_rank(), " + ",
                  cache.rope_dim(), "] per token, the config [", D, " + ", R, "]");
  detail::require(keys >= 1 && keys <= cache.tokens(), "decode_absorbed: ", keys,
                  " keys requested, the cache holds ", cache.tokens(), " tokens");
  detail::require(q_latent.rows() == H && q_latent.cols() == K && out_latent.rows() == H &&
                      out_latent.cols() == D && lse.rows() == 1 && lse.cols() == H,
                  "decode_absorbed: q_latent [", q_latent.rows(), ", ", q_latent.cols(),
                  "], out_latent [", out_latent.rows(), ", ", out_latent.cols(), "], lse [",
                  lse.rows(), ", ", lse.cols(), "]; expected [", H, ", ", K, "], [", H, ", ", D,
                  "], [1, ", H, "]");
  detail::require(options.tile_tokens >= 16 && options.tile_tokens % 16 == 0 &&
                      options.tile_tokens <= 4096 && options.splits >= 0 &&
                      options.splits <= 4096 && options.head_groups >= 1,
                  "decode_absorbed: options need tile_tokens a multiple of 16 in [16, 4096], "
                  "splits in [0, 4096] and head_groups >= 1; got ",
                  options.tile_tokens, ", ", options.splits, ", ", options.head_groups);
  const int threads = pool ? pool->size() : 1;
  ws.reserve(c, options, threads, W);

  const dd::Geometry geo(H, options, threads, W);
  const Index h_pad = geo.h_pad, h_group = geo.h_group, groups = geo.groups, splits = geo.splits;
  const Index tile = options.tile_tokens;
  // Split boundaries on whole tiles.
  const Index split_len = (keys + splits - 1) / splits;
  const Index split_keys = (split_len + tile - 1) / tile * tile;

  // Groups of one head vector take their scores along the key width (score_row) from Q in
  // [group][ceil(K / W)][W heads][W] order; wider groups broadcast key values against Q^T
  // [K][h_pad] (score_heads). Both scaled by sigma, padding heads zero.
  const bool by_row = h_group == W;
  const Index k_pad = (K + W - 1) / W * W;
  float* qs = ws.q.data();
  const auto sigma = static_cast<float>(scale);
  for (Index k = 0; k < K; ++k) {
    for (Index h = 0; h < h_pad; ++h) {
      const float x = h < H ? sigma * q_latent(h, k) : 0.0f;
      qs[by_row ? (h / W * k_pad + k / W * W + h % W) * W + k % W : k * h_pad + h] = x;
    }
  }

  const bool in_place = cache.holds<float>();
  // 16-head groups over BF16 and FP8 caches widen records inside the score kernel.
  bool widen_in_score = false;
#if defined(__AVX512F__)
  widen_in_score =
      std::is_same_v<Isa, simd::Avx512> && by_row && D % W == 0 && R % W == 0 &&
      (cache.storage() == CacheStorage::kBFloat16 || cache.storage() == CacheStorage::kFp8E4M3);
#endif
  auto part = [&](Index item, int thread) {
    const Index s = item / groups, g = item % groups;
    const Index h0 = g * h_group;
    const Index hw = std::min(h_group, h_pad - h0);  // this group's width, a multiple of W
    auto& t = ws.per_thread[static_cast<std::size_t>(thread)];
    float* o = ws.partial_o.data() + item * D * h_group;
    float* m = ws.partial_m.data() + item * h_group;
    float* l = ws.partial_l.data() + item * h_group;
    std::fill(o, o + D * h_group, 0.0f);
    std::fill(m, m + h_group, -std::numeric_limits<float>::infinity());
    std::fill(l, l + h_group, 0.0f);
    const Index first = s * split_keys, last = std::min(keys, first + split_keys);
    float* sc = t.scores.data();
    float* corr = t.correction.data();
    float* m_new = t.new_max.data();
    const float** rows = t.rows.data();
    for (Index j0 = first; j0 < last; j0 += tile) {
      const Index n = std::min(tile, last - j0);
      // Rows in place also name the next tile's first few, for score_row to prefetch.
      const Index named = in_place ? std::min(n + dd::kAhead, last - j0) : n;
      if (in_place) {
        for (Index j = 0; j < named; ++j)
          rows[j] = reinterpret_cast<const float*>(cache.record(j0 + j));
      } else {
        for (Index j = 0; j < n; ++j) rows[j] = t.tile.data() + j * K;
      }
      // Scores of the tile for this group's heads: [n][hw], row stride h_group. Records that
      // are not read in place are widened into the tile as they are scored (widen_in_score),
      // or else before.
      if (widen_in_score) {
#if defined(__AVX512F__)
        for (Index j = 0; j < n; ++j) {
          float* row = t.tile.data() + j * K;
          const unsigned char* ahead = cache.record(std::min(j0 + j + dd::kAhead, last - 1));
          if (!dd::score_record_avx512(cache.layout(), cache.record(j0 + j), qs + h0 * k_pad,
                                       sc + j * W, row, ahead)) {
            cache.decode(j0 + j, row, t.scratch.data());
            dd::score_row<Isa>(row, K, qs + h0 * k_pad, sc + j * W, row);
          }
        }
#endif
      } else {
        if (!in_place) {
          for (Index j = 0; j < n; ++j) {
            cache.decode(j0 + j, t.tile.data() + j * K, t.scratch.data());
          }
        }
        if (by_row) {
          for (Index j = 0; j < n; ++j) {
            dd::score_row<Isa>(rows[j], K, qs + h0 * k_pad, sc + j * W,
                               rows[std::min(j + dd::kAhead, named - 1)]);
          }
        } else {
          const float* q = qs + h0;
          for (Index h = 0, hv = hw / W; h < hv;) {
            if (hv - h >= 2) {
              h = dd::score_heads<Isa, 2>(rows, n, K, q, h_pad, sc, h_group, h);
            } else {
              h = dd::score_heads<Isa, 1>(rows, n, K, q, h_pad, sc, h_group, h);
            }
          }
        }
      }
      // Online softmax per head (columns), vectorised over heads.
      for (Index h = 0; h < hw; ++h) m_new[h] = m[h];
      for (Index j = 0; j < n; ++j) {
        const float* sj = sc + j * h_group;
        for (Index h = 0; h < hw; ++h) m_new[h] = std::max(m_new[h], sj[h]);
      }
      Eigen::Map<Eigen::ArrayXf> mn(m_new, hw), cr(corr, hw), mm(m, hw), ll(l, hw);
      cr = (mm - mn).exp();  // exp(-inf) = 0 on the first tile
      ll *= cr;
      for (Index j = 0; j < n; ++j) {
        Eigen::Map<Eigen::ArrayXf> pj(sc + j * h_group, hw);
        pj = (pj - mn).exp();
        ll += pj;
      }
      mm = mn;
      // O [hw][D] = corr O + P^T C.
      dd::output_heads<Isa>(rows, n, D, sc, h_group, o, D, corr, hw);
    }
  };
  const Index items = splits * groups;
  if (pool) {
    pool->run(items, part);
  } else {
    for (Index i = 0; i < items; ++i) part(i, 0);
  }

  // Exact merge of the splits: weights exp(m_s - M) / L, L = sum_s l_s exp(m_s - M).
  for (Index g = 0; g < groups; ++g) {
    const Index h0 = g * h_group;
    for (Index hl = 0; hl < h_group && h0 + hl < H; ++hl) {
      float mx = -std::numeric_limits<float>::infinity();
      for (Index s = 0; s < splits; ++s)
        mx = std::max(mx, ws.partial_m[(s * groups + g) * h_group + hl]);
      double sum = 0;
      for (Index s = 0; s < splits; ++s) {
        const Index i = (s * groups + g) * h_group + hl;
        const float w = std::exp(ws.partial_m[i] - mx);
        ws.partial_m[i] = w;  // reused below as the split's weight
        sum += static_cast<double>(w) * ws.partial_l[i];
      }
      const auto inv = static_cast<float>(1.0 / sum);
      for (Index s = 0; s < splits; ++s) ws.partial_m[(s * groups + g) * h_group + hl] *= inv;
      lse(0, h0 + hl) = mx + static_cast<float>(std::log(sum));
    }
  }
  // Each head's output row: the splits' rows, weighted.
  auto merge = [&](Index h, int) {
    const Index g = h / h_group, hl = h % h_group;
    Eigen::Map<Eigen::VectorXf> out(out_latent.row(h).data(), D);
    out.setZero();
    for (Index s = 0; s < splits; ++s) {
      const Index i = s * groups + g;
      out += ws.partial_m[i * h_group + hl] *
             Eigen::Map<const Eigen::VectorXf>(ws.partial_o.data() + (i * h_group + hl) * D, D);
    }
  };
  if (pool) {
    pool->run(H, merge);
  } else {
    for (Index h = 0; h < H; ++h) merge(h, 0);
  }
}

}  // namespace mla
