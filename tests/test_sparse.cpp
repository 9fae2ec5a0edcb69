// DeepSeek-V3.2's sparse attention against the double reference of tests/reference/: the
// Hadamard rotation, the index keys in the cache, the indexer's scores (FP8 queries and keys
// included), top-k and its tie rule, sparse attention == dense attention over the selected set,
// == dense attention while the context fits in k, prefill == token by token, bad input.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "mla/layer.hpp"
#include "mla/sparse.hpp"
#include "mla/thread_pool.hpp"
#include "reference/dsa_reference.hpp"
#include "test_util.hpp"

namespace {

using mla::Index;
using mla::LatentCache;
using mla::MlaConfig;
using mla::MlaLayer;
using mla::MlaWeights;
using mla::MlaWorkspace;
using mla::RowMatrix;

LatentCache make_cache(const MlaConfig& c, mla::CacheStorage storage, Index block_tokens = 4,
                       Index blocks = 64) {
  mla::LatentCacheOptions o;
  o.block_tokens = block_tokens;
  o.num_blocks = blocks;
  o.storage = storage;
  return LatentCache(c, o);
}

/// A small V3.2 config whose top-k is well below the test's context, so most tokens attend
/// sparsely.
MlaConfig sparse_config(Index topk = 8) {
  MlaConfig c = MlaConfig::small_v32();
  c.index_topk = topk;
  return c;
}

TEST(Hadamard, MatchesTheSylvesterMatrixAndKeepsDotProducts) {
  for (Index n : {1, 2, 8, 128}) {
    std::vector<double> x(static_cast<std::size_t>(n)), y;
    for (Index i = 0; i < n; ++i) x[static_cast<std::size_t>(i)] = std::sin(1.0 + 0.7 * i);
    y = x;
    mla::hadamard_transform(x.data(), n);
    ref::hadamard(y.data(), static_cast<int>(n));
    EXPECT_LT(test::max_abs_error(x, y), 1e-12) << "n " << n;
    double nx = 0.0, ny = 0.0;
    for (Index i = 0; i < n; ++i) {
      nx += x[static_cast<std::size_t>(i)] * x[static_cast<std::size_t>(i)];
      ny += std::pow(std::sin(1.0 + 0.7 * i), 2);
    }
    EXPECT_NEAR(nx, ny, 1e-12 * ny);
  }
}

TEST(TopK, TakesTheHighestWithTiesToTheEarlierPositionAndNaNLast) {
  std::vector<std::uint64_t> scratch;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> scores = {1.0f, 3.0f, nan, 3.0f, -0.0f, 0.0f, -inf, 3.0f, 2.0f, 0.5f};
  const auto n = static_cast<Index>(scores.size());
  // Independent rule: sort by (score desc, NaN last, position asc).
  const auto expect = [&](Index k) {
    std::vector<int> order(scores.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      const float x = scores[static_cast<std::size_t>(a)], y = scores[static_cast<std::size_t>(b)];
      if (std::isnan(x) || std::isnan(y)) return !std::isnan(x) && std::isnan(y);
      return x > y;
    });
    order.resize(static_cast<std::size_t>(std::min(k, n)));
    std::sort(order.begin(), order.end());
    return order;
  };
  for (Index k = 0; k <= n + 2; ++k) {
    std::vector<std::int32_t> out(static_cast<std::size_t>(n));
    const Index got = mla::select_top_k(scores.data(), n, k, out.data(), scratch);
    ASSERT_EQ(got, std::min(k, n));
    const std::vector<int> want = expect(k);
    EXPECT_EQ(std::vector<int>(out.begin(), out.begin() + got), want) << "k " << k;
  }
  // Two of the three 3s: the earlier ones.
  std::vector<std::int32_t> out(2);
  ASSERT_EQ(mla::select_top_k(scores.data(), n, 2, out.data(), scratch), 2);
  EXPECT_EQ(out, (std::vector<std::int32_t>{1, 3}));
}

