// MlaWeights: shape checks that name the tensor, the seeded initialiser, casts.

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>

#include "mla/weights.hpp"
#include "test_util.hpp"

namespace {

using mla::Linear;
using mla::MlaConfig;
using mla::MlaWeights;
using mla::RowMatrix;

TEST(Weights, RandomWeightsHaveTheConfigShapes) {
  for (const MlaConfig& c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    const MlaWeights<float> w = MlaWeights<float>::random(c, 1);
    EXPECT_NO_THROW(w.check(c));
    const auto H = c.num_attention_heads;
    EXPECT_EQ(w.wkv_a.rows(), c.kv_lora_rank + c.qk_rope_head_dim);
    EXPECT_EQ(w.wkv_b.rows(), H * (c.qk_nope_head_dim + c.v_head_dim));
    EXPECT_EQ(w.wo.cols(), H * c.v_head_dim);
    EXPECT_EQ(w.wq.empty(), c.has_q_lora());
    EXPECT_EQ(w.wq_a.empty(), !c.has_q_lora());
  }
}

TEST(Weights, RandomIsSeededAndScaled) {
  const MlaConfig c = MlaConfig::small_v3();
  const MlaWeights<double> a = MlaWeights<double>::random(c, 7),
                           b = MlaWeights<double>::random(c, 7);
  const MlaWeights<double> d = MlaWeights<double>::random(c, 8);
  EXPECT_EQ(a.wkv_b.dense(), b.wkv_b.dense());
  EXPECT_EQ(a.q_norm, b.q_norm);
  EXPECT_NE(a.wkv_b.dense(), d.wkv_b.dense());
  // Uniform with variance 1/in: mean of squares close to 1/in over many entries.
  const RowMatrix<double>& wo = a.wo.dense();
  const double mean_sq = wo.squaredNorm() / static_cast<double>(wo.size());
  EXPECT_NEAR(mean_sq * static_cast<double>(wo.cols()), 1.0, 0.1);
  EXPECT_GE(a.kv_norm.minCoeff(), 0.5);
  EXPECT_LE(a.kv_norm.maxCoeff(), 1.5);
}

TEST(Weights, CastKeepsTheValues) {
  const MlaConfig c = MlaConfig::small_v3();
  const MlaWeights<double> w = MlaWeights<double>::random(c, 2);
  const MlaWeights<float> f = w.cast<float>();
  EXPECT_NO_THROW(f.check(c));
  EXPECT_EQ(f.wq_b.dense(), w.wq_b.dense().cast<float>());
  EXPECT_EQ(f.kv_norm, w.kv_norm.cast<float>());
}

TEST(Weights, WrongShapesNameTheTensor) {
  struct Bad {
    MlaConfig config;
    std::function<void(MlaWeights<float>&)> mutate;
    std::string message;
  };
  const MlaConfig lite = MlaConfig::small_v2_lite(), v3 = MlaConfig::small_v3();
  MlaConfig no_norm = lite;  // a latent without RMSNorm (layers converted from MHA)
  no_norm.kv_latent_norm = false;
  auto lin = [](mla::Index r, mla::Index k) { return Linear<float>(RowMatrix<float>::Zero(r, k)); };
  const std::vector<Bad> bad = {
      {lite, [&](auto& w) { w.wq = lin(96, 63); }, "MlaWeights.wq is [96, 63], expected"},
      {lite, [&](auto& w) { w.wkv_a = lin(40, 65); }, "MlaWeights.wkv_a is [40, 65]"},
      {lite, [&](auto& w) { w.kv_norm = mla::Vector<float>::Ones(31); },
       "MlaWeights.kv_norm has 31 values, expected kv_lora_rank = 32"},
      {lite, [&](auto& w) { w.wkv_b = lin(112, 32); },
       "MlaWeights.wkv_b is [112, 32], expected [heads * (qk_nope_head_dim + v_head_dim), "
       "kv_lora_rank] = [128, 32]"},
      {lite, [&](auto& w) { w.wo = lin(64, 60); }, "MlaWeights.wo is [64, 60]"},
      {lite, [&](auto& w) { w.wq_a = lin(24, 64); }, "must be empty when q_lora_rank == 0"},
      {v3, [&](auto& w) { w.wq = lin(96, 64); },
       "MlaWeights.wq must be empty when q_lora_rank > 0"},
      {v3, [&](auto& w) { w.wq_a = lin(23, 64); }, "MlaWeights.wq_a is [23, 64]"},
      {v3, [&](auto& w) { w.q_norm = mla::Vector<float>::Ones(25); }, "MlaWeights.q_norm has 25"},
      {v3, [&](auto& w) { w.wq_b = lin(96, 23); }, "MlaWeights.wq_b is [96, 23]"},
      {no_norm, [&](auto& w) { w.kv_norm = mla::Vector<float>::Ones(32); },
       "MlaWeights.kv_norm must be empty when MlaConfig.kv_latent_norm is false, but it has 32"},
  };
  for (const Bad& b : bad) {
    MlaWeights<float> w = MlaWeights<float>::random(b.config, 1);
    b.mutate(w);
    EXPECT_TRUE(test::throws_error_containing([&] { w.check(b.config); }, b.message));
    // The layer refuses them too.
    EXPECT_TRUE(
        test::throws_error_containing([&] { mla::MlaLayer<float>(b.config, w); }, b.message));
  }
}

}  // namespace
