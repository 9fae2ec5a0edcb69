// The fast absorbed decode kernel (mla/decode.hpp) against plain double loops over the cache's
// dequantised contents: every storage format, every SIMD variant the target has, context
// lengths that are not multiples of the tile, 1 and 2 threads, several split counts and head
// groups; and ThreadPool on its own.

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "mla/decode.hpp"
#include "mla/detail/isa/tile_counts.hpp"
#include "mla/detail/lse_merge.hpp"
#include "mla/layer.hpp"
#include "reference/mla_reference.hpp"
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
  EXPECT_TRUE(test::throws_error_containing(
      run(c, 11), "11 keys requested for 1 query tokens, the cache holds 10 tokens"));
  EXPECT_TRUE(test::throws_error_containing(run(c, 0), "0 keys requested"));
  // Two query tokens need two keys at least.
  RowMatrix<float> q2(16, 40), out2(16, 32), lse2(2, 8);
  q2.setZero();
  EXPECT_TRUE(test::throws_error_containing(
      [&] { mla::decode_absorbed(c, view, q2, 1.0, out2, lse2, ws, nullptr, {}, 1); },
      "1 keys requested for 2 query tokens"));
  RowMatrix<float> lse_wrong(1, 8);
  EXPECT_TRUE(test::throws_error_containing(
      [&] { mla::decode_absorbed(c, view, q2, 1.0, out2, lse_wrong, ws, nullptr, {}, 5); },
      "lse [1, 8]"));
  EXPECT_TRUE(test::throws_error_containing(run(dims(8, 16, 8), -1), "the cache holds [32 + 8]"));
  EXPECT_TRUE(test::throws_error_containing(run(dims(4, 32, 8), -1), "q_latent [8, 40]"));
  DecodeOptions bad;
  bad.tile_tokens = 20;
  EXPECT_TRUE(test::throws_error_containing(run(c, -1, bad), "tile_tokens 0 or a multiple of 16"));
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
    mla::RunOptions run;
    run.executor = &pool;
    run.decode.splits = 3;
    run.decode.tile_tokens = 16;
    mla::RunOptions run_absorbed = run;
    run_absorbed.path = mla::AttentionPath::kAbsorbed;
    RowMatrix<double> yd(90, c.hidden_size);
    RowMatrix<float> yf(90, c.hidden_size);
    const RowMatrix<float> xf = x.cast<float>();
    // A prefill, an absorbed chunk of 10, then single-token steps.
    ld.forward(x.topRows(40), 0, cd, sd, yd.topRows(40), wsd);
    lf.forward(xf.topRows(40), 0, cf, sf, yf.topRows(40), wsf, run);
    ld.forward(x.middleRows(40, 10), 40, cd, sd, yd.middleRows(40, 10), wsd,
               mla::AttentionPath::kAbsorbed);
    lf.forward(xf.middleRows(40, 10), 40, cf, sf, yf.middleRows(40, 10), wsf, run_absorbed);
    for (Index t = 50; t < 90; ++t) {
      ld.forward(x.row(t), t, cd, sd, yd.row(t), wsd);
      lf.forward(xf.row(t), t, cf, sf, yf.row(t), wsf, run);
    }
    EXPECT_LE(test::rel_error(test::to_vec(yf.bottomRows(50)), test::to_vec(yd.bottomRows(50))),
              1e-5);
  }
}

// ---------------------------------------------------------------------------------------------
// Several query tokens per call, and the BF16 precision

