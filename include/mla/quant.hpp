#pragma once
/// \file
/// Scaled FP8 quantisation: values are stored as e4m3 codes q with one FP32 dequantisation
/// multiplier per tile of consecutive values, x ~ float(q) * scale. The FP8 latent cache uses
/// 128-value tiles per token (FlashMLA's layout); DeepSeek-V3 quantises activations the same
/// way (1 x 128 tiles).

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "mla/fp8.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// How a scale is stored.
enum class ScaleFormat : std::uint8_t {
  kFloat32,     ///< any FP32 value: max(amax, floor) / 448
  kPowerOfTwo,  ///< rounded up to a power of two (DeepSeek-V3.1's "ue8m0" scales)
};

/// Largest finite e4m3 value, the target of a tile's absolute maximum.
inline constexpr float kE4M3Max = 448.0f;

/// Rounds a positive finite scale up to the next power of two (2^ceil(log2 s)); exact powers of
/// two are kept. Rounding up keeps |x| / scale <= 448, so nothing saturates.
inline float round_scale_up_to_power_of_two(float s) {
  int e = 0;
  const float m = std::frexp(s, &e);  // s = m * 2^e, m in [0.5, 1)
  return m == 0.5f ? s : std::ldexp(1.0f, e);
}

/// The dequantisation multiplier of a tile whose absolute maximum is `amax`:
/// max(amax, amax_floor) / 448, rounded up to a power of two for kPowerOfTwo. A tile with
/// nothing to scale (amax and floor 0) gets 1, so it stores exact zeros.
inline float e4m3_scale(float amax, float amax_floor, ScaleFormat format) {
  float s = std::max(amax, amax_floor) / kE4M3Max;
  if (!(s > 0.0f)) return 1.0f;  // 0 (all-zero tile, no floor); NaN cannot arise from max
  if (format == ScaleFormat::kPowerOfTwo && std::isfinite(s)) s = round_scale_up_to_power_of_two(s);
  return s;
}

/// Quantises x[0, n) in tiles of `tile` consecutive values (the last tile may be shorter):
/// scales[k] = e4m3_scale(max |x| over tile k, amax_floor, format) and
/// q[i] = e4m3(x[i] / scales[i / tile]), saturating. NaN inputs stay NaN and do not enter amax.
inline void quantize_e4m3_tiles(const float* x, Index n, Index tile, float amax_floor,
                                ScaleFormat format, float8_e4m3fn* q, float* scales) {
  for (Index k = 0, first = 0; first < n; ++k, first += tile) {
    const Index len = std::min(tile, n - first);
    float amax = 0.0f;
    for (Index i = 0; i < len; ++i) amax = std::max(amax, std::fabs(x[first + i]));
    scales[k] = e4m3_scale(amax, amax_floor, format);
    to_fp8(x + first, static_cast<std::size_t>(len), q + first, scales[k]);
  }
}

/// x[i] = float(q[i]) * scales[i / tile] for i < n.
inline void dequantize_e4m3_tiles(const float8_e4m3fn* q, const float* scales, Index n, Index tile,
                                  float* x) {
  for (Index k = 0, first = 0; first < n; ++k, first += tile) {
    from_fp8(q + first, static_cast<std::size_t>(std::min(tile, n - first)), x + first, scales[k]);
  }
}

}  // namespace mla
