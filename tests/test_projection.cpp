// Linear / project against plain loops in double.

#include <gtest/gtest.h>

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
