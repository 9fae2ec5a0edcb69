// Tests for mla/fp8.hpp against the independent reference in tests/reference/fp8_reference.hpp.

#include <gtest/gtest.h>

#include <Eigen/Core>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "mla/fp8.hpp"
#include "mla/quant.hpp"  // the bulk conversions
#include "reference/fp8_reference.hpp"

namespace {

using mla::float8_e4m3fn;
using mla::float8_e5m2;
using mla::Fp8Overflow;

constexpr Fp8Overflow kModes[] = {Fp8Overflow::kSaturate, Fp8Overflow::kNoSaturate};

template <class F8>
struct Spec;
template <>
struct Spec<float8_e4m3fn> {
  static constexpr ref::Fp8Spec kValue = ref::kE4M3FN;
};
template <>
struct Spec<float8_e5m2> {
  static constexpr ref::Fp8Spec kValue = ref::kE5M2;
};

float float_from_bits(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
double double_from_bits(std::uint64_t u) {
  double d;
  std::memcpy(&d, &u, sizeof d);
  return d;
}

const char* mode_name(Fp8Overflow mode) {
  return mode == Fp8Overflow::kSaturate ? "saturate" : "no-saturate";
}

std::string hex(unsigned v) {
  std::ostringstream os;
  os << "0x" << std::hex << v;
  return os.str();
}

/// The float NaN whose leading mantissa bits carry the payload of FP8 NaN `code`. Built from
/// bits so that no arithmetic quiets it.
float nan_float_for(const ref::Fp8Spec& f, unsigned code) {
  const std::uint32_t m = code & ((1u << f.mantissa_bits) - 1);
  return float_from_bits(((code & 0x80u) << 24) | 0x7F800000u | (m << (23 - f.mantissa_bits)));
}
double nan_double_for(const ref::Fp8Spec& f, unsigned code) {
  const std::uint64_t m = code & ((1u << f.mantissa_bits) - 1);
  return double_from_bits((std::uint64_t{code & 0x80u} << 56) | 0x7FF0000000000000ull |
                          (m << (52 - f.mantissa_bits)));
}

/// Compares a produced code with the reference: exact, except that for a NaN only NaN-ness and
/// sign are compared (the payload is carried where it fits and is not part of the spec).
bool same_code(const ref::Fp8Spec& f, unsigned expected, unsigned got) {
  if (ref::fp8_is_nan(f, expected)) {
    return ref::fp8_is_nan(f, got) && (expected & 0x80u) == (got & 0x80u);
  }
  return expected == got;
}

/// Collects mismatches and reports the first few, so an exhaustive loop does not flood the log.
class Mismatches {
 public:
  void check(bool ok, const std::string& what) {
    if (ok) return;
    if (++count_ <= 8) ADD_FAILURE() << what;
  }
  int count() const { return count_; }

 private:
  int count_ = 0;
};

template <class F8>
class Fp8Test : public ::testing::Test {
 protected:
  static constexpr ref::Fp8Spec kSpec = Spec<F8>::kValue;
  ref::Fp8Rounder rounder_{kSpec};

  /// Checks every conversion path for input value v (exactly representable in double) in both
  /// overflow modes: from float (when v is a float), from double, and from the given extra
  /// source (bf16/fp16) when supplied.
  template <class Extra = float>
  void check_value(double v, Mismatches& bad, const Extra* extra = nullptr) {
    const bool is_float = std::isnan(v) || static_cast<double>(static_cast<float>(v)) == v;
    for (Fp8Overflow mode : kModes) {
      const unsigned expected = rounder_.round(v, mode == Fp8Overflow::kSaturate);
      const unsigned from_double = F8(v, mode).bits();
      bad.check(same_code(kSpec, expected, from_double),
                std::string("double ") + std::to_string(v) + " " + mode_name(mode) + ": got " +
                    hex(from_double) + ", expected " + hex(expected));
      if (is_float) {
        const unsigned from_float = F8(static_cast<float>(v), mode).bits();
        bad.check(same_code(kSpec, expected, from_float),
                  std::string("float ") + std::to_string(v) + " " + mode_name(mode) + ": got " +
                      hex(from_float) + ", expected " + hex(expected));
      }
      if (extra) {
        const unsigned from_extra = F8(*extra, mode).bits();
        bad.check(same_code(kSpec, expected, from_extra),
                  std::string("bf16/fp16 ") + std::to_string(v) + " " + mode_name(mode) + ": got " +
                      hex(from_extra) + ", expected " + hex(expected));
      }
    }
  }
};

using Fp8Types = ::testing::Types<float8_e4m3fn, float8_e5m2>;
// The explicit empty name-generator argument keeps clang -Wpedantic quiet about the variadic macro.
TYPED_TEST_SUITE(Fp8Test, Fp8Types, );

TYPED_TEST(Fp8Test, TypeIsOneTriviallyCopyableByte) {
  using F8 = TypeParam;
  static_assert(sizeof(F8) == 1 && alignof(F8) == 1);
  static_assert(std::is_trivially_copyable_v<F8>);
  static_assert(std::is_standard_layout_v<F8>);
  static_assert(!std::is_convertible_v<float, F8>, "narrowing must be explicit");
  static_assert(std::is_convertible_v<F8, float>, "widening must be implicit");
  static_assert(F8::from_bits(0xA5).bits() == 0xA5, "from_bits/bits are constexpr inverses");
  static_assert(std::is_same_v<decltype(F8::from_bits(0)), F8>);
  static_assert(mla::is_float8_v<F8> && !mla::is_float8_v<float>);
  EXPECT_EQ(F8{}.bits(), 0x00);  // value-initialised +0
  EXPECT_EQ(F8(0).bits(), 0x00);
  EXPECT_EQ(F8(-0.0f).bits(), 0x80);
}

TYPED_TEST(Fp8Test, ExhaustiveAllCodesDecodeToTheFormula) {
  using F8 = TypeParam;
  int finite = 0, inf = 0, nan = 0;
  for (unsigned c = 0; c < 256; ++c) {
    ref::Kind kind;
    const double v = ref::fp8_value(this->kSpec, c, &kind);
    const float got = F8::from_bits(static_cast<std::uint8_t>(c));
    const bool negative = c & 0x80u;
    EXPECT_EQ(std::signbit(got), negative) << "code " << hex(c);
    switch (kind) {
      case ref::Kind::kFinite:
        ++finite;
        EXPECT_EQ(static_cast<double>(got), v) << "code " << hex(c);
        break;
      case ref::Kind::kInf:
        ++inf;
        EXPECT_TRUE(std::isinf(got)) << "code " << hex(c);
        break;
      case ref::Kind::kNaN:
        ++nan;
        EXPECT_TRUE(std::isnan(got)) << "code " << hex(c);
        break;
    }
  }
  // OCP OFP8: E4M3FN has NaN only at 0x7F/0xFF and no Inf; E5M2 has Inf at 0x7C/0xFC and
  // NaN at 0x7D-0x7F/0xFD-0xFF.
  const bool e5m2 = this->kSpec.ieee_specials;
  EXPECT_EQ(nan, e5m2 ? 6 : 2);
  EXPECT_EQ(inf, e5m2 ? 2 : 0);
  EXPECT_EQ(finite, 256 - nan - inf);
}

TYPED_TEST(Fp8Test, ExhaustiveAllCodesReencodeFromFloatAndDouble) {
  using F8 = TypeParam;
  const unsigned max_code = this->rounder_.max_code();
  for (unsigned c = 0; c < 256; ++c) {
    ref::Kind kind;
    const double v = ref::fp8_value(this->kSpec, c, &kind);
    for (Fp8Overflow mode : kModes) {
      SCOPED_TRACE("code " + hex(c) + " " + mode_name(mode));
      if (kind == ref::Kind::kNaN) {
        // NaN codes come back bit for bit, payload included.
        EXPECT_EQ(F8(nan_float_for(this->kSpec, c), mode).bits(), c);
        EXPECT_EQ(F8(nan_double_for(this->kSpec, c), mode).bits(), c);
        // And the widened value re-encodes to the same code.
        EXPECT_EQ(F8(static_cast<float>(F8::from_bits(static_cast<std::uint8_t>(c))), mode).bits(),
                  c);
      } else if (kind == ref::Kind::kInf) {
        // Inf keeps its code only when not saturating; saturation maps it to +-max.
        const unsigned want = mode == Fp8Overflow::kSaturate ? (c & 0x80u) | max_code : c;
        EXPECT_EQ(F8(static_cast<float>(v), mode).bits(), want);
        EXPECT_EQ(F8(v, mode).bits(), want);
      } else {
        EXPECT_EQ(F8(static_cast<float>(v), mode).bits(), c);
        EXPECT_EQ(F8(v, mode).bits(), c);
        EXPECT_EQ(F8(static_cast<float>(F8::from_bits(static_cast<std::uint8_t>(c))), mode).bits(),
                  c);
      }
    }
  }
}

TYPED_TEST(Fp8Test, ExhaustiveAllBf16PatternsMatchReference) {
  Mismatches bad;
  for (unsigned b = 0; b < 65536; ++b) {
    const double v = ref::bf16_value(static_cast<std::uint16_t>(b));
    const auto bf = Eigen::numext::bit_cast<Eigen::bfloat16>(static_cast<std::uint16_t>(b));
    this->check_value(v, bad, &bf);
  }
  EXPECT_EQ(bad.count(), 0);
}

TYPED_TEST(Fp8Test, ExhaustiveAllFp16PatternsMatchReference) {
  Mismatches bad;
  for (unsigned b = 0; b < 65536; ++b) {
    const double v = ref::fp16_value(static_cast<std::uint16_t>(b));
    const auto h = Eigen::numext::bit_cast<Eigen::half>(static_cast<std::uint16_t>(b));
    this->check_value(v, bad, &h);
  }
  EXPECT_EQ(bad.count(), 0);
}

TYPED_TEST(Fp8Test, MidpointsAndTheirNeighboursMatchReference) {
  // Every tie between two adjacent representable values (and the tie between the largest
  // finite value and the first overflowing grid point), plus the nearest float and double on
  // either side: this is where rounding and the overflow order go wrong.
  Mismatches bad;
  const std::vector<double>& grid = this->rounder_.grid();
  for (std::size_t i = 0; i + 1 < grid.size(); ++i) {
    const double mid = 0.5 * (grid[i] + grid[i + 1]);
    for (double sign : {1.0, -1.0}) {
      const double m = sign * mid;
      const float mf = static_cast<float>(m);  // exact: the midpoints have few bits
      for (double v : {m, std::nextafter(m, 0.0), std::nextafter(m, 2 * m),
                       static_cast<double>(std::nextafter(mf, 0.0f)),
                       static_cast<double>(std::nextafter(mf, 2 * mf))}) {
        this->check_value(v, bad);
      }
    }
  }
  EXPECT_EQ(bad.count(), 0);
}

TYPED_TEST(Fp8Test, RandomFloatBitPatternsMatchReference) {
  Mismatches bad;
  std::mt19937 rng(20240501);
  for (int i = 0; i < (1 << 18); ++i) {
    this->check_value(static_cast<double>(float_from_bits(static_cast<std::uint32_t>(rng()))), bad);
  }
  EXPECT_EQ(bad.count(), 0);
}

TYPED_TEST(Fp8Test, RandomDoublesWithLowBitsMatchReference) {
  // Doubles whose bits below float precision decide the rounding: these catch a conversion
  // that goes through float first.
  Mismatches bad;
  std::mt19937_64 rng(7);
  std::uniform_int_distribution<int> exponent(-22, 18);
  for (int i = 0; i < (1 << 18); ++i) {
    const std::uint64_t mantissa = rng() & ((std::uint64_t{1} << 52) - 1);
    const std::uint64_t sign = rng() & 1;
    const std::uint64_t biased = static_cast<std::uint64_t>(exponent(rng) + 1023);
    this->check_value(double_from_bits((sign << 63) | (biased << 52) | mantissa), bad);
  }
  EXPECT_EQ(bad.count(), 0);
}

TYPED_TEST(Fp8Test, DefaultModeIsSaturating) {
  using F8 = TypeParam;
  for (float x : {1e9f, -1e9f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(F8(x).bits(), F8(x, Fp8Overflow::kSaturate).bits()) << x;
    EXPECT_EQ(F8(static_cast<double>(x)).bits(), F8(x, Fp8Overflow::kSaturate).bits()) << x;
    EXPECT_EQ(static_cast<float>(F8(x)),
              x > 0 ? static_cast<float>(std::numeric_limits<F8>::max())
                    : static_cast<float>(std::numeric_limits<F8>::lowest()));
  }
}

TYPED_TEST(Fp8Test, NumericLimitsAgreeWithTheFormat) {
  using F8 = TypeParam;
  using L = std::numeric_limits<F8>;
  const std::vector<double>& grid = this->rounder_.grid();
  const double max = grid[grid.size() - 2];
  static_assert(L::is_specialized && L::is_signed && !L::is_integer && !L::is_exact);
  static_assert(L::has_quiet_NaN && L::has_denorm == std::denorm_present && L::radix == 2);
  EXPECT_EQ(L::has_infinity, this->kSpec.ieee_specials);
  EXPECT_EQ(L::digits, this->kSpec.mantissa_bits + 1);
  EXPECT_EQ(static_cast<double>(L::max()), max);
  EXPECT_EQ(static_cast<double>(L::lowest()), -max);
  EXPECT_EQ(static_cast<double>(L::min()), std::ldexp(1.0, 1 - this->kSpec.bias));
  EXPECT_EQ(static_cast<double>(L::denorm_min()), grid[1]);
  EXPECT_EQ(static_cast<double>(L::round_error()), 0.5);
  // epsilon: the gap between 1 and the next representable value.
  const auto one = std::lower_bound(grid.begin(), grid.end(), 1.0);
  EXPECT_EQ(static_cast<double>(L::epsilon()), *(one + 1) - 1.0);
  // Exponent conventions of <limits>: min() == 2^(min_exponent - 1), max() < 2^max_exponent.
  EXPECT_EQ(static_cast<double>(L::min()), std::ldexp(1.0, L::min_exponent - 1));
  EXPECT_LT(max, std::ldexp(1.0, L::max_exponent));
  EXPECT_GE(max, std::ldexp(1.0, L::max_exponent - 1));
  EXPECT_GE(std::pow(10.0, L::min_exponent10), static_cast<double>(L::min()));
  EXPECT_LT(std::pow(10.0, L::min_exponent10 - 1), static_cast<double>(L::min()));
  EXPECT_LE(std::pow(10.0, L::max_exponent10), max);
  EXPECT_GT(std::pow(10.0, L::max_exponent10 + 1), max);
  EXPECT_TRUE(std::isnan(static_cast<float>(L::quiet_NaN())));
  EXPECT_TRUE(std::isnan(static_cast<float>(L::signaling_NaN())));
  if (L::has_infinity) {
    EXPECT_TRUE(std::isinf(static_cast<float>(L::infinity())));
  } else {
    EXPECT_TRUE(std::isnan(static_cast<float>(L::infinity())));  // documented: no Inf, NaN
  }
  // max_digits10 significant digits print every finite value so that it reads back to itself.
  for (unsigned c = 0; c < 256; ++c) {
    const F8 x = F8::from_bits(static_cast<std::uint8_t>(c));
    if (!std::isfinite(static_cast<float>(x))) continue;
    std::ostringstream os;
    os.precision(L::max_digits10);
    os << static_cast<float>(x);
    EXPECT_EQ(F8(std::stod(os.str())).bits(), c) << os.str();
  }
  // One digit fewer is not enough (max_digits10 is the smallest count that round-trips).
  bool fewer_suffices = true;
  for (unsigned c = 0; c < 256 && fewer_suffices; ++c) {
    const F8 x = F8::from_bits(static_cast<std::uint8_t>(c));
    if (!std::isfinite(static_cast<float>(x))) continue;
    std::ostringstream os;
    os.precision(L::max_digits10 - 1);
    os << static_cast<float>(x);
    fewer_suffices = F8(std::stod(os.str())).bits() == c;
  }
  EXPECT_FALSE(fewer_suffices);
}

TYPED_TEST(Fp8Test, EigenContainersHoldTheType) {
  using F8 = TypeParam;
  using Matrix8 = Eigen::Matrix<F8, Eigen::Dynamic, Eigen::Dynamic>;
  const Eigen::MatrixXf x = Eigen::MatrixXf::Random(5, 7) * 300.0f;
  const Matrix8 q = x.cast<F8>();
  const Eigen::MatrixXf back = q.template cast<float>();
  for (Eigen::Index j = 0; j < x.cols(); ++j) {
    for (Eigen::Index i = 0; i < x.rows(); ++i) {
      EXPECT_EQ(q(i, j).bits(), F8(x(i, j)).bits());
      EXPECT_EQ(back(i, j), static_cast<float>(F8(x(i, j))));
    }
  }
  Matrix8 z = Matrix8::Zero(3, 2);
  for (Eigen::Index i = 0; i < z.size(); ++i) EXPECT_EQ(z.data()[i].bits(), 0x00);
  z.setConstant(F8(2.5f));
  EXPECT_EQ(static_cast<float>(z(2, 1)), 2.5f);
  using NT = Eigen::NumTraits<F8>;
  EXPECT_EQ(static_cast<float>(NT::epsilon()),
            static_cast<float>(std::numeric_limits<F8>::epsilon()));
  EXPECT_EQ(static_cast<float>(NT::highest()), static_cast<float>(std::numeric_limits<F8>::max()));
  EXPECT_EQ(static_cast<float>(NT::lowest()),
            static_cast<float>(std::numeric_limits<F8>::lowest()));
  EXPECT_GT(static_cast<float>(NT::dummy_precision()), static_cast<float>(NT::epsilon()));
  std::ostringstream os;
  os << Eigen::Matrix<F8, 1, 2>(F8(1.5f), F8(-3.0f));
  EXPECT_EQ(os.str(), "1.5  -3");
}

// ---------------------------------------------------------------------------------------------
// Bulk conversions

/// Inputs that exercise every branch: random magnitudes across the whole FP8 range and beyond,
/// zeros, subnormals of both formats and of float, the overflow boundaries, Inf and NaNs.
std::vector<float> bulk_inputs(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-20, 18);
  const float specials[] = {0.0f,
                            -0.0f,
                            448.0f,
                            464.0f,
                            465.0f,
                            -464.0f,
                            480.0f,
                            57344.0f,
                            61440.0f,
                            -61439.0f,
                            std::ldexp(1.0f, -9),
                            std::ldexp(1.0f, -10),
                            std::ldexp(1.5f, -9),
                            std::ldexp(1.0f, -17),
                            std::ldexp(1.0f, -16),
                            1.0625f,
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::min(),
                            std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            float_from_bits(0x7F800001u),
                            float_from_bits(0xFFA00000u)};
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    if (i % 5 == 0) {
      v[i] = specials[(i / 5) % (sizeof specials / sizeof specials[0])];
    } else if (i % 5 == 1) {
      v[i] = float_from_bits(static_cast<std::uint32_t>(rng()));
    } else {
      v[i] = std::ldexp(unit(rng), exponent(rng));
    }
  }
  return v;
}

/// Floats x near m * scale for every FP8 tie m: x / scale lands on or next to a tie, where
/// dividing and multiplying by the reciprocal round differently.
std::vector<float> scaled_ties(const std::vector<double>& grid, float scale) {
  std::vector<float> v;
  for (std::size_t i = 0; i + 1 < grid.size(); ++i) {
    float x = static_cast<float>(0.5 * (grid[i] + grid[i + 1]) * scale);
    for (int k = 0; k < 2; ++k) x = std::nextafter(x, 0.0f);
    for (int k = 0; k < 5; ++k, x = std::nextafter(x, 2 * x)) {
      v.push_back(x);
      v.push_back(-x);
    }
  }
  return v;
}

TYPED_TEST(Fp8Test, BulkToFp8EqualsScalarConversion) {
  using F8 = TypeParam;
  constexpr std::size_t kGuard = 16;
  for (float scale : {1.0f, 0.5f, 3.0f, 1.0f / 448.0f, 7.3e-3f, std::ldexp(1.0f, -7), 1e30f}) {
    std::vector<float> input = scaled_ties(this->rounder_.grid(), scale);
    const std::vector<float> mixed = bulk_inputs(5000, 11);
    input.insert(input.end(), mixed.begin(), mixed.end());
    for (Fp8Overflow mode : kModes) {
      for (std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{15},
                            std::size_t{16}, std::size_t{17}, std::size_t{63}, std::size_t{64},
                            std::size_t{65}, std::size_t{1000}, input.size() - 3}) {
        for (std::size_t offset : {0u, 1u, 3u}) {
          SCOPED_TRACE("scale " + std::to_string(scale) + " " + mode_name(mode) + " n " +
                       std::to_string(n) + " offset " + std::to_string(offset));
          std::vector<F8> out(n + offset + kGuard, F8::from_bits(0x5A));
          mla::to_fp8(input.data() + offset, n, out.data() + offset, scale, mode);
          Mismatches bad;
          for (std::size_t i = 0; i < n; ++i) {
            const float x = input[offset + i];
            const F8 expected = scale == 1.0f ? F8(x, mode) : F8(x / scale, mode);
            // NaNs compare by NaN-ness and sign: compilers may quiet a signalling NaN here
            // (LLVM folds the select above into x / scale, which is x for every non-NaN).
            bad.check(same_code(this->kSpec, expected.bits(), out[offset + i].bits()),
                      "element " + std::to_string(i) + " input " + std::to_string(x) + ": got " +
                          hex(out[offset + i].bits()) + ", expected " + hex(expected.bits()));
          }
          EXPECT_EQ(bad.count(), 0);
          // Nothing outside [offset, offset + n) is touched.
          for (std::size_t i = 0; i < offset; ++i) EXPECT_EQ(out[i].bits(), 0x5A);
          for (std::size_t i = offset + n; i < out.size(); ++i) EXPECT_EQ(out[i].bits(), 0x5A);
        }
      }
    }
  }
}