/// Plain loops in double for T query tokens: token t sees the first keys - (T - 1 - t) keys.
/// out [T * H][d_c], lse [T * H].
void reference_tokens(const MlaConfig& c, const RowMatrix<double>& kv, const RowMatrix<float>& q,
                      double scale, Index keys, Index T, std::vector<double>& out,
                      std::vector<double>& lse) {
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, K = c.latent_cache_width();
  out.assign(static_cast<std::size_t>(T * H * D), 0.0);
  lse.assign(static_cast<std::size_t>(T * H), 0.0);
  for (Index t = 0; t < T; ++t) {
    const Index n = keys - (T - 1 - t);
    std::vector<double> s(static_cast<std::size_t>(n));
    for (Index h = 0; h < H; ++h) {
      const Index row = t * H + h;
      double mx = -INFINITY;
      for (Index j = 0; j < n; ++j) {
        double dot = 0.0;
        for (Index k = 0; k < K; ++k) dot += static_cast<double>(q(row, k)) * kv(j, k);
        s[static_cast<std::size_t>(j)] = scale * dot;
        mx = std::max(mx, scale * dot);
      }
      double sum = 0.0;
      for (Index j = 0; j < n; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - mx);
      for (Index j = 0; j < n; ++j) {
        const double p = std::exp(s[static_cast<std::size_t>(j)] - mx) / sum;
        for (Index d = 0; d < D; ++d) out[static_cast<std::size_t>(row * D + d)] += p * kv(j, d);
      }
      lse[static_cast<std::size_t>(row)] = mx + std::log(sum);
    }
  }
}

struct DecodeErrors {
  double out = 0, lse = 0;  // relative (Frobenius) output error, largest absolute lse error
  double worst() const { return std::max(out, lse); }
};

/// Runs decode_absorbed for T query tokens on the active target and compares with `want`.
DecodeErrors decode_tokens_error(const MlaConfig& c, const mla::LatentView& view,
                                 const RowMatrix<float>& q, double scale, Index keys, Index T,
                                 int threads, const DecodeOptions& o,
                                 const std::vector<double>& want_out,
                                 const std::vector<double>& want_lse) {
  const Index H = c.num_attention_heads;
  RowMatrix<float> out(T * H, c.kv_lora_rank), lse(T, H);
  out.setConstant(NAN);
  lse.setConstant(NAN);
  mla::DecodeWorkspace ws;
  mla::ThreadPool pool(threads);
  mla::decode_absorbed(c, view, q, scale, out, lse, ws, &pool, o, keys);
  DecodeErrors e;
  e.out = test::rel_error(test::to_vec(out), want_out);
  const std::vector<double> got = test::to_vec(lse);
  for (std::size_t i = 0; i < got.size(); ++i) {
    e.lse = std::max(e.lse, std::isfinite(got[i]) ? std::fabs(got[i] - want_lse[i]) : INFINITY);
  }
  return e;
}

RowMatrix<float> random_query_rows(Index rows, Index width, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n;
  RowMatrix<float> q(rows, width);
  for (Index i = 0; i < q.size(); ++i) q.data()[i] = n(rng);
  return q;
}

// kBf16 rounds the queries and the softmax weights to BF16 (2^-9 relative each; FP32 caches
// also their keys): over these widths (up to 576) and scores of unit spread the output moves by
// ~1e-3 relative and the lse by ~1e-2 absolute (measured: see the [measured] lines). Bounds with
// room: 1e-2 and 2e-2.
constexpr double kBf16OutTolerance = 1e-2, kBf16LseTolerance = 2e-2;

