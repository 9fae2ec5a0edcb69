#pragma once
/// \file
/// The byte layout of one token's latent-cache record, for every storage format (mla/formats.hpp
/// names them). Plain data: the record codec (mla/latent_cache.hpp) and the kernels
/// (detail/isa/) read and write records through it. Internal.

#include <Eigen/Core>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mla/formats.hpp"
#include "mla/matrix.hpp"

namespace mla {

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