TYPED_TEST(Fp8Test, BulkFromFp8EqualsScalarConversion) {
  using F8 = TypeParam;
  constexpr std::size_t kGuard = 16;
  std::vector<F8> codes(4099);
  std::mt19937 rng(3);
  for (std::size_t i = 0; i < codes.size(); ++i) {
    // All 256 codes in order first, then random codes.
    codes[i] = F8::from_bits(static_cast<std::uint8_t>(i < 256 ? i : rng()));
  }
  // Subnormal, negative and huge scales too (the AVX-512 path hands |scale| > 2^100 back).
  for (float scale : {1.0f, 0.25f, 3.0f, 1.0f / 448.0f, 7.3e-3f, 1e30f, -0.5f, 1e-40f, 0x1p110f}) {
    for (std::size_t n : {0u, 1u, 15u, 16u, 17u, 255u, 256u, 1000u, 4096u}) {
      for (std::size_t offset : {0u, 1u, 3u}) {
        SCOPED_TRACE("scale " + std::to_string(scale) + " n " + std::to_string(n) + " offset " +
                     std::to_string(offset));
        const float sentinel = -1234.5f;
        std::vector<float> out(n + offset + kGuard, sentinel);
        mla::from_fp8(codes.data() + offset, n, out.data() + offset, scale);
        Mismatches bad;
        for (std::size_t i = 0; i < n; ++i) {
          const float x = codes[offset + i];
          const float expected = scale == 1.0f ? x : x * scale;
          const float got = out[offset + i];
          const bool ok = std::isnan(expected)
                              ? std::isnan(got) && std::signbit(got) == std::signbit(expected)
                              : bits_of(got) == bits_of(expected);
          bad.check(ok, "code " + hex(codes[offset + i].bits()) + ": got " + std::to_string(got) +
                            ", expected " + std::to_string(expected));
        }
        EXPECT_EQ(bad.count(), 0);
        for (std::size_t i = 0; i < offset; ++i) EXPECT_EQ(out[i], sentinel);
        for (std::size_t i = offset + n; i < out.size(); ++i) EXPECT_EQ(out[i], sentinel);
      }
    }
  }
  // With scale 1 even NaN payloads come through unchanged (no arithmetic touches them).
  std::vector<float> out(256);
  mla::from_fp8(codes.data(), 256, out.data());
  for (unsigned c = 0; c < 256; ++c) {
    EXPECT_EQ(bits_of(out[c]), bits_of(static_cast<float>(codes[c]))) << hex(c);
  }
}

