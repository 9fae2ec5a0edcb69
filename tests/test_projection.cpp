// Linear / project against plain loops in double.

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "mla/projection.hpp"
#include "test_util.hpp"

namespace {

using mla::Index;
using mla::Linear;
using mla::RowMatrix;

template <class T>
class ProjectionTest : public ::testing::Test {};
using ComputeTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ProjectionTest, ComputeTypes, );

TYPED_TEST(ProjectionTest, ApplyIsXTimesWTransposed) {
  using T = TypeParam;
  const RowMatrix<T> w = test::random_input<T>(37, 53, 1);  // [out, in]
  const Linear<T> lin(w);
  EXPECT_EQ(lin.rows(), 37);
  EXPECT_EQ(lin.cols(), 53);
  for (Index tokens : {Index{1}, Index{2}, Index{19}}) {  // one token takes Eigen's GEMV path
    const RowMatrix<T> x = test::random_input<T>(tokens, 53, 2);
    RowMatrix<T> y(tokens, 37);
    mla::project(lin, x, y);
    std::vector<double> want;
    for (Index t = 0; t < tokens; ++t) {
      for (Index o = 0; o < 37; ++o) {
        double acc = 0.0;
        for (Index i = 0; i < 53; ++i)
          acc += static_cast<double>(w(o, i)) * static_cast<double>(x(t, i));
        want.push_back(acc);
      }
    }
    EXPECT_LE(test::rel_error(test::to_vec(y), want), sizeof(T) == 8 ? 1e-14 : 1e-6);
  }
}

TYPED_TEST(ProjectionTest, WorksOnBlocksOfLargerMatrices) {
  using T = TypeParam;
  const Linear<T> lin(test::random_input<T>(6, 8, 3));
  const RowMatrix<T> big = test::random_input<T>(10, 20, 4);
  RowMatrix<T> out = RowMatrix<T>::Zero(10, 30);
  mla::project(lin, big.block(2, 5, 4, 8), out.block(3, 7, 4, 6));
  const RowMatrix<T> want = big.block(2, 5, 4, 8) * lin.dense().transpose();
  EXPECT_LE(test::rel_error(test::to_vec(out.block(3, 7, 4, 6)), test::to_vec(want)), 1e-6);
  EXPECT_EQ(out.topRows(3).norm(), T(0));  // nothing outside the block is touched
  EXPECT_EQ(out.bottomRows(3).norm(), T(0));
}

