// What an inference engine needs from the library: views over its own paged buffers, its own
// threads, mixed ragged batches, truncate / fork / shared prefixes, and one LatentCache used
// from several threads at once. Each result is compared with the same computation done the
// plain way (one sequence alone, a fresh cache, the built-in pool), bit for bit where the
// arithmetic is the same.

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "mla/mla.hpp"
#include "test_util.hpp"

namespace {

using mla::AttentionPath;
using mla::CacheStorage;
using mla::Index;
using mla::LatentCache;
using mla::LatentCacheOptions;
using mla::MlaConfig;
using mla::RowMatrix;
using mla::SequenceId;

LatentCacheOptions cache_options(Index blocks, Index block_tokens, CacheStorage s,
                                 Index layers = 1) {
  LatentCacheOptions o;
  o.num_layers = layers;
  o.block_tokens = block_tokens;
  o.num_blocks = blocks;
  o.storage = s;
  return o;
}

bool bit_equal(const RowMatrix<float>& a, const RowMatrix<float>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

/// The layer over a LatentCache, one chunk after another, for reference.
RowMatrix<float> run_alone(const mla::MlaLayer<float>& layer, const RowMatrix<float>& x,
                           const std::vector<Index>& chunks, CacheStorage storage,
                           mla::Executor* executor = nullptr) {
  LatentCache cache(layer.config(), cache_options(64, 16, storage));
  const SequenceId s = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  mla::RunOptions run;
  run.executor = executor;
  RowMatrix<float> y(x.rows(), x.cols());
  Index row = 0;
  for (Index n : chunks) {
    layer.forward(x.middleRows(row, n), row, cache, s, y.middleRows(row, n), ws, run);
    row += n;
  }
  return y;
}

// ------------------------------------------------------------------------------------------
// Views over an engine's buffer

TEST(EngineBuffer, RecordFormatsHaveTheDocumentedBytes) {
  const MlaConfig v3 = MlaConfig::deepseek_v3();
  const auto bytes = [&](CacheStorage s) {
    return mla::LatentRecordFormat(v3.kv_lora_rank, v3.qk_rope_head_dim, s).bytes();
  };
  EXPECT_EQ(bytes(CacheStorage::kBFloat16), 576u * 2u);  // vLLM's [.., block_size, 576] BF16
  EXPECT_EQ(bytes(CacheStorage::kFp8E4M3), 656u);        // FlashMLA's FP8 record
  EXPECT_EQ(bytes(CacheStorage::kFloat32), 576u * 4u);
  const mla::LatentRecordFormat fp8(512, 64, CacheStorage::kFp8E4M3);
  EXPECT_EQ(fp8.scales_offset(), 512u);
  EXPECT_EQ(fp8.rope_offset(), 528u);
}

TEST(EngineBuffer, APagedBufferWithPermutedBlocksGivesTheCachesResultsBitForBit) {
  // An engine keeps [num_blocks, block_size, record] itself and hands out blocks in its own
  // order; the layer writes and reads records through the block tables. The same tokens
  // through a LatentCache give the same bytes and the same outputs.
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 31));
  for (CacheStorage storage :
       {CacheStorage::kFloat32, CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
    SCOPED_TRACE(mla::to_string(storage));
    const Index bt = 8, blocks = 12;
    const mla::LatentRecordFormat format(c.kv_lora_rank, c.qk_rope_head_dim, storage);
    std::vector<float> memory(format.bytes() * bt * blocks / sizeof(float) + 1);
    mla::PagedLatentBuffer buf;
    buf.format = format;
    buf.data = memory.data();
    buf.num_blocks = blocks;
    buf.block_tokens = bt;
    // Two sequences with interleaved, scrambled block tables.
    std::vector<std::int32_t> table_a = {7, 2, 10, 4}, table_b = {0, 11, 5, 9};
    const RowMatrix<float> xa = test::random_input<float>(29, c.hidden_size, 3);
    const RowMatrix<float> xb = test::random_input<float>(27, c.hidden_size, 4);
    // Chunks: a prefill of 13 (expanded), then a mixed batch of decode tokens and a chunk.
    LatentCache cache(c, cache_options(16, bt, storage));
    const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
    mla::MlaWorkspace<float> ws_cache, ws_paged;
    RowMatrix<float> ya(29, c.hidden_size), yb(27, c.hidden_size);
    RowMatrix<float> pa(29, c.hidden_size), pb(27, c.hidden_size);
    layer.forward(xa.topRows(13), 0, cache, a, ya.topRows(13), ws_cache);
    layer.forward(xb.topRows(20), 0, cache, b, yb.topRows(20), ws_cache);
    layer.forward_paged(xa.topRows(13), buf, {{table_a.data(), 0, 0, 13}}, pa.topRows(13),
                        ws_paged);
    layer.forward_paged(xb.topRows(20), buf, {{table_b.data(), 0, 0, 20}}, pb.topRows(20),
                        ws_paged);
    Index la = 13, lb = 20;
    while (la < 29) {
      const Index na = std::min<Index>(la == 13 ? 9 : 1, 29 - la), nb = lb < 27 ? 1 : 0;
      RowMatrix<float> x(na + nb, c.hidden_size), y1(na + nb, c.hidden_size),
          y2(na + nb, c.hidden_size);
      x.topRows(na) = xa.middleRows(la, na);
      if (nb) x.bottomRows(nb) = xb.middleRows(lb, nb);
      std::vector<mla::BatchEntry> entries = {{a, la, na}};
      std::vector<mla::PagedEntry> paged = {{table_a.data(), la, la, na}};
      if (nb) {
        entries.push_back({b, lb, nb});
        paged.push_back({table_b.data(), lb, lb, nb});
      }
      layer.forward_batch(x, entries, cache, y1, ws_cache);
      layer.forward_paged(x, buf, paged, y2, ws_paged);
      ya.middleRows(la, na) = y1.topRows(na);
      pa.middleRows(la, na) = y2.topRows(na);
      if (nb) {
        yb.middleRows(lb, nb) = y1.bottomRows(nb);
        pb.middleRows(lb, nb) = y2.bottomRows(nb);
      }
      la += na;
      lb += nb;
    }
    EXPECT_TRUE(bit_equal(ya, pa));
    EXPECT_TRUE(bit_equal(yb, pb));
    // The records themselves are the same bytes.
    const auto table = cache.block_table(a);
    const mla::PagedLatentBuffer own = cache.buffer(0);
    for (Index t = 0; t < 29; ++t) {
      ASSERT_EQ(std::memcmp(own.record(table[static_cast<std::size_t>(t / bt)], t % bt),
                            buf.record(table_a[static_cast<std::size_t>(t / bt)], t % bt),
                            format.bytes()),
                0)
          << "token " << t;
    }
    // A view the engine builds reads what a view of the cache reads.
    const mla::LatentView engine_view(buf, table_b.data(), 27);
    EXPECT_EQ(test::cache_contents_of(engine_view), test::cache_contents(cache, b, 0));
  }
}

TEST(EngineBuffer, TheRecordCodecRoundTripsThroughAnEnginesBuffer) {
  // An engine may write records itself (its own cache-write kernel); the library reads them.
  const mla::LatentRecordFormat format(256, 64, CacheStorage::kFp8E4M3);
  const RowMatrix<float> x = test::random_input<float>(1, 320, 9);
  std::vector<unsigned char> rec(format.bytes());
  format.encode<float>(x.data(), x.data() + 256, rec.data());
  std::vector<float> c(256), k(64);
  format.decode<float>(rec.data(), c.data(), k.data());
  for (Index i = 0; i < 256; ++i) {
    // E4M3 keeps 3 mantissa bits: half an ulp is 1/16 relative, plus the tile scale's floor.
    EXPECT_NEAR(c[static_cast<std::size_t>(i)], x(0, i), std::abs(x(0, i)) / 16 + 1e-6);
  }
  for (Index i = 0; i < 64; ++i) {
    EXPECT_NEAR(k[static_cast<std::size_t>(i)], x(0, 256 + i), std::abs(x(0, 256 + i)) / 256);
  }
}

TEST(EngineBuffer, WrongLayoutsAreClearErrors) {
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 2));
  const mla::LatentRecordFormat format(c.kv_lora_rank, c.qk_rope_head_dim, CacheStorage::kFloat32);
  std::vector<float> memory(format.bytes() * 8 * 4 / sizeof(float) + 4);
  mla::PagedLatentBuffer buf;
  buf.format = format;
  buf.data = memory.data();
  buf.num_blocks = 4;
  buf.block_tokens = 8;
  std::vector<std::int32_t> table = {1, 4};
  // A table entry past the buffer's blocks.
  EXPECT_THROW(mla::LatentView(buf, table.data(), 9), mla::Error);
  EXPECT_NO_THROW(mla::LatentView(buf, table.data(), 8));
  // Misaligned data for FP32 records.
  mla::PagedLatentBuffer off = buf;
  off.data = reinterpret_cast<unsigned char*>(memory.data()) + 2;
  EXPECT_THROW(mla::LatentView(off, table.data(), 8), mla::Error);
  // A stride smaller than a block, null data.
  off = buf;
  off.block_stride = format.bytes();
  EXPECT_THROW(mla::LatentView(off, table.data(), 8), mla::Error);
  off = buf;
  off.data = nullptr;
  EXPECT_THROW(mla::LatentView(off, table.data(), 8), mla::Error);
  // Records of another width than the layer's: nothing is written.
  mla::PagedLatentBuffer other = buf;
  other.format =
      mla::LatentRecordFormat(c.kv_lora_rank + 8, c.qk_rope_head_dim, CacheStorage::kFloat32);
  const std::vector<float> before = memory;
  const RowMatrix<float> x = test::random_input<float>(2, c.hidden_size, 1);
  RowMatrix<float> y(2, c.hidden_size);
  mla::MlaWorkspace<float> ws;
  EXPECT_THROW(layer.forward_paged(x, other, {{table.data(), 0, 0, 2}}, y, ws), mla::Error);
  // Entries that do not cover x, and a table too short for the new tokens.
  EXPECT_THROW(layer.forward_paged(x, buf, {{table.data(), 0, 0, 1}}, y, ws), mla::Error);
  table[0] = 9;
  EXPECT_THROW(layer.forward_paged(x, buf, {{table.data(), 0, 0, 2}}, y, ws), mla::Error);
  table[0] = 1;
  // A PagedCache without its latent buffer, and index keys for a layer without an indexer.
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward(x, {{table.data(), 0, 0, 2}}, mla::PagedCache{}, y, ws);
      },
      "names no latent buffer"));
  const mla::IndexKeyFormat keys(128);
  std::vector<float> key_memory(keys.bytes_per_token() * 8 * 4 / sizeof(float) + 16);
  mla::PagedIndexBuffer index_buffer;
  index_buffer.format = keys;
  index_buffer.data = key_memory.data();
  index_buffer.num_blocks = 4;
  index_buffer.block_tokens = 8;
  EXPECT_TRUE(test::throws_error_containing(
      [&] {
        layer.forward(x, {{table.data(), 0, 0, 2}}, mla::PagedCache{&buf, &index_buffer}, y, ws);
      },
      "has no indexer of its own"));
  EXPECT_EQ(std::memcmp(before.data(), memory.data(), sizeof(float) * memory.size()), 0);
}