// ---------------------------------------------------------------------------------------------
// The boundary vectors of the OCP spec (as restated by NVIDIA, ONNX and ml_dtypes).

struct Vector {
  double input;
  unsigned saturate;
  unsigned no_saturate;
};

template <class F8>
void check_vectors(const std::vector<Vector>& vectors) {
  for (const Vector& v : vectors) {
    SCOPED_TRACE("input " + std::to_string(v.input));
    for (Fp8Overflow mode : kModes) {
      const unsigned want = mode == Fp8Overflow::kSaturate ? v.saturate : v.no_saturate;
      const unsigned from_double = F8(v.input, mode).bits();
      const unsigned from_float = F8(static_cast<float>(v.input), mode).bits();
      if (std::isnan(v.input)) {
        EXPECT_TRUE(
            std::isnan(static_cast<float>(F8::from_bits(static_cast<std::uint8_t>(from_double)))));
        EXPECT_EQ(from_double, want) << mode_name(mode);
      } else {
        EXPECT_EQ(from_double, want) << mode_name(mode);
        EXPECT_EQ(from_float, want) << mode_name(mode);
      }
    }
  }
}

TEST(Fp8Vectors, E4M3FNBoundaries) {
  const double inf = std::numeric_limits<double>::infinity();
  check_vectors<float8_e4m3fn>({
      {448.0, 0x7E, 0x7E},
      {464.0, 0x7E, 0x7E},  // a tie rounds to the even 448 before the overflow check
      {465.0, 0x7E, 0x7F},
      {-465.0, 0xFE, 0xFF},
      {std::ldexp(1.0, -9), 0x01, 0x01},
      {std::ldexp(1.0, -10), 0x00, 0x00},
      {std::ldexp(1.5, -9), 0x02, 0x02},
      {std::ldexp(7.5, -9), 0x08, 0x08},
      {1.0, 0x38, 0x38},
      {1.0625, 0x38, 0x38},
      {1.1875, 0x3A, 0x3A},
      {0.1, 0x1D, 0x1D},
      {3.14159, 0x45, 0x45},
      {-2.0, 0xC0, 0xC0},
      {-0.0, 0x80, 0x80},
      {inf, 0x7E, 0x7F},
      {-inf, 0xFE, 0xFF},
      {std::numeric_limits<double>::quiet_NaN(), 0x7F, 0x7F},
  });
}

