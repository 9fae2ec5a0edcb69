// mla::mpi, run by ctest under `mpirun -np 2` and `-np 3`: the context- and head-parallel
// layers against the single-process layer (which every rank also runs), the log-sum-exp merge
// against a softmax in double, and wrong use failing on every rank instead of hanging.

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "mla/mla.hpp"
#include "mla/mpi.hpp"
#include "test_util.hpp"

namespace {

using mla::Index;
using mla::MlaConfig;
using mla::RowMatrix;

mla::LatentCacheOptions options(Index block_tokens, mla::CacheStorage storage) {
  mla::LatentCacheOptions o;
  o.block_tokens = block_tokens;
  o.num_blocks = 64;
  o.storage = storage;
  return o;
}

/// The single-process layer on the same rows: prefill `prompt` rows, then one row at a time.
RowMatrix<float> single_process(const mla::MlaLayer<float>& layer, const RowMatrix<float>& x,
                                Index prompt, mla::CacheStorage storage) {
  mla::LatentCache cache(layer.config(), options(16, storage));
  const auto s = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  RowMatrix<float> y(x.rows(), x.cols());
  layer.forward(x.topRows(prompt), 0, cache, s, y.topRows(prompt), ws);
  for (Index t = prompt; t < x.rows(); ++t) layer.forward(x.row(t), t, cache, s, y.row(t), ws);
  return y;
}

TEST(LseMerge, MergingPartsEqualsOneSoftmaxOverAllKeysInDouble) {
  // Keys split into parts of different sizes (one empty); each part's softmax-weighted sum and
  // log-sum-exp, merged in turn, against the softmax over all keys in double.
  const Index D = 7, keys = 40;
  std::mt19937 rng(3);
  std::normal_distribution<double> n(0.0, 3.0);
  std::vector<double> score(keys), value(keys * D);
  for (auto& v : score) v = n(rng);
  for (auto& v : value) v = n(rng);
  double m = -1e300, z = 0;
  for (double s : score) m = std::max(m, s);
  for (double s : score) z += std::exp(s - m);
  std::vector<double> want(D, 0.0);
  for (Index j = 0; j < keys; ++j) {
    for (Index k = 0; k < D; ++k) want[k] += std::exp(score[j] - m) / z * value[j * D + k];
  }
  const double want_lse = m + std::log(z);
  const auto part = [&](Index first, Index count) {
    std::vector<float> p(D + 1, 0.0f);
    if (count == 0) {
      p[0] = -std::numeric_limits<float>::infinity();
      return p;
    }
    double pm = -1e300, pz = 0;
    for (Index j = first; j < first + count; ++j) pm = std::max(pm, score[j]);
    for (Index j = first; j < first + count; ++j) pz += std::exp(score[j] - pm);
    for (Index j = first; j < first + count; ++j) {
      for (Index k = 0; k < D; ++k) {
        p[1 + k] += static_cast<float>(std::exp(score[j] - pm) / pz * value[j * D + k]);
      }
    }
    p[0] = static_cast<float>(pm + std::log(pz));
    return p;
  };
  std::vector<float> acc = part(0, 0);  // start from an empty part
  for (auto [first, count] : {std::pair<Index, Index>{0, 13}, {13, 0}, {13, 1}, {14, 26}}) {
    const std::vector<float> p = part(first, count);
    mla::mpi::merge_partials(p.data(), acc.data(), 1, D);
  }
  EXPECT_NEAR(acc[0], want_lse, 1e-5 * std::abs(want_lse) + 1e-6);
  for (Index k = 0; k < D; ++k) EXPECT_NEAR(acc[1 + k], want[k], 1e-5 * 10);
}

struct Case {
  const char* preset;
  Index prompt, steps, block;
};

/// "families": every attention option of the other MLA families at once (NoPE, output gate,
/// Llama-4 query scaling, scaled latents); "v32": DeepSeek-V3.2's sparse attention.
MlaConfig preset(const char* name) {
  const std::string n = name;
  if (n == "v32") return MlaConfig::small_v32();
  if (n == "families") {
    MlaConfig c = MlaConfig::small_v3();
    c.mla_use_nope = c.mla_use_output_gate = true;
    c.llama_4_scaling = {0.1, 8};
    c.q_lora_scale = 2.0;
    c.kv_lora_scale = 1.5;
    return c;
  }
  return n == "v3" ? MlaConfig::small_v3() : MlaConfig::small_v2_lite();
}

TEST(ContextParallel, EqualsTheSingleProcessLayer) {
  const int ranks = mla::mpi::size(MPI_COMM_WORLD);
  // Contexts not divisible by the rank count, and prompts shorter than one block per rank
  // (some ranks hold nothing for a while).
  for (Case k : {Case{"v3", 37, 6, 4}, Case{"v2lite", 21, 5, 8}, Case{"v3", 2, 9, 4},
                 Case{"v3", 1, 4, 16}, Case{"families", 23, 6, 4}}) {
    for (mla::CacheStorage storage : {mla::CacheStorage::kFloat32, mla::CacheStorage::kBFloat16}) {
      SCOPED_TRACE(std::string(k.preset) + " prompt " + std::to_string(k.prompt) + " " +
                   mla::to_string(storage));
      const MlaConfig c = preset(k.preset);
      const auto w = mla::MlaWeights<float>::random(c, 21);
      const RowMatrix<float> x = test::random_input<float>(k.prompt + k.steps, c.hidden_size, 5);
      mla::mpi::ContextParallelLayer layer(MPI_COMM_WORLD, c, w, options(k.block, storage));
      const auto s = layer.add_sequence();
      mla::MlaWorkspace<float> ws;
      RowMatrix<float> y(x.rows(), c.hidden_size);
      layer.forward(x.topRows(k.prompt), 0, s, y.topRows(k.prompt), ws);
      for (Index t = k.prompt; t < x.rows(); ++t) layer.forward(x.row(t), t, s, y.row(t), ws);
      // The shard sizes: block b on rank b mod N.
      Index expect = 0;
      for (Index t = 0; t < x.rows(); ++t) {
        expect += (t / k.block) % ranks == mla::mpi::rank(MPI_COMM_WORLD) ? 1 : 0;
      }
      EXPECT_EQ(layer.local_length(s), expect);
      EXPECT_EQ(layer.length(s), x.rows());
      const RowMatrix<float> want =
          single_process(mla::MlaLayer<float>(c, w), x, k.prompt, storage);
      EXPECT_LT(test::rel_error(test::to_vec(y), test::to_vec(want)), 1e-5);
      if (storage == mla::CacheStorage::kFloat32) {
        const std::vector<double> exact = ref::mla_forward(
            test::to_ref(c), test::to_ref(w), test::to_vec(x), static_cast<int>(x.rows()), 0);
        EXPECT_LT(test::rel_error(test::to_vec(y), exact), 1e-5) << "vs the double reference";
      }
    }
  }
}

TEST(HeadParallel, EqualsTheSingleProcessLayer) {
  // The gate's rows go with the heads; V3.2's indexer runs whole on every rank.
  for (Case k : {Case{"v3", 19, 5, 16}, Case{"v2lite", 33, 4, 16}, Case{"families", 21, 5, 16},
                 Case{"v32", 15, 6, 16}}) {
    SCOPED_TRACE(k.preset);
    const MlaConfig c = preset(k.preset);
    const auto w = mla::MlaWeights<float>::random(c, 22);
    const RowMatrix<float> x = test::random_input<float>(k.prompt + k.steps, c.hidden_size, 6);
    mla::mpi::HeadParallelLayer layer(MPI_COMM_WORLD, c, w,
                                      options(16, mla::CacheStorage::kFloat32));
    const auto [h0, count] = mla::mpi::head_range(
        c.num_attention_heads, mla::mpi::rank(MPI_COMM_WORLD), mla::mpi::size(MPI_COMM_WORLD));
    EXPECT_EQ(layer.first_head(), h0);
    EXPECT_EQ(layer.local_layer().config().num_attention_heads, count);
    const auto s = layer.add_sequence();
    mla::MlaWorkspace<float> ws;
    RowMatrix<float> y(x.rows(), c.hidden_size);
    layer.forward(x.topRows(k.prompt), 0, s, y.topRows(k.prompt), ws);
    for (Index t = k.prompt; t < x.rows(); ++t) layer.forward(x.row(t), t, s, y.row(t), ws);
    const RowMatrix<float> want =
        single_process(mla::MlaLayer<float>(c, w), x, k.prompt, mla::CacheStorage::kFloat32);
    EXPECT_LT(test::rel_error(test::to_vec(y), test::to_vec(want)), 1e-5);
  }
}

TEST(MpiMisuse, FailsOnEveryRankInsteadOfHanging) {
  const int me = mla::mpi::rank(MPI_COMM_WORLD), ranks = mla::mpi::size(MPI_COMM_WORLD);
  MlaConfig c = MlaConfig::small_v3();
  const auto w = mla::MlaWeights<float>::random(c, 1);
  // More ranks than heads.
  MlaConfig few = c;
  few.num_attention_heads = ranks - 1;
  if (few.num_attention_heads >= 1) {
    const auto fw = mla::MlaWeights<float>::random(few, 1);
    EXPECT_THROW(mla::mpi::HeadParallelLayer(MPI_COMM_WORLD, few, fw,
                                             options(16, mla::CacheStorage::kFloat32)),
                 mla::Error);
  }
  // Sparse attention context-parallel: refused on every rank.
  EXPECT_THROW(
      mla::mpi::ContextParallelLayer(MPI_COMM_WORLD, MlaConfig::small_v32(),
                                     mla::MlaWeights<float>::random(MlaConfig::small_v32(), 1),
                                     options(16, mla::CacheStorage::kFloat32)),
      mla::Error);
  // Ranks with different configs.
  if (ranks > 1) {
    MlaConfig other = c;
    if (me == 0) other.rope_theta = 5000.0;
    EXPECT_THROW(mla::mpi::ContextParallelLayer(MPI_COMM_WORLD, other, w,
                                                options(16, mla::CacheStorage::kFloat32)),
                 mla::Error);
  }
  // One rank called with a position that does not continue the sequence: every rank throws,
  // and every shard is as it was.
  mla::mpi::ContextParallelLayer layer(MPI_COMM_WORLD, c, w,
                                       options(4, mla::CacheStorage::kFloat32));
  const auto s = layer.add_sequence();
  mla::MlaWorkspace<float> ws;
  const RowMatrix<float> x = test::random_input<float>(12, c.hidden_size, 2);
  RowMatrix<float> y(12, c.hidden_size);
  layer.forward(x.topRows(10), 0, s, y.topRows(10), ws);
  const Index before = layer.local_length(s);
  EXPECT_THROW(layer.forward(x.row(10), me == ranks - 1 ? 11 : 10, s, y.row(10), ws), mla::Error);
  EXPECT_EQ(layer.local_length(s), before);
  EXPECT_EQ(layer.length(s), 10);
  // A shard without room on one rank fails on all of them.
  mla::LatentCacheOptions tiny = options(4, mla::CacheStorage::kFloat32);
  tiny.num_blocks = me == 0 ? 1 : 8;
  mla::mpi::ContextParallelLayer small(MPI_COMM_WORLD, c, w, tiny);
  const auto t = small.add_sequence();
  const Index n = 4 * ranks + 1;  // rank 0 needs two blocks
  RowMatrix<float> yn(n, c.hidden_size);
  EXPECT_THROW(small.forward(test::random_input<float>(n, c.hidden_size, 3), 0, t, yn, ws),
               mla::Error);
  EXPECT_EQ(small.local_length(t), 0);
  // And the layer still works after all that.
  layer.forward(x.row(10), 10, s, y.row(10), ws);
  EXPECT_EQ(layer.length(s), 11);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  int worst = 0;
  MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
