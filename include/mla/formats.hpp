#pragma once
/// \file
/// The storage formats the library names in its API: how a latent-cache record stores its
/// values (`CacheStorage`) and how an FP8 scale is stored (`ScaleFormat`). Vocabulary only;
/// the byte layouts are in the record codec.

#include <cstdint>

namespace mla {

/// How a scale is stored.
enum class ScaleFormat : std::uint8_t {
  kFloat32,     ///< any FP32 value: max(amax, floor) / 448
  kPowerOfTwo,  ///< rounded up to a power of two (DeepSeek-V3.1's "ue8m0" scales)
};

/// Element format of the cached latent and rotary key. Bytes per token and layer at DeepSeek
/// sizes (d_c 512, R 64) in brackets.
enum class CacheStorage : std::uint8_t {
  kFloat32,   ///< (d_c + R) * 4 bytes   [2304]
  kBFloat16,  ///< (d_c + R) * 2 bytes   [1152]
  /// FlashMLA's "fp8 with scale" record: d_c e4m3 latent bytes at offset 0, then one FP32 scale
  /// per 128 latent values (tile amax / 448) at offset d_c, then k^R in BF16 (never quantised:
  /// RoPE phases do not survive 3 mantissa bits) at offset d_c + 4 * ceil(d_c / 128).  [656]
  kFp8E4M3,
  kFloat64,  ///< (d_c + R) * 8 bytes, for verification against double references  [4608]
};

/// Printable name of a storage choice.
inline const char* to_string(CacheStorage s) {
  switch (s) {
    case CacheStorage::kFloat32:
      return "fp32";
    case CacheStorage::kBFloat16:
      return "bf16";
    case CacheStorage::kFp8E4M3:
      return "fp8";
    case CacheStorage::kFloat64:
      return "fp64";
  }
  return "unknown";
}

}  // namespace mla
