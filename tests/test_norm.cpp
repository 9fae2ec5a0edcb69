// rms_norm against a plain loop in double.

#include <gtest/gtest.h>

#include <cmath>

#include "mla/norm.hpp"
#include "test_util.hpp"

namespace {

using mla::Index;
using mla::RowMatrix;

template <class T>
class NormTest : public ::testing::Test {};
using ComputeTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(NormTest, ComputeTypes, );

TYPED_TEST(NormTest, MatchesDeepSeekRmsNorm) {
  using T = TypeParam;
  const double eps = 1e-6;
  RowMatrix<T> x = test::random_input<T>(5, 512, 1);
  x.row(3) *= T(1e-4);  // small enough that eps matters
  const mla::Vector<T> g = test::random_input<T>(512, 1, 2).col(0);
  const RowMatrix<T> before = x;
  mla::rms_norm<T>(x, g, eps);
  std::vector<double> want;
  for (Index t = 0; t < 5; ++t) {
    double ss = 0.0;
    for (Index i = 0; i < 512; ++i)
      ss += static_cast<double>(before(t, i)) * static_cast<double>(before(t, i));
    const double inv = 1.0 / std::sqrt(ss / 512.0 + eps);
    for (Index i = 0; i < 512; ++i)
      want.push_back(static_cast<double>(before(t, i)) * inv * static_cast<double>(g(i)));
  }
  EXPECT_LE(test::rel_error(test::to_vec(x), want), sizeof(T) == 8 ? 1e-14 : 1e-6);
}

TYPED_TEST(NormTest, NormalisesOnlyTheGivenColumns) {
  using T = TypeParam;
  RowMatrix<T> kv = test::random_input<T>(3, 40, 3);
  const RowMatrix<T> before = kv;
  const mla::Vector<T> g = mla::Vector<T>::Ones(32);
  mla::rms_norm<T>(kv.leftCols(32), g, 1e-6);
  EXPECT_EQ(kv.rightCols(8), before.rightCols(8));
  for (Index t = 0; t < 3; ++t) {
    EXPECT_NEAR(static_cast<double>(kv.row(t).head(32).squaredNorm()) / 32.0, 1.0, 1e-4);
  }
}

TYPED_TEST(NormTest, WeightOfTheWrongSizeIsAClearError) {
  using T = TypeParam;
  RowMatrix<T> x(2, 8);
  EXPECT_TRUE(
      test::throws_error_containing([&] { mla::rms_norm<T>(x, mla::Vector<T>::Ones(7), 1e-6); },
                                    "weight has 7 values, rows have 8"));
}

}  // namespace