TYPED_TEST(ProjectionTest, ShapeMismatchIsAClearError) {
  using T = TypeParam;
  const Linear<T> lin(test::random_input<T>(6, 8, 3));
  RowMatrix<T> x(2, 7), y(2, 6), y_bad(3, 6);
  EXPECT_TRUE(test::throws_error_containing([&] { mla::project(lin, x, y); },
                                            "weight is [6, 8], input is [2, 7]"));
  RowMatrix<T> x_ok(2, 8);
  EXPECT_TRUE(
      test::throws_error_containing([&] { mla::project(lin, x_ok, y_bad); }, "output is [3, 6]"));
  EXPECT_TRUE(Linear<T>().empty());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Block-FP8 weights behind the same call

namespace {

/// The reference of the FP8 matmul: dequantise (W8A8: the activations too, with a quantiser
/// written here) and multiply in double. `bound` receives, per element, the FP32 accumulation
/// error allowance (bk + K/bk + 2) u sum_k |a_k b_k| for the compute type's unit roundoff u.
template <class T>
std::vector<double> fp8_reference(const RowMatrix<T>& x, const mla::BlockFp8Matrix& w, bool w8a8,
                                  std::vector<double>* bound) {
  const Index M = x.rows(), K = x.cols(), N = w.rows(), bk = w.block_cols();
  const Index kb = w.col_blocks();
  RowMatrix<double> xd = x.template cast<double>();
  if (w8a8) {
    for (Index m = 0; m < M; ++m) {
      for (Index b = 0; b < kb; ++b) {
        const Index k0 = b * bk, kl = std::min(bk, K - k0);
        float amax = 0.0f;
        for (Index k = k0; k < k0 + kl; ++k)
          amax = std::max(amax, std::fabs(static_cast<float>(x(m, k))));
        const float s = std::max(amax, 1e-4f) / 448.0f;
        for (Index k = k0; k < k0 + kl; ++k) {
          xd(m, k) = static_cast<double>(
                         static_cast<float>(mla::float8_e4m3fn(static_cast<float>(x(m, k)) / s))) *
                     s;
        }
      }
    }
  }
  const double u = std::ldexp(1.0, -std::numeric_limits<T>::digits);
  std::vector<double> y;
  bound->clear();
  for (Index m = 0; m < M; ++m) {
    for (Index n = 0; n < N; ++n) {
      double acc = 0.0, mag = 0.0;
      for (Index k = 0; k < K; ++k) {
        const double wv = static_cast<double>(static_cast<float>(w.codes()[n * K + k])) *
                          static_cast<double>(w.scale(n / w.block_rows(), k / bk));
        acc += xd(m, k) * wv;
        mag += std::fabs(xd(m, k) * wv);
      }
      y.push_back(acc);
      bound->push_back(static_cast<double>(bk + kb + 2) * u * mag);
    }
  }
  return y;
}

TYPED_TEST(ProjectionTest, Fp8MatmulEqualsTheDequantisedDoubleMatmul) {
  using T = TypeParam;
  for (mla::Fp8Matmul mode : {mla::Fp8Matmul::kW8A32, mla::Fp8Matmul::kW8A8}) {
    for (Index M : {Index{1}, Index{2}, Index{17}, Index{300}}) {
      // N and K ragged against the 128-blocks; also a non-default block shape.
      for (auto [br, bc] : {std::pair<Index, Index>{128, 128}, std::pair<Index, Index>{16, 64}}) {
        SCOPED_TRACE(std::string(mode == mla::Fp8Matmul::kW8A8 ? "W8A8" : "W8A32") + " M " +
                     std::to_string(M) + " blocks " + std::to_string(br) + "x" +
                     std::to_string(bc));
        const RowMatrix<T> w = test::random_input<T>(1100, 333, 5) * T(0.1);
        RowMatrix<T> x = test::random_input<T>(M, 333, 6) * T(3);
        // A token whose first 128 channels are tiny: W8A8's 1e-4 amax floor decides their scale.
        x.row(0).head(128) *= T(1e-6);
        mla::Fp8Options o;
        o.matmul = mode;
        o.block_rows = br;
        o.block_cols = bc;
        const Linear<T> lin = Linear<T>::quantize_fp8(w, o);
        EXPECT_TRUE(lin.is_fp8());
        RowMatrix<T> y(M, 1100);
        mla::project(lin, x, y);
        std::vector<double> bound;
        const std::vector<double> want =
            fp8_reference(x, lin.fp8(), mode == mla::Fp8Matmul::kW8A8, &bound);
        const std::vector<double> got = test::to_vec(y);
        int bad = 0;
        for (std::size_t i = 0; i < got.size(); ++i) {
          if (!(std::fabs(got[i] - want[i]) <= bound[i]) && ++bad <= 3) {
            ADD_FAILURE() << "element " << i << ": " << got[i] << " vs " << want[i] << " (bound "
                          << bound[i] << ")";
          }
        }
        EXPECT_EQ(bad, 0);
      }
    }
  }
}

TEST(ProjectionFp8, CloseToTheFp32MatmulByDeepSeeksMeasure) {
  // DeepSeek's check of its FP8 kernels: 1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-3 between the FP8
  // result x and the FP32 result y, on random data.
  std::mt19937 rng(8);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (Index M : {Index{1}, Index{64}}) {
    RowMatrix<float> w(768, 2048), x(M, 2048);
    for (Index i = 0; i < w.size(); ++i) w.data()[i] = nd(rng) * 0.02f;
    for (Index i = 0; i < x.size(); ++i) x.data()[i] = nd(rng);
    RowMatrix<float> y32(M, 768);
    mla::project(Linear<float>(w), x, y32);
    for (mla::Fp8Matmul mode : {mla::Fp8Matmul::kW8A32, mla::Fp8Matmul::kW8A8}) {
      for (mla::ScaleFormat sf : {mla::ScaleFormat::kFloat32, mla::ScaleFormat::kPowerOfTwo}) {
        mla::Fp8Options o;
        o.matmul = mode;
        o.weight_scales = sf;
        o.activation_scales = sf;
        RowMatrix<float> y8(M, 768);
        mla::project(Linear<float>::quantize_fp8(w, o), x, y8);
        const double xy = (y8.cast<double>().array() * y32.cast<double>().array()).sum();
        const double sq = y8.cast<double>().squaredNorm() + y32.cast<double>().squaredNorm();
        const double diff = 1.0 - 2.0 * xy / sq;
        EXPECT_LT(diff, 1e-3) << "M " << M << (mode == mla::Fp8Matmul::kW8A8 ? " W8A8" : " W8A32");
        EXPECT_GT(diff, 0.0);  // it is quantised
      }
    }
  }
}

TYPED_TEST(ProjectionTest, Fp8WeightsKeepTheInterface) {
  using T = TypeParam;
  const RowMatrix<T> w = test::random_input<T>(40, 30, 9);
  const Linear<T> lin = Linear<T>::quantize_fp8(w);
  EXPECT_EQ(lin.rows(), 40);
  EXPECT_EQ(lin.cols(), 30);
  EXPECT_EQ(lin.to_dense(), lin.fp8().template dequantize<T>());
  EXPECT_TRUE(test::throws_error_containing([&] { (void)lin.dense(); }, "use to_dense()"));
  EXPECT_TRUE(test::throws_error_containing([&] { (void)Linear<T>(w).fp8(); }, "stored dense"));
  RowMatrix<T> x(2, 29), y(2, 40);
  EXPECT_TRUE(
      test::throws_error_containing([&] { mla::project(lin, x, y); }, "weight is [40, 30]"));
  // cast keeps the codes.
  const Linear<double> d = lin.template cast<double>();
  EXPECT_TRUE(d.is_fp8());
  EXPECT_EQ(d.fp8().scales(), lin.fp8().scales());
}

}  // namespace
