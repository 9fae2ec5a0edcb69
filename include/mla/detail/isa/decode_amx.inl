// The absorbed decode step on AMX tiles (TDPBF16PS: BF16 products, FP32 sums), written once
// over a tile backend (HardwareTiles, or the software model EmulatedTiles): the block policy of
// the decode frame (decode_frame.inl) for the amx and amx_model targets. Included inside the
// AMX namespace, after amx.hpp's backends and the frame. No include guard on purpose.
//
// Per block of keys (256 by default: DecodeOptions::tile_tokens 0):
//   scores  S^T [keys][rows] = K [keys][k] Q^T: A = the key rows, read straight from BF16
//           records when 16 consecutive keys lie at one stride (no copy), else copied as BF16
//           (FP8 codes widened exactly, once per block; their scales multiply each 128-wide
//           segment's FP32 partial sums); B = the queries in BF16 pairs, built once per call.
//           The query rows' pairs are the outer loop, so their panel stays in L1 while the
//           keys stream.
//   outputs O [rows][d_c] += P [rows][keys] C [keys][d_c]: A = the softmax weights in BF16
//           (rows in M, 32 consecutive keys per tile row), B = the latent in pairs of
//           consecutive keys (two records interleaved, no transpose); O is the frame's output,
//           each accumulator tile loaded and stored once per block (FP8: each output segment's
//           columns hold their sums over a power-of-two unit kept for the part). O is rescaled
//           in memory only for rows whose running maximum rose.
// Precision: kBf16 rounds the queries (times the softmax scale) and the weights once to BF16;
// kFp32 splits the queries into three BF16 parts and the weights into two (sums of parts hold
// 24 and 16 significant bits; the tested bound is 1e-5 relative), one tile product per part,
// so that only the FP32 sums round. FP32 and FP64 caches keep the AVX-512 FMA kernel for kFp32
// (their keys are not BF16 values); latent widths that are not a multiple of 16 keep the
// AVX-512 kernels.
//
// Keys a query row must not see (the newest keys, for all but the last of several query
// tokens) are never multiplied into its output: their weights are zero and their latent pairs
// are zero in a masked copy of the 32-key step that holds them, so a non-finite record cannot
// reach the rows before it. Rows past the last key of a block are never read from the cache.

namespace decode_amx {

/// Tile roles: C accumulators 0..3 (C(i, j) = 2 i + j), A operands 4, 5, B operands 6, 7.
/// An operand's 16-row tile at (i, k, part): base(i) + k * step_k + part * step_p, with
/// base(i) = bases[i] when `bases` is set (tiles of rows that do not lie at one stride from
/// each other: the key rows of records), base + i * step_i otherwise.
struct Operand {
  const unsigned char* base = nullptr;
  const unsigned char* const* bases = nullptr;
  Index stride = 0, step_i = 0, step_k = 0, step_p = 0;
  const unsigned char* at(Index i, Index k, Index p = 0) const {
    return (bases ? bases[i] : base + i * step_i) + k * step_k + p * step_p;
  }
  Operand shifted(Index i) const {
    Operand o = *this;
    if (bases) {
      o.bases += i;
    } else {
      o.base += i * step_i;
    }
    return o;
  }
};

/// C(i, j) (+)= sum over k in [k0, k1) and parts p of A(i, k, p) B(j, k, p) for i < MI,
/// j < NJ, with the parts on A (kPartsOnA: B is the same for every part) or on B. C(i, j) is
/// the FP32 tile at c + i * c_i + j * c_j bytes, rows c_stride bytes apart; loaded first when
/// `load_c`, zero otherwise; stored at the end.
template <int MI, int NJ, bool kPartsOnA, class Tiles>
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
    if constexpr (kPartsOnA) {
      t.template load<6>(B.at(0, k), B.stride);
      if constexpr (NJ > 1) t.template load<7>(B.at(1, k), B.stride);
    } else {
      t.template load<4>(A.at(0, k), A.stride);
      if constexpr (MI > 1) t.template load<5>(A.at(1, k), A.stride);
    }
    for (Index p = 0; p < parts; ++p) {
      if constexpr (kPartsOnA) {
        t.template load<4>(A.at(0, k, p), A.stride);
        if constexpr (MI > 1) t.template load<5>(A.at(1, k, p), A.stride);
      } else {
        t.template load<6>(B.at(0, k, p), B.stride);
        if constexpr (NJ > 1) t.template load<7>(B.at(1, k, p), B.stride);
      }
      t.template dp<0, 4, 6>();
      if constexpr (MI > 1) t.template dp<2, 5, 6>();
      if constexpr (NJ > 1) t.template dp<1, 4, 7>();
      if constexpr (MI > 1 && NJ > 1) t.template dp<3, 5, 7>();
    }
  }
  t.template store<0>(c, c_stride);
  if constexpr (NJ > 1) t.template store<1>(c + c_j, c_stride);
  if constexpr (MI > 1) t.template store<2>(c + c_i, c_stride);
  if constexpr (MI > 1 && NJ > 1) t.template store<3>(c + c_i + c_j, c_stride);
}

