// MHA/GQA -> MLA conversion and the GQA baseline, each measured against the independent plain
// MHA of tests/reference (loops in double).

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "mla/convert.hpp"
#include "mla/mla.hpp"
#include "reference/mla_reference.hpp"
#include "test_util.hpp"

namespace {

using mla::AttentionPath;
using mla::Index;
using mla::MhaConfig;
using mla::MhaWeights;
using mla::RowMatrix;

RowMatrix<double> gaussian(Index rows, Index cols, std::uint64_t seed, double sd = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, sd);
  RowMatrix<double> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
  return m;
}

MhaConfig mha_dims(Index hidden, Index heads, Index kv_heads, Index dk, Index dv, Index rope) {
  MhaConfig c;
  c.hidden_size = hidden;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = dk;
  c.v_head_dim = dv;
  c.rope_dim = rope;
  return c;
}

/// Random weights with variance 1/in, so that activations stay O(1).
MhaWeights<double> random_mha(const MhaConfig& c, std::uint64_t seed) {
  const double s = 1.0 / std::sqrt(static_cast<double>(c.hidden_size));
  return {gaussian(c.num_heads * c.head_dim, c.hidden_size, seed, s),
          gaussian(c.num_kv_heads * c.head_dim, c.hidden_size, seed + 1, s),
          gaussian(c.num_kv_heads * c.v_head_dim, c.hidden_size, seed + 2, s),
          gaussian(c.hidden_size, c.num_heads * c.v_head_dim, seed + 3,
                   1.0 / std::sqrt(static_cast<double>(c.num_heads * c.v_head_dim)))};
}

/// The reference's plain MHA of an MHA/GQA layer: KV heads repeated for their query heads.
std::vector<double> reference_mha(const MhaConfig& c, const MhaWeights<double>& w,
                                  const RowMatrix<double>& x, long long pos0) {
  const Index H = c.num_heads, per = H / c.num_kv_heads, dk = c.head_dim, dv = c.v_head_dim;
  RowMatrix<double> wk(H * dk, c.hidden_size), wv(H * dv, c.hidden_size);
  for (Index h = 0; h < H; ++h) {
    wk.middleRows(h * dk, dk) = w.wk.middleRows(h / per * dk, dk);
    wv.middleRows(h * dv, dv) = w.wv.middleRows(h / per * dv, dv);
  }
  ref::MhaSpec s;
  s.hidden = static_cast<int>(c.hidden_size);
  s.heads = static_cast<int>(H);
  s.dk = static_cast<int>(dk);
  s.dv = static_cast<int>(dv);
  s.scale = 1.0 / std::sqrt(static_cast<double>(dk));
  s.rope.dim = static_cast<int>(c.rope_dim);
  s.rope.theta = c.rope_theta;
  s.rope.interleaved = c.rope_layout == mla::RopeLayout::kInterleaved;
  s.rope.inv_freq = c.rope_inv_freq;
  return ref::mha_forward(s, test::to_vec(w.wq), test::to_vec(wk), test::to_vec(wv),
                          test::to_vec(w.wo), test::to_vec(x), static_cast<int>(x.rows()), pos0);
}

/// The converted MLA layer's output for x: one prefill of the first `prefill` rows (expanded
/// attention), then one absorbed decode step per remaining row, on a double cache.
RowMatrix<double> run_mla(const mla::MlaConversion<double>& m, const RowMatrix<double>& x,
                          std::int64_t pos0, Index prefill) {
  const mla::MlaLayer<double> layer(m.config, m.weights);
  mla::LatentCacheOptions o;
  o.block_tokens = 16;
  o.num_blocks = (x.rows() + 15) / 16;
  o.storage = mla::CacheStorage::kFloat64;
  mla::LatentCache cache(m.config, o);
  const auto seq = cache.add_sequence();
  mla::MlaWorkspace<double> ws;
  RowMatrix<double> y(x.rows(), x.cols());
  layer.forward(x.topRows(prefill), pos0, cache, seq, y.topRows(prefill), ws,
                AttentionPath::kExpanded);
  for (Index t = prefill; t < x.rows(); ++t) {
    layer.forward(x.row(t), pos0 + t, cache, seq, y.row(t), ws, AttentionPath::kAbsorbed);
  }
  return y;
}