/// The layer's indexer (index keys in the cache, scores through the public functions) against
/// the reference, FP8 rounding of queries and keys included.
TEST(Indexer, KeysScoresAndSelectionMatchTheReference) {
  for (mla::ScaleFormat scales : {mla::ScaleFormat::kPowerOfTwo, mla::ScaleFormat::kFloat32}) {
    MlaConfig c = sparse_config();
    c.index_scales = scales;
    const auto w = MlaWeights<float>::random(c, 11);
    const MlaLayer<float> layer(c, w);
    const Index n = 37;
    const std::int64_t pos0 = 5;
    const RowMatrix<float> x = test::random_input<float>(n, c.hidden_size, 3);
    LatentCache cache = make_cache(c, mla::CacheStorage::kFloat32);
    const auto seq = cache.add_sequence();
    MlaWorkspace<float> ws;
    RowMatrix<float> y(n, c.hidden_size);
    layer.forward(x, pos0, cache, seq, y, ws);

    const ref::MlaSpec rs = test::to_ref(c);
    const ref::MlaWeights rw = test::to_ref(w);
    const std::vector<double> xv = test::to_vec(x);
    const ref::IndexerTrace tr = ref::indexer_forward(
        rs, test::to_ref_indexer(c), test::to_ref_indexer(w.indexer), xv,
        ref::query_latents(rs, rw, xv, static_cast<int>(n)), static_cast<int>(n), pos0);
    // Index keys as cached: E4M3 values times their scale.
    const mla::IndexKeyView keys = cache.index_view(seq, 0);
    ASSERT_EQ(keys.tokens(), n);
    std::vector<double> got_keys, want_keys;
    std::vector<float> k(static_cast<std::size_t>(c.index_head_dim));
    for (Index t = 0; t < n; ++t) {
      keys.decode(t, k.data());
      for (Index d = 0; d < c.index_head_dim; ++d) {
        got_keys.push_back(k[static_cast<std::size_t>(d)]);
        want_keys.push_back(tr.keys[static_cast<std::size_t>(t * c.index_head_dim + d)] *
                            tr.key_scales[static_cast<std::size_t>(t)]);
      }
    }
    EXPECT_LT(test::rel_error(got_keys, want_keys), 1e-6);

    // Queries through the public functions, scores over every causal prefix.
    const Index HI = c.index_n_heads, DI = c.index_head_dim;
    RowMatrix<float> cq(n, c.q_lora_rank), q(n * HI, DI), hw(n, HI);
    mla::project(w.wq_a, x, cq);
    mla::rms_norm<float>(cq, w.q_norm, c.rms_norm_eps);
    Eigen::Map<RowMatrix<float>> qrows(q.data(), n, HI * DI);
    mla::project(w.indexer.wq_b, cq, qrows);
    mla::project(w.indexer.weights_proj, x, hw);
    const mla::Rope rope = mla::index_rope(c);
    std::vector<float> scratch(static_cast<std::size_t>(c.qk_rope_head_dim));
    std::vector<unsigned char> codes(static_cast<std::size_t>(DI));
    for (Index t = 0; t < n; ++t) {
      mla::prepare_index_queries(c, rope, pos0 + t, q.data() + t * HI * DI, hw.row(t).data(),
                                 scratch.data(), codes.data());
    }
    std::vector<Index> visible(static_cast<std::size_t>(n));
    for (Index t = 0; t < n; ++t) visible[static_cast<std::size_t>(t)] = t + 1;
    RowMatrix<float> scores = RowMatrix<float>::Zero(n, n);
    mla::IndexerWorkspace iws;
    mla::ThreadPool pool(2);
    // Every kernel variant (FMA, BF16 dot products, few or many query rows at once).
    test::for_each_isa([&](mla::Isa) {
      for (Index rows : {Index{1}, Index{3}, n}) {
        RowMatrix<float> part = RowMatrix<float>::Zero(n, n);
        for (Index t0 = 0; t0 < n; t0 += rows) {
          const Index m = std::min(rows, n - t0);
          mla::index_scores(keys, q.middleRows(t0 * HI, m * HI), hw.middleRows(t0, m),
                            visible.data() + t0, part.middleRows(t0, m), iws, &pool);
        }
        EXPECT_LT(test::rel_error(test::to_vec(part), tr.scores), 1e-5) << rows << " rows";
        scores = part;
      }
    });
    const std::vector<double> got = test::to_vec(scores);
    EXPECT_LT(test::rel_error(got, tr.scores), 1e-5);
    // The selection: equal sets (no near-ties in this data: checked against the reference's
    // gap at the boundary).
    std::vector<std::uint64_t> topk_scratch;
    std::vector<std::int32_t> sel(static_cast<std::size_t>(c.index_topk));
    for (Index t = 0; t < n; ++t) {
      const Index m =
          mla::select_top_k(scores.row(t).data(), t + 1, c.index_topk, sel.data(), topk_scratch);
      const std::vector<int>& want = tr.selected[static_cast<std::size_t>(t)];
      EXPECT_EQ(std::vector<int>(sel.begin(), sel.begin() + m), want) << "token " << t;
    }
  }
}

