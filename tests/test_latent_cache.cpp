// LatentCache: write then read, paging across blocks, sequences and layers kept apart, atomic
// appends, block reuse, byte accounting, errors.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "mla/attention.hpp"
#include "mla/latent_cache.hpp"
#include "test_util.hpp"

namespace {

struct ScaleFormatCase {
  mla::ScaleFormat format;
  bool pow2;
};

using mla::CacheStorage;
using mla::Index;
using mla::LatentCache;
using mla::LatentCacheOptions;
using mla::MlaConfig;
using mla::RowMatrix;
using mla::SequenceId;

LatentCacheOptions options(Index layers, Index block_tokens, Index blocks, CacheStorage s) {
  LatentCacheOptions o;
  o.num_layers = layers;
  o.block_tokens = block_tokens;
  o.num_blocks = blocks;
  o.storage = s;
  return o;
}

RowMatrix<double> contents(const LatentCache& cache, SequenceId id, Index layer) {
  return test::cache_contents(cache, id, layer);
}

TEST(LatentCache, BytesPerTokenAreTheLatentOnly) {
  const MlaConfig v3 = MlaConfig::deepseek_v3();
  EXPECT_EQ(LatentCache(v3, options(1, 64, 1, CacheStorage::kFloat32)).bytes_per_token_per_layer(),
            2304u);  // 576 * 4
  EXPECT_EQ(LatentCache(v3, options(1, 64, 1, CacheStorage::kFloat64)).bytes_per_token_per_layer(),
            4608u);
  EXPECT_EQ(LatentCache(MlaConfig::small_v3(), options(1, 8, 1, CacheStorage::kFloat32))
                .bytes_per_token_per_layer(),
            (32u + 8u) * 4u);
}

TEST(LatentCache, WriteThenReadIsExactAcrossBlocksLayersAndSequences) {
  const MlaConfig c = MlaConfig::small_v3();  // d_c 32, R 8
  for (CacheStorage storage : {CacheStorage::kFloat32, CacheStorage::kFloat64}) {
    LatentCache cache(c, options(3, 5, 40, storage));
    const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
    // What each (sequence, layer) should hold, built up chunk by chunk in interleaved order.
    std::map<std::pair<SequenceId, Index>, RowMatrix<double>> want;
    unsigned seed = 1;
    for (Index chunk : {Index{3}, Index{1}, Index{7}, Index{5}, Index{12}, Index{1}}) {
      for (SequenceId id : {a, b}) {
        for (Index layer = 0; layer < 3; ++layer) {
          // b only gets every other chunk in layer 2, so its layers differ in length.
          if (id == b && layer == 2 && chunk == 7) continue;
          const RowMatrix<float> x = test::random_input<float>(chunk, 40, seed++);
          cache.append<float>(id, layer, x.leftCols(32), x.rightCols(8));
          RowMatrix<double>& w = want[{id, layer}];
          if (w.cols() == 0) w.resize(0, 40);  // first chunk of this (sequence, layer)
          RowMatrix<double> grown(w.rows() + chunk, 40);
          grown.topRows(w.rows()) = w;
          grown.bottomRows(chunk) = x.cast<double>();
          w = grown;
        }
      }
    }
    for (const auto& [key, expected] : want) {
      EXPECT_EQ(cache.length(key.first, key.second), expected.rows());
      // float data survive fp32 and fp64 storage exactly.
      EXPECT_EQ(contents(cache, key.first, key.second), expected)
          << to_string(storage) << " seq " << key.first << " layer " << key.second;
    }
    // Partial reads from the middle, crossing block boundaries.
    const mla::LatentView v = cache.view(a, 1);
    RowMatrix<float> part_c(9, 32), part_k(9, 8);
    v.read<float>(4, 9, part_c, part_k);
    EXPECT_EQ(part_c.cast<double>(), (want[{a, 1}].block(4, 0, 9, 32)));
    EXPECT_EQ(part_k.cast<double>(), (want[{a, 1}].block(4, 32, 9, 8)));
  }
}

TEST(LatentCache, Fp32StorageRoundsDoublesOnce) {
  const MlaConfig c = MlaConfig::small_v2_lite();
  LatentCache cache(c, options(1, 4, 4, CacheStorage::kFloat32));
  const SequenceId s = cache.add_sequence();
  const RowMatrix<double> x = test::random_input<double>(6, 40, 3);
  cache.append<double>(s, 0, x.leftCols(32), x.rightCols(8));
  EXPECT_EQ(contents(cache, s, 0), x.cast<float>().cast<double>());
  EXPECT_NE(contents(cache, s, 0), x);  // it did round
}

TEST(LatentCache, FailedAppendLeavesEverythingAsItWas) {
  const MlaConfig c = MlaConfig::small_v3();
  LatentCache cache(c, options(2, 4, 5, CacheStorage::kFloat32));  // 20 tokens in all
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  const RowMatrix<float> x = test::random_input<float>(20, 40, 5);
  cache.append<float>(a, 0, x.topRows(6).leftCols(32), x.topRows(6).rightCols(8));  // 2 blocks
  cache.append<float>(b, 1, x.topRows(9).leftCols(32), x.topRows(9).rightCols(8));  // 3 blocks
  const RowMatrix<double> a0 = contents(cache, a, 0), b1 = contents(cache, b, 1);
  EXPECT_EQ(cache.free_blocks(), 0);
  // a layer 0 has room for 2 more tokens in its last block, not 3.
  EXPECT_TRUE(test::throws_error_containing(
      [&] { cache.append<float>(a, 0, x.topRows(3).leftCols(32), x.topRows(3).rightCols(8)); },
      "needs 1 more blocks"));
  // a layer 1 shares a's blocks (8 tokens of room), but 9 need a third block.
  EXPECT_TRUE(test::throws_error_containing(
      [&] { cache.append<float>(a, 1, x.topRows(9).leftCols(32), x.topRows(9).rightCols(8)); },
      "only 0 of the pool's 5 blocks are free"));
  EXPECT_EQ(cache.length(a, 0), 6);
  EXPECT_EQ(cache.length(a, 1), 0);
  EXPECT_EQ(cache.length(b, 1), 9);
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_EQ(contents(cache, a, 0), a0);
  EXPECT_EQ(contents(cache, b, 1), b1);
  // What fits still goes in.
  cache.append<float>(a, 0, x.topRows(2).leftCols(32), x.topRows(2).rightCols(8));
  cache.append<float>(a, 1, x.topRows(8).leftCols(32), x.topRows(8).rightCols(8));
  EXPECT_EQ(cache.length(a, 0), 8);
  EXPECT_EQ(cache.length(a, 1), 8);
}

TEST(LatentCache, AnAppendNeedingMoreBlocksThanAreFreeTakesNone) {
  // Some blocks are free, but fewer than the append needs: it must not take the free ones.
  const MlaConfig c = MlaConfig::small_v3();
  LatentCache cache(c, options(2, 4, 4, CacheStorage::kFloat32));
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  const RowMatrix<float> x = test::random_input<float>(12, 40, 9);
  cache.append<float>(a, 0, x.topRows(9).leftCols(32), x.topRows(9).rightCols(8));  // 3 blocks
  const RowMatrix<double> a0 = contents(cache, a, 0);
  ASSERT_EQ(cache.free_blocks(), 1);
  // b needs 2 blocks for 5 tokens; a needs 2 more for 8 (3 in its last block, then 5).
  EXPECT_TRUE(test::throws_error_containing(
      [&] { cache.append<float>(b, 0, x.topRows(5).leftCols(32), x.topRows(5).rightCols(8)); },
      "needs 2 more blocks of 4 tokens for 5 tokens, but only 1 of the pool's 4 blocks"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { cache.append<float>(a, 0, x.topRows(8).leftCols(32), x.topRows(8).rightCols(8)); },
      "needs 2 more blocks"));
  EXPECT_EQ(cache.free_blocks(), 1);
  EXPECT_EQ(cache.blocks_in_use(), 3);
  EXPECT_EQ(cache.bytes_in_use(), 3u * 4u * 40u * 4u * 2u);
  EXPECT_EQ(cache.bytes_of_tokens(), 9u * 40u * 4u);
  EXPECT_EQ(cache.length(a, 0), 9);
  EXPECT_EQ(cache.length(a, 1), 0);
  EXPECT_EQ(cache.length(b, 0), 0);
  EXPECT_EQ(contents(cache, a, 0), a0);
  // The free block still serves an append that fits in it.
  cache.append<float>(b, 0, x.topRows(4).leftCols(32), x.topRows(4).rightCols(8));
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_EQ(contents(cache, b, 0), x.topRows(4).cast<double>());
}

TEST(LatentCache, PositionsOfASequenceAreContiguous) {
  const MlaConfig c = MlaConfig::small_v3();
  LatentCache cache(c, options(2, 4, 8, CacheStorage::kFloat32));
  const SequenceId s = cache.add_sequence();
  const RowMatrix<float> x = test::random_input<float>(6, 40, 3);
  const auto append = [&](Index layer, Index n, std::int64_t pos) {
    cache.append<float>(s, layer, x.topRows(n).leftCols(32), x.topRows(n).rightCols(8), pos);
  };
  EXPECT_EQ(cache.first_position(s), -1);
  EXPECT_EQ(cache.next_position(s, 0), -1);  // anything goes while the sequence is empty
  append(0, 3, 160000);                      // a first chunk far into the context
  EXPECT_EQ(cache.first_position(s), 160000);
  EXPECT_EQ(cache.next_position(s, 0), 160003);
  EXPECT_EQ(cache.next_position(s, 1), 160000);  // layer 1 starts where the sequence starts
  const RowMatrix<double> before = contents(cache, s, 0);
  // Gaps, repeats and going backwards, in both layers: errors naming both numbers.
  for (std::int64_t bad :
       {std::int64_t{160004}, std::int64_t{160002}, std::int64_t{160000}, std::int64_t{0}}) {
    EXPECT_TRUE(test::throws_error_containing(
        [&] { append(0, 2, bad); },
        "next token is at position 160003, got " + std::to_string(bad)));
  }
  EXPECT_TRUE(test::throws_error_containing([&] { append(1, 1, 160001); },
                                            "next token is at position 160000, got 160001"));
  EXPECT_TRUE(test::throws_error_containing([&] { append(0, 1, -5); }, "must be >= 0, got -5"));
  EXPECT_EQ(cache.length(s, 0), 3);
  EXPECT_EQ(cache.length(s, 1), 0);
  EXPECT_EQ(contents(cache, s, 0), before);
  // The position-less append continues where the layer is.
  cache.append<float>(s, 0, x.topRows(1).leftCols(32), x.topRows(1).rightCols(8));
  EXPECT_EQ(cache.next_position(s, 0), 160004);
  append(1, 2, 160000);
  EXPECT_EQ(cache.next_position(s, 1), 160002);
  // A new sequence starts wherever it likes; a position-less first append starts at 0.
  const SequenceId t = cache.add_sequence();
  cache.append<float>(t, 1, x.topRows(2).leftCols(32), x.topRows(2).rightCols(8));
  EXPECT_EQ(cache.first_position(t), 0);
  EXPECT_EQ(cache.next_position(t, 0), 0);
}

TEST(LatentCache, RemovingASequenceReturnsItsBlocksForReuse) {
  const MlaConfig c = MlaConfig::small_v3();
  LatentCache cache(c, options(1, 4, 6, CacheStorage::kFloat32));
  const RowMatrix<float> x = test::random_input<float>(24, 40, 6);
  const SequenceId a = cache.add_sequence();
  cache.append<float>(a, 0, x.topRows(17).leftCols(32), x.topRows(17).rightCols(8));  // 5 blocks
  EXPECT_EQ(cache.free_blocks(), 1);
  const SequenceId b = cache.add_sequence();
  EXPECT_THROW(cache.append<float>(b, 0, x.topRows(5).leftCols(32), x.topRows(5).rightCols(8)),
               mla::Error);
  cache.remove_sequence(a);
  EXPECT_FALSE(cache.contains(a));
  EXPECT_EQ(cache.free_blocks(), 6);
  cache.append<float>(b, 0, x.leftCols(32), x.rightCols(8));  // all 24 tokens: every block
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_EQ(contents(cache, b, 0), x.cast<double>());
  const SequenceId d = cache.add_sequence();
  EXPECT_NE(d, a);  // ids are never reused
  EXPECT_TRUE(test::throws_error_containing([&] { cache.length(a, 0); }, "unknown sequence id"));
}

TEST(LatentCache, CloneIsADeepCopy) {
  const MlaConfig c = MlaConfig::small_v2_lite();
  LatentCache cache(c, options(1, 4, 8, CacheStorage::kFloat64));
  const SequenceId s = cache.add_sequence();
  const RowMatrix<double> x = test::random_input<double>(10, 40, 7);
  cache.append<double>(s, 0, x.topRows(5).leftCols(32), x.topRows(5).rightCols(8));
  LatentCache copy = cache.clone();
  copy.append<double>(s, 0, x.bottomRows(5).leftCols(32), x.bottomRows(5).rightCols(8));
  EXPECT_EQ(cache.length(s, 0), 5);
  EXPECT_EQ(copy.length(s, 0), 10);
  EXPECT_EQ(contents(cache, s, 0), x.topRows(5));
  EXPECT_EQ(contents(copy, s, 0), x);
  EXPECT_EQ(cache.free_blocks(), 6);
  EXPECT_EQ(copy.free_blocks(), 5);
  static_assert(!std::is_copy_constructible_v<LatentCache>, "copies are explicit (clone)");
}

TEST(LatentCache, BadArgumentsAreClearErrors) {
  const MlaConfig c = MlaConfig::small_v3();
  EXPECT_TRUE(test::throws_error_containing(
      [&] { LatentCache(c, options(0, 4, 4, CacheStorage::kFloat32)); }, "num_layers"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { LatentCache(c, options(1, 0, 4, CacheStorage::kFloat32)); }, "block_tokens"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { LatentCache(c, options(1, 4, 0, CacheStorage::kFloat32)); }, "num_blocks"));
  MlaConfig bad = c;
  bad.kv_lora_rank = 0;
  EXPECT_TRUE(test::throws_error_containing(
      [&] { LatentCache(bad, options(1, 4, 4, CacheStorage::kFloat32)); }, "kv_lora_rank"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { LatentCache(c, options(1 << 16, 1 << 20, 1 << 30, CacheStorage::kFloat64)); },
      "too large"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { LatentCache(c, options(1 << 17, 4, 4, CacheStorage::kFloat32)); }, "num_layers"));

  LatentCache cache(c, options(2, 4, 4, CacheStorage::kFloat32));
  const SequenceId s = cache.add_sequence();
  const RowMatrix<float> x = test::random_input<float>(3, 40, 8);
  EXPECT_TRUE(test::throws_error_containing(
      [&] { cache.append<float>(s, 2, x.leftCols(32), x.rightCols(8)); }, "layer 2 out of range"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { cache.append<float>(s + 7, 0, x.leftCols(32), x.rightCols(8)); },
      "unknown sequence id"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { cache.append<float>(s, 0, x.leftCols(31), x.rightCols(8)); }, "expected [n, 32]"));
  EXPECT_TRUE(test::throws_error_containing(
      [&] { cache.append<float>(s, 0, x.leftCols(32), x.topRows(2).rightCols(8)); },
      "expected [n, 32] and [n, 8]"));
  EXPECT_TRUE(
      test::throws_error_containing([&] { cache.remove_sequence(s + 7); }, "unknown sequence id"));
  EXPECT_EQ(cache.length(s, 0), 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Storage formats: BF16 and FP8 (FlashMLA's layout)

namespace {

/// bf16 nearest to a double in the normal range, ties to even, by comparing against the two
/// neighbouring bf16 values (exact in double by Sterbenz's lemma).
std::uint16_t exact_bf16_bits(double x) {
  std::uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  const std::uint64_t sign = u >> 63;
  const int e = static_cast<int>((u >> 52) & 0x7FF) - 1023;  // normal inputs only
  const std::uint64_t top7 = (u >> 45) & 0x7F;
  const double mag = std::fabs(x);
  const double lo = std::ldexp(1.0 + static_cast<double>(top7) / 128.0, e);
  const double hi = lo + std::ldexp(1.0, e - 7);
  std::uint32_t bits =
      static_cast<std::uint32_t>((e + 127) << 7) | static_cast<std::uint32_t>(top7);
  if (mag - lo > hi - mag || (mag - lo == hi - mag && (bits & 1u))) ++bits;  // carries into e
  return static_cast<std::uint16_t>((sign << 15) | bits);
}

/// FlashMLA's record for one token, built independently: per 128-tile scale = amax / 448 (or
/// the next power of two), codes e4m3(x / scale), then the scales, then k^R in bf16.
std::vector<unsigned char> expected_fp8_record(const std::vector<float>& c,
                                               const std::vector<float>& k, bool pow2) {
  const std::size_t D = c.size(), tiles = (D + 127) / 128;
  std::vector<unsigned char> rec(D + 4 * tiles + 2 * k.size());
  for (std::size_t t = 0; t < tiles; ++t) {
    float amax = 0.0f;
    for (std::size_t i = t * 128; i < std::min(D, t * 128 + 128); ++i)
      amax = std::max(amax, std::fabs(c[i]));
    float scale = amax / 448.0f;
    if (scale == 0.0f) scale = 1.0f;
    if (pow2)
      scale = static_cast<float>(std::exp2(std::ceil(std::log2(static_cast<double>(scale)))));
    for (std::size_t i = t * 128; i < std::min(D, t * 128 + 128); ++i) {
      rec[i] = mla::float8_e4m3fn(c[i] / scale).bits();
    }
    std::memcpy(&rec[D + 4 * t], &scale, 4);
  }
  for (std::size_t i = 0; i < k.size(); ++i) {
    const std::uint16_t b = Eigen::numext::bit_cast<std::uint16_t>(Eigen::bfloat16(k[i]));
    std::memcpy(&rec[D + 4 * tiles + 2 * i], &b, 2);
  }
  return rec;
}

TEST(LatentCacheStorage, DeepSeekBytesPerTokenAndWholeModelAccounting) {
  const MlaConfig v3 = MlaConfig::deepseek_v3();
  // REFERENCE section 6: 576 numbers per token and layer.
  EXPECT_EQ(LatentCache::bytes_per_token_per_layer(v3, CacheStorage::kFloat32), 2304u);
  EXPECT_EQ(LatentCache::bytes_per_token_per_layer(v3, CacheStorage::kBFloat16), 1152u);
  EXPECT_EQ(LatentCache::bytes_per_token_per_layer(v3, CacheStorage::kFp8E4M3), 656u);
  EXPECT_EQ(LatentCache::bytes_per_token_per_layer(v3, CacheStorage::kFloat64), 4608u);
  // The whole V3 model (61 layers): 70,272 B per token in bf16, 40,016 B in fp8.
  for (auto [storage, per_token] : {std::pair{CacheStorage::kBFloat16, std::size_t{70272}},
                                    std::pair{CacheStorage::kFp8E4M3, std::size_t{40016}}}) {
    LatentCache cache(v3, options(v3.num_hidden_layers, 64, 2, storage));
    EXPECT_EQ(cache.bytes_per_token(), per_token);
    EXPECT_EQ(cache.capacity_tokens(), 128);
    EXPECT_EQ(cache.capacity_bytes(), 128 * per_token);
    EXPECT_EQ(cache.bytes_in_use(), 0u);
  }
  // In use: whole blocks for every layer; bytes_of_tokens: exactly the cached tokens.
  const MlaConfig c = MlaConfig::small_v3();  // 32 + 8 numbers: fp8 record 32 + 4 + 16 = 52 B
  LatentCache cache(c, options(3, 8, 10, CacheStorage::kFp8E4M3));
  EXPECT_EQ(cache.bytes_per_token_per_layer(), 52u);
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  const RowMatrix<float> x = test::random_input<float>(11, 40, 1);
  cache.append<float>(a, 0, x.leftCols(32), x.rightCols(8));                        // 2 blocks
  cache.append<float>(a, 2, x.topRows(3).leftCols(32), x.topRows(3).rightCols(8));  // same
  cache.append<float>(b, 1, x.topRows(9).leftCols(32), x.topRows(9).rightCols(8));  // 2 blocks
  EXPECT_EQ(cache.blocks_in_use(), 4);
  EXPECT_EQ(cache.bytes_in_use(), 4u * 8u * 52u * 3u);
  EXPECT_EQ(cache.bytes_of_tokens(), (11u + 3u + 9u) * 52u);
  cache.remove_sequence(a);
  EXPECT_EQ(cache.bytes_in_use(), 2u * 8u * 52u * 3u);
  EXPECT_EQ(cache.bytes_of_tokens(), 9u * 52u);
}

TEST(LatentCacheStorage, Fp8RecordIsFlashMlaLayoutByteForByte) {
  const MlaConfig v3 = MlaConfig::deepseek_v3();  // d_c 512: offsets 0 / 512 / 528, 656 bytes
  for (ScaleFormatCase f : {ScaleFormatCase{mla::ScaleFormat::kFloat32, false},
                            ScaleFormatCase{mla::ScaleFormat::kPowerOfTwo, true}}) {
    LatentCacheOptions o = options(1, 4, 3, CacheStorage::kFp8E4M3);
    o.fp8_scales = f.format;
    LatentCache cache(v3, o);
    const SequenceId s = cache.add_sequence();
    RowMatrix<float> x = test::random_input<float>(6, 576, 2) * 3.0f;
    x.row(1).head(128).setZero();         // an all-zero tile
    x.row(2).segment(128, 128) *= 1e-3f;  // a tile of small values (e4m3 subnormals appear)
    x(3, 5) = 1000.0f;                    // one tile dominated by an outlier
    cache.append<float>(s, 0, x.leftCols(512), x.rightCols(64));
    const mla::LatentView v = cache.view(s, 0);
    ASSERT_EQ(v.token_bytes(), 656u);
    for (Index t = 0; t < 6; ++t) {
      const std::vector<float> c(x.row(t).data(), x.row(t).data() + 512);
      const std::vector<float> k(x.row(t).data() + 512, x.row(t).data() + 576);
      const std::vector<unsigned char> want = expected_fp8_record(c, k, f.pow2);
      const unsigned char* got = v.record(t);
      EXPECT_EQ(std::memcmp(got, want.data(), 512), 0) << "latent codes, token " << t;
      EXPECT_EQ(std::memcmp(got + 512, want.data() + 512, 16), 0) << "scales at 512, token " << t;
      EXPECT_EQ(std::memcmp(got + 528, want.data() + 528, 128), 0)
          << "bf16 k^R at 528, token " << t;
    }
  }
}

TEST(LatentCacheStorage, WriteThenReadWithinEachFormatsBound) {
  const MlaConfig c = MlaConfig::deepseek_v3();
  RowMatrix<float> x = test::random_input<float>(20, 576, 3) * 2.5f;
  // The four latent tiles of a token have amaxes that differ by powers of ten (in an order
  // that changes from token to token), so a scale taken from the wrong tile saturates or
  // flushes values far beyond the bound.
  for (Index t = 0; t < 20; ++t) {
    for (Index tile = 0; tile < 4; ++tile) {
      x.row(t).segment(tile * 128, 128) *= std::pow(10.0f, static_cast<float>((tile + t) % 4) - 2);
    }
  }
  for (CacheStorage storage : {CacheStorage::kFloat32, CacheStorage::kBFloat16,
                               CacheStorage::kFp8E4M3, CacheStorage::kFloat64}) {
    SCOPED_TRACE(to_string(storage));
    LatentCache cache(c, options(1, 8, 3, storage));
    const SequenceId s = cache.add_sequence();
    cache.append<float>(s, 0, x.leftCols(512), x.rightCols(64));
    const RowMatrix<double> back = contents(cache, s, 0);
    for (Index t = 0; t < 20; ++t) {
      for (Index i = 0; i < 576; ++i) {
        const double v = x(t, i), r = back(t, i);
        double bound = 0.0;  // fp32 and fp64 are exact
        if (storage == CacheStorage::kBFloat16 || (storage == CacheStorage::kFp8E4M3 && i >= 512)) {
          bound = std::ldexp(std::fabs(v), -8);  // half a bf16 ulp: 2^-9 relative, 2^-8 safe
        } else if (storage == CacheStorage::kFp8E4M3) {
          // Half an e4m3 ulp (2^-4 relative) for normal codes; below 2^-6 * scale the
          // subnormal step 2^-9 * scale, halved.
          const double scale = x.row(t).segment(i / 128 * 128, 128).cwiseAbs().maxCoeff() / 448.0;
          bound = std::max(std::ldexp(std::fabs(v), -4), std::ldexp(scale, -10));
        }
        ASSERT_LE(std::fabs(r - v), bound) << "token " << t << " value " << i;
      }
    }
  }
}

TEST(LatentCacheStorage, DoublesRoundToBf16Once) {
  // Doubles just above a bf16 tie whose float rounding lands exactly on the tie: rounding twice
  // (double -> float -> bf16) would go to even, rounding once must go up.
  const MlaConfig c = MlaConfig::small_v3();  // R = 8
  std::vector<double> k;
  for (int i = 0; i < 8; ++i) {
    // Halfway between the bf16 mantissas 2i/128 (even) and (2i+1)/128: ties go down to even.
    const double tie = std::ldexp(1.0 + (4.0 * i + 1.0) / 256.0, i - 3);
    k.push_back(tie + std::ldexp(tie, -30));
  }
  RowMatrix<double> kk(1, 8), cc = RowMatrix<double>::Constant(1, 32, 0.5);
  for (int i = 0; i < 8; ++i) kk(0, i) = k[static_cast<std::size_t>(i)];
  for (CacheStorage storage : {CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
    LatentCache cache(c, options(1, 4, 1, storage));
    const SequenceId s = cache.add_sequence();
    cache.append<double>(s, 0, cc, kk);
    const mla::LatentView v = cache.view(s, 0);
    const std::size_t offset = storage == CacheStorage::kBFloat16 ? 2 * 32 : 32 + 4;
    for (int i = 0; i < 8; ++i) {
      std::uint16_t got;
      std::memcpy(&got, v.record(0) + offset + 2 * static_cast<std::size_t>(i), 2);
      EXPECT_EQ(got, exact_bf16_bits(k[static_cast<std::size_t>(i)]))
          << to_string(storage) << " " << i;
      const auto twice = Eigen::numext::bit_cast<std::uint16_t>(
          Eigen::bfloat16(static_cast<float>(k[static_cast<std::size_t>(i)])));
      EXPECT_NE(got, twice) << "the input was meant to expose double rounding";
    }
  }
}

TEST(LatentCacheStorage, KernelsReadFp32InPlaceAndConvertOtherFormatsPerTile) {
  const MlaConfig c = MlaConfig::small_v3();
  const RowMatrix<float> x = test::random_input<float>(21, 40, 4);
  for (CacheStorage storage :
       {CacheStorage::kFloat32, CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
    LatentCache cache(c, options(1, 8, 3, storage));
    const SequenceId s = cache.add_sequence();
    cache.append<float>(s, 0, x.leftCols(32), x.rightCols(8));
    const mla::LatentView v = cache.view(s, 0);
    RowMatrix<float> c_buf(5, 32), k_buf(5, 8);
    std::vector<float> scratch(32);
    std::vector<Index> firsts;
    RowMatrix<double> seen(21, 40);
    v.for_each_tile<float>(
        5, c_buf, k_buf, scratch.data(), [&](Index first, Index n, auto ct, auto kt) {
          firsts.push_back(first);
          EXPECT_LE(n, 5);
          EXPECT_EQ(first / 8, (first + n - 1) / 8) << "a tile crosses a block";
          const bool in_place = ct.data() == reinterpret_cast<const float*>(v.record(first));
          EXPECT_EQ(in_place, storage == CacheStorage::kFloat32);
          seen.block(first, 0, n, 32) = ct.template cast<double>();
          seen.block(first, 32, n, 8) = kt.template cast<double>();
        });
    EXPECT_EQ(firsts, (std::vector<Index>{0, 5, 8, 13, 16}));
    EXPECT_EQ(seen, contents(cache, s, 0));  // the same values read() gives
  }
}

}  // namespace

TEST(LatentCache, SubviewsSeeTheirTokensOnly) {
  const MlaConfig c = MlaConfig::small_v2_lite();
  LatentCacheOptions o;
  o.block_tokens = 16;
  o.num_blocks = 16;
  LatentCache cache(c, o);
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  // Interleave two sequences so that their blocks alternate in the pool.
  RowMatrix<float> x = RowMatrix<float>::Random(100, c.latent_cache_width());
  for (Index t = 0; t < 100; t += 10) {
    cache.append<float>(a, 0, x.block(t, 0, 10, 32), x.block(t, 32, 10, 8));
    cache.append<float>(b, 0, -x.block(t, 0, 10, 32), -x.block(t, 32, 10, 8));
  }
  const mla::LatentView sub = cache.view(a, 0).subview(32, 50);
  EXPECT_EQ(sub.tokens(), 50);
  RowMatrix<float> cv(50, 32), kv(50, 8);
  sub.read<float>(0, 50, cv, kv);
  EXPECT_EQ(cv, x.block(32, 0, 50, 32));
  EXPECT_EQ(kv, x.block(32, 32, 50, 8));
  EXPECT_TRUE(test::throws_error_containing([&] { (void)cache.view(a, 0).subview(5, 10); },
                                            "must lie in [0, 100) and start a block of 16"));
  EXPECT_TRUE(test::throws_error_containing([&] { (void)cache.view(a, 0).subview(96, 5); },
                                            "tokens [96, 101)"));
}

TEST(LatentCache, ASelectionReadsTheChosenRecordsWhereTheyAre) {
  const MlaConfig c = MlaConfig::small_v2_lite();
  for (const CacheStorage s : {CacheStorage::kFloat32, CacheStorage::kBFloat16,
                               CacheStorage::kFp8E4M3, CacheStorage::kFloat64}) {
    SCOPED_TRACE(mla::to_string(s));
    LatentCache cache(c, options(1, 16, 16, s));
    const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
    RowMatrix<float> x = RowMatrix<float>::Random(60, c.latent_cache_width());
    for (Index t = 0; t < 60; t += 10) {  // interleaved: the blocks alternate
      cache.append<float>(a, 0, x.block(t, 0, 10, 32), x.block(t, 32, 10, 8));
      cache.append<float>(b, 0, -x.block(t, 0, 10, 32), -x.block(t, 32, 10, 8));
    }
    const mla::LatentView all = cache.view(a, 0);
    const std::vector<std::int32_t> pos = {17, 0, 59, 17, 33};
    const mla::LatentView sel = all.select(pos.data(), static_cast<Index>(pos.size()));
    ASSERT_EQ(sel.tokens(), 5);
    RowMatrix<double> got_c(5, 32), got_k(5, 8), want_c(1, 32), want_k(1, 8);
    sel.read<double>(0, 5, got_c, got_k);
    for (Index j = 0; j < 5; ++j) {
      EXPECT_EQ(sel.record(j), all.record(pos[static_cast<std::size_t>(j)]));  // no copy
      all.read<double>(pos[static_cast<std::size_t>(j)], 1, want_c, want_k);
      EXPECT_EQ(got_c.row(j), want_c.row(0));
      EXPECT_EQ(got_k.row(j), want_k.row(0));
    }
    // The tiles the reference kernels read go record by record too.
    mla::AttentionWorkspace<double> ws;
    ws.reserve(c, 1);
    Index seen = 0;
    sel.for_each_tile<double>(3, ws.c_tile, ws.kpe_tile, ws.convert_scratch.data(),
                              [&](Index first, Index n, const auto& ct, const auto& kt) {
                                for (Index i = 0; i < n; ++i) {
                                  EXPECT_EQ(ct.row(i), got_c.row(first + i));
                                  EXPECT_EQ(kt.row(i), got_k.row(first + i));
                                }
                                seen += n;
                              });
    EXPECT_EQ(seen, 5);
    const std::vector<std::int32_t> bad = {3, 60};
    EXPECT_TRUE(test::throws_error_containing([&] { (void)all.select(bad.data(), 2); },
                                              "position 60 (entry 1) is outside [0, 60)"));
    EXPECT_TRUE(test::throws_error_containing([&] { (void)sel.select(pos.data(), 1); },
                                              "the view is a selection"));
    EXPECT_TRUE(
        test::throws_error_containing([&] { (void)sel.subview(0, 1); }, "the view is a selection"));
  }
}

TEST(LatentCacheStorage, RecordSegmentsAreTheDocumentedBytes) {
  using mla::detail::Element;
  const auto layout = [](Index d, Index r, CacheStorage s) {
    return mla::LatentRecordFormat(d, r, s).layout();
  };
  // FlashMLA's FP8 record at DeepSeek widths: 4 tiles of 128 codes, their scales at 512 + 4 t,
  // then k^R in BF16 at 528.
  const mla::detail::RecordSegments fp8 =
      mla::detail::segments_of(layout(512, 64, CacheStorage::kFp8E4M3));
  ASSERT_EQ(fp8.count, 5);
  for (Index t = 0; t < 4; ++t) {
    const auto& s = fp8.at[t];
    EXPECT_EQ(s.first, 128 * t);
    EXPECT_EQ(s.count, 128);
    EXPECT_EQ(s.offset, static_cast<std::size_t>(128 * t));
    EXPECT_EQ(s.element, Element::kE4M3);
    EXPECT_EQ(s.scale_offset, static_cast<std::size_t>(512 + 4 * t));
    EXPECT_EQ(s.index, t);
  }
  EXPECT_EQ(fp8.at[4].first, 512);
  EXPECT_EQ(fp8.at[4].count, 64);
  EXPECT_EQ(fp8.at[4].offset, 528u);
  EXPECT_EQ(fp8.at[4].element, Element::kBFloat16);
  // A ragged last tile (d_c = 200: tiles of 128 and 72, scales at 200 and 204, k^R at 208).
  const mla::detail::RecordSegments ragged =
      mla::detail::segments_of(layout(200, 8, CacheStorage::kFp8E4M3));
  ASSERT_EQ(ragged.count, 3);
  EXPECT_EQ(ragged.at[1].count, 72);
  EXPECT_EQ(ragged.at[1].scale_offset, 204u);
  EXPECT_EQ(ragged.at[2].offset, 208u);
  // The others: the latent, then k^R, in one element.
  const std::pair<CacheStorage, Element> plain[] = {{CacheStorage::kFloat32, Element::kFloat32},
                                                    {CacheStorage::kBFloat16, Element::kBFloat16},
                                                    {CacheStorage::kFloat64, Element::kFloat64}};
  for (const auto& [storage, element] : plain) {
    const mla::detail::RecordSegments s = mla::detail::segments_of(layout(512, 64, storage));
    const std::size_t bytes = element == Element::kFloat64    ? 8
                              : element == Element::kBFloat16 ? 2
                                                              : 4;
    ASSERT_EQ(s.count, 2);
    EXPECT_EQ(s.at[0].count, 512);
    EXPECT_EQ(s.at[0].offset, 0u);
    EXPECT_EQ(s.at[1].first, 512);
    EXPECT_EQ(s.at[1].offset, 512 * bytes);
    EXPECT_EQ(s.at[0].element, element);
    EXPECT_EQ(s.at[1].element, element);
  }
  // No k^R: no segment for it.
  EXPECT_EQ(mla::detail::segments_of(layout(256, 0, CacheStorage::kBFloat16)).count, 1);
}
