#pragma once
/// \file
/// The scratch buffers of decode_absorbed (mla/decode.hpp's DecodeWorkspace holds them), apart
/// from the kernels so that every target's kernels can use them. Internal.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mla/config.hpp"
#include "mla/decode_options.hpp"
#include "mla/detail/record_layout.hpp"
#include "mla/matrix.hpp"

namespace mla {

namespace detail::decode {

/// Rows the score kernels prefetch ahead of the one they score: one stream at a time outruns
/// the hardware prefetcher on a cache in DRAM (measured: 2 to 16 ahead alike, 1.6x over none).
inline constexpr Index kAhead = 3;

/// How the heads and keys of one call are laid out and divided, for a SIMD width.
struct Geometry {
  Index h_pad = 0;    // heads rounded up to the SIMD width (padding heads have zero queries)
  Index h_group = 0;  // heads per group, a multiple of the width
  Index groups = 0;   // head groups
  Index splits = 0;   // key-range parts

  Geometry(Index heads, const DecodeOptions& o, int threads, int width) {
    h_pad = (heads + width - 1) / width * width;
    const Index want = std::max<Index>(1, std::min(o.head_groups, h_pad / width));
    h_group = ((h_pad + want - 1) / want + width - 1) / width * width;
    groups = (h_pad + h_group - 1) / h_group;
    splits = o.splits > 0 ? o.splits : threads;
  }
};

/// Query rows of a call: each token's H heads padded to the SIMD width, token after token.
inline Index query_rows(Index heads, Index tokens, int width) {
  return tokens * ((heads + width - 1) / width * width);
}

/// Score segments of a record in the BF16 kernel: one per FP8 scale tile plus k^R for FP8
/// records (each has its own multiplier), one for the whole record otherwise.
inline Index bf16_segments(const MlaConfig& c) {
  return LatentLayout::fp8_tiles(c.kv_lora_rank) + 1;
}

/// Key width of the AMX kernels' BF16 key rows: the latent and k^R each padded to 32 values
/// (one tile row of 64 bytes per k block).
inline Index tile_key_width(const MlaConfig& c) {
  return (c.kv_lora_rank + 31) / 32 * 32 + (c.qk_rope_head_dim + 31) / 32 * 32;
}

/// BF16 parts the AMX kernels split each query and softmax weight into: three for kFp32 (their
/// sum holds 24 significant bits, a float's), one for kBf16.
inline Index tile_parts(Precision p) { return p == Precision::kBf16 ? 1 : 3; }

/// The buffers of one decode_absorbed call.
struct Buffers {
  struct PerThread {
    AlignedVector<float> scores;      // [tile][h_group]: scores, then softmax weights
    AlignedVector<float> correction;  // [h_group]
    AlignedVector<float> tile;        // [tile][d_c + R], widened keys (BF16 / FP8 / FP64 caches)
    std::vector<const float*> rows;
    // Precision::kBf16 only:
    AlignedVector<std::uint16_t> keys16;  // [tile][K even], keys as BF16
    std::vector<const std::uint16_t*> rows16;
    AlignedVector<std::uint32_t> c_pairs;  // [tile / 2][d_c], latent pairs of consecutive keys
    AlignedVector<std::uint32_t> p_pairs;  // [segments][tile / 2][h_group], weight pairs
    AlignedVector<float> mult;             // [tile][segments], per key and segment
    // The AMX tile kernels only (detail/isa/decode_amx.inl):
    AlignedVector<std::uint16_t> tile_keys;       // [tile + 1][K padded], key rows copied as BF16
    std::vector<const unsigned char*> tile_rows;  // [tile / 16]: each 16 keys' first row
    AlignedVector<std::uint32_t> tile_v;          // [tile / 2 + 16][d_c]: latent pairs of keys (B)
    AlignedVector<std::uint16_t> tile_p;  // [segments][parts][tile / 32][h_group][32]: weights (A)
    AlignedVector<float> tile_c;          // [4][16][16], accumulator tiles
  };
  // sigma * queries, padded with zero heads, in the order the score kernel reads them.
  AlignedVector<float> q;
  AlignedVector<std::uint32_t> tile_q;  // AMX: [parts][K padded / 2][h_pad] pairs, [h_pad] units
  AlignedVector<float> partial_o;       // per (split, group): [h_group][d_c], unnormalised
  AlignedVector<float> partial_m;       // per (split, group): [h_group], running max
  AlignedVector<float> partial_l;       // per (split, group): [h_group], running sum
  std::vector<PerThread> per_thread;

  /// Room for a call with these dimensions, `tokens` query tokens, on `threads` threads at SIMD
  /// width `width` (and for the AMX tile kernels when `tiles`).
  void reserve(const MlaConfig& c, const DecodeOptions& o, int threads, int width, Index tokens = 1,
               bool tiles = false) {
    const Index D = c.kv_lora_rank, K = c.latent_cache_width();
    const Geometry g(query_rows(c.num_attention_heads, tokens, width), o, threads, width);
    const Index h_group = g.h_group, parts = g.splits * g.groups;
    grow(q, ((K + width - 1) / width * width + 1) * g.h_pad);
    grow(partial_o, parts * D * h_group);
    grow(partial_m, parts * h_group);
    grow(partial_l, parts * h_group);
    if (static_cast<Index>(per_thread.size()) < threads) {
      per_thread.resize(static_cast<std::size_t>(threads));
    }
    for (PerThread& t : per_thread) {
      grow(t.scores, o.tile_tokens * h_group);
      grow(t.correction, h_group);
      grow(t.tile, o.tile_tokens * K);
      grow(t.rows, o.tile_tokens + kAhead);
      if (o.precision == Precision::kBf16) {
        const Index pairs = (o.tile_tokens + 1) / 2, segments = bf16_segments(c);
        grow(t.keys16, o.tile_tokens * (K + 1));
        grow(t.rows16, o.tile_tokens);
        grow(t.c_pairs, pairs * D);
        grow(t.p_pairs, segments * pairs * h_group);
        grow(t.mult, o.tile_tokens * segments);
      }
      if (tiles) {
        const Index segments = bf16_segments(c), k_pad = tile_key_width(c);
        const Index parts = tile_parts(o.precision), blocks32 = (o.tile_tokens + 31) / 32;
        grow(t.tile_keys, (blocks32 * 32 + 1) * k_pad);
        grow(t.tile_rows, blocks32 * 2);
        grow(t.tile_v, (blocks32 + 1) * 16 * D);
        grow(t.tile_p, segments * parts * blocks32 * h_group * 32);
        grow(t.tile_c, 4 * 256);
        grow(t.mult, blocks32 * 32 * segments);
      }
    }
    if (tiles) grow(tile_q, (tile_parts(o.precision) * (tile_key_width(c) / 2) + 1) * g.h_pad);
  }
};

}  // namespace detail::decode

}  // namespace mla
