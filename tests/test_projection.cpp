// Linear / project against plain loops in double.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
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
  ASSERT_EQ(d.fp8().scale_count(), lin.fp8().scale_count());
  EXPECT_TRUE(
      std::equal(d.fp8().scales(), d.fp8().scales() + d.fp8().scale_count(), lin.fp8().scales()));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Every storage, layout and precision on every instruction set

namespace {

/// float -> the nearest BF16 value (ties to even), independently of the library.
double round_bf16(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, 4);
  const std::uint32_t lsb = (u >> 16) & 1u;
  u = (u + 0x7FFFu + lsb) & 0xFFFF0000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

enum class Storage { kDense, kBf16, kFp8 };

struct Weights {
  Linear<float> lin;
  RowMatrix<double> value;  // the stored values, exactly
  Index kblock;             // K block of FP32 promotion (for the bound)
};

/// A [rows, cols] weight in the given storage and its exact values.
Weights make_weights(Storage s, Index rows, Index cols, unsigned seed) {
  const RowMatrix<float> w = test::random_input<float>(rows, cols, seed) * 0.3f;
  Weights out{Linear<float>(w), w.cast<double>(), 256};
  if (s == Storage::kBf16) {
    out.lin = Linear<float>::bf16(w);
    for (Index i = 0; i < w.size(); ++i) out.value.data()[i] = round_bf16(w.data()[i]);
  } else if (s == Storage::kFp8) {
    mla::Fp8Options o;
    o.block_rows = 32;  // narrower than an AVX-512 panel of columns: scales vary inside it
    o.block_cols = 64;
    out.lin = Linear<float>::quantize_fp8(w, o);
    out.value = out.lin.fp8().dequantize<double>();
    out.kblock = 64;
  }
  return out;
}

TEST(ProjectionKernels, EveryStorageLayoutAndPrecisionMatchesTheDoubleReference) {
  mla::ThreadPool pool(2);
  const Index N = 70, K = 333;  // ragged against every vector width, panel and block
  for (Storage s : {Storage::kDense, Storage::kBf16, Storage::kFp8}) {
    const Weights w = make_weights(s, N, K, 11);
    for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
      for (Index M : {1, 2, 5, 8, 9, 17, 40, 300}) {
        const RowMatrix<float> x = test::random_input<float>(M, K, 12);
        const RowMatrix<float> xs = test::random_input<float>(M, 21, 13);  // for the row slices
        const RowMatrix<float> xr = test::random_input<float>(M, K, 14);
        // The reference sees what the kernels multiply: kBf16 rounds the activations to BF16
        // once for BF16 and FP8 weights (dense weights stay FP32); then exact products and a
        // sum in double.
        const bool bf16 = p == mla::Precision::kBf16 && s != Storage::kDense;
        const auto act = [&](float v) { return bf16 ? round_bf16(v) : static_cast<double>(v); };
        const auto wt = [&](Index r, Index c) { return w.value(r, c); };
        const double u = std::ldexp(1.0, -24);
        test::for_each_isa([&](mla::Isa) {
          for (mla::ThreadPool* pp : {static_cast<mla::ThreadPool*>(nullptr), &pool}) {
            SCOPED_TRACE(std::string(s == Storage::kDense  ? "dense"
                                     : s == Storage::kBf16 ? "bf16"
                                                           : "fp8") +
                         " " + mla::to_string(p) + " M " + std::to_string(M) + (pp ? " pool" : ""));
            mla::ProjectionWorkspace ws;
            const mla::ProjectionContext ctx{pp, p, &ws};
            // apply: y = x W^T; apply_rows: rows [30, 51); apply_rows_transposed: rows [40, 61).
            RowMatrix<float> y(M, N), yr(M, 21), yt(M, K);
            w.lin.apply(x, y, ctx);
            w.lin.apply_rows(30, 21, xr, yr, ctx);
            w.lin.apply_rows_transposed(40, 21, xs, yt, ctx);
            int bad = 0;
            const auto check = [&](double got, double want, double mag, Index terms) {
              const double bound = static_cast<double>(w.kblock + terms / w.kblock + 4) * u * mag;
              if (!(std::fabs(got - want) <= bound) && ++bad <= 3) {
                ADD_FAILURE() << got << " vs " << want << " (bound " << bound << ")";
              }
            };
            for (Index m = 0; m < M; ++m) {
              for (Index n = 0; n < N; ++n) {
                double acc = 0, mag = 0;
                for (Index k = 0; k < K; ++k) {
                  acc += act(x(m, k)) * wt(n, k);
                  mag += std::fabs(act(x(m, k)) * wt(n, k));
                }
                check(y(m, n), acc, mag, K);
              }
              for (Index j = 0; j < 21; ++j) {
                double acc = 0, mag = 0;
                for (Index k = 0; k < K; ++k) {
                  acc += act(xr(m, k)) * wt(30 + j, k);
                  mag += std::fabs(act(xr(m, k)) * wt(30 + j, k));
                }
                check(yr(m, j), acc, mag, K);
              }
              for (Index c = 0; c < K; ++c) {
                double acc = 0, mag = 0;
                for (Index j = 0; j < 21; ++j) {
                  acc += act(xs(m, j)) * wt(40 + j, c);
                  mag += std::fabs(act(xs(m, j)) * wt(40 + j, c));
                }
                check(yt(m, c), acc, mag, 21);
              }
            }
            EXPECT_EQ(bad, 0);
          }
        });
      }
    }
  }
}

TEST(ProjectionKernels, BorrowedWeightsEqualOwnedOnesBitForBit) {
  const RowMatrix<float> w = test::random_input<float>(50, 90, 21);
  const Linear<float> owned = Linear<float>::bf16(w);
  // A copy of the BF16 values that only the keep-alive owns.
  auto storage = std::make_shared<std::vector<std::uint16_t>>(
      static_cast<const std::uint16_t*>(owned.bf16_data()),
      static_cast<const std::uint16_t*>(owned.bf16_data()) + w.size());
  Linear<float> borrowed = Linear<float>::borrow_bf16(storage->data(), 50, 90, storage);
  storage.reset();  // the Linear keeps the memory alive
  const RowMatrix<float> x = test::random_input<float>(12, 90, 22);
  RowMatrix<float> a(12, 50), b(12, 50);
  owned.apply(x, a);
  borrowed.apply(x, b);
  EXPECT_EQ(a, b);
  EXPECT_EQ(borrowed.weight_bytes(), 50u * 90u * 2u);
  EXPECT_EQ(borrowed.storage(), mla::WeightStorage::kBf16);
  // FP8: a view of an owned matrix's codes and scales.
  const mla::BlockFp8Matrix q = mla::BlockFp8Matrix::quantize(w.data(), 50, 90);
  const mla::BlockFp8Matrix view =
      mla::BlockFp8Matrix::borrow(50, 90, 128, 128, q.codes(), q.scales());
  EXPECT_FALSE(view.owns());
  EXPECT_TRUE(q.owns());
  Linear<float>(q).apply(x, a);
  Linear<float>(view).apply(x, b);
  EXPECT_EQ(a, b);
  EXPECT_TRUE(test::throws_error_containing(
      [] { mla::BlockFp8Matrix::borrow(2, 2, 128, 128, nullptr, nullptr); }, "null codes"));
}

}  // namespace