double mla_error(const MhaConfig& c, const MhaWeights<double>& w, Index rank,
                 const RowMatrix<double>& x, const RowMatrix<double>& calibration = {}) {
  const auto m = mla::convert_to_mla(c, w, rank, calibration);
  return test::rel_error(test::to_vec(run_mla(m, x, 7, x.rows() / 2)), reference_mha(c, w, x, 7));
}

TEST(Convert, MhaForwardMatchesThePlainReference) {
  for (const MhaConfig& c :
       {mha_dims(24, 4, 4, 8, 6, 4), mha_dims(24, 6, 2, 10, 4, 6), mha_dims(16, 3, 1, 6, 6, 0)}) {
    const auto w = random_mha(c, 3);
    const RowMatrix<double> x = gaussian(9, c.hidden_size, 4);
    EXPECT_LE(test::rel_error(test::to_vec(mla::mha_forward<double>(c, w, x, 5)),
                              reference_mha(c, w, x, 5)),
              1e-12);
  }
}

TEST(Convert, ExactAtFullRankWithoutRopeAndForOneSharedRotaryKey) {
  // No RoPE: only the latent factorisation, exact at rank G (P + d_v).
  // MQA (one KV head): the shared rotary key is the head's own, so RoPE is exact too.
  // A rank above hidden_size (4 * 14 = 56 > 40) is exact as well: M has rank <= hidden.
  for (const MhaConfig& c :
       {mha_dims(40, 4, 4, 8, 6, 0), mha_dims(40, 4, 1, 8, 6, 4), mha_dims(24, 6, 1, 12, 8, 12)}) {
    const auto w = random_mha(c, 11);
    const RowMatrix<double> x = gaussian(12, c.hidden_size, 12);
    const Index full = c.num_kv_heads * (c.head_dim - c.rope_dim + c.v_head_dim);
    const auto m = mla::convert_to_mla(c, w, full);
    EXPECT_NEAR(m.latent_retained, 1.0, 1e-12);
    EXPECT_NEAR(m.rotary_retained, 1.0, 1e-12);
    EXPECT_LE(mla_error(c, w, full, x), 1e-10) << "kv heads " << c.num_kv_heads;
  }
}

TEST(Convert, RotaryKeysThatDifferByAComplexFactorPerPairAreExact) {
  // Heads whose rotary keys are a complex multiple (per RoPE pair) of one shared key: the
  // factor moves into the queries, so the conversion is exact although G = H.
  for (mla::RopeLayout layout : {mla::RopeLayout::kInterleaved, mla::RopeLayout::kHalfSplit}) {
    MhaConfig c = mha_dims(32, 3, 3, 10, 6, 6);
    c.rope_layout = layout;
    auto w = random_mha(c, 21);
    const Index P = c.head_dim - c.rope_dim, R = c.rope_dim;
    const RowMatrix<double> shared = gaussian(R, c.hidden_size, 22, 0.2);
    const RowMatrix<double> f = gaussian(c.num_kv_heads, R, 23);  // (re, im) per head and pair
    for (Index g = 0; g < c.num_kv_heads; ++g) {
      for (Index i = 0; i < R / 2; ++i) {
        const bool il = layout == mla::RopeLayout::kInterleaved;
        const Index a = il ? 2 * i : i, b = il ? 2 * i + 1 : i + R / 2;
        const double re = f(g, 2 * i), im = f(g, 2 * i + 1);
        // (re + i im)(s_a + i s_b)
        w.wk.row(g * c.head_dim + P + a) = re * shared.row(a) - im * shared.row(b);
        w.wk.row(g * c.head_dim + P + b) = re * shared.row(b) + im * shared.row(a);
      }
    }
    const Index full = c.num_kv_heads * (P + c.v_head_dim);
    EXPECT_NEAR(mla::convert_to_mla(c, w, full).rotary_retained, 1.0, 1e-12);
    EXPECT_LE(mla_error(c, w, full, gaussian(10, c.hidden_size, 24)), 1e-10);
  }
}

