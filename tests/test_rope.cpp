// RoPE and YaRN: the published numbers, the reference rotation, and RoPE's identities.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "mla/rope.hpp"
#include "reference/mla_reference.hpp"
#include "test_util.hpp"

namespace {

using mla::MlaConfig;
using mla::Rope;
using mla::RopeLayout;

TEST(Yarn, DeepSeekCorrectionRangeAndSoftmaxScale) {
  // DeepSeek-V3 (and V2, V2-Lite: same rope fields): low = 10, high = 23.
  for (const MlaConfig& c :
       {MlaConfig::deepseek_v3(), MlaConfig::deepseek_v2(), MlaConfig::deepseek_v2_lite()}) {
    const mla::YarnRange r = mla::yarn_correction_range(c);
    EXPECT_EQ(r.low, 10.0);
    EXPECT_EQ(r.high, 23.0);
  }
  // sigma = 192^-1/2 * (0.1 ln 40 + 1)^2 = 0.1352337789 for V3; mscale 0.707 for V2(-Lite).
  EXPECT_NEAR(mla::softmax_scale(MlaConfig::deepseek_v3()), 0.1352337789, 1e-10);
  EXPECT_NEAR(mla::yarn_get_mscale(40.0, 1.0), 1.3688879454, 1e-10);
  // V2(-Lite): the published figure 0.114721 (six digits), and the closed form in full.
  const double m2 = 0.1 * 0.707 * std::log(40.0) + 1.0;
  for (const MlaConfig& c : {MlaConfig::deepseek_v2_lite(), MlaConfig::deepseek_v2()}) {
    EXPECT_NEAR(mla::softmax_scale(c), 0.114721, 1e-6);
    EXPECT_NEAR(mla::softmax_scale(c), m2 * m2 / std::sqrt(192.0), 1e-15);
  }
  // Without YaRN the scale is plain (P + R)^-1/2.
  MlaConfig plain = MlaConfig::deepseek_v3();
  plain.rope_scaling.type = mla::RopeScaling::Type::kNone;
  EXPECT_DOUBLE_EQ(mla::softmax_scale(plain), 1.0 / std::sqrt(192.0));
}

TEST(Yarn, FrequenciesFollowTheRamp) {
  const MlaConfig c = MlaConfig::deepseek_v3();
  const Rope rope(c);
  ASSERT_EQ(rope.inv_freq().size(), 32u);
  for (int i = 0; i < 32; ++i) {
    const double theta = std::pow(10000.0, -2.0 * i / 64.0);
    const double f = rope.inv_freq()[static_cast<std::size_t>(i)];
    if (i <= 10) {
      EXPECT_DOUBLE_EQ(f, theta) << i;  // pairs 0..10 keep theta
    } else if (i >= 23) {
      EXPECT_DOUBLE_EQ(f, theta / 40.0) << i;  // pairs 23..31 get theta / 40
    } else {
      EXPECT_LT(f, theta) << i;
      EXPECT_GT(f, theta / 40.0) << i;
    }
  }
  // Against the reference's independent implementation, every pair and both presets' shapes.
  for (const MlaConfig& k : {c, MlaConfig::small_v2_lite(), MlaConfig::small_v3()}) {
    const std::vector<double> want = ref::rope_frequencies(test::to_ref_rope(k));
    EXPECT_LE(test::rel_error(Rope(k).inv_freq(), want), 1e-15);
  }
}

/// A config whose HF cos/sin magnitude factor is not 1 (mscale != mscale_all_dim).
MlaConfig magnitude_config() {
  MlaConfig c = MlaConfig::deepseek_v3();
  c.rope_scaling.mscale = 1.0;
  c.rope_scaling.mscale_all_dim = 0.5;
  return c;
}

template <class T>
class RopeTest : public ::testing::Test {};
using ComputeTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(RopeTest, ComputeTypes, );

template <class T>
std::vector<T> random_vector(int n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<T> v(static_cast<std::size_t>(n));
  for (T& x : v) x = static_cast<T>(u(rng));
  return v;
}

template <class T>
std::vector<T> rotated(const Rope& rope, std::vector<T> x, std::int64_t pos) {
  std::vector<T> cs(static_cast<std::size_t>(rope.dim()));
  rope.cos_sin(pos, cs.data(), cs.data() + rope.dim() / 2);
  rope.rotate(x.data(), cs.data(), cs.data() + rope.dim() / 2);
  return x;
}

template <class T>
double dot(const std::vector<T>& a, const std::vector<T>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i)
    s += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return s;
}

// Rounding of one rotation in T (a few ulps), plus the angle's own rounding in double: an ulp
// of difference in pos * theta moves the angle by about pos * 2^-52 (1e-15 per position).
template <class T>
double rope_tolerance(std::int64_t pos) {
  return (sizeof(T) == 8 ? 1e-13 : 2e-6) + static_cast<double>(pos) * 1e-15;
}

TYPED_TEST(RopeTest, MatchesReferenceRotationAtLargePositions) {
  using T = TypeParam;
  for (RopeLayout layout : {RopeLayout::kInterleaved, RopeLayout::kHalfSplit}) {
    for (MlaConfig c : {MlaConfig::deepseek_v3(), magnitude_config()}) {
      c.rope_layout = layout;
      const Rope rope(c);
      for (std::int64_t pos : {std::int64_t{0}, std::int64_t{1}, std::int64_t{4097},
                               std::int64_t{163839}, std::int64_t{1} << 20}) {
        const std::vector<T> x = random_vector<T>(64, 3);
        std::vector<double> want(x.begin(), x.end());
        ref::rope_rotate(want.data(), test::to_ref_rope(c), pos);
        const std::vector<T> got = rotated(rope, x, pos);
        // A float angle at pos 163839 would be off by ~0.01 rad: far above this bound.
        EXPECT_LE(test::rel_error(std::vector<double>(got.begin(), got.end()), want),
                  rope_tolerance<T>(pos))
            << "pos " << pos;
      }
    }
  }
}