TEST(DecodeTokens, EveryPrecisionStorageTokenCountKeyCountAndThreadingMatchesTheReference) {
  // Latent widths 40 (even), 41 (odd: the BF16 kernel pads the key rows) and 48 (a multiple of
  // 16 that is not one of 32: the AMX kernels pad the key rows to whole tiles), 1, 16 and 40
  // heads.
  double worst_fp32 = 0, worst_bf16_out = 0, worst_bf16_lse = 0, least_bf16 = INFINITY;
  double worst_by_isa[std::size(mla::kAllIsas)][2] = {};  // [isa][precision]: the worst error
  for (const MlaConfig& c : {dims(16, 40, 8), dims(1, 41, 8), dims(40, 48, 8)}) {
    const Index H = c.num_attention_heads, K = c.latent_cache_width();
    for (CacheStorage storage :
         {CacheStorage::kFloat32, CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
      const Filled f = fill(c, storage, 1000, 21);
      const mla::LatentView view = f.cache.view(f.seq, 0);
      const RowMatrix<double> kv = test::cache_contents_of(view);
      for (Index T : {1, 2, 3, 8}) {
        const RowMatrix<float> q = random_query_rows(T * H, K, 31 + static_cast<unsigned>(T));
        const double scale = 1.0 / std::sqrt(static_cast<double>(K));
        for (Index keys : {1, 15, 16, 17, 63, 64, 65, 1000}) {
          if (keys < T) continue;
          std::vector<double> want_out, want_lse;
          reference_tokens(c, kv, q, scale, keys, T, want_out, want_lse);
          for (int threads : {1, 2}) {
            for (Index splits : {0, 3}) {
              test::for_each_isa([&](mla::Isa isa) {
                for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
                  const bool bf16 = p == mla::Precision::kBf16;
                  SCOPED_TRACE(std::string(bf16 ? "bf16" : "fp32") + " heads " + std::to_string(H) +
                               " d_c " + std::to_string(c.kv_lora_rank) + " " +
                               mla::to_string(storage) + " tokens " + std::to_string(T) + " keys " +
                               std::to_string(keys) + " threads " + std::to_string(threads) +
                               " splits " + std::to_string(splits));
                  DecodeOptions o;
                  o.splits = splits;
                  o.tile_tokens = 16;
                  o.precision = p;
                  const DecodeErrors e = decode_tokens_error(c, view, q, scale, keys, T, threads, o,
                                                             want_out, want_lse);
                  double& w = worst_by_isa[static_cast<int>(isa)][bf16 ? 1 : 0];
                  w = std::max(w, e.worst());
                  if (bf16) {
                    EXPECT_LE(e.out, kBf16OutTolerance);
                    EXPECT_LE(e.lse, kBf16LseTolerance);
                    worst_bf16_out = std::max(worst_bf16_out, e.out);
                    worst_bf16_lse = std::max(worst_bf16_lse, e.lse);
                    if (keys >= 16) least_bf16 = std::min(least_bf16, e.out);
                  } else {
                    EXPECT_LE(e.worst(), kTolerance);
                    worst_fp32 = std::max(worst_fp32, e.worst());
                  }
                }
              });
            }
          }
        }
      }
    }
  }
  std::printf("    [measured] fp32 worst %.2e; bf16 worst out %.2e, lse %.2e\n", worst_fp32,
              worst_bf16_out, worst_bf16_lse);
  for (mla::Isa isa : mla::kAllIsas) {
    const double* w = worst_by_isa[static_cast<int>(isa)];
    if (w[0] > 0) {
      std::printf("    [measured] %s: fp32 worst %.2e, bf16 worst %.2e\n", mla::to_string(isa),
                  w[0], w[1]);
    }
  }
  // The BF16 bound is tight: BF16 really rounds, well above FP32's error, in every case that
  // averages more than a few keys.
  EXPECT_GT(least_bf16, 10 * worst_fp32);
}