TEST(EngineRun, OneWorkspaceServesCallsWithDifferentRunOptions) {
  // The workspace holds memory only: calls with other threads, path and precisions in between
  // leave a call's result bit for bit what it is on a fresh workspace.
  const MlaConfig c = MlaConfig::small_v3();
  mla::MlaWeights<float> w = mla::MlaWeights<float>::random(c, 21);
  for (mla::Linear<float>* l : {&w.wq_a, &w.wq_b, &w.wkv_a, &w.wo}) {
    *l = mla::Linear<float>::bf16(l->to_dense());
  }
  const mla::MlaLayer<float> layer(c, std::move(w));
  const RowMatrix<float> x = test::random_input<float>(24, c.hidden_size, 22);
  mla::ThreadPool pool(2);
  std::vector<mla::RunOptions> options(4);
  options[1].executor = &pool;
  options[1].decode.precision = mla::Precision::kBf16;
  options[1].projection_precision = mla::Precision::kBf16;
  options[2].path = mla::AttentionPath::kAbsorbed;
  options[2].decode.splits = 3;
  options[2].decode.tile_tokens = 16;
  options[3].executor = &pool;
  options[3].path = mla::AttentionPath::kExpanded;
  // Prefill 16 tokens, then 8 single steps, with options[i] throughout.
  const auto run_with = [&](const mla::RunOptions& run, mla::MlaWorkspace<float>& ws,
                            LatentCache& cache, SequenceId s) {
    RowMatrix<float> y(24, c.hidden_size);
    layer.forward(x.topRows(16), 0, cache, s, y.topRows(16), ws, run);
    for (Index t = 16; t < 24; ++t) layer.forward(x.row(t), t, cache, s, y.row(t), ws, run);
    return y;
  };
  std::vector<RowMatrix<float>> fresh;
  for (const mla::RunOptions& run : options) {
    LatentCache cache(c, cache_options(16, 16, CacheStorage::kBFloat16));
    mla::MlaWorkspace<float> ws;
    fresh.push_back(run_with(run, ws, cache, cache.add_sequence()));
  }
  // The options differ in their results (else the test could not tell them apart).
  EXPECT_FALSE(bit_equal(fresh[0], fresh[1]));
  mla::MlaWorkspace<float> shared;
  for (int round = 0; round < 2; ++round) {
    for (std::size_t i = options.size(); i-- > 0;) {
      SCOPED_TRACE("options " + std::to_string(i) + ", round " + std::to_string(round));
      LatentCache cache(c, cache_options(16, 16, CacheStorage::kBFloat16));
      EXPECT_TRUE(bit_equal(run_with(options[i], shared, cache, cache.add_sequence()), fresh[i]));
    }
  }
}