TEST(Convert, GeneralRotaryKeysLoseOnlyWhatTheSharedKeyCannotHold) {
  // Independent rotary keys per head: part of them is lost at every rank; the loss is
  // reported, and is the whole error at full rank.
  const MhaConfig c = mha_dims(32, 4, 4, 8, 6, 4);
  const auto w = random_mha(c, 31);
  const Index full = c.num_kv_heads * (c.head_dim - c.rope_dim + c.v_head_dim);
  const auto m = mla::convert_to_mla(c, w, full);
  EXPECT_LT(m.rotary_retained, 0.9);
  EXPECT_GT(m.rotary_retained, 0.25 - 1e-12);  // the leading of 4 directions keeps >= 1/4
  EXPECT_GT(mla_error(c, w, full, gaussian(10, c.hidden_size, 32)), 1e-3);
}

TEST(Convert, ErrorDoesNotGrowWithRank) {
  // A spectrum that decays, as trained projections have: M = A diag(0.7^k) B.
  const MhaConfig c = mha_dims(48, 4, 4, 8, 8, 0);
  auto w = random_mha(c, 41);
  const Index width = c.num_kv_heads * (c.head_dim + c.v_head_dim);  // 64
  RowMatrix<double> a = gaussian(width, width, 42), b = gaussian(width, c.hidden_size, 43, 0.15);
  for (Index k = 0; k < width; ++k) a.col(k) *= std::pow(0.85, static_cast<double>(k));
  const RowMatrix<double> m = a * b;
  for (Index g = 0; g < c.num_kv_heads; ++g) {
    w.wk.middleRows(g * 8, 8) = m.middleRows(g * 16, 8);
    w.wv.middleRows(g * 8, 8) = m.middleRows(g * 16 + 8, 8);
  }
  const RowMatrix<double> x = gaussian(16, c.hidden_size, 44);
  double previous = INFINITY;
  for (Index rank : {1, 2, 4, 8, 16, 32, 48, 64}) {
    const double e = mla_error(c, w, rank, x);
    EXPECT_LE(e, previous * (1 + 1e-9)) << "rank " << rank;
    previous = e;
  }
  EXPECT_LE(previous, 1e-10);
}

TEST(Convert, AModelOfExactRankRIsRecoveredAtR) {
  const MhaConfig c = mha_dims(40, 4, 2, 8, 6, 2);
  auto w = random_mha(c, 51);
  const Index P = c.head_dim - c.rope_dim, width = c.num_kv_heads * (P + c.v_head_dim);
  constexpr Index r = 5;
  const RowMatrix<double> m =
      gaussian(width, r, 52) * gaussian(r, c.hidden_size, 53, 1.0 / std::sqrt(40.0));
  for (Index g = 0; g < c.num_kv_heads; ++g) {
    w.wk.middleRows(g * c.head_dim, P) = m.middleRows(g * (P + c.v_head_dim), P);
    w.wv.middleRows(g * c.v_head_dim, c.v_head_dim) =
        m.middleRows(g * (P + c.v_head_dim) + P, c.v_head_dim);
    // One shared rotary key row pair for both KV heads (up to a real factor): exact.
    w.wk.middleRows(g * c.head_dim + P, 2) = (g + 1.0) * w.wk.middleRows(P, 2);
  }
  const RowMatrix<double> x = gaussian(10, c.hidden_size, 54);
  EXPECT_LE(mla_error(c, w, r, x), 1e-10);
  EXPECT_GT(mla_error(c, w, r - 1, x), 1e-4);
}

TEST(Convert, CalibrationLowersTheErrorOnInputsLikeIt) {
  // Inputs concentrated in a few directions: weighting by their covariance spends the rank
  // where the inputs are.
  const MhaConfig c = mha_dims(48, 4, 4, 8, 8, 0);
  const auto w = random_mha(c, 61);
  RowMatrix<double> mix = gaussian(6, c.hidden_size, 62);
  const RowMatrix<double> calibration = gaussian(200, 6, 63) * mix;
  const RowMatrix<double> x = gaussian(12, 6, 64) * mix;
  const Index rank = 12;
  EXPECT_LT(mla_error(c, w, rank, x, calibration), 0.5 * mla_error(c, w, rank, x));
}

