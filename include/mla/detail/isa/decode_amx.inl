// The absorbed decode step on AMX tiles (TDPBF16PS: BF16 products, FP32 sums), written once
// over a tile backend (HardwareTiles, or the software model EmulatedTiles): the block policy of
// the decode frame (decode_frame.inl) for the amx and amx_model targets. Included inside the
// AMX namespace, after amx.hpp's backends and the frame. No include guard on purpose.
//
// Per tile of keys:
//   scores  S [keys][rows] = K [keys][k] Q^T: A = the keys as BF16 rows (exact for BF16
//           records and FP8 codes; FP8 scales multiply each 128-wide segment's FP32 partial
//           sums), B = the queries in BF16 pairs;
//   outputs O^T [d_c][rows] += C^T [d_c][keys] P^T: A = the latent transposed (one 32-key block
//           of BF16 per tile row), B = the softmax weights in BF16 pairs of consecutive keys
//           (times each output segment's FP8 scale); O^T is turned back once per part.
// Precision: kBf16 rounds the queries (times the softmax scale) and the weights once to BF16;
// kFp32 splits each into three BF16 parts whose sum is the FP32 value (24 significant bits),
// one tile product per part, so that only the FP32 sums round. FP32 and FP64 caches keep the
// AVX-512 FMA kernel for kFp32 (their keys are not BF16 values); latent widths that are not a
// multiple of 16 keep the AVX-512 kernels.
//
// Keys a query row must not see (the newest keys, for all but the last of several query
// tokens) are never multiplied into its output: their weights are zero and their latent
// columns are zero in a masked copy of the block that holds them, so a non-finite record
// cannot reach the rows before it.