// ------------------------------------------------------------------------------------------
// Mixed ragged batches

TEST(MixedBatch, PrefillChunksAndDecodeTokensTogetherEqualEachSequenceAlone) {
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 5));
  mla::ThreadPool pool(2);
  for (CacheStorage storage : {CacheStorage::kFloat32, CacheStorage::kFp8E4M3}) {
    for (mla::Executor* ex :
         {static_cast<mla::Executor*>(nullptr), static_cast<mla::Executor*>(&pool)}) {
      SCOPED_TRACE(std::string(mla::to_string(storage)) + (ex ? " pool" : " serial"));
      // Three sequences: A prefills in chunks of 7 then decodes, B decodes from the start, C
      // joins late with a prompt of 20 in one chunk (expanded path).
      const RowMatrix<float> xa = test::random_input<float>(24, c.hidden_size, 11);
      const RowMatrix<float> xb = test::random_input<float>(12, c.hidden_size, 12);
      const RowMatrix<float> xc = test::random_input<float>(25, c.hidden_size, 13);
      LatentCache cache(c, cache_options(64, 16, storage));
      const SequenceId a = cache.add_sequence(), b = cache.add_sequence(),
                       cc = cache.add_sequence();
      mla::MlaWorkspace<float> ws;
      mla::RunOptions run;
      run.executor = ex;
      RowMatrix<float> ya(24, c.hidden_size), yb(12, c.hidden_size), yc(25, c.hidden_size);
      std::vector<Index> chunks_a, chunks_b, chunks_c;
      Index la = 0, lb = 0, lc = 0;
      for (int step = 0; la < 24 || lb < 12 || lc < 25; ++step) {
        std::vector<mla::BatchEntry> entries;
        std::vector<std::pair<const RowMatrix<float>*, RowMatrix<float>*>> io;
        auto add = [&](SequenceId s, Index& len, Index total, Index n, const RowMatrix<float>& x,
                       RowMatrix<float>& y, std::vector<Index>& log) {
          n = std::min(n, total - len);
          if (n <= 0) return;
          entries.push_back({s, len, n});
          io.push_back({&x, &y});
          log.push_back(n);
          len += n;
        };
        add(a, la, 24, la < 14 ? 7 : 1, xa, ya, chunks_a);
        if (step % 2 == 0) add(b, lb, 12, 1, xb, yb, chunks_b);
        if (step >= 2) add(cc, lc, 25, lc == 0 ? 20 : 1, xc, yc, chunks_c);
        Index rows = 0;
        for (const auto& e : entries) rows += e.tokens;
        RowMatrix<float> x(rows, c.hidden_size), y(rows, c.hidden_size);
        Index r = 0;
        for (std::size_t i = 0; i < entries.size(); ++i) {
          x.middleRows(r, entries[i].tokens) =
              io[i].first->middleRows(entries[i].start_pos, entries[i].tokens);
          r += entries[i].tokens;
        }
        layer.forward(x, entries, cache, y, ws, run);
        r = 0;
        for (std::size_t i = 0; i < entries.size(); ++i) {
          io[i].second->middleRows(entries[i].start_pos, entries[i].tokens) =
              y.middleRows(r, entries[i].tokens);
          r += entries[i].tokens;
        }
      }
      // Each alone, with the same chunks: the same paths and kernels; only the projections'
      // row blocking differs with the batch's height (FP32 rounding).
      for (auto [got, x, chunks] :
           {std::tuple(&ya, &xa, &chunks_a), std::tuple(&yb, &xb, &chunks_b),
            std::tuple(&yc, &xc, &chunks_c)}) {
        EXPECT_LT(test::rel_error(test::to_vec(*got),
                                  test::to_vec(run_alone(layer, *x, *chunks, storage, ex))),
                  2e-6);
      }
    }
  }
}