TEST(Convert, GqaBaselineEqualsMhaWhenGroupsEqualHeadsAndPoolsByMean) {
  const MhaConfig c = mha_dims(24, 4, 4, 8, 6, 4);
  const auto w = random_mha(c, 71);
  const RowMatrix<double> x = gaussian(8, c.hidden_size, 72);
  MhaConfig same;
  const auto p = mla::pool_kv_heads(c, w, 4, same);
  EXPECT_EQ(same.num_kv_heads, 4);
  EXPECT_LE(test::rel_error(test::to_vec(mla::mha_forward<double>(same, p, x)),
                            reference_mha(c, w, x, 0)),
            1e-12);
  // Two groups: keys and values of heads (0, 1) and (2, 3) averaged, by hand here.
  MhaConfig two;
  const auto q = mla::pool_kv_heads(c, w, 2, two);
  MhaWeights<double> want = w;
  want.wk = RowMatrix<double>(2 * 8, 24);
  want.wv = RowMatrix<double>(2 * 6, 24);
  for (Index i = 0; i < 8; ++i) {
    for (Index j = 0; j < 24; ++j) {
      want.wk(i, j) = 0.5 * (w.wk(i, j) + w.wk(8 + i, j));
      want.wk(8 + i, j) = 0.5 * (w.wk(16 + i, j) + w.wk(24 + i, j));
    }
  }
  for (Index i = 0; i < 6; ++i) {
    for (Index j = 0; j < 24; ++j) {
      want.wv(i, j) = 0.5 * (w.wv(i, j) + w.wv(6 + i, j));
      want.wv(6 + i, j) = 0.5 * (w.wv(12 + i, j) + w.wv(18 + i, j));
    }
  }
  EXPECT_LE(test::rel_error(test::to_vec(mla::mha_forward<double>(two, q, x)),
                            reference_mha(two, want, x, 0)),
            1e-12);
  EXPECT_EQ(two.cache_bytes_per_token(), 2 * (8 + 6) * 4);
}

// ---------------------------------------------------------------------------------------------
// Partial RoPE

/// The source's frequencies times `scale`: the same as its tokens sitting `scale` positions
/// apart, i.e. a context `scale` times longer for the same tokens.
MhaConfig stretched(MhaConfig c, double scale) {
  const std::vector<double> f = mla::Rope(mla::detail::convert::mla_shape(c, 1)).inv_freq();
  c.rope_inv_freq.clear();
  for (double v : f) c.rope_inv_freq.push_back(v * scale);
  return c;
}

double partial_error(const MhaConfig& c, const MhaWeights<double>& w, Index rank,
                     const mla::ConvertOptions& o, const RowMatrix<double>& x) {
  const auto m = mla::convert_to_mla(c, w, rank, RowMatrix<double>(), o);
  return test::rel_error(test::to_vec(run_mla(m, x, 0, x.rows() / 2)), reference_mha(c, w, x, 0));
}

TEST(PartialRope, KeepingEveryPairIsTheConversionWithoutPartialRope) {
  const MhaConfig c = mha_dims(32, 4, 2, 12, 8, 8);
  const auto w = random_mha(c, 31);
  const RowMatrix<double> cal = gaussian(40, c.hidden_size, 32);
  for (Index rank : {Index{5}, Index{24}}) {
    const auto base = mla::convert_to_mla(c, w, rank, cal);
    for (auto criterion : {mla::RopeKeep::kHighestFrequency, mla::RopeKeep::kContribution}) {
      const auto m = mla::convert_to_mla(c, w, rank, cal, {8, criterion});
      EXPECT_EQ(m.config.qk_rope_head_dim, base.config.qk_rope_head_dim);
      EXPECT_TRUE(m.config.rope_inv_freq.empty());
      EXPECT_EQ(m.weights.wq.to_dense(), base.weights.wq.to_dense());
      EXPECT_EQ(m.weights.wkv_a.to_dense(), base.weights.wkv_a.to_dense());
      EXPECT_EQ(m.weights.wkv_b.to_dense(), base.weights.wkv_b.to_dense());
      EXPECT_EQ(m.rotary_retained, base.rotary_retained);
      EXPECT_EQ(m.latent_retained, base.latent_retained);
    }
  }
}