/// The whole V3.2 layer (prefill; a token sees up to 37 keys, k = 8) against the reference run on
/// the cache's contents, for FP32 and FP8 latent caches and on every instruction set.
TEST(SparseLayer, PrefillMatchesTheReference) {
  const MlaConfig c = sparse_config();
  const auto w = MlaWeights<float>::random(c, 5);
  const MlaLayer<float> layer(c, w);
  const Index n = 37;
  const RowMatrix<float> x = test::random_input<float>(n, c.hidden_size, 9);
  test::for_each_isa([&](mla::Isa) {
    for (auto storage : {mla::CacheStorage::kFloat32, mla::CacheStorage::kFp8E4M3}) {
      LatentCache cache = make_cache(c, storage);
      const auto seq = cache.add_sequence();
      MlaWorkspace<float> ws;
      RowMatrix<float> y(n, c.hidden_size);
      layer.forward(x, 0, cache, seq, y, ws);
      const std::vector<double> latents = test::to_vec(test::cache_contents(cache, seq, 0));
      ref::IndexerTrace tr;
      const std::vector<double> want =
          ref::dsa_forward(test::to_ref(c), test::to_ref(w), test::to_ref_indexer(c),
                           test::to_ref_indexer(w.indexer), test::to_vec(x), static_cast<int>(n), 0,
                           nullptr, &latents, &tr);
      EXPECT_LT(test::rel_error(test::to_vec(y), want), 1e-5) << mla::to_string(storage);
      // The reference really is sparse here: late tokens drop most keys.
      EXPECT_EQ(tr.selected.back().size(), static_cast<std::size_t>(c.index_topk));
      // ... and differs from dense attention by far more than the tolerance.
      const std::vector<double> dense =
          ref::mla_forward(test::to_ref(c), test::to_ref(w), test::to_vec(x), static_cast<int>(n),
                           0, nullptr, &latents);
      EXPECT_GT(test::rel_error(dense, want), 1e-3);
    }
  });
}

TEST(SparseLayer, DoubleLayerMatchesTheReferenceClosely) {
  const MlaConfig c = sparse_config();
  const auto w = MlaWeights<double>::random(c, 6);
  const MlaLayer<double> layer(c, w);
  const Index n = 23;
  const RowMatrix<double> x = test::random_input<double>(n, c.hidden_size, 2);
  LatentCache cache = make_cache(c, mla::CacheStorage::kFloat64);
  const auto seq = cache.add_sequence();
  MlaWorkspace<double> ws;
  RowMatrix<double> y(n, c.hidden_size);
  layer.forward(x, 0, cache, seq, y, ws);
  const std::vector<double> want =
      ref::dsa_forward(test::to_ref(c), test::to_ref(w), test::to_ref_indexer(c),
                       test::to_ref_indexer(w.indexer), test::to_vec(x), static_cast<int>(n), 0);
  // The indexer runs in FP32 whatever T is; the selection is the reference's, so what is left
  // is double arithmetic.
  EXPECT_LT(test::rel_error(test::to_vec(y), want), 1e-10);
}