TEST(MixedBatch, AFailingEntryLeavesEveryCacheAsItWas) {
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 5));
  LatentCache cache(c, cache_options(3, 8, CacheStorage::kFloat32));
  const SequenceId a = cache.add_sequence(), b = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  const RowMatrix<float> x = test::random_input<float>(20, c.hidden_size, 1);
  RowMatrix<float> y(20, c.hidden_size);
  layer.forward(x.topRows(5), 0, cache, a, y.topRows(5), ws);
  layer.forward(x.topRows(3), 0, cache, b, y.topRows(3), ws);  // a and b: one block each
  const LatentCache before = cache.clone();
  // a's token fits its block; b's 14 need two more blocks and only one is free.
  EXPECT_THROW(
      layer.forward_batch(x.topRows(15), {{a, 5, 1}, {b, 3, 14}}, cache, y.topRows(15), ws),
      mla::Error);
  // A wrong position in the second entry; rows that do not match the entries; zero tokens; a
  // sequence twice; an unknown sequence.
  EXPECT_THROW(layer.forward_batch(x.topRows(3), {{a, 5, 1}, {b, 4, 2}}, cache, y.topRows(3), ws),
               mla::Error);
  EXPECT_THROW(layer.forward_batch(x.topRows(4), {{a, 5, 1}, {b, 3, 2}}, cache, y.topRows(4), ws),
               mla::Error);
  EXPECT_THROW(layer.forward_batch(x.topRows(1), {{a, 5, 1}, {b, 3, 0}}, cache, y.topRows(1), ws),
               mla::Error);
  EXPECT_THROW(layer.forward_batch(x.topRows(2), {{a, 5, 1}, {a, 6, 1}}, cache, y.topRows(2), ws),
               mla::Error);
  EXPECT_THROW(
      layer.forward_batch(x.topRows(2), {{a, 5, 1}, {b + 7, 0, 1}}, cache, y.topRows(2), ws),
      mla::Error);
  EXPECT_EQ(cache.free_blocks(), before.free_blocks());
  EXPECT_EQ(cache.length(a, 0), 5);
  EXPECT_EQ(cache.length(b, 0), 3);
  EXPECT_EQ(test::cache_contents(cache, a, 0), test::cache_contents(before, a, 0));
  EXPECT_EQ(test::cache_contents(cache, b, 0), test::cache_contents(before, b, 0));
}