TEST(PartialRope, MovedPairsThatDoNotTurnAreExactAtFullRank) {
  // Pairs of frequency 0 never rotate, so as ordinary key dimensions in the latent they are
  // exact: MQA keeping the turning pairs, and MHA (independent rotary keys) moving every pair.
  MhaConfig mqa = mha_dims(40, 4, 1, 10, 6, 8);
  mqa.rope_inv_freq = {1.0, 0.25, 0.0, 0.0};
  MhaConfig mha = mha_dims(40, 4, 4, 10, 6, 8);
  mha.rope_inv_freq = {0.0, 0.0, 0.0, 0.0};
  const std::vector<std::pair<MhaConfig, Index>> cases = {{mqa, 4}, {mha, 0}};
  for (const auto& [c, keep] : cases) {
    const auto w = random_mha(c, 41);
    const RowMatrix<double> x = gaussian(12, c.hidden_size, 42);
    const Index full = c.num_kv_heads * (c.head_dim - keep + c.v_head_dim);
    const auto m = mla::convert_to_mla(c, w, full, RowMatrix<double>(), {keep});
    EXPECT_EQ(m.config.qk_rope_head_dim, keep);
    EXPECT_EQ(m.config.qk_nope_head_dim, c.head_dim - keep);
    EXPECT_NEAR(m.rotary_retained, 1.0, 1e-12);
    EXPECT_LE(partial_error(c, w, full, {keep}, x), 1e-10) << "kv heads " << c.num_kv_heads;
    // Without moving them, MHA's independent rotary keys lose most of their energy.
    if (keep == 0) {
      EXPECT_LT(mla::convert_to_mla(c, w, c.num_kv_heads * (c.head_dim - 8 + c.v_head_dim))
                    .rotary_retained,
                0.5);
    }
  }
}

TEST(PartialRope, TheErrorGrowsWithTheContextAsTheMovedPairsTurn) {
  // MQA, full rank: the only loss is the rotation the moved (lowest-frequency) pair misses,
  // an angle of up to L theta over a context of L positions.
  const MhaConfig c = mha_dims(32, 4, 1, 12, 8, 8);
  const auto w = random_mha(c, 51);
  const RowMatrix<double> x = gaussian(12, c.hidden_size, 52);
  const Index full = c.head_dim - 6 + c.v_head_dim;
  double last = 0.0;
  for (double scale : {1.0, 4.0, 16.0, 64.0, 256.0}) {
    const MhaConfig s = stretched(c, scale);
    const double e = partial_error(s, w, full, {6}, x);
    EXPECT_GT(e, last) << "context x" << scale;
    last = e;
  }
  EXPECT_LT(partial_error(c, w, full, {6}, x), 1e-2);  // 11 positions x 1e-3 rad: small
  EXPECT_GT(last, 1e-2);
  // Keeping every pair is exact at every context.
  EXPECT_LE(partial_error(stretched(c, 256.0), w, full + 6 - 8, {8}, x), 1e-10);
}

TEST(PartialRope, MoreRotaryDirectionsPerPairHoldMoreOfTheHeadsKeys) {
  // Independent rotary keys per head (MHA): rope_rank = num_kv_heads keeps every head's key
  // exactly (exact at full rank), and the retained energy grows with the rank.
  const MhaConfig c = mha_dims(32, 4, 4, 12, 8, 8);
  const auto w = random_mha(c, 71);
  const RowMatrix<double> x = gaussian(12, c.hidden_size, 72);
  const Index full = c.num_kv_heads * (12 - 8 + 8);
  double last = 0.0;
  for (Index rr = 1; rr <= 4; ++rr) {
    const mla::ConvertOptions o{8, mla::RopeKeep::kHighestFrequency, rr};
    const auto m = mla::convert_to_mla(c, w, full, RowMatrix<double>(), o);
    EXPECT_EQ(m.config.qk_rope_head_dim, 8 * rr);
    EXPECT_GT(m.rotary_retained, last);
    last = m.rotary_retained;
    if (rr == 4) {
      EXPECT_NEAR(m.rotary_retained, 1.0, 1e-12);
      EXPECT_LE(partial_error(c, w, full, o, x), 1e-10);
    }
  }
  // Partial RoPE with several directions: the kept pairs exact, moved pairs that do not turn
  // exact too.
  MhaConfig still = c;
  still.rope_inv_freq = {1.0, 0.3, 0.0, 0.0};
  const Index full4 = c.num_kv_heads * (12 - 4 + 8);
  EXPECT_LE(partial_error(still, w, full4, {4, mla::RopeKeep::kHighestFrequency, 4}, x), 1e-10);
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        mla::convert_to_mla(c, w, 4, RowMatrix<double>(), {8, mla::RopeKeep::kHighestFrequency, 5});
      },
      "rope_rank must be in [1, num_kv_heads = 4]"));
}

