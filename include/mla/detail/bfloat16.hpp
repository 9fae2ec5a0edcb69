#pragma once
/// \file
/// Rounding to Eigen::bfloat16 once, from float or double. Internal.

#include <Eigen/Core>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "mla/detail/bit_cast.hpp"

namespace mla::detail {

/// float -> bf16, round to nearest even (Eigen's conversion).
inline Eigen::bfloat16 to_bfloat16(float x) { return Eigen::bfloat16(x); }

/// double -> bf16 with a single rounding. Going through float rounds twice and can land on the
/// wrong side of a bf16 tie; instead round to float *to odd* (truncate and set the last bit when
/// anything was discarded), which keeps the information the final round-to-nearest-even needs:
/// float has 16 more mantissa bits than bf16.
inline Eigen::bfloat16 to_bfloat16(double x) {
  float f = static_cast<float>(x);
  if (std::isfinite(x) && static_cast<double>(f) != x) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(x)) f = std::nextafter(f, 0.0f);
    f = bit_cast<float>(bit_cast<std::uint32_t>(f) | 1u);
  }
  return Eigen::bfloat16(f);
}

/// The float value of the bfloat16 whose bits are at `p` (possibly unaligned): the bits moved
/// to the high half of a float (exact). The one BF16 widening; the bulk kernels of detail/isa/
/// do the same per vector.
inline float bfloat16_bits_to_float(const unsigned char* p) noexcept {
  std::uint16_t b;
  std::memcpy(&b, p, sizeof(b));
  return bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

/// The bits of x rounded to the nearest BF16 (even on ties; NaN stays NaN).
inline std::uint16_t bf16_bits(float x) { return bit_cast<std::uint16_t>(to_bfloat16(x)); }

/// The float value of BF16 bits (exact).
inline float bf16_value(std::uint16_t bits) {
  return bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

/// x rounded to the nearest BF16 value (even on ties; NaN stays NaN), as float.
inline float round_bf16(float x) { return bf16_value(bf16_bits(x)); }

/// Two BF16 values as one 32-bit word, `lo` in the low half: the pair layout of VDPBF16PS
/// operands and AMX B tiles (two consecutive k of one column per word).
inline std::uint32_t bf16_pair(std::uint16_t lo, std::uint16_t hi) {
  return static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
}

}  // namespace mla::detail