TEST(SparseLayer, EqualsDenseWhileTheContextFitsInK) {
  const MlaConfig c = sparse_config(64);
  MlaConfig dense_c = c;
  dense_c.index_n_heads = dense_c.index_head_dim = dense_c.index_topk = 0;
  const auto w = MlaWeights<float>::random(c, 8);
  MlaWeights<float> dense_w = w;
  dense_w.indexer = {};
  const MlaLayer<float> sparse(c, w), dense(dense_c, dense_w);
  const Index n = 40;
  const RowMatrix<float> x = test::random_input<float>(n, c.hidden_size, 4);
  RowMatrix<float> ys(n, c.hidden_size), yd(n, c.hidden_size);
  LatentCache cs = make_cache(c, mla::CacheStorage::kFloat32),
              cd = make_cache(dense_c, mla::CacheStorage::kFloat32);
  const auto s1 = cs.add_sequence(), s2 = cd.add_sequence();
  MlaWorkspace<float> w1, w2;
  for (auto path : {mla::AttentionPath::kExpanded, mla::AttentionPath::kAbsorbed}) {
    cs.truncate(s1, 0);
    cd.truncate(s2, 0);
    sparse.forward(x, 0, cs, s1, ys, w1, path);
    dense.forward(x, 0, cd, s2, yd, w2, path);
    EXPECT_EQ(test::to_vec(ys), test::to_vec(yd));
  }
  EXPECT_EQ(cs.bytes_per_token_per_layer(),
            cd.bytes_per_token_per_layer() + static_cast<std::size_t>(c.index_head_dim) + 4);
}

/// Prefill in one call == chunked prefill == token by token, and a mixed batch == alone.
TEST(SparseLayer, PrefillEqualsChunksAndTokenByToken) {
  const MlaConfig c = sparse_config();
  const auto w = MlaWeights<float>::random(c, 12);
  const MlaLayer<float> layer(c, w);
  const Index n = 30;
  const RowMatrix<float> x = test::random_input<float>(n, c.hidden_size, 7);
  const auto run = [&](Index chunk) {
    LatentCache cache = make_cache(c, mla::CacheStorage::kFloat32);
    const auto seq = cache.add_sequence();
    MlaWorkspace<float> ws;
    RowMatrix<float> y(n, c.hidden_size);
    for (Index t0 = 0; t0 < n; t0 += chunk) {
      const Index m = std::min(chunk, n - t0);
      layer.forward(x.middleRows(t0, m), t0, cache, seq, y.middleRows(t0, m), ws);
    }
    return test::to_vec(y);
  };
  const std::vector<double> whole = run(n);
  EXPECT_LT(test::rel_error(run(1), whole), 1e-5);
  EXPECT_LT(test::rel_error(run(7), whole), 1e-5);

  // Two sequences in one mixed batch: a decode token after 20 cached, and a 10-token chunk.
  LatentCache cache = make_cache(c, mla::CacheStorage::kFloat32);
  const auto a = cache.add_sequence(), b = cache.add_sequence();
  MlaWorkspace<float> ws;
  RowMatrix<float> ya(20, c.hidden_size);
  layer.forward(x.topRows(20), 0, cache, a, ya, ws);
  RowMatrix<float> xb(11, c.hidden_size), yb(11, c.hidden_size);
  xb << x.row(20), x.middleRows(0, 10);
  layer.forward_batch(xb, {{a, 20, 1}, {b, 0, 10}}, cache, yb, ws);
  const std::vector<double> want_a = test::to_vec(RowMatrix<float>(
      Eigen::Map<const RowMatrix<double>>(whole.data() + 20 * c.hidden_size, 1, c.hidden_size)
          .cast<float>()));
  EXPECT_LT(test::rel_error(test::to_vec(yb.topRows(1)), want_a), 1e-5);
  const std::vector<double> first10(whole.begin(), whole.begin() + 10 * c.hidden_size);
  EXPECT_LT(test::rel_error(test::to_vec(yb.bottomRows(10)), first10), 1e-5);
}