// ------------------------------------------------------------------------------------------
// Truncate, fork, shared prefixes

TEST(SequenceOps, TruncateThenRedecodeEqualsNeverHavingDecodedTheDroppedTokens) {
  // Speculative decoding: 6 draft tokens are decoded, 4 rejected, 3 others decoded instead.
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 8));
  for (CacheStorage storage : {CacheStorage::kFloat32, CacheStorage::kBFloat16}) {
    SCOPED_TRACE(mla::to_string(storage));
    const RowMatrix<float> prompt = test::random_input<float>(14, c.hidden_size, 2);
    const RowMatrix<float> drafts = test::random_input<float>(6, c.hidden_size, 3);
    const RowMatrix<float> others = test::random_input<float>(3, c.hidden_size, 4);
    LatentCache cache(c, cache_options(8, 4, storage, 2));
    const mla::MlaLayer<float> layer1(c, mla::MlaWeights<float>::random(c, 8), 1);
    const SequenceId s = cache.add_sequence();
    mla::MlaWorkspace<float> ws;
    RowMatrix<float> y(14, c.hidden_size), yd(6, c.hidden_size);
    for (const auto* l : {&layer, &layer1}) l->forward(prompt, 0, cache, s, y, ws);
    for (const auto* l : {&layer, &layer1}) l->forward(drafts, 14, cache, s, yd, ws);
    EXPECT_EQ(cache.blocks_in_use(), 5);
    const RowMatrix<double> before0 = test::cache_contents(cache, s, 0);
    const RowMatrix<double> before1 = test::cache_contents(cache, s, 1);
    cache.truncate(s, 16);  // keep 2 drafts
    EXPECT_EQ(cache.length(s, 0), 16);
    EXPECT_EQ(cache.length(s, 1), 16);
    EXPECT_EQ(cache.blocks_in_use(), 4);  // the fifth block went back
    EXPECT_EQ(cache.next_position(s, 0), 16);
    EXPECT_EQ(test::cache_contents(cache, s, 0), before0.topRows(16));
    EXPECT_EQ(test::cache_contents(cache, s, 1), before1.topRows(16));
    RowMatrix<float> got(3, c.hidden_size), want(3, c.hidden_size);
    for (Index t = 0; t < 3; ++t) {
      for (const auto* l : {&layer, &layer1}) {
        l->forward(others.row(t), 16 + t, cache, s, got.row(t), ws);
      }
    }
    // Reference: a fresh cache that never saw the rejected drafts, holding the same 16
    // records (read back exactly, written again unchanged).
    LatentCache fresh(c, cache_options(8, 4, storage, 2));
    const SequenceId f = fresh.add_sequence();
    for (Index l = 0; l < 2; ++l) {
      const RowMatrix<float> kept = (l == 0 ? before0 : before1).topRows(16).cast<float>();
      fresh.append<float>(f, l, kept.leftCols(c.kv_lora_rank), kept.rightCols(c.qk_rope_head_dim),
                          0);
    }
    for (Index t = 0; t < 3; ++t) {
      for (const auto* l : {&layer, &layer1}) {
        l->forward(others.row(t), 16 + t, fresh, f, want.row(t), ws);
      }
    }
    EXPECT_TRUE(bit_equal(got, want));
    EXPECT_EQ(test::cache_contents(cache, s, 1), test::cache_contents(fresh, f, 1));
    // Truncating to 0 gives an empty sequence that may start anywhere.
    cache.truncate(s, 0);
    EXPECT_EQ(cache.blocks_in_use(), 0);
    EXPECT_EQ(cache.next_position(s, 0), -1);
    EXPECT_EQ(cache.bytes_of_tokens(), 0u);
  }
}

