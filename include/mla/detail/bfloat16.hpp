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

/// dst[i] = float(src[i]) for n bfloat16 values given as their bits, read from possibly
/// unaligned memory: the bits moved to the high half of a float (exact). Vectorised by the
/// compiler.
inline void bfloat16_to_float(const unsigned char* src, std::size_t n, float* dst) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    std::uint16_t b;
    std::memcpy(&b, src + 2 * i, sizeof(b));
    const std::uint32_t w = static_cast<std::uint32_t>(b) << 16;
    std::memcpy(dst + i, &w, sizeof(w));
  }
}

}  // namespace mla::detail
