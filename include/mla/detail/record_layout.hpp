#pragma once
/// \file
/// The byte layout of one token's latent-cache record, for every storage format, and the enums
/// that name the formats. Plain data: the record codec (mla/latent_cache.hpp) and the kernels
/// (detail/isa/) read and write records through it. Internal.

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mla/matrix.hpp"

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

namespace detail {

/// Where each part of one token's record lives.
struct LatentLayout {
  /// Latent values per FP8 scale (FlashMLA's tile).
  static constexpr Index kFp8Tile = 128;

  CacheStorage storage = CacheStorage::kFloat32;
  ScaleFormat fp8_scales = ScaleFormat::kFloat32;
  Index kv_lora_rank = 0;  // d_c
  Index rope_dim = 0;      // R
  std::size_t token_bytes = 0;
  std::size_t scales_offset = 0;  // FP8 only
  std::size_t kpe_offset = 0;     // byte offset of k^R in the record

  static LatentLayout make(Index d_c, Index r, CacheStorage storage, ScaleFormat fp8_scales) {
    LatentLayout l;
    l.storage = storage;
    l.fp8_scales = fp8_scales;
    l.kv_lora_rank = d_c;
    l.rope_dim = r;
    const auto dc = static_cast<std::size_t>(d_c), rr = static_cast<std::size_t>(r);
    switch (storage) {
      case CacheStorage::kFp8E4M3:
        l.scales_offset = dc;
        l.kpe_offset = dc + sizeof(float) * static_cast<std::size_t>(fp8_tiles(d_c));
        l.token_bytes = l.kpe_offset + sizeof(Eigen::bfloat16) * rr;
        break;
      default: {
        const std::size_t e = element_bytes(storage);
        l.kpe_offset = dc * e;
        l.token_bytes = (dc + rr) * e;
      }
    }
    return l;
  }

  static Index fp8_tiles(Index d_c) { return (d_c + kFp8Tile - 1) / kFp8Tile; }

  static std::size_t element_bytes(CacheStorage s) {
    switch (s) {
      case CacheStorage::kFloat64:
        return 8;
      case CacheStorage::kBFloat16:
        return 2;
      case CacheStorage::kFp8E4M3:
        return 1;
      case CacheStorage::kFloat32:
        break;
    }
    return 4;
  }

  /// True when records hold T itself, so kernels can read them in place.
  template <class T>
  bool holds() const {
    return (std::is_same_v<T, float> && storage == CacheStorage::kFloat32) ||
           (std::is_same_v<T, double> && storage == CacheStorage::kFloat64);
  }
};

}  // namespace detail
}  // namespace mla