namespace decode_amx {

/// Tile roles: C accumulators 0..3 (C(i, j) = 2 i + j), A operands 4, 5, B operands 6, 7.
/// An operand's 16-row tile at (i, k, part): base + i * step_i + k * step_k + part * step_p.
struct Operand {
  const unsigned char* base = nullptr;
  Index stride = 0, step_i = 0, step_k = 0, step_p = 0;
  const unsigned char* at(Index i, Index k, Index p = 0) const {
    return base + i * step_i + k * step_k + p * step_p;
  }
};

/// C(i, j) (+)= sum over k in [k0, k1) and parts p of A(i, k) B(j, k, p) for i < MI, j < NJ.
/// C(i, j) is the FP32 tile at c + i * c_i + j * c_j bytes, rows c_stride bytes apart; loaded
/// first when `load_c`, zero otherwise; stored at the end.
template <int MI, int NJ, class Tiles>
MLA_KERNEL_INLINE void product(Tiles& t, const Operand& A, const Operand& B, Index k0, Index k1,
                               Index parts, unsigned char* c, Index c_stride, Index c_i, Index c_j,
                               bool load_c) {
  if (load_c) {
    t.template load<0>(c, c_stride);
    if constexpr (NJ > 1) t.template load<1>(c + c_j, c_stride);
    if constexpr (MI > 1) t.template load<2>(c + c_i, c_stride);
    if constexpr (MI > 1 && NJ > 1) t.template load<3>(c + c_i + c_j, c_stride);
  } else {
    t.template zero<0>();
    if constexpr (NJ > 1) t.template zero<1>();
    if constexpr (MI > 1) t.template zero<2>();
    if constexpr (MI > 1 && NJ > 1) t.template zero<3>();
  }
  for (Index k = k0; k < k1; ++k) {
    t.template load<4>(A.at(0, k), A.stride);
    if constexpr (MI > 1) t.template load<5>(A.at(1, k), A.stride);
    for (Index p = 0; p < parts; ++p) {
      t.template load<6>(B.at(0, k, p), B.stride);
      t.template dp<0, 4, 6>();
      if constexpr (MI > 1) t.template dp<2, 5, 6>();
      if constexpr (NJ > 1) {
        t.template load<7>(B.at(1, k, p), B.stride);
        t.template dp<1, 4, 7>();
        if constexpr (MI > 1) t.template dp<3, 5, 7>();
      }
    }
  }
  t.template store<0>(c, c_stride);
  if constexpr (NJ > 1) t.template store<1>(c + c_j, c_stride);
  if constexpr (MI > 1) t.template store<2>(c + c_i, c_stride);
  if constexpr (MI > 1 && NJ > 1) t.template store<3>(c + c_i + c_j, c_stride);
}

/// C(i, j) for every i < mi and j < nj tile, two by two: calls f(MI, NJ, i, j) with the
/// compile-time block shape.
template <class F>
MLA_KERNEL_INLINE void for_blocks(Index mi, Index nj, F&& f) {
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  for (Index i = 0; i < mi; i += 2) {
    for (Index j = 0; j < nj; j += 2) {
      if (i + 1 < mi && j + 1 < nj) {
        f(Two{}, Two{}, i, j);
      } else if (i + 1 < mi) {
        f(Two{}, One{}, i, j);
      } else if (j + 1 < nj) {
        f(One{}, Two{}, i, j);
      } else {
        f(One{}, One{}, i, j);
      }
    }
  }
}

/// The rounded BF16 value of each lane, as float bits (low half zero).
inline __m512i rounded(V x) {
  return _mm512_and_si512(Ops::round_bf16(x), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

/// Pairs (lo, hi) of the next BF16 part of x0 and x1, which keep the remainders.
inline __m512i next_part(V& x0, V& x1) {
  const __m512i r0 = rounded(x0), r1 = rounded(x1);
  x0 = Ops::sub(x0, _mm512_castsi512_ps(r0));
  x1 = Ops::sub(x1, _mm512_castsi512_ps(r1));
  return _mm512_or_si512(_mm512_srli_epi32(r0, 16), r1);
}

/// The transpose of 16 vectors of 16 32-bit lanes: r[i] lane j becomes r[j] lane i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane q of r[4a + b] now holds rows 4a .. 4a+3 of column 4q + b' (b' from b).
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

/// How a call lays its operands out.
/// The power of two just above x > 0 (x / it is in [0.5, 1)); 1 for 0, infinities and NaN. What
/// queries and FP8-scaled weights are divided by before they are split into BF16 parts.
inline float power_of_two_above(float x) {
  if (!(x > 0.0f) || !std::isfinite(x)) return 1.0f;
  int e = 0;
  std::frexp(x, &e);
  return std::ldexp(1.0f, e);
}

/// Most FP8 scale tiles of a latent the tile kernels take (d_c up to 4096).
inline constexpr Index kMaxTiles8 = 32;

struct Layout {
  Index D = 0, R = 0;
  Index d_pad = 0, k_pad = 0;  // latent, and latent + k^R, each padded to 32
  Index parts = 1;             // BF16 parts of the queries and weights
  Index tiles8 = 0;            // FP8 scale tiles of the latent (0: no FP8)
  bool fp8 = false;
};

/// The tile policy (see the file comment).
template <class Tiles>
struct TilePolicy {
  static constexpr bool kAccumulatesInOutput = false;
  RecordSegments record;    // the cache's record segments
  const std::uint32_t* qp;  // [parts][k_pad / 2][h_pad] query pairs
  const float* units;       // [h_pad] the rows' units
  Layout L;

  TilePolicy(const DecodeArgs& a, const decode_frame::Rows& q, const decode::Geometry& geo,
             Index parts)
      : record(segments_of(a.cache.layout)) {
    const LatentBlocks& cache = a.cache;
    L.D = cache.layout.kv_lora_rank;
    L.R = cache.layout.rope_dim;
    L.d_pad = (L.D + 31) / 32 * 32;
    L.k_pad = L.d_pad + (L.R + 31) / 32 * 32;
    L.parts = parts;
    L.fp8 = cache.layout.storage == CacheStorage::kFp8E4M3;
    L.tiles8 = L.fp8 ? LatentLayout::fp8_tiles(L.D) : 0;
    // sigma * queries as `parts` BF16 parts in pairs [k_pad / 2][h_pad] each, in the key rows'
    // layout; padding rows and columns zero.
    const Index rows = geo.h_pad, kp_n = L.k_pad / 2;
    std::uint32_t* pairs = a.buffers->tile_q.data();
    // Each row divided by a power of two near its largest value (its unit, multiplied back into
    // the FP32 scores), so that the BF16 parts stay clear of the subnormals the tiles treat as
    // zero, whatever the queries' magnitude.
    float* u = reinterpret_cast<float*>(pairs + parts * kp_n * rows);
    const auto source = [&](Index k) {  // position in q of position k of a key row, or -1
      return k < L.d_pad ? (k < L.D ? k : -1) : (k - L.d_pad < L.R ? L.D + k - L.d_pad : -1);
    };
    for (Index r = 0; r < rows; ++r) {
      const Index t = q.token(r), h = r - t * q.h_pad1;
      float mx = 0.0f;
      if (h < q.heads) {
        const float* qr = a.q + (t * q.heads + h) * a.q_stride;
        for (Index k = 0; k < L.D + L.R; ++k) mx = std::max(mx, std::fabs(a.scale * qr[k]));
      }
      u[r] = power_of_two_above(mx);
    }
    for (Index kp = 0; kp < kp_n; ++kp) {
      for (Index r = 0; r < rows; ++r) {
        const Index t = q.token(r), h = r - t * q.h_pad1;
        const float inv = 1.0f / u[r];
        float x[2] = {0.0f, 0.0f};
        for (int i = 0; i < 2; ++i) {
          const Index src = source(2 * kp + i);
          if (h < q.heads && src >= 0) {
            x[i] = a.scale * a.q[(t * q.heads + h) * a.q_stride + src] * inv;
          }
        }
        for (Index p = 0; p < parts; ++p) {
          std::uint16_t b[2];
          for (int i = 0; i < 2; ++i) {
            b[i] = bf16_bits(x[i]);
            x[i] -= bf16_value(b[i]);
          }
          pairs[(p * kp_n + kp) * rows + r] = bf16_pair(b[0], b[1]);
        }
      }
    }
    qp = pairs;
    units = u;
  }

  struct Worker {
    const TilePolicy& p;
    const decode_frame::Group& g;
    const Layout& L;
    Tiles tiles;
    float* ot;
    Operand qB, kA;
    Index n = 0;  // keys of the current block

    // The key rows of one tile as BF16 [n][k_pad] (latent, zeros, k^R, zeros), multipliers per
    // key and segment, and the latent transposed into 32-key blocks [block][d_c][32].
    void load_keys(const LatentBlocks& cache, Index j0, decode::Buffers::PerThread& t,
                   Index segments) const {
      decode_bf16::KeyLayout kl(cache.layout);
      kl.d_even = L.d_pad;
      kl.k_even = L.d_pad + L.R;
      const Index n16 = (n + 15) / 16 * 16;
      for (Index j = 0; j < n16; ++j) {
        std::uint16_t* row = t.tile_keys.data() + j * L.k_pad;
        if (j >= n) {
          std::fill(row, row + L.k_pad, std::uint16_t{0});
          continue;
        }
        const unsigned char* rec = cache.record(j0 + j);
        decode_bf16::key_to_bf16(p.record, kl, rec, row, t.tile.data());
        std::fill(row + L.D, row + L.d_pad, std::uint16_t{0});
        std::fill(row + L.d_pad + L.R, row + L.k_pad, std::uint16_t{0});
        if (L.fp8) decode_bf16::segment_multipliers(p.record, rec, t.mult.data() + j * segments);
      }
      // Latent transposed: block b, row d holds keys 32 b .. 32 b + 31 at d (zero past n).
      const Index blocks = (n + 31) / 32;
      for (Index b = 0; b < blocks; ++b) {
        for (Index d = 0; d < L.D; d += 16) {
          __m512i r[16];
          for (int i = 0; i < 16; ++i) {
            const Index j = 32 * b + 2 * i;
            const __m512i lo =
                j < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(t.tile_keys.data() + j * L.k_pad + d)))
                      : _mm512_setzero_si512();
            const __m512i hi =
                j + 1 < n
                    ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                          t.tile_keys.data() + (j + 1) * L.k_pad + d)))
                    : _mm512_setzero_si512();
            r[i] = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));  // lane = d, pair i
          }
          transpose16(r);  // r[d'] lane i = pair i of dimension d + d'
          std::uint16_t* dst = t.tile_ct.data() + (b * L.D + d) * 32;
          for (int i = 0; i < 16; ++i) {
            _mm512_storeu_si512(reinterpret_cast<void*>(dst + i * 32), r[i]);
          }
        }
      }
    }

    Worker(const TilePolicy& policy, const decode_frame::Group& group)
        : p(policy), g(group), L(policy.L), ot(group.t->tile_ot.data()) {
      std::fill(ot, ot + L.D * g.stride, 0.0f);
      tiles.configure(full_tiles());
      // Queries: B(j, k, p) = 16 pair rows of k block k, 16 rows from head block j, part p.
      qB.base = reinterpret_cast<const unsigned char*>(p.qp + g.h0);
      qB.stride = g.h_pad * 4;
      qB.step_i = 16 * 4;
      qB.step_k = 16 * g.h_pad * 4;
      qB.step_p = (L.k_pad / 2) * g.h_pad * 4;
      // Keys: A(i, k) = key block i (16 rows), k block k.
      kA.base = reinterpret_cast<const unsigned char*>(g.t->tile_keys.data());
      kA.stride = L.k_pad * 2;
      kA.step_i = 16 * L.k_pad * 2;
      kA.step_k = 64;
    }

    MLA_KERNEL_NOINLINE void score(Index j0, Index keys) {
      n = keys;
      decode::Buffers::PerThread& t = *g.t;
      const Index h_group = g.stride, segments = L.tiles8 + 1;
      const Index nb = (n + 15) / 16, hb = g.hw / 16;  // key and row blocks
      const Index kblocks_latent = L.d_pad / 32, kblocks = L.k_pad / 32;
      const float* units = p.units;
      const Index h0 = g.h0;
      float* sc = g.scores;
      float* ctmp = t.tile_c.data();
      load_keys(g.a->cache, j0, t, segments);
      // Scores per segment (FP8: each scale tile of the latent, then k^R; otherwise the whole
      // row), each segment's FP32 sums times the rows' units and the keys' multipliers, added.
      const Index score_segments = L.fp8 ? segments : 1;
      for (Index seg = 0; seg < score_segments; ++seg) {
        const Index k0 = !L.fp8 ? 0 : seg < L.tiles8 ? 4 * seg : kblocks_latent;
        const Index k1 = !L.fp8           ? kblocks
                         : seg < L.tiles8 ? std::min(kblocks_latent, 4 * seg + 4)
                                          : kblocks;
        if (k0 >= k1) continue;
        for_blocks(nb, hb, [&](auto mi, auto nj, Index i, Index j) {
          constexpr int MI = decltype(mi)::value, NJ = decltype(nj)::value;
          Operand A = kA;
          A.base += i * kA.step_i;
          Operand B = qB;
          B.base += j * qB.step_i;
          product<MI, NJ>(tiles, A, B, k0, k1, L.parts, reinterpret_cast<unsigned char*>(ctmp),
                          16 * 4, 2 * 256 * 4, 256 * 4, false);
          // sc[key][h] (+)= tile * unit[h] * mult[key][seg].
          for (int ii = 0; ii < MI; ++ii) {
            for (int jj = 0; jj < NJ; ++jj) {
              const float* c = ctmp + (2 * ii + jj) * 256;
              const V u = Ops::load(units + h0 + (j + jj) * 16);
              for (int r = 0; r < 16; ++r) {
                const Index key = (i + ii) * 16 + r;
                V x = Ops::mul(Ops::load(c + r * 16), u);
                if (L.fp8) {
                  x = Ops::mul(
                      x,
                      Ops::set1(
                          t.mult[static_cast<std::size_t>(std::min(key, n - 1) * segments + seg)]));
                }
                float* dst = sc + key * h_group + (j + jj) * 16;
                Ops::store(dst, seg == 0 ? x : Ops::add(Ops::load(dst), x));
              }
            }
          }
        });
      }
      // Per query token: online softmax over the keys it sees, the weights as BF16 pairs, the
      // outputs O^T over the same keys.
    }

    /// Rows [r0, r1): the weights as BF16 pairs, the outputs O^T over the keys they see.
    MLA_KERNEL_NOINLINE void accumulate(Index r0, Index r1, Index seen, Index) {
      decode::Buffers::PerThread& t = *g.t;
      const Index D = L.D, h_group = g.stride, segments = L.tiles8 + 1;
      const Index out_segments = L.fp8 ? L.tiles8 : 1;
      const Index tile = g.a->options.tile_tokens;
      const Index pair_rows = tile / 2 + 16;  // weight pairs per part, room for 32-key rounding
      const float* sc = g.scores;
      const float* corr = g.corr;
      float* ctmp = t.tile_c.data();
      std::uint32_t* pp = t.tile_p.data();
      std::uint16_t* ct_mask = t.tile_ct.data() + ((tile + 31) / 32) * D * 32;
      for (Index d = 0; d < D; ++d) {
        float* row = ot + d * h_group;
        for (Index r = r0; r < r1; r += kW) {
          Ops::store(row + r, Ops::mul(Ops::load(row + r), Ops::load(corr + r)));
        }
      }
      const Index kb_seen = (seen + 31) / 32;  // 32-key blocks the weights cover
      const Index pairs = kb_seen * 16;
      // FP8: each output segment's scales divided by a power of two near their largest
      // (unit[os], multiplied back into the FP32 sums), so that the BF16 parts of the
      // weights stay clear of the subnormals the tiles treat as zero, whatever the scales.
      float unit[kMaxTiles8];
      for (Index os = 0; os < out_segments; ++os) {
        float mx = 0.0f;
        if (L.fp8) {
          for (Index j = 0; j < seen; ++j) {
            mx = std::max(mx, t.mult[static_cast<std::size_t>(j * segments + os)]);
          }
        }
        unit[os] = L.fp8 ? power_of_two_above(mx) : 1.0f;
      }
      for (Index os = 0; os < out_segments; ++os) {
        const float inv = 1.0f / unit[os];
        for (Index jp = 0; jp < pairs; ++jp) {
          const Index j = 2 * jp;
          const float mu0 =
              L.fp8 && j < n ? t.mult[static_cast<std::size_t>(j * segments + os)] * inv : 1.0f;
          const float mu1 = L.fp8 && j + 1 < n
                                ? t.mult[static_cast<std::size_t>((j + 1) * segments + os)] * inv
                                : 1.0f;
          for (Index r = r0; r < r1; r += kW) {
            V x0 =
                j < seen ? Ops::mul(Ops::load(sc + j * h_group + r), Ops::set1(mu0)) : Ops::zero();
            V x1 = j + 1 < seen ? Ops::mul(Ops::load(sc + (j + 1) * h_group + r), Ops::set1(mu1))
                                : Ops::zero();
            for (Index p = 0; p < L.parts; ++p) {
              _mm512_storeu_si512(
                  reinterpret_cast<void*>(pp + ((os * L.parts + p) * pair_rows + jp) * h_group + r),
                  next_part(x0, x1));
            }
          }
        }
      }
      // The block holding the first key this token must not see, with that key and the
      // ones after it zero (their weights are zero; their values may not be finite).
      const Index full = seen / 32;
      const bool masked = seen % 32 != 0 && seen < n;
      if (masked) {
        const std::uint16_t* src = t.tile_ct.data() + full * D * 32;
        for (Index d = 0; d < D; ++d) {
          for (Index jj = 0; jj < 32; ++jj) {
            ct_mask[d * 32 + jj] = full * 32 + jj < seen ? src[d * 32 + jj] : std::uint16_t{0};
          }
        }
      }
      const Index kb_plain = masked ? full : kb_seen;
      const Index db = D / 16, rb0 = r0 / 16, rbn = (r1 - r0) / 16;
      for (Index os = 0; os < out_segments; ++os) {
        const Index d0 = L.fp8 ? os * 8 : 0, d1 = L.fp8 ? std::min(db, os * 8 + 8) : db;
        Operand B;  // weights: B(j, k, p) = pair rows 16 k.., rows from block rb0 + j
        B.base = reinterpret_cast<const unsigned char*>(pp + (os * L.parts * pair_rows) * h_group +
                                                        rb0 * 16);
        B.stride = h_group * 4;
        B.step_i = 16 * 4;
        B.step_k = 16 * h_group * 4;
        B.step_p = pair_rows * h_group * 4;
        for_blocks(d1 - d0, rbn, [&](auto mi, auto nj, Index i, Index j) {
          constexpr int MI = decltype(mi)::value, NJ = decltype(nj)::value;
          Operand A;  // latent: A(i, k) = dimensions 16 (d0 + i).., key block k
          A.base = reinterpret_cast<const unsigned char*>(t.tile_ct.data() + (d0 + i) * 16 * 32);
          A.stride = 64;
          A.step_i = 16 * 64;
          A.step_k = D * 64;
          Operand Bj = B;
          Bj.base += j * B.step_i;
          float* c = ot + (d0 + i) * 16 * h_group + (rb0 + j) * 16;
          // Non-FP8: the products add to O^T in the tiles. FP8: into fresh tiles, then
          // O^T += unit * tiles.
          const auto add = [&](const Operand& Ak, Index k0, Index k1) {
            if (!L.fp8) {
              product<MI, NJ>(tiles, Ak, Bj, k0, k1, L.parts, reinterpret_cast<unsigned char*>(c),
                              h_group * 4, 16 * h_group * 4, 16 * 4, true);
              return;
            }
            product<MI, NJ>(tiles, Ak, Bj, k0, k1, L.parts, reinterpret_cast<unsigned char*>(ctmp),
                            16 * 4, 2 * 256 * 4, 256 * 4, false);
            const V u = Ops::set1(unit[os]);
            for (int ii = 0; ii < MI; ++ii) {
              for (int jj = 0; jj < NJ; ++jj) {
                const float* src = ctmp + (2 * ii + jj) * 256;
                for (int r = 0; r < 16; ++r) {
                  float* dst = c + (ii * 16 + r) * h_group + jj * 16;
                  Ops::store(dst, Ops::fmadd(u, Ops::load(src + r * 16), Ops::load(dst)));
                }
              }
            }
          };
          if (kb_plain > 0) add(A, 0, kb_plain);
          if (masked) {
            Operand Am = A;
            Am.base = reinterpret_cast<const unsigned char*>(ct_mask + (d0 + i) * 16 * 32) -
                      full * A.step_k;
            add(Am, full, full + 1);
          }
        });
      }
    }

    /// O^T [d_c][h_group] back to the frame's [h_group][d_c].
    void finish() {
      tiles.release();
      for (Index d = 0; d < L.D; ++d) {
        for (Index r = 0; r < g.hw; ++r) g.o[r * L.D + d] = ot[d * g.stride + r];
      }
    }
  };
};