TEST(Fp8Vectors, E5M2Boundaries) {
  const double inf = std::numeric_limits<double>::infinity();
  check_vectors<float8_e5m2>({
      {57344.0, 0x7B, 0x7B},
      {61440.0, 0x7B, 0x7C},  // a tie that rounds up to 2^16: overflow
      {61439.0, 0x7B, 0x7B},
      {-61440.0, 0xFB, 0xFC},
      {std::ldexp(1.0, -16), 0x01, 0x01},
      {std::ldexp(1.0, -17), 0x00, 0x00},
      {std::ldexp(1.0, -14), 0x04, 0x04},
      {1.0, 0x3C, 0x3C},
      {1.125, 0x3C, 0x3C},
      {-0.0, 0x80, 0x80},
      {inf, 0x7B, 0x7C},
      {-inf, 0xFB, 0xFC},
      {std::numeric_limits<double>::quiet_NaN(), 0x7E, 0x7E},
  });
}

TEST(Fp8Vectors, NoDoubleRounding) {
  // 1 + 2^-4 + 2^-24 lies just above the E4M3 tie 1.0625, so it rounds up to 1.125. Rounding to
  // float first gives exactly 1.0625 (2^-24 is a float tie that goes to even) and then 1.0.
  const double x = 1.0 + std::ldexp(1.0, -4) + std::ldexp(1.0, -24);
  EXPECT_EQ(static_cast<float>(float8_e4m3fn(x)), 1.125f);
  EXPECT_EQ(float8_e4m3fn(x).bits(), 0x39);
  EXPECT_EQ(float8_e4m3fn(static_cast<float>(x)).bits(), 0x38);  // the double-rounding trap
  // Same for E5M2 around its tie 1.125 between 1.0 and 1.25.
  const double y = 1.0 + std::ldexp(1.0, -3) + std::ldexp(1.0, -24);
  EXPECT_EQ(static_cast<float>(float8_e5m2(y)), 1.25f);
  // From float: 1.0625 + 2^-20 rounds up to 1.125, but through bf16 (7 mantissa bits) it would
  // become 1.0625 and then tie to 1.0.
  const float z = 1.0625f + std::ldexp(1.0f, -20);
  EXPECT_EQ(float8_e4m3fn(z).bits(), 0x39);
  EXPECT_EQ(float8_e4m3fn(Eigen::bfloat16(z)).bits(), 0x38);
}