TEST(SequenceOps, ForkedChildrenEqualIndependentCopiesAndLeaveTheParentUnchanged) {
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 9));
  const Index bt = 4;
  LatentCache cache(c, cache_options(32, bt, CacheStorage::kFloat32));
  const RowMatrix<float> prompt = test::random_input<float>(10, c.hidden_size, 5);  // 2.5 blocks
  const SequenceId parent = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  RowMatrix<float> y(10, c.hidden_size);
  layer.forward(prompt, 0, cache, parent, y, ws);
  const RowMatrix<double> parent_before = test::cache_contents(cache, parent, 0);
  const auto parent_table = cache.block_table(parent);
  // Parallel sampling: three children continue differently.
  std::vector<SequenceId> kids;
  for (int i = 0; i < 3; ++i) kids.push_back(cache.fork(parent));
  // Full blocks shared (2 per child), the partly filled third copied: 3 + 3 blocks.
  EXPECT_EQ(cache.blocks_in_use(), 6);
  EXPECT_EQ(cache.shared_blocks(), 2);
  // Unique tokens: the parent's 10 (8 of them shared) and each child's own 2.
  EXPECT_EQ(cache.bytes_of_tokens(), (10u + 3u * 2u) * cache.bytes_per_token_per_layer());
  for (std::size_t i = 0; i < kids.size(); ++i) {
    const RowMatrix<float> cont = test::random_input<float>(7, c.hidden_size, 40 + unsigned(i));
    RowMatrix<float> got(7, c.hidden_size), want(7, c.hidden_size);
    for (Index t = 0; t < 7; ++t)
      layer.forward(cont.row(t), 10 + t, cache, kids[i], got.row(t), ws);
    // The independent copy: the prompt then the same continuation in a cache of its own.
    LatentCache alone(c, cache_options(32, bt, CacheStorage::kFloat32));
    const SequenceId s = alone.add_sequence();
    layer.forward(prompt, 0, alone, s, y, ws);
    for (Index t = 0; t < 7; ++t) layer.forward(cont.row(t), 10 + t, alone, s, want.row(t), ws);
    EXPECT_TRUE(bit_equal(got, want)) << "child " << i;
    EXPECT_EQ(test::cache_contents(cache, kids[i], 0), test::cache_contents(alone, s, 0));
  }
  EXPECT_EQ(test::cache_contents(cache, parent, 0), parent_before);
  EXPECT_EQ(cache.block_table(parent), parent_table);
  // A child truncated into the shared prefix copies the shared block before writing it.
  cache.truncate(kids[0], 6);
  EXPECT_EQ(cache.block_table(kids[0])[1], parent_table[1]);  // still shared
  const RowMatrix<float> alt = test::random_input<float>(1, c.hidden_size, 77);
  RowMatrix<float> y1(1, c.hidden_size);
  layer.forward(alt, 6, cache, kids[0], y1, ws);
  EXPECT_NE(cache.block_table(kids[0])[1], parent_table[1]);  // copied on write
  EXPECT_EQ(test::cache_contents(cache, parent, 0), parent_before);
  // Removing the parent keeps the children's shared blocks alive.
  cache.remove_sequence(parent);
  for (SequenceId k : kids) EXPECT_GE(cache.length(k, 0), 7);
  for (SequenceId k : kids) cache.remove_sequence(k);
  EXPECT_EQ(cache.blocks_in_use(), 0);
  EXPECT_EQ(cache.free_blocks(), 32);
}

TEST(SequenceOps, ASharedPrefixIsStoredOnceAndAccountedExactly) {
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 10));
  const Index bt = 8, layers = 2;
  LatentCache cache(c, cache_options(64, bt, CacheStorage::kBFloat16, layers));
  const mla::MlaLayer<float> layer1(c, mla::MlaWeights<float>::random(c, 11), 1);
  // A system prompt of 32 tokens (4 full blocks) prefilled once.
  const RowMatrix<float> system = test::random_input<float>(32, c.hidden_size, 6);
  const SequenceId root = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  RowMatrix<float> y(32, c.hidden_size);
  for (const auto* l : {&layer, &layer1}) l->forward(system, 0, cache, root, y, ws);
  // Ten requests share it; each adds 5 tokens of its own.
  std::vector<SequenceId> reqs;
  for (int i = 0; i < 10; ++i) {
    reqs.push_back(cache.fork(root, 32));
    const RowMatrix<float> q = test::random_input<float>(5, c.hidden_size, 100 + unsigned(i));
    RowMatrix<float> yq(5, c.hidden_size);
    for (const auto* l : {&layer, &layer1}) l->forward(q, 32, cache, reqs.back(), yq, ws);
  }
  const std::size_t record = cache.bytes_per_token_per_layer();
  // 4 shared blocks + one block of their own per request.
  EXPECT_EQ(cache.blocks_in_use(), 4 + 10);
  EXPECT_EQ(cache.shared_blocks(), 4);
  EXPECT_EQ(cache.bytes_in_use(), (4u + 10u) * bt * record * layers);
  EXPECT_EQ(cache.bytes_of_tokens(), (32u + 10u * 5u) * record * layers);
  // A fork of a prefix that ends inside a block copies that block.
  const SequenceId partial = cache.fork(root, 20);
  EXPECT_EQ(cache.length(partial, 0), 20);
  EXPECT_EQ(cache.blocks_in_use(), 4 + 10 + 1);
  EXPECT_EQ(test::cache_contents(cache, partial, 1),
            test::cache_contents(cache, root, 1).topRows(20));
  // Removing the root and all requests frees exactly what they held.
  cache.remove_sequence(root);
  EXPECT_EQ(cache.blocks_in_use(), 4 + 10 + 1);  // still held by the requests
  for (SequenceId r : reqs) cache.remove_sequence(r);
  EXPECT_EQ(cache.blocks_in_use(), 3);  // the partial fork: 2 formerly shared, 1 copied
  cache.remove_sequence(partial);
  EXPECT_EQ(cache.bytes_in_use(), 0u);
}