/// Calls f(MI, NJ, i, j) with the compile-time block shape for the 2 x 2 (or smaller) block
/// of C tiles at (i, j).
template <class F>
MLA_KERNEL_INLINE void block_at(Index mi, Index nj, Index i, Index j, F& f) {
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
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

/// C(i, j) for every i < mi and j < nj tile, two by two, i (the A operand) in the outer loop.
template <class F>
MLA_KERNEL_INLINE void for_blocks(Index mi, Index nj, F&& f) {
  for (Index i = 0; i < mi; i += 2) {
    for (Index j = 0; j < nj; j += 2) block_at(mi, nj, i, j, f);
  }
}

/// The same with j (the B operand) in the outer loop: B's panel stays in L1 while A streams.
template <class F>
MLA_KERNEL_INLINE void for_blocks_b_outer(Index mi, Index nj, F&& f) {
  for (Index j = 0; j < nj; j += 2) {
    for (Index i = 0; i < mi; i += 2) block_at(mi, nj, i, j, f);
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

/// The power of two just above x > 0 (x / it is in [0.5, 1)); 1 for 0, infinities and NaN. What
/// queries and FP8-scaled weights are divided by before they are split into BF16 parts.
inline float power_of_two_above(float x) {
  if (!(x > 0.0f) || !std::isfinite(x)) return 1.0f;
  int e = 0;
  std::frexp(x, &e);
  return std::ldexp(1.0f, e);
}

/// E4M3 codes as BF16 values (exact: every E4M3 value is one), 32 at a time: a normal code's
/// bits shifted into BF16's fields and rebased (exponent bias 7 -> 127), the 8 subnormal
/// magnitudes from a table, NaN as NaN, the sign put back.
inline void e4m3_to_bf16(const unsigned char* src, Index count, std::uint16_t* dst) {
  alignas(64) static const std::uint16_t kSubnormal[32] = {0,      0x3B00, 0x3B80, 0x3BC0,
                                                           0x3C00, 0x3C20, 0x3C40, 0x3C60};
  const __m512i sub = _mm512_load_si512(kSubnormal);
  const __m512i low7 = _mm512_set1_epi16(0x7F), nan = _mm512_set1_epi16(0x7FC0);
  const Index whole = count / 32 * 32;
  for (Index i = 0; i < whole; i += 32) {
    const __m512i w =
        _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    const __m512i mag = _mm512_and_si512(w, low7);
    __m512i v = _mm512_add_epi16(_mm512_slli_epi16(mag, 4), _mm512_set1_epi16(0x3C00));
    v = _mm512_mask_permutexvar_epi16(v, _mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(8)), mag,
                                      sub);
    v = _mm512_mask_mov_epi16(v, _mm512_cmpeq_epi16_mask(mag, low7), nan);
    v = _mm512_or_si512(v, _mm512_slli_epi16(_mm512_andnot_si512(low7, w), 8));
    _mm512_storeu_si512(dst + i, v);
  }
  for (Index i = whole; i < count; ++i) dst[i] = bf16_bits(decode_fp8<E4M3FNFormat>(src[i]));
}

/// Most FP8 scale tiles of a latent the tile kernels take (d_c up to 4096).
inline constexpr Index kMaxTiles8 = 32;

/// BF16 parts of the weights for kFp32 (the queries take tile_parts(kFp32) = 3): two hold 16
/// significant bits, a relative error of at most 2^-17 (7.6e-6) per weight, which the sums over
/// keys average. Measured on AMX (V3, 32K keys, kFp32): a third part costs 13-15% of the step.
/// The scores keep three: their error is multiplied by the exponential.
inline constexpr Index kMaxWeightParts = 2;
inline Index weight_parts(Index query_parts) { return query_parts > 1 ? kMaxWeightParts : 1; }

/// How a call lays its operands out.
struct Layout {
  Index D = 0, R = 0;
  Index d_pad = 0, k_pad = 0;  // latent, and latent + k^R, each padded to 32
  Index parts = 1;             // BF16 parts of the queries
  Index p_parts = 1;           // BF16 parts of the weights
  Index tiles8 = 0;            // FP8 scale tiles of the latent (0: no FP8)
  bool fp8 = false;
  bool direct = false;  // key rows read from the records (BF16 records of whole 32-wide blocks)
  Index record_bytes = 0;
};

/// The tile policy (see the file comment).
template <class Tiles>
struct TilePolicy {
  static constexpr bool kAccumulatesInOutput = true;
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
    L.p_parts = weight_parts(parts);
    L.fp8 = cache.layout.storage == CacheStorage::kFp8E4M3;
    L.tiles8 = L.fp8 ? LatentLayout::fp8_tiles(L.D) : 0;
    L.record_bytes = static_cast<Index>(cache.layout.token_bytes);
    L.direct = cache.layout.storage == CacheStorage::kBFloat16 && L.D % 32 == 0 && L.R % 32 == 0 &&
               L.record_bytes == 2 * (L.D + L.R);
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
    Operand qB;   // the queries: B(j, k, p) = 16 pair rows of k block k, row block j, part p
    Operand kA;   // this block's key rows: A(i, k) = keys 16 i .., k block k
    Index n = 0;  // keys of the current block
    Index segments = 1;
    float out_units[kMaxTiles8] = {};  // FP8: each output segment's unit (0: none yet)

    Worker(const TilePolicy& policy, const decode_frame::Group& group)
        : p(policy), g(group), L(policy.L), segments(policy.L.tiles8 + 1) {
      tiles.configure(full_tiles());
      qB.base = reinterpret_cast<const unsigned char*>(p.qp + g.h0);
      qB.stride = g.h_pad * 4;
      qB.step_i = 16 * 4;
      qB.step_k = 16 * g.h_pad * 4;
      qB.step_p = (L.k_pad / 2) * g.h_pad * 4;
    }

    /// The block's key rows (kA: records in place, or rows of tile_keys) and FP8 multipliers,
    /// and the latent pairs of consecutive keys [n32 / 2][d_c] (zero past n).
    void load_keys(Index j0) {
      decode::Buffers::PerThread& t = *g.t;
      const LatentBlocks& cache = g.a->cache;
      const Index groups = (n + 15) / 16, n32 = (n + 31) / 32 * 32;
      if constexpr (Tiles::kEmulated) tile_counts().record_bytes += n * L.record_bytes;
      const std::uint16_t* zero_row = t.tile_keys.data() + n32 * L.k_pad;
      std::fill(t.tile_keys.data() + n32 * L.k_pad, t.tile_keys.data() + (n32 + 1) * L.k_pad,
                std::uint16_t{0});
      decode_bf16::KeyLayout kl(cache.layout);
      kl.d_even = L.d_pad;
      kl.k_even = L.d_pad + L.R;
      // Each 16 keys: their records when every one lies at one stride from the first (direct
      // layout), else copies. (The first and last alone prove nothing: a block table or a
      // selection may put other records between them.)
      const unsigned char** bases = t.tile_rows.data();
      for (Index gi = 0; gi < groups; ++gi) {
        const Index first = 16 * gi, count = std::min<Index>(16, n - first);
        const unsigned char* rec0 = cache.record(j0 + first);
        bool strided = L.direct && count == 16;
        for (Index j = 1; strided && j < 16; ++j) {
          strided = cache.record(j0 + first + j) == rec0 + j * L.record_bytes;
        }
        if (strided) {
          bases[gi] = rec0;
          continue;
        }
        std::uint16_t* rows = t.tile_keys.data() + first * L.k_pad;
        for (Index j = 0; j < 16; ++j) {
          std::uint16_t* row = rows + j * L.k_pad;
          if (j >= count) {
            std::fill(row, row + L.k_pad, std::uint16_t{0});
            continue;
          }
          const unsigned char* rec = cache.record(j0 + first + j);
          decode_bf16::key_to_bf16(p.record, kl, rec, row, t.tile.data(),
                                   [](const unsigned char* src, Index count, std::uint16_t* out) {
                                     e4m3_to_bf16(src, count, out);  // 32 codes at a time
                                   });
          std::fill(row + L.D, row + L.d_pad, std::uint16_t{0});
          std::fill(row + L.d_pad + L.R, row + L.k_pad, std::uint16_t{0});
          if (L.fp8) {
            decode_bf16::segment_multipliers(p.record, rec, t.mult.data() + (first + j) * segments);
          }
        }
        // Copied rows are k_pad values apart; records record_bytes: one stride for all.
        bases[gi] = reinterpret_cast<const unsigned char*>(rows);
      }
      kA = Operand{};
      kA.bases = bases;
      kA.step_k = 64;  // the row stride is per group: key_stride
      // Latent pairs: B rows of the outputs, 32 values at a time in the order of the 16-bit
      // unpacks (see natural_order); a last 16 in order.
      std::uint32_t* vp = t.tile_v.data();
      const Index d32 = L.D / 32 * 32;
      for (Index jp = 0; jp < n32 / 2; ++jp) {
        const Index j = 2 * jp;
        const std::uint16_t* lo = j < n ? key_row(j) : zero_row;
        const std::uint16_t* hi = j + 1 < n ? key_row(j + 1) : zero_row;
        std::uint32_t* dst = vp + jp * L.D;
        for (Index d = 0; d < d32; d += 32) {
          const __m512i a = _mm512_loadu_si512(lo + d), b = _mm512_loadu_si512(hi + d);
          _mm512_storeu_si512(dst + d, _mm512_unpacklo_epi16(a, b));
          _mm512_storeu_si512(dst + d + 16, _mm512_unpackhi_epi16(a, b));
        }
        if (d32 < L.D) {
          Ops::store(reinterpret_cast<float*>(dst + d32), Ops::interleave_bf16(lo + d32, hi + d32));
        }
      }
    }

    /// The outputs' columns of each 32 hold the latent values in the order 16-bit unpacks leave
    /// them (within 128-bit lanes); finish() puts them back in order with these indices (the
    /// first or second 16 values of the 32).
    static __m512i natural_order(int half) {
      alignas(64) std::int32_t idx[16];
      for (int k = 0; k < 16; ++k) {
        const int dim = 16 * half + k, q = dim / 8, w = dim % 8;
        idx[k] = w < 4 ? 4 * q + w : 16 + 4 * q + w - 4;
      }
      return _mm512_load_si512(idx);
    }

    /// Key row j of the block (after load_keys' choice for its group).
    const std::uint16_t* key_row(Index j) const {
      return reinterpret_cast<const std::uint16_t*>(
          g.t->tile_rows[static_cast<std::size_t>(j / 16)] + (j % 16) * key_stride(j / 16));
    }
    /// Bytes between the key rows of group gi: the record size when read in place.
    Index key_stride(Index gi) const {
      const unsigned char* b = g.t->tile_rows[static_cast<std::size_t>(gi)];
      const auto* keys = reinterpret_cast<const unsigned char*>(g.t->tile_keys.data());
      const bool copied = b >= keys && b < keys + g.t->tile_keys.size() * sizeof(std::uint16_t);
      return copied ? L.k_pad * 2 : L.record_bytes;
    }

    MLA_KERNEL_NOINLINE void score(Index j0, Index keys) {
      n = keys;
      decode::Buffers::PerThread& t = *g.t;
      const Index h_group = g.stride;
      const Index nb = (n + 15) / 16, hb = g.hw / 16;  // key and row blocks
      const Index kblocks_latent = L.d_pad / 32, kblocks = L.k_pad / 32;
      const float* units = p.units;
      const Index h0 = g.h0;
      float* sc = g.scores;
      float* ctmp = t.tile_c.data();
      load_keys(j0);
      // Scores per segment (FP8: each scale tile of the latent, then k^R; otherwise the whole
      // row), each segment's FP32 sums times the rows' units and the keys' multipliers, added.
      const Index score_segments = L.fp8 ? segments : 1;
      for (Index seg = 0; seg < score_segments; ++seg) {
        const Index k0 = !L.fp8 ? 0 : seg < L.tiles8 ? 4 * seg : kblocks_latent;
        const Index k1 = !L.fp8           ? kblocks
                         : seg < L.tiles8 ? std::min(kblocks_latent, 4 * seg + 4)
                                          : kblocks;
        if (k0 >= k1) continue;
        for_blocks_b_outer(nb, hb, [&](auto mi, auto nj, Index i, Index j) {
          constexpr int MI = decltype(mi)::value, NJ = decltype(nj)::value;
          Operand A = kA.shifted(i);
          // The two groups of A share one stride (both copied or both in place) or run alone.
          A.stride = key_stride(i);
          if (MI > 1 && key_stride(i + 1) != A.stride) {
            run_scores<1, NJ>(A, i, j, k0, k1, seg, ctmp, units, h0, sc, h_group);
            Operand A1 = kA.shifted(i + 1);
            A1.stride = key_stride(i + 1);
            run_scores<1, NJ>(A1, i + 1, j, k0, k1, seg, ctmp, units, h0, sc, h_group);
            return;
          }
          run_scores<MI, NJ>(A, i, j, k0, k1, seg, ctmp, units, h0, sc, h_group);
        });
      }
    }

    /// Key blocks i .. i + MI - 1 against row blocks j .. j + NJ - 1 over k blocks [k0, k1):
    /// sc[key][h] (+)= tile * unit[h] (* mult[key][seg] for FP8).
    template <int MI, int NJ>
    MLA_KERNEL_INLINE void run_scores(const Operand& A, Index i, Index j, Index k0, Index k1,
                                      Index seg, float* ctmp, const float* units, Index h0,
                                      float* sc, Index h_group) {
      Operand B = qB.shifted(j);
      product<MI, NJ, false>(tiles, A, B, k0, k1, L.parts, reinterpret_cast<unsigned char*>(ctmp),
                             16 * 4, 2 * 256 * 4, 256 * 4, false);
      const float* mult = g.t->mult.data();
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
                  Ops::set1(mult[static_cast<std::size_t>(std::min(key, n - 1) * segments + seg)]));
            }
            float* dst = sc + key * h_group + (j + jj) * 16;
            Ops::store(dst, seg == 0 ? x : Ops::add(Ops::load(dst), x));
          }
        }
      }
    }

    /// Rows [r0, r1) (one query token's): O rescaled where the maximum rose, the weights as
    /// BF16 tile rows, then O += P C over the keys they see.
    MLA_KERNEL_NOINLINE void accumulate(Index r0, Index r1, Index seen, Index) {
      decode::Buffers::PerThread& t = *g.t;
      const Index D = L.D, h_group = g.stride;
      const Index out_segments = L.fp8 ? L.tiles8 : 1;
      const Index rows = r1 - r0;
      const float* sc = g.scores;
      const float* corr = g.corr;
      float* o = g.o;
      // The rescale, only for rows whose correction is not 1 (the maximum rose).
      for (Index r = r0; r < r1; r += kW) {
        const __mmask16 changed =
            _mm512_cmp_ps_mask(Ops::load(corr + r), Ops::set1(1.0f), _CMP_NEQ_UQ);
        for (unsigned m = changed; m != 0; m &= m - 1) {
          const Index row = r + __builtin_ctz(m);
          const V c = Ops::set1(corr[row]);
          float* orow = o + row * D;
          for (Index d = 0; d < D; d += kW) Ops::store(orow + d, Ops::mul(Ops::load(orow + d), c));
        }
      }
      const Index kb_seen = (seen + 31) / 32;  // 32-key steps the weights cover
      // FP8: each output segment's scales divided by a power of two above the largest so far
      // (out_units[os]: O's columns of the segment hold sums / unit, multiplied back in finish()),
      // so that the BF16 parts of the weights stay clear of the subnormals the tiles treat as
      // zero, whatever the scales. A larger scale raises the unit and rescales those columns
      // (by a power of two: exact) for every row, so the accumulators stay in O.
      for (Index os = 0; os < out_segments && L.fp8; ++os) {
        float mx = 0.0f;
        for (Index j = 0; j < seen; ++j) {
          mx = std::max(mx, t.mult[static_cast<std::size_t>(j * segments + os)]);
        }
        const float u = power_of_two_above(mx);
        if (u <= out_units[os]) continue;
        if (out_units[os] > 0.0f) scale_columns(os, out_units[os] / u);
        out_units[os] = u;
      }
      // Weights: P[os][part][kb] [rows][32 keys] in BF16, from the scores [key][row]: pairs of
      // consecutive keys for 16 rows, transposed 16 x 16 into tile rows.
      std::uint16_t* pa = t.tile_p.data();
      const Index p_parts = L.p_parts;
      const Index part_step = kb_seen * rows * 32, seg_step = p_parts * part_step;
      for (Index os = 0; os < out_segments; ++os) {
        const float inv = L.fp8 ? 1.0f / out_units[os] : 1.0f;
        for (Index kb = 0; kb < kb_seen; ++kb) {
          for (Index rb = r0; rb < r1; rb += 16) {
            __m512i parts[kMaxWeightParts][16];
            for (int i = 0; i < 16; ++i) {
              const Index j = 32 * kb + 2 * i;
              V x0 = Ops::zero(), x1 = Ops::zero();
              if (j < seen) {
                x0 = Ops::load(sc + j * h_group + rb);
                if (L.fp8) {
                  x0 = Ops::mul(
                      x0, Ops::set1(t.mult[static_cast<std::size_t>(j * segments + os)] * inv));
                }
              }
              if (j + 1 < seen) {
                x1 = Ops::load(sc + (j + 1) * h_group + rb);
                if (L.fp8) {
                  x1 = Ops::mul(
                      x1,
                      Ops::set1(t.mult[static_cast<std::size_t>((j + 1) * segments + os)] * inv));
                }
              }
              for (Index pp = 0; pp < p_parts; ++pp) parts[pp][i] = next_part(x0, x1);
            }
            for (Index pp = 0; pp < p_parts; ++pp) {
              transpose16(parts[pp]);  // parts[pp][r] = row rb + r's 16 pairs
              std::uint16_t* dst = pa + os * seg_step + pp * part_step + (kb * rows + rb - r0) * 32;
              for (int r = 0; r < 16; ++r) {
                _mm512_storeu_si512(reinterpret_cast<void*>(dst + r * 32), parts[pp][r]);
              }
            }
          }
        }
      }
      // The 32-key step holding the first key this token must not see, with that key and the
      // ones after it zero (their weights are zero; their values may not be finite).
      const Index full = seen / 32;
      const bool masked = seen % 32 != 0 && seen < n;
      const std::uint32_t* vp = t.tile_v.data();
      std::uint32_t* vmask = t.tile_v.data() + ((n + 31) / 32) * 16 * D;
      if (masked) {
        for (Index jp = 0; jp < 16; ++jp) {
          const Index j = 32 * full + 2 * jp;
          const std::uint32_t keep = j + 1 < seen ? 0xFFFFFFFFu : j < seen ? 0x0000FFFFu : 0u;
          const std::uint32_t* src = vp + (16 * full + jp) * D;
          std::uint32_t* dst = vmask + jp * D;
          const __m512i k = _mm512_set1_epi32(static_cast<int>(keep));
          for (Index d = 0; d < D; d += kW) {
            _mm512_storeu_si512(reinterpret_cast<void*>(dst + d),
                                _mm512_and_si512(_mm512_loadu_si512(src + d), k));
          }
        }
      }
      const Index kb_plain = masked ? full : kb_seen;
      const Index db = D / 16, rbn = rows / 16;
      for (Index os = 0; os < out_segments; ++os) {
        const Index d0 = L.fp8 ? os * 8 : 0, d1 = L.fp8 ? std::min(db, os * 8 + 8) : db;
        Operand A;  // weights: A(i, k, p) = rows 16 i .., 32-key step k, part p
        A.base = reinterpret_cast<const unsigned char*>(pa + os * seg_step);
        A.stride = 64;
        A.step_i = 16 * 64;
        A.step_k = rows * 64;
        A.step_p = part_step * 2;
        Operand B;  // latent pairs: B(j, k) = dimensions 16 (d0 + j).., 32-key step k
        B.base = reinterpret_cast<const unsigned char*>(vp + d0 * 16);
        B.stride = D * 4;
        B.step_i = 64;
        B.step_k = 16 * D * 4;
        Operand Bm = B;  // the masked step (k = full)
        Bm.base = reinterpret_cast<const unsigned char*>(vmask + d0 * 16) - full * B.step_k;
        for_blocks_b_outer(rbn, d1 - d0, [&](auto mi, auto nj, Index i, Index j) {
          constexpr int MI = decltype(mi)::value, NJ = decltype(nj)::value;
          const Operand Ai = A.shifted(i), Bj = B.shifted(j), Bmj = Bm.shifted(j);
          float* c = o + (r0 + 16 * i) * D + (d0 + j) * 16;
          const Index c_stride = D * 4, c_i = 16 * D * 4, c_j = 64;
          // Accumulators loaded from O and stored back once per block (and once more for a
          // masked step).
          auto* cb = reinterpret_cast<unsigned char*>(c);
          if (kb_plain > 0) {
            product<MI, NJ, true>(tiles, Ai, Bj, 0, kb_plain, p_parts, cb, c_stride, c_i, c_j,
                                  true);
          }
          if (masked) {
            product<MI, NJ, true>(tiles, Ai, Bmj, full, full + 1, p_parts, cb, c_stride, c_i, c_j,
                                  true);
          }
        });
      }
    }

    /// O's columns of FP8 output segment os, every row, times f.
    void scale_columns(Index os, float f) {
      const V x = Ops::set1(f);
      const Index d0 = os * 128, d1 = std::min(L.D, d0 + 128);
      for (Index r = 0; r < g.hw; ++r) {
        float* row = g.o + r * L.D;
        for (Index d = d0; d < d1; d += kW) Ops::store(row + d, Ops::mul(Ops::load(row + d), x));
      }
    }

    void finish() {
      tiles.release();
      for (Index os = 0; os < L.tiles8; ++os) {
        if (out_units[os] > 0.0f) scale_columns(os, out_units[os]);
      }
      const __m512i first = natural_order(0), second = natural_order(1);
      const Index d32 = L.D / 32 * 32;
      for (Index r = 0; r < g.hw; ++r) {
        float* row = g.o + r * L.D;
        for (Index d = 0; d < d32; d += 32) {
          const __m512 lo = _mm512_loadu_ps(row + d), hi = _mm512_loadu_ps(row + d + 16);
          _mm512_storeu_ps(row + d, _mm512_permutex2var_ps(lo, first, hi));
          _mm512_storeu_ps(row + d + 16, _mm512_permutex2var_ps(lo, second, hi));
        }
      }
    }
  };
};