/// sparse_attention_absorbed == the double reference over the selected positions only; -1
/// slots are skipped; bad positions are named.
TEST(SparseAttention, EqualsDenseAttentionOverTheSelectedSet) {
  const MlaConfig c = sparse_config();
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim;
  LatentCache cache = make_cache(c, mla::CacheStorage::kBFloat16);
  const auto seq = cache.add_sequence();
  const Index n = 50;
  const RowMatrix<float> lat = test::random_input<float>(n, D + R, 1);
  const RowMatrix<float> keys = test::random_input<float>(n, c.index_head_dim, 2);
  cache.append<float>(seq, 0, lat.leftCols(D), lat.rightCols(R), keys, 0);
  const mla::LatentView view = cache.view(seq, 0);
  const RowMatrix<double> stored = test::cache_contents(cache, seq, 0);
  const RowMatrix<float> q = test::random_input<float>(H, D + R, 3);
  const std::vector<std::int32_t> sel = {41, -1, 3, 17, 18, 49, 0, -1, 25};
  const double scale = 0.3;
  mla::SparseWorkspace<float> ws;
  RowMatrix<float> out(H, D), lse(1, H);
  test::for_each_isa([&](mla::Isa) {
    mla::sparse_attention_absorbed<float>(c, view, sel.data(), static_cast<Index>(sel.size()), q,
                                          scale, out, lse, ws);
    std::vector<double> want_out, want_lse;
    for (Index h = 0; h < H; ++h) {
      std::vector<double> s;
      double mx = -INFINITY;
      for (std::int32_t j : sel) {
        if (j < 0) continue;
        double dot = 0.0;
        for (Index d = 0; d < D + R; ++d) dot += double(q(h, d)) * stored(j, d);
        s.push_back(scale * dot);
        mx = std::max(mx, s.back());
      }
      double sum = 0.0;
      for (double v : s) sum += std::exp(v - mx);
      std::vector<double> o(static_cast<std::size_t>(D), 0.0);
      std::size_t i = 0;
      for (std::int32_t j : sel) {
        if (j < 0) continue;
        const double p = std::exp(s[i++] - mx) / sum;
        for (Index d = 0; d < D; ++d) o[static_cast<std::size_t>(d)] += p * stored(j, d);
      }
      want_out.insert(want_out.end(), o.begin(), o.end());
      want_lse.push_back(mx + std::log(sum));
    }
    EXPECT_LT(test::rel_error(test::to_vec(out), want_out), 1e-5);
    EXPECT_LT(test::max_abs_error(test::to_vec(lse), want_lse), 1e-5);
  });
  const std::vector<std::int32_t> bad = {3, 50};
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        mla::sparse_attention_absorbed<float>(c, view, bad.data(), 2, q, scale, out, lse, ws);
      },
      "selected position 50"));
  const std::vector<std::int32_t> none = {-1, -1};
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        mla::sparse_attention_absorbed<float>(c, view, none.data(), 2, q, scale, out, lse, ws);
      },
      "no valid position"));
}