TEST(SequenceOps, MisuseIsAClearErrorThatChangesNothing) {
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 12));
  LatentCache cache(c, cache_options(3, 4, CacheStorage::kFloat32));
  const SequenceId s = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  const RowMatrix<float> x = test::random_input<float>(10, c.hidden_size, 7);
  RowMatrix<float> y(10, c.hidden_size);
  layer.forward(x.topRows(10), 0, cache, s, y.topRows(10), ws);  // 3 blocks: the pool is full
  const LatentCache before = cache.clone();
  EXPECT_THROW(cache.truncate(s, 11), mla::Error);
  EXPECT_THROW(cache.truncate(s, -1), mla::Error);
  EXPECT_THROW(cache.truncate(s + 100, 1), mla::Error);
  EXPECT_THROW(cache.fork(s + 100), mla::Error);
  EXPECT_THROW(cache.fork(s, -2), mla::Error);
  // The partly filled last block needs a copy, and no block is free.
  EXPECT_THROW(cache.fork(s), mla::Error);
  EXPECT_EQ(cache.num_sequences(), 1);
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_EQ(cache.length(s, 0), 10);
  EXPECT_EQ(test::cache_contents(cache, s, 0), test::cache_contents(before, s, 0));
  // A prefix of full blocks needs no copy: that fork succeeds on a full pool; the child's
  // first write into... it has whole blocks only, so its next token needs a new block.
  const SequenceId k = cache.fork(s, 8);
  EXPECT_EQ(cache.shared_blocks(), 2);
  RowMatrix<float> y1(1, c.hidden_size);
  EXPECT_THROW(layer.forward(x.row(8), 8, cache, k, y1, ws), mla::Error);  // pool full
  EXPECT_EQ(cache.length(k, 0), 8);
  EXPECT_EQ(cache.shared_blocks(), 2);
}

// ------------------------------------------------------------------------------------------
// The engine's threads

/// An executor over plain std::threads, started per call: what a user writes in a few lines.
class SpawningExecutor final : public mla::Executor {
 public:
  explicit SpawningExecutor(int threads) : threads_(threads) {}
  int concurrency() const override { return threads_; }
  void parallel_for(Index n, mla::TaskRef task) override {
    std::atomic<Index> next{0};
    std::vector<std::thread> workers;
    for (int w = 0; w < threads_; ++w) {
      workers.emplace_back([&, w] {
        for (Index i; (i = next.fetch_add(1)) < n;) task(i, w);
      });
    }
    for (std::thread& t : workers) t.join();
    calls_.fetch_add(1);
  }
  int calls() const { return calls_.load(); }

 private:
  int threads_;
  std::atomic<int> calls_{0};
};