TEST(DecodeTokens, DeepSeekWidthsAndHeadCountsInBothPrecisions) {
  for (Index heads : {1, 16, 40, 64, 128}) {
    const MlaConfig c = dims(heads, 512, 64);
    for (CacheStorage storage :
         {CacheStorage::kFloat32, CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
      const Filled f = fill(c, storage, 300, 7);
      const mla::LatentView view = f.cache.view(f.seq, 0);
      const RowMatrix<double> kv = test::cache_contents_of(view);
      for (Index T : {1, 4}) {
        const RowMatrix<float> q = random_query_rows(T * heads, 576, 9);
        const double scale = 1.0 / std::sqrt(192.0);
        std::vector<double> want_out, want_lse;
        reference_tokens(c, kv, q, scale, 300, T, want_out, want_lse);
        test::for_each_isa([&](mla::Isa) {
          for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
            const bool bf16 = p == mla::Precision::kBf16;
            SCOPED_TRACE(std::string(bf16 ? "bf16" : "fp32") + " heads " + std::to_string(heads) +
                         " " + mla::to_string(storage) + " tokens " + std::to_string(T));
            DecodeOptions o;
            o.precision = p;
            const DecodeErrors e =
                decode_tokens_error(c, view, q, scale, 300, T, 2, o, want_out, want_lse);
            EXPECT_LE(e.out, bf16 ? kBf16OutTolerance : kTolerance);
            EXPECT_LE(e.lse, bf16 ? kBf16LseTolerance : kTolerance);
          }
        });
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The AMX tile kernels' blocks of 256 keys

TEST(DecodeTiles, KeyCountsAroundTheBlockMatchTheReferenceOnEveryTarget) {
  // DeepSeek widths (the tile kernels read BF16 key rows straight from the records when 16 keys
  // lie at one stride) and key counts on both sides of a 256-key block; caches in blocks of 16
  // (every 16 keys in place) and of 5 tokens (16 keys cross blocks: copied rows).
  const MlaConfig c = dims(16, 512, 64);
  const Index H = 16, K = 576;
  double worst[2] = {0, 0};  // kFp32, kBf16 on the tile targets
  for (CacheStorage storage : {CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
    for (Index block_tokens : {16, 5}) {
      const Index cached = block_tokens == 16 ? 32768 : 1000;
      mla::LatentCacheOptions lo;
      lo.block_tokens = block_tokens;
      lo.num_blocks = cached / block_tokens + 1;
      lo.storage = storage;
      LatentCache cache(c, lo);
      const auto seq = cache.add_sequence();
      const RowMatrix<float> kv0 = random_query_rows(cached, K, 41);
      cache.append<float>(seq, 0, kv0.leftCols(512), kv0.rightCols(64));
      const mla::LatentView view = cache.view(seq, 0);
      const RowMatrix<double> kv = test::cache_contents_of(view);
      for (Index T : {1, 3}) {
        const RowMatrix<float> q = random_query_rows(T * H, K, 43 + static_cast<unsigned>(T));
        const double scale = 1.0 / std::sqrt(192.0);
        for (Index keys : {1, 255, 256, 257, 1000, 32768}) {
          if (keys < T || keys > cached || (keys == 32768 && T > 1)) continue;
          std::vector<double> want_out, want_lse;
          reference_tokens(c, kv, q, scale, keys, T, want_out, want_lse);
          test::for_each_isa([&](mla::Isa isa) {
            for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
              const bool bf16 = p == mla::Precision::kBf16;
              SCOPED_TRACE(std::string(bf16 ? "bf16 " : "fp32 ") + mla::to_string(storage) +
                           " blocks of " + std::to_string(block_tokens) + ", tokens " +
                           std::to_string(T) + " keys " + std::to_string(keys));
              DecodeOptions o;
              o.precision = p;
              const DecodeErrors e =
                  decode_tokens_error(c, view, q, scale, keys, T, 2, o, want_out, want_lse);
              EXPECT_LE(e.out, bf16 ? kBf16OutTolerance : kTolerance);
              EXPECT_LE(e.lse, bf16 ? kBf16LseTolerance : kTolerance);
              if (isa == mla::Isa::kAmx || isa == mla::Isa::kAmxModel) {
                worst[bf16 ? 1 : 0] = std::max(worst[bf16 ? 1 : 0], e.worst());
              }
            }
          });
        }
      }
    }
  }
  std::printf("    [measured] tiles: fp32 worst %.2e, bf16 worst %.2e\n", worst[0], worst[1]);
}

TEST(DecodeTiles, RecordsThatOnlySeemStridedAreNotReadInPlace) {
  // An engine's buffer in blocks of 5 records, no padding, whose table puts block 3 where the
  // 16th key's record lies 15 records after the first one's, with other blocks between: the
  // tile kernels may read 16 keys in place only when every one of them is at that stride.
  const MlaConfig c = dims(16, 512, 64);
  const Index K = 576, bt = 5, keys = 40, blocks = 16;
  const mla::LatentRecordFormat format(512, 64, CacheStorage::kBFloat16);
  std::vector<float> memory(blocks * bt * format.bytes() / sizeof(float) + 16);
  mla::PagedLatentBuffer buf{format, memory.data(), blocks, bt, 0};
  // Key 15 is block 3's slot 0: 15 records after key 0, with blocks 7 and 9 between.
  const std::vector<std::int32_t> table = {0, 7, 9, 3, 11, 4, 13, 2};
  const RowMatrix<float> kv0 = random_query_rows(keys, K, 47);
  for (Index j = 0; j < keys; ++j) {
    format.encode<float>(kv0.row(j).data(), kv0.row(j).data() + 512,
                         buf.record(table[static_cast<std::size_t>(j / bt)], j % bt));
  }
  const mla::LatentView view(buf, table.data(), keys);
  const RowMatrix<double> kv = test::cache_contents_of(view);
  const RowMatrix<float> q = random_query_rows(16, K, 48);
  const double scale = 1.0 / std::sqrt(192.0);
  std::vector<double> want_out, want_lse;
  reference_tokens(c, kv, q, scale, keys, 1, want_out, want_lse);
  test::for_each_isa([&](mla::Isa isa) {
    SCOPED_TRACE(mla::to_string(isa));
    DecodeOptions o;
    o.precision = mla::Precision::kBf16;
    const DecodeErrors e =
        decode_tokens_error(c, view, q, scale, keys, 1, 1, o, want_out, want_lse);
    EXPECT_LE(e.out, kBf16OutTolerance);
    EXPECT_LE(e.lse, kBf16LseTolerance);
  });
}

TEST(DecodeTiles, TheTileModelCountsTheMinimalProductsAndOneAccumulatorPassPerBlock) {
  // Counted on the tile model: every TDPBF16PS, every accumulator tile load and store, and the
  // cache bytes the blocks fetch. Products: each 16 keys x 16 query rows x 32-wide k block once
  // per query part for the scores; each 16 rows x 16 latent values x 32 keys a token sees once
  // per weight part for the outputs. Accumulators: each output tile loaded and stored once per
  // block of 256 keys (once more for the 32-key step a token must not see all of); score tiles
  // stored once. Records: fetched once per call, whatever the number of query tokens.
  if (!mla::isa_available(mla::Isa::kAmxModel)) GTEST_SKIP() << "no AVX512-BF16 for the model";
  const Index H = 16, D = 512, R = 64, K = D + R, keys = 1000, block = 256;
  const MlaConfig c = dims(H, D, R);
  const Filled f = fill(c, CacheStorage::kBFloat16, keys, 3);
  const mla::LatentView view = f.cache.view(f.seq, 0);
  mla::force_isa(mla::Isa::kAmxModel);
  for (Index T : {1, 4}) {
    for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
      SCOPED_TRACE(std::string(p == mla::Precision::kBf16 ? "bf16" : "fp32") + ", tokens " +
                   std::to_string(T));
      const Index q_parts = p == mla::Precision::kBf16 ? 1 : 3;
      const Index p_parts = p == mla::Precision::kBf16 ? 1 : 2;
      const RowMatrix<float> q = random_query_rows(T * H, K, 5);
      RowMatrix<float> out(T * H, D), lse(T, H);
      mla::DecodeWorkspace ws;
      DecodeOptions o;
      o.precision = p;
      o.splits = 1;
      mla::detail::isa::TileCounts& counts = mla::detail::isa::tile_counts();
      counts.reset();
      mla::decode_absorbed(c, view, q, 0.05, out, lse, ws, nullptr, o, keys);
      std::int64_t products = 0, c_loads = 0, c_stores = 0;
      const Index row_tiles = T, d_tiles = D / 16, k_blocks = K / 32;
      for (Index j0 = 0; j0 < keys; j0 += block) {
        const Index n = std::min(block, keys - j0), key_tiles = (n + 15) / 16;
        products += key_tiles * row_tiles * k_blocks * q_parts;
        c_stores += key_tiles * row_tiles;
        for (Index t = 0; t < T; ++t) {
          const Index seen = std::clamp<Index>(keys - (T - 1 - t) - j0, 0, n);
          if (seen == 0) continue;
          const Index steps = (seen + 31) / 32;
          const bool masked = seen % 32 != 0 && seen < n;
          products += d_tiles * steps * p_parts;
          c_loads += d_tiles * (masked ? 2 : 1);
          c_stores += d_tiles * (masked ? 2 : 1);
        }
      }
      EXPECT_EQ(counts.products.load(), products);
      EXPECT_EQ(counts.c_load_bytes.load(), c_loads * 1024);
      EXPECT_EQ(counts.c_store_bytes.load(), c_stores * 1024);
      EXPECT_EQ(counts.record_bytes.load(), keys * 2 * K);
      std::printf(
          "    [measured] tile model, %s, %lld tokens: per 256 keys %.0f products, %.0f KB "
          "of operand loads, %.0f KB of accumulator loads and stores\n",
          mla::to_string(p), static_cast<long long>(T),
          static_cast<double>(counts.products.load()) * block / keys,
          static_cast<double>(counts.operand_bytes.load()) * block / keys / 1024,
          static_cast<double>(counts.c_load_bytes.load() + counts.c_store_bytes.load()) * block /
              keys / 1024);
    }
  }
  mla::reset_isa();
}

TEST(DecodeTokens, SeveralTokensInOneCallEqualEachTokenDecodedAlone) {
  const MlaConfig c = dims(16, 64, 16);
  const Index H = 16, T = 5, keys = 133;
  const Filled f = fill(c, CacheStorage::kBFloat16, keys, 4);
  const mla::LatentView view = f.cache.view(f.seq, 0);
  const RowMatrix<float> q = random_query_rows(T * H, 80, 5);
  test::for_each_isa([&](mla::Isa) {
    for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
      SCOPED_TRACE(p == mla::Precision::kBf16 ? "bf16" : "fp32");
      DecodeOptions o;
      o.precision = p;
      mla::DecodeWorkspace ws;
      mla::ThreadPool pool(2);
      RowMatrix<float> out(T * H, 64), lse(T, H);
      mla::decode_absorbed(c, view, q, 0.1, out, lse, ws, &pool, o, keys);
      for (Index t = 0; t < T; ++t) {
        RowMatrix<float> out1(H, 64), lse1(1, H);
        mla::decode_absorbed(c, view, q.middleRows(t * H, H), 0.1, out1, lse1, ws, &pool, o,
                             keys - (T - 1 - t));
        // The same keys, tiles and splits, in the same order: equal to float accuracy.
        EXPECT_LE(test::rel_error(test::to_vec(out.middleRows(t * H, H)), test::to_vec(out1)), 1e-6)
            << "token " << t;
        EXPECT_LE(test::rel_error(test::to_vec(lse.row(t)), test::to_vec(lse1)), 1e-6);
      }
    }
  });
}

TEST(DecodeTokens, ANonFiniteDraftTokenLeavesTheTokensBeforeItAlone) {
  // Speculative decoding verifies draft tokens in one call: a NaN in the newest key must not
  // reach the earlier query tokens, which do not see it (not even through a zero weight).
  const MlaConfig c = dims(16, 64, 16);
  const Index H = 16, T = 4, keys = 70;
  mla::LatentCacheOptions lo;
  lo.block_tokens = 16;
  lo.num_blocks = 5;
  for (CacheStorage storage : {CacheStorage::kFloat32, CacheStorage::kBFloat16}) {
    lo.storage = storage;
    LatentCache cache(c, lo);
    const auto seq = cache.add_sequence();
    RowMatrix<float> kv = random_query_rows(keys, 80, 8);
    kv(keys - 1, 3) = NAN;  // the last draft token's key
    cache.append<float>(seq, 0, kv.leftCols(64), kv.rightCols(16));
    const RowMatrix<float> q = random_query_rows(T * H, 80, 9);
    test::for_each_isa([&](mla::Isa) {
      for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
        SCOPED_TRACE(std::string(mla::to_string(storage)) +
                     (p == mla::Precision::kBf16 ? " bf16" : " fp32"));
        DecodeOptions o;
        o.precision = p;
        o.tile_tokens = 16;
        mla::DecodeWorkspace ws;
        RowMatrix<float> out(T * H, 64), lse(T, H);
        mla::decode_absorbed(c, cache.view(seq, 0), q, 0.1, out, lse, ws, nullptr, o, keys);
        EXPECT_TRUE(out.topRows((T - 1) * H).allFinite());
        EXPECT_TRUE(lse.topRows(T - 1).allFinite());
        EXPECT_FALSE(out.bottomRows(H).allFinite());
      }
    });
  }
}

TEST(DecodeTokens, AFloatLayerInBf16PrecisionStaysWithinTheBound) {
  // The precision reaches the layer through its workspace. Prefill (expanded, FP32), then
  // absorbed chunks and single steps in kBf16, against the double reference run on the
  // dequantised cache.
  for (const MlaConfig& c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    const auto w = mla::MlaWeights<float>::random(c, 19);
    const mla::MlaLayer<float> layer(c, w);
    for (CacheStorage storage :
         {CacheStorage::kFloat32, CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
      test::for_each_isa([&](mla::Isa) {
        SCOPED_TRACE(mla::to_string(storage));
        mla::LatentCacheOptions o;
        o.block_tokens = 16;
        o.num_blocks = 8;
        o.storage = storage;
        LatentCache cache(c, o);
        const auto seq = cache.add_sequence();
        mla::MlaWorkspace<float> ws;
        mla::RunOptions run;
        run.decode.precision = mla::Precision::kBf16;
        mla::RunOptions run_absorbed = run;
        run_absorbed.path = mla::AttentionPath::kAbsorbed;
        const Index n = 60;
        const RowMatrix<float> x = test::random_input<float>(n, c.hidden_size, 20);
        RowMatrix<float> y(n, c.hidden_size);
        layer.forward(x.topRows(30), 0, cache, seq, y.topRows(30), ws, run);
        layer.forward(x.middleRows(30, 6), 30, cache, seq, y.middleRows(30, 6), ws, run_absorbed);
        for (Index t = 36; t < n; ++t) layer.forward(x.row(t), t, cache, seq, y.row(t), ws, run);
        const std::vector<double> latent = test::to_vec(test::cache_contents(cache, seq, 0));
        const std::vector<double> want =
            ref::mla_forward(test::to_ref(c), test::to_ref(w), test::to_vec(x), static_cast<int>(n),
                             0, nullptr, &latent);
        const std::vector<double> got = test::to_vec(y);
        const std::size_t from = static_cast<std::size_t>(30 * c.hidden_size);
        const double err = test::rel_error(std::vector<double>(got.begin() + from, got.end()),
                                           std::vector<double>(want.begin() + from, want.end()));
        EXPECT_LE(err, kBf16OutTolerance);
        EXPECT_GT(err, 1e-5) << "kBf16 rounds: its error is above FP32's bound";
      });
    }
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

namespace {

// The softmax over scores s of values v, in double: its output and log-sum-exp.
std::pair<double, double> softmax_of(const std::vector<double>& s, const std::vector<double>& v) {
  double mx = -std::numeric_limits<double>::infinity();
  for (double x : s) mx = std::max(mx, x);
  double sum = 0, acc = 0;
  for (std::size_t i = 0; i < s.size(); ++i) {
    sum += std::exp(s[i] - mx);
    acc += std::exp(s[i] - mx) * v[i];
  }
  return {acc / sum, mx + std::log(sum)};
}

}  // namespace

TEST(LseMerge, StatesOverDisjointKeysMergeIntoTheSoftmaxOverTheirUnion) {
  // Parts of different sizes, one empty; each part's state as the decode kernels keep it
  // (maximum, sum, unnormalised output) and as mla::mpi keeps it (log-sum-exp, normalised
  // output). Two score sets: comparable scores (every part and every sum matters), and one
  // part 100 above the others (exp(100) overflows float: the merge must not form it).
  std::mt19937 rng(7);
  std::normal_distribution<double> z(0.0, 2.0);
  for (const double offset : {0.0, 100.0}) {
    SCOPED_TRACE(offset);
    std::vector<double> s(40), v(40);
    for (std::size_t i = 0; i < s.size(); ++i) {
      s[i] = z(rng) + (i >= 20 ? offset : 0.0);
      v[i] = 10 * z(rng);
    }
    const auto [want_o, want_lse] = softmax_of(s, v);
    const std::size_t bounds[] = {0, 3, 3, 20, 40};  // parts [0,3) [3,3) [3,20) [20,40)
    constexpr int kParts = 4;
    float m[kParts], l[kParts], o[kParts], lse[kParts], on[kParts];
    for (int p = 0; p < kParts; ++p) {
      std::vector<double> sp(s.begin() + bounds[p], s.begin() + bounds[p + 1]);
      std::vector<double> vp(v.begin() + bounds[p], v.begin() + bounds[p + 1]);
      double mx = -std::numeric_limits<double>::infinity(), sum = 0, acc = 0;
      for (double x : sp) mx = std::max(mx, x);
      for (std::size_t i = 0; i < sp.size(); ++i) {
        sum += std::exp(sp[i] - mx);
        acc += std::exp(sp[i] - mx) * vp[i];
      }
      m[p] = static_cast<float>(mx);
      l[p] = static_cast<float>(sum);
      o[p] = static_cast<float>(acc);
      lse[p] = sp.empty() ? -std::numeric_limits<float>::infinity()
                          : static_cast<float>(mx + std::log(sum));
      on[p] = sp.empty() ? 0.0f : static_cast<float>(acc / sum);
    }
    float w[kParts];
    const float got_lse = mla::detail::lse_merge(kParts, m, l, 1, w);
    double got_o = 0;
    for (int p = 0; p < kParts; ++p) got_o += static_cast<double>(w[p]) * o[p];
    EXPECT_NEAR(got_lse, want_lse, 1e-5 * std::fabs(want_lse) + 1e-5);
    EXPECT_NEAR(got_o, want_o, 1e-5 * std::fabs(want_o) + 1e-5);
    EXPECT_EQ(w[1], 0.0f);  // the empty part
    const float got_lse_n = mla::detail::lse_merge(kParts, lse, nullptr, 1, w);
    double got_on = 0;
    for (int p = 0; p < kParts; ++p) got_on += static_cast<double>(w[p]) * on[p];
    EXPECT_NEAR(got_lse_n, want_lse, 1e-5 * std::fabs(want_lse) + 1e-5);
    EXPECT_NEAR(got_on, want_o, 1e-5 * std::fabs(want_o) + 1e-5);
  }
  float w[2];
  // Every part empty: weights 0 and log-sum-exp -inf. A NaN state: NaN.
  const float empty[2] = {-std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()};
  EXPECT_EQ(mla::detail::lse_merge(2, empty, nullptr, 1, w),
            -std::numeric_limits<float>::infinity());
  EXPECT_EQ(w[0], 0.0f);
  EXPECT_EQ(w[1], 0.0f);
  const float with_nan[2] = {1.0f, std::numeric_limits<float>::quiet_NaN()};
  EXPECT_TRUE(std::isnan(mla::detail::lse_merge(2, with_nan, nullptr, 1, w)));
}