TEST(SparseCache, V32Fp8RecordsAre788BytesAndAppendsStayAtomic) {
  const MlaConfig v32 = MlaConfig::deepseek_v32();
  EXPECT_EQ(LatentCache::bytes_per_token_per_layer(v32, mla::CacheStorage::kFp8E4M3), 788u);
  EXPECT_EQ(
      LatentCache::bytes_per_token_per_layer(MlaConfig::deepseek_v3(), mla::CacheStorage::kFp8E4M3),
      656u);
  mla::LatentCacheOptions o;
  o.block_tokens = 64;
  o.num_blocks = 2;
  o.storage = mla::CacheStorage::kFp8E4M3;
  const LatentCache big(v32, o);
  EXPECT_EQ(big.bytes_per_token_per_layer(), 788u);
  EXPECT_EQ(big.capacity_bytes(), 2u * 64u * 788u);  // no padding at V3.2 sizes

  const MlaConfig c = sparse_config();
  LatentCache cache = make_cache(c, mla::CacheStorage::kFp8E4M3, 4, 3);
  const auto seq = cache.add_sequence();
  const Index D = c.kv_lora_rank, R = c.qk_rope_head_dim;
  const RowMatrix<float> lat = test::random_input<float>(16, D + R, 1);
  const RowMatrix<float> keys = test::random_input<float>(16, c.index_head_dim, 2);
  cache.append<float>(seq, 0, lat.topRows(8).leftCols(D), lat.topRows(8).rightCols(R),
                      keys.topRows(8), 0);
  std::vector<float> before(static_cast<std::size_t>(c.index_head_dim)), after = before;
  cache.index_view(seq, 0).decode(7, before.data());
  // 8 more tokens need 2 blocks, the pool has 1: nothing changes.
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        cache.append<float>(seq, 0, lat.bottomRows(8).leftCols(D), lat.bottomRows(8).rightCols(R),
                            keys.bottomRows(8), 8);
      },
      "blocks are free"));
  EXPECT_EQ(cache.length(seq, 0), 8);
  cache.index_view(seq, 0).decode(7, after.data());
  EXPECT_EQ(before, after);
  // Index keys are required by an indexed cache and refused by a dense one.
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        cache.append<float>(seq, 0, lat.topRows(1).leftCols(D), lat.topRows(1).rightCols(R), 8);
      },
      "index keys"));
  LatentCache dense = make_cache(MlaConfig::small_v3(), mla::CacheStorage::kFloat32);
  const auto ds = dense.add_sequence();
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        dense.append<float>(ds, 0, lat.topRows(1).leftCols(D), lat.topRows(1).rightCols(R),
                            keys.topRows(1), 0);
      },
      "keeps none"));
}

/// An engine's own buffers (vLLM-style: FP8 656-byte-class latent records in one tensor, the
/// indexer's keys in another, one block table) give what the LatentCache gives.
TEST(SparseEngine, ForwardPagedWithAnIndexBufferEqualsTheCache) {
  const MlaConfig c = sparse_config();
  const auto w = MlaWeights<float>::random(c, 14);
  const MlaLayer<float> layer(c, w);
  const Index n = 26, bt = 4, blocks = 16;
  const RowMatrix<float> x = test::random_input<float>(n, c.hidden_size, 15);
  const mla::LatentRecordFormat format(c.kv_lora_rank, c.qk_rope_head_dim,
                                       mla::CacheStorage::kFp8E4M3);
  std::vector<float> latent_mem(blocks * bt * format.bytes() / sizeof(float) + 1);
  const mla::IndexKeyFormat key_format(c.index_head_dim, c.index_scales);
  std::vector<float> index_mem(blocks * bt * key_format.bytes_per_token() / sizeof(float) + 1);
  mla::PagedLatentBuffer buf{format, latent_mem.data(), blocks, bt, 0};
  mla::PagedIndexBuffer ibuf;
  ibuf.format = key_format;
  ibuf.data = index_mem.data();
  ibuf.num_blocks = blocks;
  ibuf.block_tokens = bt;
  const std::vector<std::int32_t> table = {9, 3, 14, 0, 7, 12, 1, 5};  // scattered blocks
  MlaWorkspace<float> ws;
  RowMatrix<float> y(n, c.hidden_size);
  // A prefill chunk of 11, then decode steps and a chunk of 4.
  Index cached = 0;
  for (Index chunk : {11, 1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1}) {
    layer.forward_paged(x.middleRows(cached, chunk), buf, ibuf,
                        {{table.data(), cached, cached, chunk}}, y.middleRows(cached, chunk), ws);
    cached += chunk;
  }
  ASSERT_EQ(cached, n);
  LatentCache cache = make_cache(c, mla::CacheStorage::kFp8E4M3);
  const auto seq = cache.add_sequence();
  RowMatrix<float> want(n, c.hidden_size);
  layer.forward(x, 0, cache, seq, want, ws);
  // Chunks against one call: other paths for the same rows, each within kFp32's bound of the
  // exact result (the AMX kernel's weights hold 16 bits: 2.4e-6 here, 1e-7 elsewhere).
  EXPECT_LT(test::rel_error(test::to_vec(y), test::to_vec(want)), 5e-6);
  // Mismatched buffers are named; dense forward_paged refuses a V3.2 layer.
  mla::PagedIndexBuffer wrong = ibuf;
  wrong.block_tokens = 8;
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward_paged(x.topRows(1), buf, wrong, {{table.data(), 0, 0, 1}}, y.topRows(1), ws);
      },
      "one block table serves both"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward_paged(x.topRows(1), buf, {{table.data(), 0, 0, 1}}, y.topRows(1), ws);
      },
      "PagedIndexBuffer"));
}

