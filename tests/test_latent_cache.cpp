// LatentCache: write then read, paging across blocks, sequences and layers kept apart, atomic
// appends, block reuse, byte accounting, errors.

#include <gtest/gtest.h>

#include <map>
#include <vector>

#include "mla/latent_cache.hpp"
#include "test_util.hpp"

namespace {

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

/// Everything (id, layer) holds, read back as double [tokens, d_c + R].
RowMatrix<double> contents(const LatentCache& cache, SequenceId id, Index layer) {
  const mla::LatentView v = cache.view(id, layer);
  RowMatrix<double> c(v.tokens(), v.kv_lora_rank()), k(v.tokens(), v.rope_dim());
  v.read<double>(0, v.tokens(), c, k);
  RowMatrix<double> both(v.tokens(), v.kv_lora_rank() + v.rope_dim());
  both << c, k;
  return both;
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
      [&] { LatentCache(c, options(1 << 20, 1 << 20, 1 << 30, CacheStorage::kFloat64)); },
      "too large"));

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