TEST(PartialRope, TheContributionCriterionKeepsThePairsThatCarryTheScores) {
  // Pairs 0 and 1 (the highest frequencies) carry almost nothing in the key: the contribution
  // criterion keeps pairs 2 and 3, the frequency criterion pairs 0 and 1. (MQA, so that the
  // kept pairs are exact and the error is only the moved pairs' missing rotation: moving the
  // empty pairs costs nothing, moving the full ones does.)
  const MhaConfig c = mha_dims(32, 4, 1, 12, 8, 8);
  auto w = random_mha(c, 61);
  for (Index g = 0; g < c.num_kv_heads; ++g) {
    for (Index i : {0, 1}) {
      const mla::RopePair p = mla::rope_pair(c.rope_layout, 8, i);
      w.wk.row(g * 12 + 4 + p.first) *= 1e-3;
      w.wk.row(g * 12 + 4 + p.second) *= 1e-3;
    }
  }
  const Index rank = c.num_kv_heads * (12 - 4 + 8);
  const auto by_norm =
      mla::convert_to_mla(c, w, rank, RowMatrix<double>(), {4, mla::RopeKeep::kContribution});
  const auto by_freq =
      mla::convert_to_mla(c, w, rank, RowMatrix<double>(), {4, mla::RopeKeep::kHighestFrequency});
  EXPECT_EQ(by_norm.rope_pairs_kept, (std::vector<Index>{2, 3}));
  EXPECT_EQ(by_freq.rope_pairs_kept, (std::vector<Index>{0, 1}));
  const RowMatrix<double> x = gaussian(16, c.hidden_size, 62);
  EXPECT_LT(partial_error(c, w, rank, {4, mla::RopeKeep::kContribution}, x),
            partial_error(c, w, rank, {4, mla::RopeKeep::kHighestFrequency}, x));
}

TEST(Convert, BadArgumentsAreClearErrors) {
  const MhaConfig c = mha_dims(24, 4, 2, 8, 6, 4);
  const auto w = random_mha(c, 81);
  EXPECT_TRUE(
      test::throws_error_containing([&] { mla::convert_to_mla(c, w, 0); }, "rank must be in [1, "));
  EXPECT_TRUE(
      test::throws_error_containing([&] { mla::convert_to_mla(c, w, 21); }, "= 20], got 21"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { mla::convert_to_mla(c, w, 4, gaussian(5, 23, 1)); }, "calibration has 23 columns"));
  MhaConfig out;
  EXPECT_TRUE(test::throws_error_containing([&] { mla::pool_kv_heads(c, w, 3, out); },
                                            "groups (3) must divide num_kv_heads (2)"));
  MhaWeights<double> bad = w;
  bad.wv = RowMatrix<double>(5, 24);
  EXPECT_TRUE(
      test::throws_error_containing([&] { mla::convert_to_mla(c, w, 4, RowMatrix<double>(), {3}); },
                                    "rope_keep must be an even"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { mla::convert_to_mla(c, w, 4, RowMatrix<double>(), {c.rope_dim + 2}); },
      "rope_keep must be an even"));
  EXPECT_TRUE(test::throws_error_containing([&] { mla::convert_to_mla(c, bad, 4); },
                                            "MhaWeights.wv is [5, 24], expected [12, 24]"));
  EXPECT_TRUE(test::throws_error_containing([] { mha_dims(24, 4, 3, 8, 6, 4).validate(); },
                                            "num_kv_heads (3) must divide num_heads (4)"));
}

}  // namespace