/// Latent widths the tile kernels take: whole 16-wide output tiles, up to kMaxTiles8 FP8 tiles.
inline bool tiles_take(const LatentLayout& l) {
  return l.kv_lora_rank % 16 == 0 && l.kv_lora_rank <= 128 * kMaxTiles8;
}

/// Precision::kFp32: tiles for BF16 and FP8 caches (three parts), the AVX-512 FMA kernel for
/// the others.
template <class Tiles>
void decode_absorbed(const DecodeArgs& a) {
  const CacheStorage st = a.cache.layout.storage;
  if (!tiles_take(a.cache.layout) ||
      (st != CacheStorage::kBFloat16 && st != CacheStorage::kFp8E4M3)) {
    avx512::decode_absorbed(a);
    return;
  }
  decode_frame::run<TilePolicy<Tiles>>(a, decode::tile_parts(Precision::kFp32));
}

/// Precision::kBf16: tiles for every cache whose latent width is a multiple of 16.
template <class Tiles>
void decode_absorbed_bf16(const DecodeArgs& a) {
  if (!tiles_take(a.cache.layout)) {
    avx512_bf16::decode_absorbed_bf16(a);
    return;
  }
  decode_frame::run<TilePolicy<Tiles>>(a, decode::tile_parts(Precision::kBf16));
}

}  // namespace decode_amx
