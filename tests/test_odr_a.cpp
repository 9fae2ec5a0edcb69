// ODR check, first translation unit: this file and test_odr_b.cpp both include the whole
// library and instantiate the same templates; the test binary links only if every
// header-defined function and variable is inline (or a template), as a header-only library
// requires.

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "mla/mla.hpp"

// Defined in test_odr_b.cpp.
float odr_decode_b(std::uint8_t code);
std::uint8_t odr_encode_b(float x);
std::vector<float> odr_bulk_b(const std::vector<float>& x);

namespace {

TEST(Odr, TwoTranslationUnitsLinkAndAgree) {
  for (unsigned c = 0; c < 256; ++c) {
    const auto code = static_cast<std::uint8_t>(c);
    const float a = mla::float8_e4m3fn::from_bits(code);
    const float b = odr_decode_b(code);
    if (a != a) {
      EXPECT_NE(b, b) << c;  // both NaN
    } else {
      EXPECT_EQ(a, b) << c;
    }
  }
  for (float x : {0.1f, -3.0f, 500.0f, 1e-3f}) {
    EXPECT_EQ(mla::float8_e4m3fn(x).bits(), odr_encode_b(x)) << x;
  }
  const std::vector<float> x = {1.0f, 2.5f, -7.0f, 300.0f};
  std::vector<mla::float8_e5m2> q(x.size());
  mla::to_fp8(x.data(), x.size(), q.data());
  std::vector<float> back(x.size());
  mla::from_fp8(q.data(), q.size(), back.data());
  EXPECT_EQ(back, odr_bulk_b(x));
  EXPECT_EQ(MLA_VERSION, MLA_VERSION_MAJOR * 10000 + MLA_VERSION_MINOR * 100 + MLA_VERSION_PATCH);
}

}  // namespace
