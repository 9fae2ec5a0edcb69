// MlaConfig: the DeepSeek presets and validate()'s errors.

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "mla/config.hpp"
#include "mla/rope.hpp"
#include "test_util.hpp"

namespace {

using mla::MlaConfig;

TEST(Config, PresetsHaveDeepSeekDimensions) {
  struct Row {
    MlaConfig c;
    std::int64_t hidden, heads, q_lora;
    double mscale;
    std::int64_t layers;
  };
  // DeepSeek-V2 paper / config.json values (REFERENCE table 1).
  for (const Row& r : {Row{MlaConfig::deepseek_v2_lite(), 2048, 16, 0, 0.707, 27},
                       Row{MlaConfig::deepseek_v2(), 5120, 128, 1536, 0.707, 60},
                       Row{MlaConfig::deepseek_v3(), 7168, 128, 1536, 1.0, 61}}) {
    EXPECT_NO_THROW(r.c.validate());
    EXPECT_EQ(r.c.hidden_size, r.hidden);
    EXPECT_EQ(r.c.num_attention_heads, r.heads);
    EXPECT_EQ(r.c.q_lora_rank, r.q_lora);
    EXPECT_EQ(r.c.has_q_lora(), r.q_lora > 0);
    EXPECT_EQ(r.c.kv_lora_rank, 512);
    EXPECT_EQ(r.c.qk_nope_head_dim, 128);
    EXPECT_EQ(r.c.qk_rope_head_dim, 64);
    EXPECT_EQ(r.c.v_head_dim, 128);
    EXPECT_EQ(r.c.latent_cache_width(), 576);  // the cache keeps 576 numbers per token
    EXPECT_EQ(r.c.qk_head_dim(), 192);
    EXPECT_EQ(r.c.rms_norm_eps, 1e-6);
    EXPECT_EQ(r.c.rope_theta, 10000.0);
    EXPECT_EQ(r.c.max_position_embeddings, 163840);
    EXPECT_EQ(r.c.rope_scaling.type, mla::RopeScaling::Type::kYarn);
    EXPECT_EQ(r.c.rope_scaling.factor, 40.0);
    EXPECT_EQ(r.c.rope_scaling.original_max_position_embeddings, 4096);
    EXPECT_EQ(r.c.rope_scaling.beta_fast, 32.0);
    EXPECT_EQ(r.c.rope_scaling.beta_slow, 1.0);
    EXPECT_EQ(r.c.rope_scaling.mscale, r.mscale);
    EXPECT_EQ(r.c.rope_scaling.mscale_all_dim, r.mscale);
    EXPECT_EQ(r.c.rope_layout, mla::RopeLayout::kInterleaved);
    EXPECT_EQ(r.c.num_hidden_layers, r.layers);
  }
  EXPECT_NO_THROW(MlaConfig::small_v2_lite().validate());
  EXPECT_NO_THROW(MlaConfig::small_v3().validate());
  EXPECT_FALSE(MlaConfig::small_v2_lite().has_q_lora());
  EXPECT_TRUE(MlaConfig::small_v3().has_q_lora());
}

TEST(Config, ValidateNamesTheBadField) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Bad {
    std::function<void(MlaConfig&)> mutate;
    std::string field;
  };
  const std::vector<Bad> bad = {
      {[](MlaConfig& c) { c.hidden_size = 0; }, "MlaConfig.hidden_size"},
      {[](MlaConfig& c) { c.num_attention_heads = -1; }, "MlaConfig.num_attention_heads"},
      {[](MlaConfig& c) { c.q_lora_rank = -5; }, "MlaConfig.q_lora_rank"},
      {[](MlaConfig& c) { c.kv_lora_rank = 0; }, "MlaConfig.kv_lora_rank"},
      {[](MlaConfig& c) { c.qk_nope_head_dim = -1; }, "MlaConfig.qk_nope_head_dim"},
      {[](MlaConfig& c) { c.qk_rope_head_dim = 63; }, "MlaConfig.qk_rope_head_dim must be even"},
      {[](MlaConfig& c) { c.qk_rope_head_dim = -2; }, "MlaConfig.qk_rope_head_dim"},
      {[](MlaConfig& c) { c.qk_nope_head_dim = 0, c.qk_rope_head_dim = 0; },
       "MlaConfig.qk_nope_head_dim + qk_rope_head_dim"},
      {[](MlaConfig& c) { c.v_head_dim = 0; }, "MlaConfig.v_head_dim"},
      {[](MlaConfig& c) { c.hidden_size = std::int64_t{1} << 40; }, "MlaConfig.hidden_size"},
      {[](MlaConfig& c) { c.rms_norm_eps = 0.0; }, "MlaConfig.rms_norm_eps"},
      {[nan](MlaConfig& c) { c.rms_norm_eps = nan; }, "MlaConfig.rms_norm_eps"},
      {[](MlaConfig& c) { c.rope_theta = 1.0; }, "MlaConfig.rope_theta"},
      {[](MlaConfig& c) { c.max_position_embeddings = 0; }, "MlaConfig.max_position_embeddings"},
      {[](MlaConfig& c) { c.num_hidden_layers = 0; }, "MlaConfig.num_hidden_layers"},
      {[](MlaConfig& c) { c.rope_scaling.factor = -2.0; }, "MlaConfig.rope_scaling.factor"},
      {[](MlaConfig& c) { c.rope_scaling.original_max_position_embeddings = 0; },
       "MlaConfig.rope_scaling.original_max_position_embeddings"},
      {[](MlaConfig& c) { c.rope_scaling.beta_fast = 0.0; }, "MlaConfig.rope_scaling.beta_fast"},
      {[](MlaConfig& c) { c.rope_scaling.beta_slow = 0.0; }, "MlaConfig.rope_scaling.beta_slow"},
      {[nan](MlaConfig& c) { c.rope_scaling.beta_slow = nan; }, "MlaConfig.rope_scaling.beta_slow"},
      {[nan](MlaConfig& c) { c.rope_scaling.mscale = nan; }, "MlaConfig.rope_scaling.mscale"},
      {[](MlaConfig& c) {
         c.rope_scaling.mscale_all_dim = std::numeric_limits<double>::infinity();
       },
       "MlaConfig.rope_scaling.mscale_all_dim"},
      {[](MlaConfig& c) { c.rope_theta = 0.0; }, "MlaConfig.rope_theta"},
  };
  for (const Bad& b : bad) {
    MlaConfig c = MlaConfig::deepseek_v3();
    b.mutate(c);
    EXPECT_TRUE(test::throws_error_containing([&] { c.validate(); }, b.field));
  }
  // RoPE's magnitude divides by yarn_get_mscale(factor, mscale_all_dim): a zero is refused.
  MlaConfig zero = MlaConfig::deepseek_v3();
  zero.rope_scaling.factor = std::exp(1.0);
  zero.rope_scaling.mscale_all_dim = -10.0;
  ASSERT_EQ(mla::yarn_get_mscale(zero.rope_scaling.factor, -10.0), 0.0);
  EXPECT_TRUE(test::throws_error_containing([&] { zero.validate(); },
                                            "0.1 * mscale_all_dim * ln(factor) + 1 is 0"));
  // YaRN fields are not checked when YaRN is off.
  MlaConfig c = MlaConfig::deepseek_v3();
  c.rope_scaling.type = mla::RopeScaling::Type::kNone;
  c.rope_scaling.factor = -2.0;
  EXPECT_NO_THROW(c.validate());
}

