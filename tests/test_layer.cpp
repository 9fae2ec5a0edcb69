// MlaLayer against the independent double references: absorbed == expanded == reference MLA,
// MLA == reconstructed MHA, incremental decode == prefill, RoPE layouts, bad input.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "mla/layer.hpp"
#include "reference/mla_reference.hpp"
#include "test_util.hpp"

namespace {

using mla::AttentionPath;
using mla::Index;
using mla::LatentCache;
using mla::MlaConfig;
using mla::MlaLayer;
using mla::MlaWeights;
using mla::MlaWorkspace;
using mla::RowMatrix;

/// A one-layer cache that holds T exactly, with small blocks so that chunks cross them.
template <class T>
LatentCache make_cache(const MlaConfig& c, Index num_blocks = 32, Index block_tokens = 16) {
  mla::LatentCacheOptions o;
  o.num_layers = 1;
  o.block_tokens = block_tokens;
  o.num_blocks = num_blocks;
  o.storage = test::exact_storage<T>();
  return LatentCache(c, o);
}

/// Runs one prefill of x at start_pos on a fresh cache and returns the output (and the lse and
/// cache contents, when asked).
template <class T>
RowMatrix<T> run_prefill(const MlaLayer<T>& layer, const RowMatrix<T>& x, std::int64_t start_pos,
                         AttentionPath path, std::vector<double>* lse = nullptr,
                         std::vector<double>* latent = nullptr) {
  const MlaConfig& c = layer.config();
  LatentCache cache = make_cache<T>(c);
  const mla::SequenceId seq = cache.add_sequence();
  MlaWorkspace<T> ws;
  RowMatrix<T> y(x.rows(), c.hidden_size);
  layer.forward(x, start_pos, cache, seq, y, ws, path);
  if (lse) *lse = test::to_vec(ws.last_lse().topRows(x.rows()));
  if (latent) *latent = test::to_vec(test::cache_contents(cache, seq, 0));
  return y;
}

struct Case {
  const char* name;
  MlaConfig config;
  std::int64_t start_pos;
};

std::vector<Case> cases() {
  std::vector<Case> v;
  for (std::int64_t pos : {std::int64_t{0}, std::int64_t{4097}, std::int64_t{163839}}) {
    v.push_back({"v2lite", MlaConfig::small_v2_lite(), pos});
    v.push_back({"v3", MlaConfig::small_v3(), pos});
  }
  return v;
}

template <class T>
class LayerTest : public ::testing::Test {};
using ComputeTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(LayerTest, ComputeTypes, );

TYPED_TEST(LayerTest, AbsorbedEqualsExpandedEqualsReference) {
  using T = TypeParam;
  const double tol = test::layer_tolerance<T>();
  for (const Case& k : cases()) {
    SCOPED_TRACE(std::string(k.name) + " start_pos " + std::to_string(k.start_pos));
    const MlaWeights<T> w = MlaWeights<T>::random(k.config, 17);
    const MlaLayer<T> layer(k.config, w);
    // 70 tokens: more than one attention tile (64) and several cache blocks (16).
    const Index n = 70;
    const RowMatrix<T> x = test::random_input<T>(n, k.config.hidden_size, 5);

    ref::MlaTrace trace;
    const std::vector<double> want =
        ref::mla_forward(test::to_ref(k.config), test::to_ref(w), test::to_vec(x),
                         static_cast<int>(n), k.start_pos, &trace);
    std::vector<double> lse_e, lse_a, latent;
    const RowMatrix<T> y_e =
        run_prefill(layer, x, k.start_pos, AttentionPath::kExpanded, &lse_e, &latent);
    const RowMatrix<T> y_a = run_prefill(layer, x, k.start_pos, AttentionPath::kAbsorbed, &lse_a);

    EXPECT_LE(test::rel_error(test::to_vec(y_e), want), tol) << "expanded vs reference";
    EXPECT_LE(test::rel_error(test::to_vec(y_a), want), tol) << "absorbed vs reference";
    EXPECT_LE(test::rel_error(test::to_vec(y_a), test::to_vec(y_e)), tol) << "absorbed vs expanded";
    EXPECT_LE(test::rel_error(lse_e, trace.lse), tol) << "expanded log-sum-exp";
    EXPECT_LE(test::rel_error(lse_a, trace.lse), tol) << "absorbed log-sum-exp";
    EXPECT_LE(test::rel_error(latent, trace.latent), tol) << "cached [c_kv ; k_pe]";
  }
}

TYPED_TEST(LayerTest, FamilyOptionsMatchTheReferenceOnEveryPath) {
  // The other MLA families' changes, alone and together: NoPE (Kimi), the output gate (Kimi
  // K3), Llama-4 query scaling (Mistral Large 3), scaled latents (LongCat), R = 0.
  using T = TypeParam;
  const double tol = test::layer_tolerance<T>();
  struct Option {
    const char* name;
    std::function<void(MlaConfig&)> set;
  };
  const std::vector<Option> options = {
      {"nope", [](MlaConfig& c) { c.mla_use_nope = true; }},
      {"gate", [](MlaConfig& c) { c.mla_use_output_gate = true; }},
      {"llama4",
       [](MlaConfig& c) {
         c.llama_4_scaling = {0.1, 16};
       }},
      {"latent scales",
       [](MlaConfig& c) {
         c.q_lora_scale = 2.0;
         c.kv_lora_scale = 1.5;
       }},
      {"all",
       [](MlaConfig& c) {
         c.mla_use_nope = c.mla_use_output_gate = true;
         c.llama_4_scaling = {0.25, 8};
         c.q_lora_scale = 0.5;
         c.kv_lora_scale = 3.0;
       }},
      {"R = 0",
       [](MlaConfig& c) {
         c.qk_rope_head_dim = 0;
         c.mla_use_nope = true;
       }},
  };
  for (const Option& o : options) {
    SCOPED_TRACE(o.name);
    MlaConfig c = MlaConfig::small_v3();
    o.set(c);
    const MlaWeights<T> w = MlaWeights<T>::random(c, 23);
    const MlaLayer<T> layer(c, w);
    const Index n = 40;
    const std::int64_t start = 50;  // crosses several Llama-4 periods
    const RowMatrix<T> x = test::random_input<T>(n, c.hidden_size, 6);
    const std::vector<double> want = ref::mla_forward(test::to_ref(c), test::to_ref(w),
                                                      test::to_vec(x), static_cast<int>(n), start);
    for (AttentionPath path : {AttentionPath::kExpanded, AttentionPath::kAbsorbed}) {
      EXPECT_LE(test::rel_error(test::to_vec(run_prefill(layer, x, start, path)), want), tol);
    }
    LatentCache cache = make_cache<T>(c);
    const auto seq = cache.add_sequence();
    MlaWorkspace<T> ws;
    RowMatrix<T> y(n, c.hidden_size);
    layer.forward(x.topRows(13), start, cache, seq, y.topRows(13), ws);
    for (Index t = 13; t < n; ++t) layer.forward(x.row(t), start + t, cache, seq, y.row(t), ws);
    EXPECT_LE(test::rel_error(test::to_vec(y), want), tol) << "prefill then decode";
    // Without RoPE and query scaling, no position enters: the same tokens elsewhere agree.
    if (c.mla_use_nope && !c.llama_4_scaling.enabled()) {
      const RowMatrix<T> moved = run_prefill(layer, x, 100000, AttentionPath::kAbsorbed);
      EXPECT_LE(test::rel_error(test::to_vec(moved), want), tol) << "position-free";
    }
  }
}

TYPED_TEST(LayerTest, TokenByTokenDecodeEqualsOnePrefill) {
  using T = TypeParam;
  const double tol = test::layer_tolerance<T>();
  for (const Case& k : cases()) {
    SCOPED_TRACE(std::string(k.name) + " start_pos " + std::to_string(k.start_pos));
    const MlaLayer<T> layer(k.config, MlaWeights<T>::random(k.config, 3));
    const Index n = 40, prompt = 23;
    const RowMatrix<T> x = test::random_input<T>(n, k.config.hidden_size, 9);
    const RowMatrix<T> y_prefill = run_prefill(layer, x, k.start_pos, AttentionPath::kAuto);

    // All n tokens one at a time (the absorbed decode path).
    LatentCache cache = make_cache<T>(k.config);
    const auto seq = cache.add_sequence();
    MlaWorkspace<T> ws;
    RowMatrix<T> y_steps(n, k.config.hidden_size);
    for (Index t = 0; t < n; ++t) {
      ASSERT_EQ(layer.choose_path(1, t), AttentionPath::kAbsorbed);
      layer.forward(x.row(t), k.start_pos + t, cache, seq, y_steps.row(t), ws);
    }
    EXPECT_LE(test::rel_error(test::to_vec(y_steps), test::to_vec(y_prefill)), tol);

    // A prompt prefill, then the rest one at a time.
    LatentCache cache2 = make_cache<T>(k.config);
    const auto seq2 = cache2.add_sequence();
    RowMatrix<T> y_mixed(n, k.config.hidden_size);
    layer.forward(x.topRows(prompt), k.start_pos, cache2, seq2, y_mixed.topRows(prompt), ws);
    for (Index t = prompt; t < n; ++t) {
      layer.forward(x.row(t), k.start_pos + t, cache2, seq2, y_mixed.row(t), ws);
    }
    EXPECT_LE(test::rel_error(test::to_vec(y_mixed), test::to_vec(y_prefill)), tol);
    EXPECT_EQ(cache2.length(seq2, 0), n);
  }
}

TYPED_TEST(LayerTest, ChunkedPrefillOnEitherPathEqualsOnePrefill) {
  using T = TypeParam;
  const MlaConfig c = MlaConfig::small_v3();
  const MlaLayer<T> layer(c, MlaWeights<T>::random(c, 4));
  const Index n = 50;
  const RowMatrix<T> x = test::random_input<T>(n, c.hidden_size, 2);
  const RowMatrix<T> y_one = run_prefill(layer, x, 100, AttentionPath::kExpanded);
  for (AttentionPath path : {AttentionPath::kExpanded, AttentionPath::kAbsorbed}) {
    LatentCache cache = make_cache<T>(c);
    const auto seq = cache.add_sequence();
    MlaWorkspace<T> ws;
    RowMatrix<T> y(n, c.hidden_size);
    const Index bounds[] = {0, 7, 20, 41, n};  // chunks of 7, 13, 21 and 9 tokens
    for (int i = 0; i + 1 < 5; ++i) {
      const Index t0 = bounds[i], len = bounds[i + 1] - bounds[i];
      layer.forward(x.middleRows(t0, len), 100 + t0, cache, seq, y.middleRows(t0, len), ws, path);
    }
    EXPECT_LE(test::rel_error(test::to_vec(y), test::to_vec(y_one)), test::layer_tolerance<T>());
  }
}

TYPED_TEST(LayerTest, RopeLayoutsAgreeWhenWeightsArePermuted) {
  // The same model stored with half-split rotary pairs: permute the rotary output rows of the
  // query and key projections from (x0, x1, x2, x3, ...) to (x0, x2, ..., x1, x3, ...).
  using T = TypeParam;
  for (MlaConfig c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    const MlaWeights<T> w = MlaWeights<T>::random(c, 8);
    const Index H = c.num_attention_heads, P = c.qk_nope_head_dim, R = c.qk_rope_head_dim;
    const Index D = c.kv_lora_rank;
    auto deinterleave_rows = [&](const RowMatrix<T>& m, Index first) {
      RowMatrix<T> out = m;
      for (Index i = 0; i < R / 2; ++i) {
        out.row(first + i) = m.row(first + 2 * i);
        out.row(first + R / 2 + i) = m.row(first + 2 * i + 1);
      }
      return out;
    };
    MlaWeights<T> w2 = w;
    RowMatrix<T> wq = c.has_q_lora() ? w.wq_b.dense() : w.wq.dense();
    for (Index h = 0; h < H; ++h) wq = deinterleave_rows(wq, h * (P + R) + P);
    (c.has_q_lora() ? w2.wq_b : w2.wq) = mla::Linear<T>(wq);
    w2.wkv_a = mla::Linear<T>(deinterleave_rows(w.wkv_a.dense(), D));
    MlaConfig c2 = c;
    c2.rope_layout = mla::RopeLayout::kHalfSplit;

    const RowMatrix<T> x = test::random_input<T>(30, c.hidden_size, 4);
    for (AttentionPath path : {AttentionPath::kExpanded, AttentionPath::kAbsorbed}) {
      std::vector<double> latent1, latent2;
      const RowMatrix<T> y1 = run_prefill(MlaLayer<T>(c, w), x, 4097, path, nullptr, &latent1);
      const RowMatrix<T> y2 = run_prefill(MlaLayer<T>(c2, w2), x, 4097, path, nullptr, &latent2);
      EXPECT_LE(test::rel_error(test::to_vec(y2), test::to_vec(y1)), test::layer_tolerance<T>());
      // The cached k^R of the half-split model is the de-interleaved k^R of the other.
      const RowMatrix<T> l1 = test::from_vec<T>(latent1, 30, D + R);
      RowMatrix<T> expected = l1;
      for (Index i = 0; i < R / 2; ++i) {
        expected.col(D + i) = l1.col(D + 2 * i);
        expected.col(D + R / 2 + i) = l1.col(D + 2 * i + 1);
      }
      EXPECT_LE(test::rel_error(latent2, test::to_vec(expected)), test::layer_tolerance<T>());
    }
  }
}

TEST(LayerMha, MlaEqualsReconstructedMha) {
  // A plain MHA whose per-head key and value weights are W_UK^(h) diag(g) W_DKV and
  // W_UV^(h) diag(g) W_DKV, with the shared rotary key W_KR in every head, equals MLA for
  // inputs whose raw latent W_DKV x has unit RMS: there RMSNorm(z) = z / rms(z) * g is exactly
  // the linear map diag(g). (Without that normalisation the two differ; see below.)
  const MlaConfig c = MlaConfig::small_v2_lite();  // no query compression: q = W_q x is linear
  const MlaWeights<double> w = MlaWeights<double>::random(c, 21);
  const Index H = c.num_attention_heads, P = c.qk_nope_head_dim, R = c.qk_rope_head_dim;
  const Index V = c.v_head_dim, D = c.kv_lora_rank, hidden = c.hidden_size;
  const RowMatrix<double> w_dkv = w.wkv_a.dense().topRows(D);
  const RowMatrix<double> w_kr = w.wkv_a.dense().bottomRows(R);
  const Eigen::MatrixXd g = w.kv_norm.asDiagonal();
  RowMatrix<double> wk(H * (P + R), hidden), wv(H * V, hidden);
  for (Index h = 0; h < H; ++h) {
    const RowMatrix<double> w_uk = w.wkv_b.dense().middleRows(h * (P + V), P);
    const RowMatrix<double> w_uv = w.wkv_b.dense().middleRows(h * (P + V) + P, V);
    wk.middleRows(h * (P + R), P) = w_uk * g * w_dkv;
    wk.middleRows(h * (P + R) + P, R) = w_kr;
    wv.middleRows(h * V, V) = w_uv * g * w_dkv;
  }
  ref::MhaSpec mha;
  mha.hidden = static_cast<int>(hidden);
  mha.heads = static_cast<int>(H);
  mha.dk = static_cast<int>(P + R);
  mha.dv = static_cast<int>(V);
  mha.scale = mla::softmax_scale(c);  // the same sigma = (P + R)^-1/2 mscale^2
  mha.rope = test::to_ref_rope(c);

  const Index n = 45;
  RowMatrix<double> x = test::random_input<double>(n, hidden, 12);
  const RowMatrix<double> x_raw = x;
  for (Index t = 0; t < n; ++t) {
    const double ms = (w_dkv * x.row(t).transpose()).squaredNorm() / static_cast<double>(D);
    x.row(t) *= std::sqrt((1.0 - c.rms_norm_eps) / ms);  // mean(z^2) + eps == 1
  }
  const MlaLayer<double> layer(c, w);
  for (std::int64_t pos : {std::int64_t{0}, std::int64_t{4097}}) {
    const std::vector<double> y_mha =
        ref::mha_forward(mha, test::to_vec(w.wq.dense()), test::to_vec(wk), test::to_vec(wv),
                         test::to_vec(w.wo.dense()), test::to_vec(x), static_cast<int>(n), pos);
    for (AttentionPath path : {AttentionPath::kExpanded, AttentionPath::kAbsorbed}) {
      const RowMatrix<double> y = run_prefill(layer, x, pos, path);
      EXPECT_LE(test::rel_error(test::to_vec(y), y_mha), 1e-12) << "start_pos " << pos;
    }
    // Control: on raw inputs the norm is not linear, and the comparison must see it.
    const std::vector<double> y_mha_raw =
        ref::mha_forward(mha, test::to_vec(w.wq.dense()), test::to_vec(wk), test::to_vec(wv),
                         test::to_vec(w.wo.dense()), test::to_vec(x_raw), static_cast<int>(n), pos);
    const RowMatrix<double> y_raw = run_prefill(layer, x_raw, pos, AttentionPath::kAuto);
    EXPECT_GT(test::rel_error(test::to_vec(y_raw), y_mha_raw), 1e-3);
  }
}

TEST(LayerPath, AutoPicksExpandedForPrefillAndAbsorbedForDecode) {
  for (const MlaConfig& c :
       {MlaConfig::deepseek_v2_lite(), MlaConfig::deepseek_v2(), MlaConfig::deepseek_v3(),
        MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    for (Index past : {Index{0}, Index{100}, Index{100000}}) {
      EXPECT_EQ(mla::auto_attention_path(c, 1, past), AttentionPath::kAbsorbed);
    }
    // A fresh prefill rebuilds each key once and attends with the narrow heads.
    for (Index tokens : {Index{2}, Index{64}, Index{512}, Index{4096}}) {
      EXPECT_EQ(mla::auto_attention_path(c, tokens, 0), AttentionPath::kExpanded) << tokens;
    }
  }
  // DeepSeek sizes: a short chunk after a long history is cheaper absorbed, a long one expanded.
  const MlaConfig v3 = MlaConfig::deepseek_v3();
  EXPECT_EQ(mla::auto_attention_path(v3, 4, 32768), AttentionPath::kAbsorbed);
  EXPECT_EQ(mla::auto_attention_path(v3, 512, 32768), AttentionPath::kExpanded);
}

}  // namespace

namespace {

TEST(LayerErrors, BadInputIsAClearErrorAndChangesNothing) {
  const MlaConfig c = MlaConfig::small_v3();
  const MlaLayer<float> layer(c, MlaWeights<float>::random(c, 5));
  mla::LatentCacheOptions o;
  o.num_layers = 2;
  o.block_tokens = 4;
  o.num_blocks = 3;
  LatentCache cache(c, o);
  const mla::SequenceId seq = cache.add_sequence();
  MlaWorkspace<float> ws;
  const RowMatrix<float> x = test::random_input<float>(8, 64, 1);
  RowMatrix<float> y(5, 64);
  layer.forward(x.topRows(5), 0, cache, seq, y, ws);  // 5 tokens: 2 of the 3 blocks

  const RowMatrix<float> y_before = y;
  auto unchanged = [&] {
    return cache.length(seq, 0) == 5 && cache.length(seq, 1) == 0 && cache.free_blocks() == 1 &&
           y == y_before;
  };
  RowMatrix<float> x_wide(2, 65), y_small(1, 64), y2(2, 64);
  EXPECT_TRUE(test::throws_error_containing([&] { layer.forward(x_wide, 5, cache, seq, y2, ws); },
                                            "x has 65 columns, expected hidden_size = 64"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { layer.forward(x.topRows(2), 5, cache, seq, y_small, ws); },
      "y is [1, 64], expected [2, 64]"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { layer.forward(x.topRows(2), -1, cache, seq, y2, ws); }, "start_pos"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { layer.forward(x.topRows(2), 5, cache, seq + 1, y2, ws); }, "unknown sequence id"));
  const MlaLayer<float> layer2(c, MlaWeights<float>::random(c, 5), 2);  // the cache has 2 layers
  EXPECT_TRUE(test::throws_error_containing(
      [&] { layer2.forward(x.topRows(2), 5, cache, seq, y2, ws); }, "layer 2 out of range"));
  // 5 + 8 tokens need four blocks: the pool has three.
  RowMatrix<float> y8(8, 64);
  EXPECT_TRUE(
      test::throws_error_containing([&] { layer.forward(x, 5, cache, seq, y8, ws); },
                                    "needs 2 more blocks of 4 tokens for 8 tokens, but only "
                                    "1 of the pool's 3 blocks are free"));
  // A cache built for another shape.
  LatentCache other(MlaConfig::small_v2_lite(), o);
  const auto seq_o = other.add_sequence();
  MlaConfig wider = c;
  wider.kv_lora_rank = 40;
  LatentCache wrong(wider, o);
  const auto seq_w = wrong.add_sequence();
  EXPECT_NO_THROW(layer.forward(x.topRows(2), 0, other, seq_o, y2, ws));  // same d_c and R
  EXPECT_TRUE(
      test::throws_error_containing([&] { layer.forward(x.topRows(2), 0, wrong, seq_w, y2, ws); },
                                    "the cache stores [40 + 8] per token, this layer [32 + 8]"));
  EXPECT_TRUE(unchanged());
  // An invalid config is refused by the constructor, naming the field.
  MlaConfig bad = c;
  bad.qk_rope_head_dim = 7;
  EXPECT_TRUE(
      test::throws_error_containing([&] { MlaLayer<float>(bad, MlaWeights<float>::random(c, 5)); },
                                    "MlaConfig.qk_rope_head_dim must be even"));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Quantised caches and batched decode

namespace {

using mla::CacheStorage;

/// Prefill `prompt` tokens, then decode the rest one by one, on a cache of `storage`; returns
/// the outputs of every token and (via `latent`) the dequantised cache contents.
template <class T>
RowMatrix<T> prefill_then_decode(const MlaLayer<T>& layer, const RowMatrix<T>& x, Index prompt,
                                 std::int64_t start_pos, CacheStorage storage,
                                 mla::ScaleFormat scales, AttentionPath decode_path,
                                 std::vector<double>* latent) {
  const MlaConfig& c = layer.config();
  mla::LatentCacheOptions o;
  o.block_tokens = 16;
  o.num_blocks = 8;
  o.storage = storage;
  o.fp8_scales = scales;
  LatentCache cache(c, o);
  const auto seq = cache.add_sequence();
  MlaWorkspace<T> ws;
  RowMatrix<T> y(x.rows(), c.hidden_size);
  layer.forward(x.topRows(prompt), start_pos, cache, seq, y.topRows(prompt), ws);
  for (Index t = prompt; t < x.rows(); ++t) {
    layer.forward(x.row(t), start_pos + t, cache, seq, y.row(t), ws, decode_path);
  }
  if (latent) *latent = test::to_vec(test::cache_contents(cache, seq, 0));
  return y;
}

TYPED_TEST(LayerTest, QuantisedCachesMatchTheReferenceOnTheirDequantisedContents) {
  using T = TypeParam;
  const double tol = test::layer_tolerance<T>();
  struct Storage {
    CacheStorage storage;
    mla::ScaleFormat scales;
    double vs_fp32;  // documented bound of the output difference to the same run on FP32
  };
  // The quantised cache changes what is attended to, so outputs differ from an FP32 cache by
  // about the storage's relative rounding: bf16 2^-9, fp8 e4m3 2^-4 per value, averaged down by
  // the sums. Measured here: bf16 ~2e-3, fp8 ~3e-2 (relative, whole output); bounds 4x that.
  const Storage storages[] = {{CacheStorage::kBFloat16, mla::ScaleFormat::kFloat32, 1e-2},
                              {CacheStorage::kFp8E4M3, mla::ScaleFormat::kFloat32, 1.2e-1},
                              {CacheStorage::kFp8E4M3, mla::ScaleFormat::kPowerOfTwo, 1.2e-1}};
  for (const MlaConfig& c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    const MlaWeights<T> w = MlaWeights<T>::random(c, 31);
    const MlaLayer<T> layer(c, w);
    const Index n = 45, prompt = 20;
    const RowMatrix<T> x = test::random_input<T>(n, c.hidden_size, 32);
    const RowMatrix<T> y32 =
        prefill_then_decode(layer, x, prompt, 4097, test::exact_storage<T>(),
                            mla::ScaleFormat::kFloat32, AttentionPath::kAuto, nullptr);
    for (const Storage& s : storages) {
      for (AttentionPath path : {AttentionPath::kAbsorbed, AttentionPath::kExpanded}) {
        SCOPED_TRACE(std::string(mla::to_string(s.storage)) +
                     (s.scales == mla::ScaleFormat::kPowerOfTwo ? " pow2" : "") +
                     (path == AttentionPath::kAbsorbed ? " absorbed" : " expanded"));
        std::vector<double> latent;
        const RowMatrix<T> y =
            prefill_then_decode(layer, x, prompt, 4097, s.storage, s.scales, path, &latent);
        const std::vector<double> want =
            ref::mla_forward(test::to_ref(c), test::to_ref(w), test::to_vec(x), static_cast<int>(n),
                             4097, nullptr, &latent);
        EXPECT_LE(test::rel_error(test::to_vec(y), want), tol) << "vs reference on the cache";
        const double vs32 = test::rel_error(test::to_vec(y), test::to_vec(y32));
        EXPECT_LE(vs32, s.vs_fp32) << "vs the FP32 cache";
        EXPECT_GT(vs32, 0.0) << "the storage did round";
        std::printf("    [measured] %-5s %s %-8s vs fp32: %.2e\n", mla::to_string(s.storage),
                    s.scales == mla::ScaleFormat::kPowerOfTwo ? "pow2" : "    ",
                    path == AttentionPath::kAbsorbed ? "absorbed" : "expanded", vs32);
      }
    }
  }
}

TYPED_TEST(LayerTest, BatchedDecodeEqualsEachSequenceDecodedAlone) {
  using T = TypeParam;
  for (const MlaConfig& c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    for (CacheStorage storage : {test::exact_storage<T>(), CacheStorage::kFp8E4M3}) {
      const MlaLayer<T> layer(c, MlaWeights<T>::random(c, 41));
      const Index B = 4, steps = 6;
      const Index prompts[B] = {3, 17, 1, 40};  // different lengths, crossing 16-token blocks
      const std::int64_t starts[B] = {0, 4097, 7, 163000};
      std::vector<RowMatrix<T>> x;
      for (Index b = 0; b < B; ++b) {
        x.push_back(test::random_input<T>(prompts[b] + steps, c.hidden_size,
                                          50 + static_cast<unsigned>(b)));
      }
      mla::LatentCacheOptions o;
      o.block_tokens = 16;
      o.num_blocks = 24;
      o.storage = storage;
      // Batched: one shared cache, every step decodes one token of each sequence.
      LatentCache shared(c, o);
      MlaWorkspace<T> ws;
      std::vector<mla::SequenceId> seqs;
      for (Index b = 0; b < B; ++b) {
        seqs.push_back(shared.add_sequence());
        RowMatrix<T> y(prompts[b], c.hidden_size);
        layer.forward(x[static_cast<std::size_t>(b)].topRows(prompts[b]), starts[b], shared,
                      seqs.back(), y, ws);
      }
      std::vector<RowMatrix<T>> y_batched(B, RowMatrix<T>(steps, c.hidden_size));
      for (Index s = 0; s < steps; ++s) {
        RowMatrix<T> xb(B, c.hidden_size), yb(B, c.hidden_size);
        std::vector<std::int64_t> pos;
        for (Index b = 0; b < B; ++b) {
          xb.row(b) = x[static_cast<std::size_t>(b)].row(prompts[b] + s);
          pos.push_back(starts[b] + prompts[b] + s);
        }
        layer.forward_batch(xb, pos, shared, seqs, yb, ws);
        for (Index b = 0; b < B; ++b) y_batched[static_cast<std::size_t>(b)].row(s) = yb.row(b);
      }
      // Alone: each sequence in its own cache.
      for (Index b = 0; b < B; ++b) {
        LatentCache own(c, o);
        const auto seq = own.add_sequence();
        const RowMatrix<T>& xs = x[static_cast<std::size_t>(b)];
        RowMatrix<T> y(xs.rows(), c.hidden_size);
        layer.forward(xs.topRows(prompts[b]), starts[b], own, seq, y.topRows(prompts[b]), ws);
        for (Index s = 0; s < steps; ++s) {
          layer.forward(xs.row(prompts[b] + s), starts[b] + prompts[b] + s, own, seq,
                        y.row(prompts[b] + s), ws);
        }
        // Batched projections run as one GEMM, alone as GEMVs: equal to rounding.
        EXPECT_LE(test::rel_error(test::to_vec(y_batched[static_cast<std::size_t>(b)]),
                                  test::to_vec(y.bottomRows(steps))),
                  test::layer_tolerance<T>())
            << "sequence " << b << " " << mla::to_string(storage);
        EXPECT_EQ(shared.length(seqs[static_cast<std::size_t>(b)], 0), prompts[b] + steps);
      }
    }
  }
}

TEST(LayerBatch, BadBatchesAreClearErrorsAndChangeNothing) {
  const MlaConfig c = MlaConfig::small_v3();
  const MlaLayer<float> layer(c, MlaWeights<float>::random(c, 5));
  mla::LatentCacheOptions o;
  o.block_tokens = 4;
  o.num_blocks = 3;
  LatentCache cache(c, o);
  const auto a = cache.add_sequence(), b = cache.add_sequence();
  MlaWorkspace<float> ws;
  const RowMatrix<float> x = test::random_input<float>(8, 64, 1);
  RowMatrix<float> y8(8, 64);
  layer.forward(x, 0, cache, a, y8, ws);                        // a: 8 tokens, 2 full blocks
  layer.forward(x.topRows(3), 0, cache, b, y8.topRows(3), ws);  // b: 3 tokens, 1 block
  RowMatrix<float> y2(2, 64);
  const RowMatrix<float> x2 = x.topRows(2);
  // a needs a new block, b has room: 1 block needed, 0 free.
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward_batch(x2, {8, 3}, cache, {a, b}, y2, ws);
      },
      "2 sequences, layer 0, need 1 more blocks"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward_batch(x2, {3, 3}, cache, {b, b}, y2, ws);
      },
      "appears twice"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward_batch(x2, {3}, cache, {b, a}, y2, ws);
      },
      "x has 2 rows but 2 sequences and 1 positions"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward_batch(x2, {3, -1}, cache, {b, a}, y2, ws);
      },
      "positions must be"));
  EXPECT_EQ(cache.length(a, 0), 8);
  EXPECT_EQ(cache.length(b, 0), 3);
  EXPECT_EQ(cache.free_blocks(), 0);
  // b alone fits.
  RowMatrix<float> y1(1, 64);
  layer.forward_batch(x.topRows(1), {3}, cache, {b}, y1, ws);
  EXPECT_EQ(cache.length(b, 0), 4);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// FP8 weights