TEST(EngineThreads, AUserExecutorGivesTheBuiltInPoolsResults) {
  const MlaConfig c = MlaConfig::small_v3();
  for (mla::Precision precision : {mla::Precision::kFp32, mla::Precision::kBf16}) {
    // BF16 weights so that the projections take the library's own kernels.
    mla::MlaWeights<float> w = mla::MlaWeights<float>::random(c, 13);
    for (mla::Linear<float>* l : {&w.wq, &w.wq_a, &w.wq_b, &w.wkv_a, &w.wkv_b, &w.wo}) {
      if (!l->empty()) *l = mla::Linear<float>::bf16(l->to_dense());
    }
    const mla::MlaLayer<float> layer(c, std::move(w));
    const RowMatrix<float> x = test::random_input<float>(40, c.hidden_size, 8);
    const auto run_on = [&](mla::Executor* ex) {
      LatentCache cache(c, cache_options(16, 16, CacheStorage::kBFloat16));
      const SequenceId s = cache.add_sequence();
      mla::MlaWorkspace<float> ws;
      mla::RunOptions run;
      run.executor = ex;
      run.decode.precision = precision;
      run.decode.splits = 3;
      run.projection_precision = precision;
      RowMatrix<float> y(40, c.hidden_size);
      layer.forward(x.topRows(32), 0, cache, s, y.topRows(32), ws, run);
      for (Index t = 32; t < 40; ++t) layer.forward(x.row(t), t, cache, s, y.row(t), ws, run);
      return y;
    };
    mla::ThreadPool pool(3);
    SpawningExecutor mine(3);
    const RowMatrix<float> with_pool = run_on(&pool), with_mine = run_on(&mine);
    EXPECT_GT(mine.calls(), 0);
    // Work is divided by the executor's concurrency, not by who runs it: the same bits.
    EXPECT_TRUE(bit_equal(with_pool, with_mine));
    // And within the bound of the serial run (partial sums merge in another order).
    const RowMatrix<float> serial = run_on(nullptr);
    EXPECT_LT(test::rel_error(test::to_vec(with_mine), test::to_vec(serial)), 1e-5);
  }
}

TEST(EngineThreads, DistinctSequencesOfOneCacheRunFromSeveralThreadsAtOnce) {
  // Four engine threads, each owning sequences of one shared cache: prefill, decode, fork,
  // truncate and remove at the same time. Each thread's outputs equal the same work done
  // alone. (Run under ThreadSanitizer by the tsan preset.)
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 14));
  constexpr int kThreads = 4;
  LatentCache shared(c, cache_options(kThreads * 24, 4, CacheStorage::kBFloat16));
  const auto work = [&](LatentCache& cache, int who, RowMatrix<float>& out) {
    const RowMatrix<float> x = test::random_input<float>(30, c.hidden_size, 200 + unsigned(who));
    mla::MlaWorkspace<float> ws;
    out.resize(30, c.hidden_size);
    for (int round = 0; round < 4; ++round) {
      const SequenceId s = cache.add_sequence();
      layer.forward(x.topRows(10), 0, cache, s, out.topRows(10), ws);
      const SequenceId k = cache.fork(s);
      for (Index t = 10; t < 20; ++t) layer.forward(x.row(t), t, cache, s, out.row(t), ws);
      cache.truncate(s, 15);
      for (Index t = 15; t < 20; ++t) layer.forward(x.row(t), t, cache, s, out.row(t), ws);
      // The child continues with other tokens, batched with the parent.
      RowMatrix<float> xb(2, c.hidden_size), yb(2, c.hidden_size);
      for (Index j = 0; j < 5; ++j) {
        xb.row(0) = x.row(20 + j);
        xb.row(1) = x.row(25 + j);
        layer.forward_batch(xb, {{s, 20 + j, 1}, {k, 10 + j, 1}}, cache, yb, ws);
        out.row(20 + j) = yb.row(0);
        out.row(25 + j) = yb.row(1);
      }
      (void)cache.bytes_of_tokens();
      cache.remove_sequence(k);
      cache.remove_sequence(s);
    }
  };
  std::vector<RowMatrix<float>> got(kThreads), want(kThreads);
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&, i] { work(shared, i, got[static_cast<std::size_t>(i)]); });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(shared.blocks_in_use(), 0);
  EXPECT_EQ(shared.num_sequences(), 0);
  for (int i = 0; i < kThreads; ++i) {
    LatentCache alone(c, cache_options(24, 4, CacheStorage::kBFloat16));
    work(alone, i, want[static_cast<std::size_t>(i)]);
    EXPECT_TRUE(bit_equal(got[static_cast<std::size_t>(i)], want[static_cast<std::size_t>(i)]))
        << "thread " << i;
  }
}

TEST(EngineThreads, ThreadPoolCallsFromSeveralThreadsAreSerialisedAndNestedCallsRunInline) {
  mla::ThreadPool pool(2);
  std::atomic<long> sum{0};
  std::vector<std::thread> callers;
  for (int i = 0; i < 3; ++i) {
    callers.emplace_back([&] {
      for (int r = 0; r < 50; ++r) {
        mla::parallel_for(&pool, 10, [&](Index j, int w) {
          EXPECT_GE(w, 0);
          EXPECT_LT(w, 2);
          // A nested loop on the same pool runs on the calling worker.
          mla::parallel_for(&pool, 3, [&](Index k, int) { sum.fetch_add(j * 3 + k); });
        });
      }
    });
  }
  for (std::thread& t : callers) t.join();
  EXPECT_EQ(sum.load(), 3L * 50L * (29L * 30L / 2L));
}

}  // namespace