/// Latent widths the tile kernels take: whole 16-wide output tiles, up to kMaxTiles8 FP8 tiles.
inline bool tiles_take(const LatentLayout& l) {
  return l.kv_lora_rank % 16 == 0 && l.kv_lora_rank <= 128 * kMaxTiles8;
}

/// The call with its query rows in groups of at most 256 (unless the caller chose the groups):
/// each group's output, scores and query panel then stay in L2 beside the key block.
inline DecodeArgs in_row_groups(const DecodeArgs& a) {
  DecodeArgs b = a;
  const Index rows = decode::query_rows(a.heads, a.tokens, kW);
  if (b.options.head_groups == 1 && rows > 256) b.options.head_groups = (rows + 255) / 256;
  return b;
}

/// Precision::kFp32: tiles for BF16 and FP8 caches (three parts), the AVX-512 FMA kernel for
/// the others.
template <class Tiles>
void decode_absorbed(const DecodeArgs& args) {
  const DecodeArgs a = in_row_groups(args);
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
void decode_absorbed_bf16(const DecodeArgs& args) {
  const DecodeArgs a = in_row_groups(args);
  if (!tiles_take(a.cache.layout)) {
    avx512_bf16::decode_absorbed_bf16(a);
    return;
  }
  decode_frame::run<TilePolicy<Tiles>>(a, decode::tile_parts(Precision::kBf16));
}

}  // namespace decode_amx