TYPED_TEST(RopeTest, KeepsNormsAndScalesThemByTheMagnitude) {
  using T = TypeParam;
  for (RopeLayout layout : {RopeLayout::kInterleaved, RopeLayout::kHalfSplit}) {
    for (MlaConfig c : {MlaConfig::deepseek_v3(), magnitude_config()}) {
      c.rope_layout = layout;
      const Rope rope(c);
      const double mag = rope.magnitude();
      for (std::int64_t pos : {std::int64_t{7}, std::int64_t{4097}, std::int64_t{163839}}) {
        const std::vector<T> x = random_vector<T>(64, 4);
        const std::vector<T> y = rotated(rope, x, pos);
        EXPECT_NEAR(std::sqrt(dot(y, y)), mag * std::sqrt(dot(x, x)),
                    rope_tolerance<T>(pos) * std::sqrt(dot(x, x)) * 4);
      }
    }
  }
  // The factor is yarn_get_mscale(40, 1) / yarn_get_mscale(40, 0.5) for magnitude_config().
  EXPECT_NEAR(Rope(magnitude_config()).magnitude(),
              mla::yarn_get_mscale(40.0, 1.0) / mla::yarn_get_mscale(40.0, 0.5), 1e-15);
  EXPECT_NE(Rope(magnitude_config()).magnitude(), 1.0);
}

TYPED_TEST(RopeTest, ScoresDependOnlyOnRelativePosition) {
  using T = TypeParam;
  for (RopeLayout layout : {RopeLayout::kInterleaved, RopeLayout::kHalfSplit}) {
    MlaConfig c = MlaConfig::deepseek_v3();
    c.rope_layout = layout;
    const Rope rope(c);
    const std::vector<T> q = random_vector<T>(64, 5), k = random_vector<T>(64, 6);
    const double scale = std::sqrt(dot(q, q) * dot(k, k));
    for (std::int64_t m : {std::int64_t{0}, std::int64_t{100}, std::int64_t{4097}}) {
      for (std::int64_t n : {std::int64_t{0}, std::int64_t{3}, std::int64_t{4000}}) {
        const double base = dot(rotated(rope, q, m), rotated(rope, k, n));
        for (std::int64_t shift : {std::int64_t{1}, std::int64_t{1000}, std::int64_t{163000}}) {
          const double moved = dot(rotated(rope, q, m + shift), rotated(rope, k, n + shift));
          EXPECT_NEAR(moved, base, 8 * rope_tolerance<T>(m + n + 2 * shift) * scale)
              << "m " << m << " n " << n << " shift " << shift;
        }
      }
    }
    // And it does depend on the relative position.
    EXPECT_GT(std::fabs(dot(rotated(rope, q, 5), rotated(rope, k, 0)) -
                        dot(rotated(rope, q, 0), rotated(rope, k, 0))),
              1e-3 * scale);
  }
}

TYPED_TEST(RopeTest, HalfSplitIsTheDeinterleavedRotation) {
  using T = TypeParam;
  MlaConfig a = MlaConfig::deepseek_v3();
  MlaConfig b = a;
  b.rope_layout = RopeLayout::kHalfSplit;
  const std::vector<T> x = random_vector<T>(64, 7);
  std::vector<T> x_split(64);
  for (int i = 0; i < 32; ++i) {
    x_split[static_cast<std::size_t>(i)] = x[static_cast<std::size_t>(2 * i)];
    x_split[static_cast<std::size_t>(32 + i)] = x[static_cast<std::size_t>(2 * i + 1)];
  }
  const std::vector<T> ya = rotated(Rope(a), x, 4097);
  const std::vector<T> yb = rotated(Rope(b), x_split, 4097);
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(yb[static_cast<std::size_t>(i)], ya[static_cast<std::size_t>(2 * i)]);
    EXPECT_EQ(yb[static_cast<std::size_t>(32 + i)], ya[static_cast<std::size_t>(2 * i + 1)]);
  }
}

TYPED_TEST(RopeTest, ApplyRotatesEveryHeadSliceOfEveryToken) {
  using T = TypeParam;
  const MlaConfig c = MlaConfig::small_v3();  // R = 8
  const Rope rope(c);
  const mla::Index heads = 3, stride = 11, first = 2;
  mla::RowMatrix<T> x = test::random_input<T>(4, 40, 8);
  const mla::RowMatrix<T> before = x;
  std::vector<T> scratch(8);
  rope.apply<T>(x, 100, first, heads, stride, scratch.data());
  for (mla::Index t = 0; t < x.rows(); ++t) {
    for (mla::Index h = 0; h < heads; ++h) {
      std::vector<T> slice(8);
      for (int i = 0; i < 8; ++i)
        slice[static_cast<std::size_t>(i)] = before(t, first + h * stride + i);
      const std::vector<T> want = rotated(rope, slice, 100 + t);
      for (int i = 0; i < 8; ++i)
        EXPECT_EQ(x(t, first + h * stride + i), want[static_cast<std::size_t>(i)]);
    }
    // Columns outside the slices are untouched.
    for (mla::Index j = 0; j < x.cols(); ++j) {
      const mla::Index k = j - first;
      const bool in_slice = k >= 0 && k % stride < 8 && k / stride < heads;
      if (!in_slice) {
        EXPECT_EQ(x(t, j), before(t, j)) << j;
      }
    }
  }
}

}  // namespace
