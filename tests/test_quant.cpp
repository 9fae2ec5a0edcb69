// Tile quantisation to e4m3 against a scalar reference written here.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "mla/quant.hpp"

namespace {

using mla::Index;
using mla::ScaleFormat;

/// The reference: per tile scale = max(amax, floor) / 448 (1 for a zero tile), rounded up to a
/// power of two with frexp-free arithmetic (log2 in double) when asked.
float reference_scale(const float* x, Index len, float floor, bool pow2) {
  double amax = 0.0;
  for (Index i = 0; i < len; ++i) amax = std::max(amax, static_cast<double>(std::fabs(x[i])));
  float s = std::max(static_cast<float>(amax), floor) / 448.0f;
  if (s == 0.0f) return 1.0f;
  if (pow2) s = static_cast<float>(std::exp2(std::ceil(std::log2(static_cast<double>(s)))));
  return s;
}

TEST(Quant, PowerOfTwoScalesRoundUp) {
  EXPECT_EQ(mla::round_scale_up_to_power_of_two(1.0f), 1.0f);
  EXPECT_EQ(mla::round_scale_up_to_power_of_two(0.75f), 1.0f);
  EXPECT_EQ(mla::round_scale_up_to_power_of_two(0.5f), 0.5f);
  EXPECT_EQ(mla::round_scale_up_to_power_of_two(0x1.000002p-20f), 0x1p-19f);
  EXPECT_EQ(mla::round_scale_up_to_power_of_two(3e-40f), std::ldexp(1.0f, -131));  // subnormal
  EXPECT_EQ(mla::e4m3_scale(0.0f, 0.0f, ScaleFormat::kFloat32), 1.0f);
  EXPECT_EQ(mla::e4m3_scale(0.0f, 1e-4f, ScaleFormat::kFloat32), 1e-4f / 448.0f);
  EXPECT_EQ(mla::e4m3_scale(448.0f, 1e-4f, ScaleFormat::kFloat32), 1.0f);
  EXPECT_EQ(mla::e4m3_scale(449.0f, 0.0f, ScaleFormat::kPowerOfTwo), 2.0f);
}

TEST(Quant, TilesMatchTheScalarReferenceIncludingRaggedEnds) {
  std::mt19937 rng(9);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  for (Index n : {Index{1}, Index{127}, Index{128}, Index{129}, Index{300}, Index{512}}) {
    for (Index tile : {Index{128}, Index{64}, Index{7}}) {
      for (bool pow2 : {false, true}) {
        for (float floor : {0.0f, 1e-4f}) {
          std::vector<float> x(static_cast<std::size_t>(n));
          for (float& v : x) v = dist(rng);
          if (n > tile) std::fill(x.begin(), x.begin() + tile, 0.0f);  // a zero tile
          const Index tiles = (n + tile - 1) / tile;
          std::vector<mla::float8_e4m3fn> q(static_cast<std::size_t>(n));
          std::vector<float> scales(static_cast<std::size_t>(tiles)),
              back(static_cast<std::size_t>(n));
          const ScaleFormat fmt = pow2 ? ScaleFormat::kPowerOfTwo : ScaleFormat::kFloat32;
          mla::quantize_e4m3_tiles(x.data(), n, tile, floor, fmt, q.data(), scales.data());
          mla::dequantize_e4m3_tiles(q.data(), scales.data(), n, tile, back.data());
          for (Index k = 0; k < tiles; ++k) {
            const Index first = k * tile, len = std::min(tile, n - first);
            const float s = reference_scale(&x[static_cast<std::size_t>(first)], len, floor, pow2);
            ASSERT_EQ(scales[static_cast<std::size_t>(k)], s) << "n " << n << " tile " << k;
            for (Index i = first; i < first + len; ++i) {
              const auto ii = static_cast<std::size_t>(i);
              ASSERT_EQ(q[ii].bits(), mla::float8_e4m3fn(x[ii] / s).bits()) << i;
              ASSERT_EQ(back[ii], static_cast<float>(q[ii]) * s) << i;
              // Nothing saturates: the tile's largest value maps to at most 448.
              ASSERT_LE(std::fabs(static_cast<float>(q[ii])), 448.0f);
            }
          }
        }
      }
    }
  }
}

}  // namespace