TEST(Fp8Vectors, OverflowModesPerCall) {
  const float big = 1000.0f;
  EXPECT_EQ(float8_e4m3fn(big, Fp8Overflow::kSaturate).bits(), 0x7E);
  EXPECT_TRUE(std::isnan(static_cast<float>(float8_e4m3fn(big, Fp8Overflow::kNoSaturate))));
  EXPECT_EQ(float8_e5m2(1e6f, Fp8Overflow::kSaturate).bits(), 0x7B);
  EXPECT_TRUE(std::isinf(static_cast<float>(float8_e5m2(1e6f, Fp8Overflow::kNoSaturate))));
  // NaN keeps its sign in both modes.
  for (Fp8Overflow mode : kModes) {
    EXPECT_EQ(float8_e4m3fn(-std::numeric_limits<float>::quiet_NaN(), mode).bits(), 0xFF);
    const unsigned e5 = float8_e5m2(-std::numeric_limits<float>::quiet_NaN(), mode).bits();
    EXPECT_TRUE(e5 >= 0xFD) << hex(e5);
  }
  // A float NaN whose payload does not fit E5M2's two bits stays NaN (quiet), not Inf.
  EXPECT_EQ(float8_e5m2(float_from_bits(0x7F800001u)).bits(), 0x7E);
}

TEST(Fp8Vectors, PrintsAsFloat) {
  std::ostringstream os;
  os << float8_e4m3fn(3.14159f) << ' ' << float8_e5m2(-1.25f);
  EXPECT_EQ(os.str(), "3.25 -1.25");
}

}  // namespace
