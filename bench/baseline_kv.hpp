#pragma once
// The baselines MLA is compared with: a plain per-head KV cache (MHA: one KV head per query
// head; GQA: g KV heads shared by groups of query heads; MQA: one) and its decode-step
// attention, written as one would for a CPU: tiles of keys, Eigen products per KV head, online
// softmax, KV heads spread over the thread pool.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "mla/detail/bfloat16.hpp"
#include "mla/detail/isa/dispatch.hpp"
#include "mla/matrix.hpp"
#include "mla/thread_pool.hpp"

namespace bench {

using mla::Index;
using mla::RowMatrix;

/// Values of unit spread in [-1, 1) (xorshift), fast to make in bulk: the caches hold up to
/// billions.
inline void fill_random(float* p, Index n, std::uint32_t seed) {
  std::uint32_t s = seed * 2654435761u + 1u;
  for (Index i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 17;
    s ^= s << 5;
    p[i] = static_cast<float>(s) * 0x1p-31f - 1.0f;
  }
}

/// K and V of `groups` KV heads of width head_dim per token, FP32 or BF16, token-major:
/// [token][K/V][group][head_dim].
class KvCache {
 public:
  KvCache(Index tokens, Index groups, Index head_dim, bool bf16)
      : tokens_(tokens), groups_(groups), head_dim_(head_dim), bf16_(bf16) {
    const auto n = static_cast<std::size_t>(tokens * row());
    if (bf16) {
      b16_.resize(n);
    } else {
      f32_.resize(n);
    }
    // Deterministic values of unit spread, written once.
    if (bf16) {
      std::vector<float> x(n);
      fill_random(x.data(), static_cast<Index>(n), 1);
      for (std::size_t i = 0; i < n; ++i) {
        const Eigen::bfloat16 b = mla::detail::to_bfloat16(x[i]);
        std::memcpy(&b16_[i], &b, sizeof(b));
      }
    } else {
      fill_random(f32_.data(), static_cast<Index>(n), 1);
    }
  }

  /// Bytes per token (one layer): 2 * groups * head_dim elements.
  static std::size_t bytes_per_token(Index groups, Index head_dim, bool bf16) {
    return static_cast<std::size_t>(2 * groups * head_dim) * (bf16 ? 2 : 4);
  }

  Index tokens() const { return tokens_; }
  Index groups() const { return groups_; }
  Index head_dim() const { return head_dim_; }
  bool bf16() const { return bf16_; }
  Index row() const { return 2 * groups_ * head_dim_; }  // elements per token

  /// Keys (kv = 0) or values (kv = 1) of KV head g for tokens [j0, j0 + n) as float rows of
  /// `buf` (BF16 converted), or in place.
  const float* rows(Index j0, Index n, int kv, Index g, float* buf, Index& stride) const {
    const Index offset = j0 * row() + kv * groups_ * head_dim_ + g * head_dim_;
    if (!bf16_) {
      stride = row();
      return f32_.data() + offset;
    }
    for (Index j = 0; j < n; ++j) {
      mla::detail::bfloat16_to_float(
          reinterpret_cast<const unsigned char*>(b16_.data() + offset + j * row()),
          static_cast<std::size_t>(head_dim_), buf + j * head_dim_);
    }
    stride = head_dim_;
    return buf;
  }

 private:
  Index tokens_, groups_, head_dim_;
  bool bf16_;
  std::vector<float> f32_;
  std::vector<std::uint16_t> b16_;
};

/// Scratch of gqa_decode per thread.
struct KvWorkspace {
  static constexpr Index kTile = 64;
  struct PerThread {
    RowMatrix<float> k, v, s;
    Eigen::VectorXf m, l;
  };
  std::vector<PerThread> per_thread;

  void reserve(int threads, Index heads_per_group, Index head_dim) {
    per_thread.resize(static_cast<std::size_t>(threads));
    for (auto& t : per_thread) {
      t.k.resize(kTile, head_dim);
      t.v.resize(kTile, head_dim);
      t.s.resize(heads_per_group, kTile);
      t.m.resize(heads_per_group);
      t.l.resize(heads_per_group);
    }
  }
};

/// One decode step of grouped-query attention: q [H, d] over every cached token; out [H, d].
/// Query heads [g * H/G, (g + 1) * H/G) share KV head g. The KV heads are the pool's tasks.
inline void gqa_decode(const KvCache& cache, const RowMatrix<float>& q, float scale,
                       RowMatrix<float>& out, mla::ThreadPool& pool, KvWorkspace& ws) {
  const Index G = cache.groups(), d = cache.head_dim(), hpg = q.rows() / G;
  const Index tokens = cache.tokens(), tile = KvWorkspace::kTile;
  using Strided = Eigen::Map<const RowMatrix<float>, 0, Eigen::OuterStride<>>;
  pool.run(G, [&](Index g, int thread) {
    auto& t = ws.per_thread[static_cast<std::size_t>(thread)];
    auto qg = q.middleRows(g * hpg, hpg);
    auto o = out.middleRows(g * hpg, hpg);
    o.setZero();
    t.m.setConstant(-std::numeric_limits<float>::infinity());
    t.l.setZero();
    for (Index j0 = 0; j0 < tokens; j0 += tile) {
      const Index n = std::min(tile, tokens - j0);
      Index ks = 0, vs = 0;
      const float* kp = cache.rows(j0, n, 0, g, t.k.data(), ks);
      const float* vp = cache.rows(j0, n, 1, g, t.v.data(), vs);
      const Strided K(kp, n, d, Eigen::OuterStride<>(ks)), V(vp, n, d, Eigen::OuterStride<>(vs));
      auto s = t.s.leftCols(n);
      s.noalias() = scale * (qg * K.transpose());
      for (Index h = 0; h < hpg; ++h) {
        const float m_new = std::max(t.m(h), s.row(h).maxCoeff());
        const float corr = std::exp(t.m(h) - m_new);
        s.row(h) = (s.row(h).array() - m_new).exp().matrix();
        t.l(h) = t.l(h) * corr + s.row(h).sum();
        t.m(h) = m_new;
        o.row(h) *= corr;
      }
      o.noalias() += s * V;
    }
    for (Index h = 0; h < hpg; ++h) o.row(h) /= t.l(h);
  });
}

}  // namespace bench
