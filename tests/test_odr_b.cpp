// ODR check, second translation unit (see test_odr_a.cpp).

#include <cstdint>
#include <vector>

#include "mla/mla.hpp"

float odr_decode_b(std::uint8_t code) { return mla::float8_e4m3fn::from_bits(code); }

std::uint8_t odr_encode_b(float x) { return mla::float8_e4m3fn(x).bits(); }

std::vector<float> odr_bulk_b(const std::vector<float>& x) {
  std::vector<mla::float8_e5m2> q(x.size());
  mla::to_fp8(x.data(), x.size(), q.data());
  std::vector<float> back(x.size());
  mla::from_fp8(q.data(), q.size(), back.data());
  return back;
}
