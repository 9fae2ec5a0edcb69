#pragma once
/// \file
/// The byte layout of one token's latent-cache record, for every storage format (mla/formats.hpp
/// names them), and its one description as segments (for_each_segment): the cache's writes and
/// reads (mla/latent_cache.hpp), the kernels' widening and BF16 packing (detail/isa/) and the
/// sparse path all walk a record through it. Internal.

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
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

/// How the values of one segment of a record are stored.
enum class Element : std::uint8_t { kFloat32, kFloat64, kBFloat16, kE4M3 };

/// One segment of a record: the values [first, first + count) of the token's [c ; k^R] (first
/// >= d_c: k^R), stored from byte `offset` as `element`. The values of an E4M3 segment are its
/// codes times the FP32 scale at byte `scale_offset`; the others hold their values. `index`
/// numbers the segments from 0 (each has its own scale, so kernels that keep per-segment
/// multipliers index them by it).
struct RecordSegment {
  Index first = 0, count = 0;
  std::size_t offset = 0;
  Element element = Element::kFloat32;
  std::size_t scale_offset = 0;
  Index index = 0;

  /// The segment's scale in the record `rec` (1 for segments that hold their values).
  float scale(const unsigned char* rec) const {
    if (element != Element::kE4M3) return 1.0f;
    float s;
    std::memcpy(&s, rec + scale_offset, sizeof(s));
    return s;
  }
};

/// The segments of a layout's records, listed once (the kernels loop over them record after
/// record, in plain loops that keep their accumulators in registers).
struct RecordSegments {
  /// Most segments of a record: FP8 latents of up to 8192 values (LatentRecordFormat's limit)
  /// have 64 scale tiles, plus k^R.
  static constexpr Index kMax = 65;
  RecordSegment at[kMax];
  Index count = 0;
  const RecordSegment* begin() const { return at; }
  const RecordSegment* end() const { return at + count; }
};

/// Calls f(segment) for each segment of a record of layout l, in order of their values: the
/// one description of the record formats.
///  - kFloat32 / kFloat64 / kBFloat16: c [d_c] at 0, then k^R [R], in that element;
///  - kFp8E4M3 (FlashMLA's record): c as E4M3 codes in tiles of 128 values, tile t's FP32 scale
///    at scales_offset + 4 t, then k^R in BF16 at kpe_offset (RoPE phases do not survive 3
///    mantissa bits).
template <class F>
void for_each_segment(const LatentLayout& l, F&& f) {
  const Index D = l.kv_lora_rank, R = l.rope_dim;
  RecordSegment s;
  if (l.storage == CacheStorage::kFp8E4M3) {
    for (Index first = 0; first < D; first += LatentLayout::kFp8Tile, ++s.index) {
      s.first = first;
      s.count = std::min(LatentLayout::kFp8Tile, D - first);
      s.offset = static_cast<std::size_t>(first);
      s.element = Element::kE4M3;
      s.scale_offset = l.scales_offset + sizeof(float) * static_cast<std::size_t>(s.index);
      f(static_cast<const RecordSegment&>(s));
    }
    s.element = Element::kBFloat16;
  } else {
    s.element = l.storage == CacheStorage::kFloat64    ? Element::kFloat64
                : l.storage == CacheStorage::kBFloat16 ? Element::kBFloat16
                                                       : Element::kFloat32;
    s.count = D;
    f(static_cast<const RecordSegment&>(s));
    ++s.index;
  }
  if (R > 0) {
    s.first = D;
    s.count = R;
    s.offset = l.kpe_offset;
    s.scale_offset = 0;
    f(static_cast<const RecordSegment&>(s));
  }
}

/// The segments of layout l's records (for_each_segment's, in a list).
inline RecordSegments segments_of(const LatentLayout& l) {
  RecordSegments list;
  for_each_segment(l, [&](const RecordSegment& s) { list.at[list.count++] = s; });
  return list;
}

}  // namespace detail
}  // namespace mla
