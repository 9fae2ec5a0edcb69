// Tile quantisation to e4m3 against a scalar reference written here.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
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

// ---------------------------------------------------------------------------------------------
// Block-scaled weights (DeepSeek-V3 checkpoints) and per-token activation tiles

namespace {

/// The scalar reference of one block's scale: amax / 448 (1 for an all-zero block), rounded up
/// to a power of two when asked.
float reference_block_scale(double amax, bool pow2) {
  float s = static_cast<float>(amax) / 448.0f;
  if (s == 0.0f) return 1.0f;
  if (pow2) s = static_cast<float>(std::exp2(std::ceil(std::log2(static_cast<double>(s)))));
  return s;
}

TEST(BlockFp8, QuantizeMatchesTheScalarReferenceByteForByte) {
  std::mt19937 rng(17);
  std::normal_distribution<float> dist(0.0f, 0.05f);
  struct Shape {
    Index rows, cols, br, bc;
  };
  // Multiples of the block, ragged in either or both dimensions, and non-square blocks.
  for (const Shape& sh : {Shape{256, 256, 128, 128}, Shape{300, 333, 128, 128},
                          Shape{130, 70, 128, 128}, Shape{50, 90, 16, 32}, Shape{1, 5, 128, 128}}) {
    for (bool pow2 : {false, true}) {
      std::vector<float> w(static_cast<std::size_t>(sh.rows * sh.cols));
      for (float& v : w) v = dist(rng);
      // An all-zero block, and a block with one large outlier.
      for (Index r = 0; r < std::min(sh.br, sh.rows); ++r) {
        for (Index c = 0; c < std::min(sh.bc, sh.cols); ++c)
          w[static_cast<std::size_t>(r * sh.cols + c)] = 0.0f;
      }
      if (sh.rows > sh.br && sh.cols > sh.bc)
        w[static_cast<std::size_t>((sh.br + 1) * sh.cols + sh.bc + 2)] = 300.0f;
      const mla::BlockFp8Matrix q =
          mla::BlockFp8Matrix::quantize(w.data(), sh.rows, sh.cols, sh.br, sh.bc,
                                        pow2 ? ScaleFormat::kPowerOfTwo : ScaleFormat::kFloat32);
      const Index rb = (sh.rows + sh.br - 1) / sh.br, cb = (sh.cols + sh.bc - 1) / sh.bc;
      ASSERT_EQ(q.row_blocks(), rb);
      ASSERT_EQ(q.col_blocks(), cb);
      ASSERT_EQ(q.scale_count(), rb * cb);
      const mla::RowMatrix<float> deq = q.dequantize();
      for (Index i = 0; i < rb; ++i) {
        for (Index j = 0; j < cb; ++j) {
          double amax = 0.0;
          for (Index r = i * sh.br; r < std::min(sh.rows, (i + 1) * sh.br); ++r) {
            for (Index c = j * sh.bc; c < std::min(sh.cols, (j + 1) * sh.bc); ++c) {
              amax = std::max(amax, static_cast<double>(
                                        std::fabs(w[static_cast<std::size_t>(r * sh.cols + c)])));
            }
          }
          const float s = reference_block_scale(amax, pow2);
          ASSERT_EQ(q.scale(i, j), s) << "block " << i << ", " << j;
          for (Index r = i * sh.br; r < std::min(sh.rows, (i + 1) * sh.br); ++r) {
            for (Index c = j * sh.bc; c < std::min(sh.cols, (j + 1) * sh.bc); ++c) {
              const float v = w[static_cast<std::size_t>(r * sh.cols + c)];
              const mla::float8_e4m3fn code(v / s);
              ASSERT_EQ(q.codes()[r * sh.cols + c].bits(), code.bits()) << r << ", " << c;
              ASSERT_EQ(deq(r, c), static_cast<float>(code) * s);
            }
          }
        }
      }
      // The all-zero block stores zeros with scale 1.
      EXPECT_EQ(q.scale(0, 0), 1.0f);
      EXPECT_EQ(deq.topLeftCorner(std::min(sh.br, sh.rows), std::min(sh.bc, sh.cols)).norm(), 0.0f);
    }
  }
}

TEST(BlockFp8, ActivationsPerTokenPerTileWithDeepSeeksFloor) {
  const Index rows = 3, cols = 300, tile = 128;
  std::vector<float> x(static_cast<std::size_t>(rows * cols));
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  for (float& v : x) v = u(rng);
  std::fill(x.begin() + cols, x.begin() + 2 * cols, 0.0f);  // a zero token
  x[5] = 1e-6f;                                             // a tiny value in a normal tile
  for (bool pow2 : {false, true}) {
    std::vector<mla::float8_e4m3fn> q(x.size());
    std::vector<float> s(static_cast<std::size_t>(rows * 3));
    mla::quantize_activations(x.data(), rows, cols, tile,
                              pow2 ? ScaleFormat::kPowerOfTwo : ScaleFormat::kFloat32, q.data(),
                              s.data());
    for (Index r = 0; r < rows; ++r) {
      for (Index k = 0; k < 3; ++k) {
        const float* t = &x[static_cast<std::size_t>(r * cols + k * tile)];
        const float want = reference_scale(t, std::min(tile, cols - k * tile), 1e-4f, pow2);
        ASSERT_EQ(s[static_cast<std::size_t>(r * 3 + k)], want) << r << " " << k;
      }
    }
    // The zero token's scale is the floor's, 1e-4 / 448 (not 1: DeepSeek's act_quant).
    EXPECT_EQ(s[3], pow2 ? mla::round_scale_up_to_power_of_two(1e-4f / 448.0f) : 1e-4f / 448.0f);
  }
}

TEST(BlockFp8, CheckpointTensorsOfTheWrongSizeAreClearErrors) {
  std::vector<mla::float8_e4m3fn> codes(300 * 200);
  EXPECT_THROW(mla::BlockFp8Matrix(300, 200, 128, 128, codes, std::vector<float>(5)), mla::Error);
  try {
    mla::BlockFp8Matrix(300, 200, 128, 128, codes, std::vector<float>(5));
  } catch (const mla::Error& e) {
    EXPECT_NE(std::string(e.what()).find("5 scales, expected [3, 2]"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(mla::BlockFp8Matrix(300, 201, 128, 128, codes, std::vector<float>(6)), mla::Error);
  std::vector<float> bad(6, 1.0f);
  bad[4] = -1.0f;
  EXPECT_THROW(mla::BlockFp8Matrix(300, 200, 128, 128, codes, bad), mla::Error);
  EXPECT_NO_THROW(mla::BlockFp8Matrix(300, 200, 128, 128, codes, std::vector<float>(6, 0.5f)));
}

}  // namespace
