// The fast absorbed decode kernel (mla/decode.hpp) against plain double loops over the cache's
// dequantised contents: every storage format, every SIMD variant the target has, context
// lengths that are not multiples of the tile, 1 and 2 threads, several split counts and head
// groups; and ThreadPool on its own.

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "mla/decode.hpp"
#include "mla/layer.hpp"
#include "test_util.hpp"

namespace {

using mla::CacheStorage;
using mla::DecodeOptions;
using mla::Index;
using mla::LatentCache;
using mla::MlaConfig;
using mla::RowMatrix;

/// Attention dimensions: H heads over a cache of [d_c + R] per token.
MlaConfig dims(Index heads, Index d_c, Index r) {
  MlaConfig c = MlaConfig::small_v2_lite();
  c.num_attention_heads = heads;
  c.kv_lora_rank = d_c;
  c.qk_rope_head_dim = r;
  return c;
}

/// A one-sequence cache of `tokens` random latents (entries N(0, 1)), in blocks of 16 tokens
/// so that tiles of 64 cross blocks.
struct Filled {
  LatentCache cache;
  mla::SequenceId seq;
};
/// A cache of `tokens` N(0, 1) tokens; with `big` != 0 the latents of odd tokens are scaled by it.
Filled fill(const MlaConfig& c, CacheStorage storage, Index tokens, unsigned seed, float big = 0) {
  mla::LatentCacheOptions o;
  o.block_tokens = 16;
  o.num_blocks = tokens / 16 + 1;
  o.storage = storage;
  Filled f{LatentCache(c, o), 0};
  f.seq = f.cache.add_sequence();
  std::mt19937 rng(seed);
  std::normal_distribution<float> n;
  RowMatrix<float> kv(tokens, c.latent_cache_width());
  for (Index i = 0; i < kv.size(); ++i) kv.data()[i] = n(rng);
  if (big != 0) {
    for (Index j = 1; j < tokens; j += 2) kv.row(j).head(c.kv_lora_rank) *= big;
  }
  f.cache.append<float>(f.seq, 0, kv.leftCols(c.kv_lora_rank), kv.rightCols(c.qk_rope_head_dim));
  return f;
}

RowMatrix<float> random_queries(const MlaConfig& c, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n;
  RowMatrix<float> q(c.num_attention_heads, c.latent_cache_width());
  for (Index i = 0; i < q.size(); ++i) q.data()[i] = n(rng);
  return q;
}

/// Plain loops in double over the first `keys` cached tokens (as the cache holds them):
/// out [H][d_c] and lse [H].
void reference(const MlaConfig& c, const mla::LatentView& view, const RowMatrix<float>& q,
               double scale, Index keys, std::vector<double>& out, std::vector<double>& lse) {
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, K = c.latent_cache_width();
  const RowMatrix<double> kv = test::cache_contents_of(view);
  out.assign(static_cast<std::size_t>(H * D), 0.0);
  lse.assign(static_cast<std::size_t>(H), 0.0);
  std::vector<double> s(static_cast<std::size_t>(keys));
  for (Index h = 0; h < H; ++h) {
    double mx = -INFINITY;
    for (Index j = 0; j < keys; ++j) {
      double dot = 0.0;
      for (Index k = 0; k < K; ++k) dot += static_cast<double>(q(h, k)) * kv(j, k);
      s[static_cast<std::size_t>(j)] = scale * dot;
      mx = std::max(mx, scale * dot);
    }
    double sum = 0.0;
    for (Index j = 0; j < keys; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - mx);
    for (Index j = 0; j < keys; ++j) {
      const double p = std::exp(s[static_cast<std::size_t>(j)] - mx) / sum;
      for (Index d = 0; d < D; ++d) out[static_cast<std::size_t>(h * D + d)] += p * kv(j, d);
    }
    lse[static_cast<std::size_t>(h)] = mx + std::log(sum);
  }
}

/// Runs decode_absorbed (on the active instruction set) and returns the worst of the output's
/// relative error and the lse's absolute error against the reference.
double decode_error(const MlaConfig& c, const mla::LatentView& view, Index keys, int threads,
                    const DecodeOptions& options, double scale = 0.0) {
  const RowMatrix<float> q = random_queries(c, 7);
  // Scores of unit spread by default, as the softmax scale gives real models.
  if (scale == 0.0) scale = 1.0 / std::sqrt(static_cast<double>(c.latent_cache_width()));
  std::vector<double> want_out, want_lse;
  reference(c, view, q, scale, keys, want_out, want_lse);
  RowMatrix<float> out(c.num_attention_heads, c.kv_lora_rank), lse(1, c.num_attention_heads);
  out.setConstant(NAN);
  lse.setConstant(NAN);
  mla::DecodeWorkspace ws;
  mla::ThreadPool pool(threads);
  mla::decode_absorbed(c, view, q, scale, out, lse, ws, &pool, options, keys);
  double lse_err = 0.0;
  const std::vector<double> got_lse = test::to_vec(lse);
  for (std::size_t h = 0; h < got_lse.size(); ++h) {
    lse_err = std::max(lse_err,
                       std::isfinite(got_lse[h]) ? std::fabs(got_lse[h] - want_lse[h]) : INFINITY);
  }
  return std::max(test::rel_error(test::to_vec(out), want_out), lse_err);
}

using test::for_each_isa;

// Float sums over up to 1000 keys of width up to 576, against double: the output's relative
// error and the lse's absolute error.
constexpr double kTolerance = 1e-5;

TEST(DecodeAbsorbed, MatchesTheReferenceForEveryStorageLengthThreadCountAndSplit) {
  // 24 heads: one full vector plus a padded one on AVX-512 (heads broadcast against key
  // values); 5 heads: a single padded vector (scores along the key width). d_c 42 and 41,
  // widths 48 and 47 leave tails in every register block.
  for (const MlaConfig& c : {dims(24, 42, 6), dims(5, 41, 6)}) {
    for (CacheStorage storage : {CacheStorage::kFloat32, CacheStorage::kBFloat16,
                                 CacheStorage::kFp8E4M3, CacheStorage::kFloat64}) {
      const Filled f = fill(c, storage, 1000, 11);
      const mla::LatentView view = f.cache.view(f.seq, 0);
      for (Index keys : {1, 63, 64, 65, 1000}) {
        for (int threads : {1, 2}) {
          for (Index splits : {0, 1, 3, 7}) {
            DecodeOptions o;
            o.splits = splits;
            for_each_isa([&](mla::Isa) {
              SCOPED_TRACE("heads " + std::to_string(c.num_attention_heads) + " " +
                           mla::to_string(storage) + " keys " + std::to_string(keys) + " threads " +
                           std::to_string(threads) + " splits " + std::to_string(splits));
              EXPECT_LE(decode_error(c, view, keys, threads, o), kTolerance);
            });
          }
        }
      }
    }
  }
}

TEST(DecodeAbsorbed, MatchesTheReferenceAtDeepSeekWidthsAndHeadCounts) {
  // d_c 512 and R 64 as in every DeepSeek model; head counts that fill 1, 2, 4 and 8 vectors
  // and ones that need padding.
  for (Index heads : {1, 5, 16, 32, 48, 128}) {
    const MlaConfig c = dims(heads, 512, 64);
    for (CacheStorage storage :
         {CacheStorage::kFloat32, CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
      const Filled f = fill(c, storage, 130, 3);
      for_each_isa([&](mla::Isa) {
        SCOPED_TRACE("heads " + std::to_string(heads) + " " + mla::to_string(storage));
        EXPECT_LE(decode_error(c, f.cache.view(f.seq, 0), 130, 2, DecodeOptions{}), kTolerance);
      });
    }
  }
}

TEST(DecodeAbsorbed, Fp8TilesWithScalesBeyondTheFastWideningRangeStayExact) {
  // Latents of ~1e34 need tile scales above 2^100, where widening through FP16 would overflow:
  // those records take the exact scalar route, the others the SIMD one, in the same tiles.
  const MlaConfig c = dims(16, 512, 64);
  const Filled f = fill(c, CacheStorage::kFp8E4M3, 200, 9, 1e34f);
  for_each_isa([&](mla::Isa) {
    EXPECT_LE(decode_error(c, f.cache.view(f.seq, 0), 200, 2, DecodeOptions{}, 1e-35), kTolerance);
  });
}

TEST(DecodeAbsorbed, HeadGroupsAndTileSizesGiveTheSameAnswer) {
  const MlaConfig c = dims(40, 64, 16);
  const Filled f = fill(c, CacheStorage::kBFloat16, 300, 5);
  for (Index groups : {1, 2, 3, 8}) {
    for (Index tile : {16, 48, 64, 256}) {
      for (Index splits : {1, 4}) {
        DecodeOptions o;
        o.head_groups = groups;
        o.tile_tokens = tile;
        o.splits = splits;
        SCOPED_TRACE("groups " + std::to_string(groups) + " tile " + std::to_string(tile) +
                     " splits " + std::to_string(splits));
        EXPECT_LE(decode_error(c, f.cache.view(f.seq, 0), 300, 2, o), kTolerance);
      }
    }
  }
}

TEST(DecodeAbsorbed, SplitsMergeExactlyWhenScoresDifferWildly) {
  // Keys far apart in score: a split whose maximum is far below another's must get weight
  // exp(m_s - M) ~ 0 without underflowing the merged sum to 0 or overflowing it.
  const MlaConfig c = dims(16, 32, 8);
  mla::LatentCacheOptions o;
  o.block_tokens = 16;
  o.num_blocks = 10;
  LatentCache cache(c, o);
  const auto seq = cache.add_sequence();
  const Index keys = 150;
  RowMatrix<float> kv = RowMatrix<float>::Zero(keys, 40);
  for (Index j = 0; j < keys; ++j) kv(j, 0) = static_cast<float>(j);  // score grows with j
  cache.append<float>(seq, 0, kv.leftCols(32), kv.rightCols(8));
  DecodeOptions opt;
  opt.splits = 5;
  opt.tile_tokens = 16;
  // Splits of ceil(ceil(150 / 5) / 16) * 16 = 32 keys: the fifth holds keys 128 .. 149, so
  // every split takes part in the merge.
  const Index split_keys = ((keys + 4) / 5 + 15) / 16 * 16;
  ASSERT_LT(4 * split_keys, keys);
  // With N(0, 1) queries and scale 0.3 the scores span tens of units.
  for_each_isa([&](mla::Isa) {
    EXPECT_LE(decode_error(c, cache.view(seq, 0), keys, 2, opt, 0.3), kTolerance);
  });
}

TEST(DecodeAbsorbed, BadArgumentsAreClearErrors) {
  const MlaConfig c = dims(8, 32, 8);
  const Filled f = fill(c, CacheStorage::kFloat32, 10, 1);
  const mla::LatentView view = f.cache.view(f.seq, 0);
  RowMatrix<float> q = random_queries(c, 1), out(8, 32), lse(1, 8);
  mla::DecodeWorkspace ws;
  auto run = [&](const MlaConfig& cc, Index keys, const DecodeOptions& o = {}) {
    return [&, cc, keys, o] {
      mla::decode_absorbed(cc, view, q, 1.0, out, lse, ws, nullptr, o, keys);
    };
  };
  EXPECT_TRUE(test::throws_error_containing(run(c, 11), "11 keys requested, the cache holds 10"));
  EXPECT_TRUE(test::throws_error_containing(run(c, 0), "0 keys requested"));
  EXPECT_TRUE(test::throws_error_containing(run(dims(8, 16, 8), -1), "the cache holds [32 + 8]"));
  EXPECT_TRUE(test::throws_error_containing(run(dims(4, 32, 8), -1), "q_latent [8, 40]"));
  DecodeOptions bad;
  bad.tile_tokens = 20;
  EXPECT_TRUE(test::throws_error_containing(run(c, -1, bad), "tile_tokens a multiple of 16"));
  bad = DecodeOptions{};
  bad.head_groups = 0;
  EXPECT_TRUE(test::throws_error_containing(run(c, -1, bad), "head_groups >= 1"));
}

TEST(DecodeAbsorbed, AFloatLayerOnAPoolDecodesLikeTheDoubleLayer) {
  // MlaLayer<float> runs its absorbed steps (single tokens and chunks) on decode_absorbed;
  // MlaLayer<double> on the reference kernel attention_absorbed. Same weights, same tokens.
  for (const MlaConfig& c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    const auto wd = mla::MlaWeights<double>::random(c, 9);
    const mla::MlaLayer<double> ld(c, wd);
    const mla::MlaLayer<float> lf(c, wd.cast<float>());
    const RowMatrix<double> x = test::random_input<double>(90, c.hidden_size, 2);
    mla::LatentCacheOptions o;
    o.block_tokens = 16;
    o.num_blocks = 8;
    o.storage = CacheStorage::kFloat64;
    LatentCache cd(c, o);
    o.storage = CacheStorage::kFloat32;
    LatentCache cf(c, o);
    const auto sd = cd.add_sequence(), sf = cf.add_sequence();
    mla::MlaWorkspace<double> wsd;
    mla::MlaWorkspace<float> wsf;
    mla::ThreadPool pool(2);
    wsf.set_thread_pool(&pool);
    DecodeOptions opt;
    opt.splits = 3;
    opt.tile_tokens = 16;
    wsf.set_decode_options(opt);
    RowMatrix<double> yd(90, c.hidden_size);
    RowMatrix<float> yf(90, c.hidden_size);
    const RowMatrix<float> xf = x.cast<float>();
    // A prefill, an absorbed chunk of 10, then single-token steps.
    ld.forward(x.topRows(40), 0, cd, sd, yd.topRows(40), wsd);
    lf.forward(xf.topRows(40), 0, cf, sf, yf.topRows(40), wsf);
    ld.forward(x.middleRows(40, 10), 40, cd, sd, yd.middleRows(40, 10), wsd,
               mla::AttentionPath::kAbsorbed);
    lf.forward(xf.middleRows(40, 10), 40, cf, sf, yf.middleRows(40, 10), wsf,
               mla::AttentionPath::kAbsorbed);
    for (Index t = 50; t < 90; ++t) {
      ld.forward(x.row(t), t, cd, sd, yd.row(t), wsd);
      lf.forward(xf.row(t), t, cf, sf, yf.row(t), wsf);
    }
    EXPECT_LE(test::rel_error(test::to_vec(yf.bottomRows(50)), test::to_vec(yd.bottomRows(50))),
              1e-5);
  }
}

TEST(ThreadPool, RunsEveryTaskOnceAndReportsTheThread) {
  for (int threads : {1, 2, 3}) {
    mla::ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (Index tasks : {0, 1, 2, 5, 100}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(tasks));
      std::atomic<bool> bad_thread{false};
      pool.run(tasks, [&](Index t, int thread) {
        hits[static_cast<std::size_t>(t)]++;
        if (thread < 0 || thread >= threads) bad_thread = true;
      });
      for (auto& h : hits) EXPECT_EQ(h.load(), 1);
      EXPECT_FALSE(bad_thread.load());
    }
  }
}

TEST(ThreadPool, RethrowsTheFirstExceptionAfterEveryTaskRan) {
  mla::ThreadPool pool(2);
  std::atomic<int> ran{0};
  EXPECT_THROW(pool.run(10,
                        [&](Index t, int) {
                          ++ran;
                          if (t == 3) throw std::runtime_error("task 3");
                        }),
               std::runtime_error);
  EXPECT_EQ(ran.load(), 10);
  // The pool still works afterwards.
  ran = 0;
  pool.run(4, [&](Index, int) { ++ran; });
  EXPECT_EQ(ran.load(), 4);
  EXPECT_TRUE(test::throws_error_containing([] { mla::ThreadPool p(-1); }, "threads must be in"));
}

}  // namespace