TEST(Config, AcceptsEveryYarnSettingTheReferenceMathAccepts) {
  // Published DeepSeek-V3-based models use beta_fast == beta_slow (Kimi K2: both 1, factor 32);
  // the reference ramp then meets low == high and adds 0.001 to high. Also beta_fast below
  // beta_slow (low > high), a factor below 1, a negative mscale_all_dim and a rotary width whose
  // correction range clamps to both ends: each is accepted and rotates like the reference.
  struct Edge {
    const char* name;
    double factor, beta_fast, beta_slow, mscale, mscale_all_dim;
    std::int64_t rope_dim;
  };
  const Edge edges[] = {
      {"betas equal (1, 1)", 32.0, 1.0, 1.0, 1.0, 1.0, 64},
      {"betas equal (4, 4)", 40.0, 4.0, 4.0, 0.707, 0.707, 64},
      {"beta_fast < beta_slow", 40.0, 1.0, 32.0, 1.0, 1.0, 64},
      {"factor below 1", 0.5, 32.0, 1.0, 1.0, 1.0, 64},
      {"negative mscale_all_dim", 40.0, 32.0, 1.0, 1.0, -0.5, 64},
      {"narrow rotary width", 40.0, 32.0, 1.0, 1.0, 1.0, 4},
  };
  for (const Edge& e : edges) {
    SCOPED_TRACE(e.name);
    MlaConfig c = MlaConfig::deepseek_v3();
    c.rope_scaling.factor = e.factor;
    c.rope_scaling.beta_fast = e.beta_fast;
    c.rope_scaling.beta_slow = e.beta_slow;
    c.rope_scaling.mscale = e.mscale;
    c.rope_scaling.mscale_all_dim = e.mscale_all_dim;
    c.qk_rope_head_dim = e.rope_dim;
    ASSERT_NO_THROW(c.validate());
    const mla::Rope rope(c);
    const ref::RopeSpec r = test::to_ref_rope(c);
    const ref::Vec want = ref::rope_frequencies(r);
    for (std::size_t i = 0; i < want.size(); ++i) {
      ASSERT_TRUE(std::isfinite(rope.inv_freq()[i]));
      EXPECT_NEAR(rope.inv_freq()[i], want[i], 1e-15 * want[i]) << "pair " << i;
    }
    EXPECT_NEAR(rope.magnitude(), ref::rope_magnitude(r), 1e-15);
    EXPECT_NEAR(mla::softmax_scale(c), ref::mla_softmax_scale(test::to_ref(c)), 1e-15);
    // And a rotated vector at a long position matches the reference rotation.
    std::vector<double> x(static_cast<std::size_t>(e.rope_dim)), y(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = y[i] = std::sin(1.0 + static_cast<double>(i));
    std::vector<double> scratch(x.size());
    rope.apply<double>(Eigen::Map<mla::RowMatrix<double>>(x.data(), 1, e.rope_dim), 150000, 0, 1, 0,
                       scratch.data());
    ref::rope_rotate(y.data(), r, 150000);
    // Angles near 1.5e5 rad carry an absolute double rounding of ~1.5e5 * 2^-52 = 3e-11.
    EXPECT_LE(test::rel_error(x, y), 1e-9);
  }
}

}  // namespace