TEST(SparseErrors, ConfigWeightsAndCachesAreNamed) {
  MlaConfig c = MlaConfig::small_v32();
  c.index_head_dim = 24;
  EXPECT_TRUE(test::throws_error_containing([&] { c.validate(); },
                                            "index_head_dim must be a power of two"));
  c = MlaConfig::small_v32();
  c.index_n_heads = 0;
  EXPECT_TRUE(test::throws_error_containing([&] { c.validate(); }, "index_n_heads"));
  c = MlaConfig::small_v32();
  c.q_lora_rank = 0;
  EXPECT_TRUE(test::throws_error_containing([&] { c.validate(); }, "q_lora_rank must be > 0"));
  c = MlaConfig::small_v32();
  c.index_head_dim = 4;  // below qk_rope_head_dim 8
  EXPECT_TRUE(test::throws_error_containing([&] { c.validate(); }, "rotary part"));

  c = MlaConfig::small_v32();
  auto w = MlaWeights<float>::random(c, 1);
  auto bad = w;
  bad.indexer.wk = mla::Linear<float>(RowMatrix<float>::Zero(8, c.hidden_size));
  EXPECT_TRUE(test::throws_error_containing([&] { MlaLayer<float>(c, bad); }, "indexer.wk"));
  bad = w;
  bad.indexer.k_norm_bias.resize(3);
  EXPECT_TRUE(
      test::throws_error_containing([&] { MlaLayer<float>(c, bad); }, "indexer.k_norm_bias"));
  auto dense_w = MlaWeights<float>::random(MlaConfig::small_v3(), 1);
  dense_w.indexer = w.indexer;
  EXPECT_TRUE(test::throws_error_containing(
      [&] { MlaLayer<float>(MlaConfig::small_v3(), dense_w); }, "indexer must be empty"));

  // A V3.2 layer over a cache without index keys, and the reverse.
  const MlaLayer<float> layer(c, w);
  LatentCache plain = make_cache(MlaConfig::small_v3(), mla::CacheStorage::kFloat32);
  const auto seq = plain.add_sequence();
  MlaWorkspace<float> ws;
  const RowMatrix<float> x = test::random_input<float>(2, c.hidden_size, 1);
  RowMatrix<float> y(2, c.hidden_size);
  EXPECT_TRUE(test::throws_error_containing([&] { layer.forward(x, 0, plain, seq, y, ws); },
                                            "index keys of width 0"));
  EXPECT_EQ(plain.length(seq, 0), 0);
  // The paged and MPI entry points do not carry index keys: refused, not silently dense.
  EXPECT_TRUE(test::throws_error_containing(
      [&] { layer.forward_with_attention(x, 0, y, ws, [](auto&&...) {}); }, "sparse attention"));
}

}  // namespace