namespace {

/// 16 x 16 blocks, so the test-sized matrices have many blocks and ragged edges.
mla::Fp8Options small_blocks(mla::Fp8Matmul matmul) {
  mla::Fp8Options o;
  o.matmul = matmul;
  o.block_rows = 16;
  o.block_cols = 16;
  return o;
}

TYPED_TEST(LayerTest, Fp8WeightsAgreeWithTheirDequantisedWeights) {
  using T = TypeParam;
  using Sel = typename MlaWeights<T>::Fp8Selection;
  for (const MlaConfig& c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    const MlaWeights<T> dense = MlaWeights<T>::random(c, 61);
    const Index n = 40;
    const RowMatrix<T> x = test::random_input<T>(n, c.hidden_size, 62);
    struct Case {
      const char* name;
      Sel which;
      mla::Fp8Matmul matmul;
      double bound;  // relative output difference to the dequantised weights
    };
    // W8A32 multiplies exactly the dequantised weights: float accuracy. W8A8 also rounds the
    // activations to e4m3 (2^-4 relative per value) before each of the five projections, and
    // the errors add up: measured 3.4e-2 to 5.9e-2 on these configs, bound 1.5e-1.
    const Case cases[] = {
        {"all W8A32", Sel{}, mla::Fp8Matmul::kW8A32, test::layer_tolerance<T>()},
        {"wq_b,wo W8A32", Sel{false, false, true, false, false, true}, mla::Fp8Matmul::kW8A32,
         test::layer_tolerance<T>()},
        {"all W8A8", Sel{}, mla::Fp8Matmul::kW8A8, 1.5e-1},
    };
    for (const Case& k : cases) {
      SCOPED_TRACE(k.name);
      const MlaWeights<T> w8 = dense.quantize_fp8(k.which, small_blocks(k.matmul));
      const MlaLayer<T> fp8_layer(c, w8);
      const MlaLayer<T> deq_layer(c, w8.dequantized());
      for (AttentionPath path : {AttentionPath::kExpanded, AttentionPath::kAbsorbed}) {
        const RowMatrix<T> y8 = run_prefill(fp8_layer, x, 4097, path);
        const RowMatrix<T> yd = run_prefill(deq_layer, x, 4097, path);
        const double diff = test::rel_error(test::to_vec(y8), test::to_vec(yd));
        EXPECT_LE(diff, k.bound);
        if (k.matmul == mla::Fp8Matmul::kW8A8) {
          EXPECT_GT(diff, 0.0);
          std::printf("    [measured] %s %s vs dequantised: %.2e\n", k.name,
                      path == AttentionPath::kAbsorbed ? "absorbed" : "expanded", diff);
        }
      }
      // And against the double reference with the dequantised weights (W8A32 only: the
      // reference does not quantise activations).
      if (k.matmul == mla::Fp8Matmul::kW8A32) {
        const std::vector<double> want = ref::mla_forward(
            test::to_ref(c), test::to_ref(w8), test::to_vec(x), static_cast<int>(n), 4097);
        const RowMatrix<T> y = run_prefill(fp8_layer, x, 4097, AttentionPath::kAuto);
        EXPECT_LE(test::rel_error(test::to_vec(y), want), test::layer_tolerance<T>());
      }
    }
  }
}

TYPED_TEST(LayerTest, AbsorbedEqualsExpandedWithFp8Weights) {
  using T = TypeParam;
  using Sel = typename MlaWeights<T>::Fp8Selection;
  const MlaConfig c = MlaConfig::small_v3();
  const MlaWeights<T> dense = MlaWeights<T>::random(c, 71);
  const RowMatrix<T> x = test::random_input<T>(36, c.hidden_size, 72);
  // Every projection W8A8 except wkv_b in W8A32: both paths then use the same weights and the
  // same activations everywhere, so they agree to float accuracy.
  MlaWeights<T> w = dense.quantize_fp8(Sel{true, true, true, true, false, true},
                                       small_blocks(mla::Fp8Matmul::kW8A8));
  w = w.quantize_fp8(Sel{false, false, false, false, true, false},
                     small_blocks(mla::Fp8Matmul::kW8A32));
  const MlaLayer<T> layer(c, w);
  const RowMatrix<T> ye = run_prefill(layer, x, 100, AttentionPath::kExpanded);
  const RowMatrix<T> ya = run_prefill(layer, x, 100, AttentionPath::kAbsorbed);
  EXPECT_LE(test::rel_error(test::to_vec(ya), test::to_vec(ye)), test::layer_tolerance<T>());
  // With wkv_b in W8A8 the expanded path also rounds c^KV to e4m3 before rebuilding K and V
  // (DeepSeek's naive mode does the same), while the absorbed path multiplies the cached latent
  // by the dequantised W_UK / W_UV: they differ by that rounding (measured 4.1e-2).
  const MlaLayer<T> layer8(c, dense.quantize_fp8(Sel{}, small_blocks(mla::Fp8Matmul::kW8A8)));
  const RowMatrix<T> ye8 = run_prefill(layer8, x, 100, AttentionPath::kExpanded);
  const RowMatrix<T> ya8 = run_prefill(layer8, x, 100, AttentionPath::kAbsorbed);
  const double diff = test::rel_error(test::to_vec(ya8), test::to_vec(ye8));
  std::printf("    [measured] W8A8 wkv_b absorbed vs expanded: %.2e\n", diff);
  EXPECT_LE(diff, 1e-1);
  EXPECT_GT(diff, test::layer_tolerance<T>());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Causality with non-finite tokens, contiguous positions, split-KV merges inside the layer

namespace {

/// Runs a prefill of x (one call, on `path`) on a fresh cache of `storage` and returns y. With
/// `pool`, float layers decode on it with `splits` key-range parts; `precision` is the
/// attention's.
template <class T>
RowMatrix<T> prefill_on(const MlaLayer<T>& layer, const RowMatrix<T>& x, CacheStorage storage,
                        AttentionPath path, mla::ThreadPool* pool = nullptr, Index splits = 0,
                        mla::Precision precision = mla::Precision::kFp32) {
  const MlaConfig& c = layer.config();
  mla::LatentCacheOptions o;
  o.block_tokens = 16;
  o.num_blocks = 8;
  o.storage = storage;
  LatentCache cache(c, o);
  const auto seq = cache.add_sequence();
  MlaWorkspace<T> ws;
  mla::RunOptions run(path);
  run.executor = pool;
  run.decode.splits = splits;
  run.decode.tile_tokens = 16;
  run.decode.precision = precision;
  RowMatrix<T> y(x.rows(), c.hidden_size);
  layer.forward(x, 0, cache, seq, y, ws, run);
  return y;
}

TYPED_TEST(LayerTest, ANonFiniteTokenAffectsOnlyItselfAndLaterTokens) {
  // Causal attention never reads the future: a NaN or Inf in token k leaves the outputs of
  // tokens 0 .. k-1 finite and equal to a prefill of those k tokens alone, on every path and
  // storage and precision (the expanded path used to multiply masked keys by a zero weight:
  // 0 x NaN = NaN).
  using T = TypeParam;
  std::vector<mla::Precision> precisions = {mla::Precision::kFp32};
  if (std::is_same_v<T, float>) precisions.push_back(mla::Precision::kBf16);
  mla::ThreadPool pool(2);
  for (const MlaConfig& c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    const MlaLayer<T> layer(c, MlaWeights<T>::random(c, 23));
    const Index n = 70;  // beyond one attention tile (64) and several 16-token blocks
    const RowMatrix<T> clean = test::random_input<T>(n, c.hidden_size, 24);
    for (CacheStorage storage :
         {test::exact_storage<T>(), CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
      for (AttentionPath path : {AttentionPath::kExpanded, AttentionPath::kAbsorbed}) {
        for (bool threaded : {false, true}) {
          if (threaded && !std::is_same_v<T, float>) continue;
          for (mla::Precision prec : precisions) {
            for (T bad :
                 {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity()}) {
              for (Index k : {1, 17, 63, 64, 69}) {
                SCOPED_TRACE(
                    std::string(mla::to_string(storage)) +
                    (path == AttentionPath::kAbsorbed ? " absorbed" : " expanded") +
                    (threaded ? " pool" : "") + (prec == mla::Precision::kBf16 ? " kBf16" : "") +
                    (std::isnan(bad) ? " NaN" : " Inf") + " at token " + std::to_string(k));
                RowMatrix<T> x = clean;
                x(k, 3) = bad;
                mla::ThreadPool* p = threaded ? &pool : nullptr;
                const RowMatrix<T> y = prefill_on(layer, x, storage, path, p, 3, prec);
                const RowMatrix<T> first = x.topRows(k);
                const RowMatrix<T> y_first = prefill_on(layer, first, storage, path, p, 3, prec);
                ASSERT_TRUE(y.topRows(k).allFinite());
                EXPECT_LE(test::rel_error(test::to_vec(y.topRows(k)), test::to_vec(y_first)),
                          test::layer_tolerance<T>());
                EXPECT_FALSE(y.row(k).allFinite()) << "the bad token itself is not finite";
              }
            }
          }
        }
      }
    }
  }
}

TYPED_TEST(LayerTest, ANonFiniteTokenInABatchAffectsOnlyItsSequence) {
  using T = TypeParam;
  const MlaConfig c = MlaConfig::small_v3();
  const MlaLayer<T> layer(c, MlaWeights<T>::random(c, 25));
  mla::LatentCacheOptions o;
  o.block_tokens = 16;
  o.num_blocks = 12;
  o.storage = CacheStorage::kFp8E4M3;
  const RowMatrix<T> prompt = test::random_input<T>(20, c.hidden_size, 26);
  RowMatrix<T> step = test::random_input<T>(3, c.hidden_size, 27);
  std::vector<RowMatrix<T>> outputs;
  for (bool poisoned : {false, true}) {
    LatentCache cache(c, o);
    MlaWorkspace<T> ws;
    std::vector<mla::SequenceId> seqs;
    for (Index b = 0; b < 3; ++b) {
      seqs.push_back(cache.add_sequence());
      RowMatrix<T> y(20 - 5 * b, c.hidden_size);
      layer.forward(prompt.topRows(20 - 5 * b), 0, cache, seqs.back(), y, ws);
    }
    RowMatrix<T> x = step;
    if (poisoned) x(1, 0) = std::numeric_limits<T>::quiet_NaN();
    RowMatrix<T> y(3, c.hidden_size);
    layer.forward_batch(x, {20, 15, 10}, cache, seqs, y, ws);
    outputs.push_back(y);
  }
  EXPECT_FALSE(outputs[1].row(1).allFinite());
  for (Index b : {0, 2}) {
    ASSERT_TRUE(outputs[1].row(b).allFinite()) << "sequence " << b;
    EXPECT_LE(test::rel_error(test::to_vec(outputs[1].row(b)), test::to_vec(outputs[0].row(b))),
              test::layer_tolerance<T>());
  }
}

TEST(LayerPositions, AFirstChunkMayStartAnywhereThenPositionsMustContinue) {
  const MlaConfig c = MlaConfig::small_v3();
  const MlaWeights<double> w = MlaWeights<double>::random(c, 29);
  const MlaLayer<double> layer(c, w);
  LatentCache cache = make_cache<double>(c);
  const auto seq = cache.add_sequence();
  MlaWorkspace<double> ws;
  const Index n = 12;
  const RowMatrix<double> x = test::random_input<double>(n, c.hidden_size, 30);
  RowMatrix<double> y(n, c.hidden_size);
  // A first chunk at position 160000 of an empty sequence, then one decode step: the same as
  // the reference of all 12 tokens from 160000 (none of the earlier positions is cached).
  layer.forward(x.topRows(n - 1), 160000, cache, seq, y.topRows(n - 1), ws);
  layer.forward(x.bottomRows(1), 160000 + n - 1, cache, seq, y.bottomRows(1), ws);
  const std::vector<double> want = ref::mla_forward(test::to_ref(c), test::to_ref(w),
                                                    test::to_vec(x), static_cast<int>(n), 160000);
  EXPECT_LE(test::rel_error(test::to_vec(y), want), 1e-12);

  // Gaps, repeats and going backwards: mla::Error naming both positions, nothing changed.
  const RowMatrix<double> before = test::cache_contents(cache, seq, 0);
  const Index free_before = cache.free_blocks();
  RowMatrix<double> y2(2, c.hidden_size);
  const RowMatrix<double> x2 = x.topRows(2);
  for (std::int64_t bad :
       {std::int64_t{160013}, std::int64_t{160011}, std::int64_t{160000}, std::int64_t{3}}) {
    for (AttentionPath path : {AttentionPath::kAuto, AttentionPath::kExpanded}) {
      EXPECT_TRUE(test::throws_error_containing(
          [&] { layer.forward(x2, bad, cache, seq, y2, ws, path); },
          "next token is at position 160012, got " + std::to_string(bad)));
    }
    EXPECT_TRUE(test::throws_error_containing(
        [&] { layer.forward_batch(x.topRows(1), {bad}, cache, {seq}, y2.topRows(1), ws); },
        "next token is at position 160012, got " + std::to_string(bad)));
  }
  EXPECT_EQ(cache.length(seq, 0), n);
  EXPECT_EQ(cache.free_blocks(), free_before);
  EXPECT_EQ(test::cache_contents(cache, seq, 0), before);
  EXPECT_NO_THROW(layer.forward(x2, 160012, cache, seq, y2, ws));
}

TEST(LayerPositions, ABatchWithOneWrongPositionChangesNoSequence) {
  const MlaConfig c = MlaConfig::small_v3();
  const MlaLayer<float> layer(c, MlaWeights<float>::random(c, 31));
  LatentCache cache = make_cache<float>(c);
  MlaWorkspace<float> ws;
  const RowMatrix<float> x = test::random_input<float>(8, c.hidden_size, 32);
  RowMatrix<float> y(8, c.hidden_size);
  const auto a = cache.add_sequence(), b = cache.add_sequence(), e = cache.add_sequence();
  layer.forward(x.topRows(5), 0, cache, a, y.topRows(5), ws);   // next: 5
  layer.forward(x.topRows(3), 70, cache, b, y.topRows(3), ws);  // next: 73
  RowMatrix<float> y3(3, c.hidden_size);
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward_batch(x.topRows(3), {5, 72, 9}, cache, {a, b, e}, y3, ws);
      },
      "sequence " + std::to_string(b) +
          " layer 0 holds 3 tokens from position 70, so its next "
          "token is at position 73, got 72"));
  EXPECT_EQ(cache.length(a, 0), 5);
  EXPECT_EQ(cache.length(b, 0), 3);
  EXPECT_EQ(cache.length(e, 0), 0);
  // e is empty, so any start is fine for it.
  layer.forward_batch(x.topRows(3), {5, 73, 9}, cache, {a, b, e}, y3, ws);
  EXPECT_EQ(cache.next_position(e, 0), 10);
}

TEST(LayerSplits, AFloatLayerOnAPoolWithSeveralNonEmptySplitsMatchesTheReference) {
  // Every decode step of this test splits its keys into 3 non-empty parts (tiles of 16) that
  // the pool's 2 threads compute and the layer merges by log-sum-exp.
  const MlaConfig c = MlaConfig::small_v2_lite();
  const MlaWeights<float> w = MlaWeights<float>::random(c, 33);
  const MlaLayer<float> layer(c, w);
  LatentCache cache = make_cache<float>(c);
  const auto seq = cache.add_sequence();
  MlaWorkspace<float> ws;
  mla::ThreadPool pool(2);
  mla::RunOptions run;
  run.executor = &pool;
  run.decode.splits = 3;
  run.decode.tile_tokens = 16;
  const Index prompt = 65, n = 96;
  const RowMatrix<float> x = test::random_input<float>(n, c.hidden_size, 34);
  RowMatrix<float> y(n, c.hidden_size);
  layer.forward(x.topRows(prompt), 0, cache, seq, y.topRows(prompt), ws, run);
  for (Index t = prompt; t < n; ++t) {
    const Index keys = t + 1;
    const Index split_keys = ((keys + 2) / 3 + 15) / 16 * 16;
    ASSERT_LT(2 * split_keys, keys) << "the last split of step " << t << " would be empty";
    layer.forward(x.row(t), t, cache, seq, y.row(t), ws, run);
  }
  const std::vector<double> want =
      ref::mla_forward(test::to_ref(c), test::to_ref(w), test::to_vec(x), static_cast<int>(n), 0);
  const std::vector<double> got = test::to_vec(y);
  const std::size_t from = static_cast<std::size_t>(prompt * c.hidden_size);
  EXPECT_LE(test::rel_error(std::vector<double>(got.begin() + from, got.end()),
                            std::vector<double>(want.begin() + from, want.end())),
            1e-5);
}

TEST(LayerPrefill, TheExpandedKernelOnEveryTargetPrecisionAndPoolMatchesTheReference) {
  // The expanded path's per-target kernel: full and partial register blocks of query rows, of
  // keys and of value columns (V = 70 = 2 x 32 + 6; P + R = 51 is odd), tiles of keys that the
  // queries see in part (blocks of 16 tokens), one prefill and a chunk after cached tokens.
  MlaConfig c = MlaConfig::small_v2_lite();
  c.num_attention_heads = 3;
  c.qk_nope_head_dim = 41;
  c.qk_rope_head_dim = 10;
  c.v_head_dim = 70;
  c.kv_lora_rank = 48;
  const MlaWeights<float> w = MlaWeights<float>::random(c, 51);
  const MlaLayer<float> layer(c, w);
  const Index n = 83, first = 37;
  const RowMatrix<float> x = test::random_input<float>(n, c.hidden_size, 52);
  ref::MlaTrace trace;
  const std::vector<double> want = ref::mla_forward(
      test::to_ref(c), test::to_ref(w), test::to_vec(x), static_cast<int>(n), 9, &trace);
  mla::ThreadPool pool(2);
  test::for_each_isa([&](mla::Isa) {
    for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
      for (mla::ThreadPool* threads : {static_cast<mla::ThreadPool*>(nullptr), &pool}) {
        for (bool chunked : {false, true}) {
          SCOPED_TRACE(std::string(p == mla::Precision::kBf16 ? "kBf16" : "kFp32") +
                       (threads ? ", 2 threads" : ", 1 thread") +
                       (chunked ? ", two chunks" : ", one prefill"));
          LatentCache cache = make_cache<float>(c);
          const auto seq = cache.add_sequence();
          MlaWorkspace<float> ws;
          mla::RunOptions run(AttentionPath::kExpanded);
          run.executor = threads;
          run.decode.precision = p;
          RowMatrix<float> y(n, c.hidden_size);
          std::vector<double> lse;
          if (chunked) {
            layer.forward(x.topRows(first), 9, cache, seq, y.topRows(first), ws, run);
            lse = test::to_vec(ws.last_lse().topRows(first));
            layer.forward(x.bottomRows(n - first), 9 + first, cache, seq, y.bottomRows(n - first),
                          ws, run);
            const std::vector<double> rest = test::to_vec(ws.last_lse().topRows(n - first));
            lse.insert(lse.end(), rest.begin(), rest.end());
          } else {
            layer.forward(x, 9, cache, seq, y, ws, run);
            lse = test::to_vec(ws.last_lse().topRows(n));
          }
          // kBf16 rounds the attention's operands (queries, keys, values, weights) to BF16;
          // the projections stay FP32 (dense weights).
          const bool bf16 = p == mla::Precision::kBf16;
          EXPECT_LE(test::rel_error(test::to_vec(y), want), bf16 ? 1e-2 : 1e-5);
          EXPECT_LE(test::max_abs_error(lse, trace.lse), bf16 ? 2e-2 : 1e-4);
        }
      }
    }
  });
}

}  // namespace
