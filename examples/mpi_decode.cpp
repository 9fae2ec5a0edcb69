// mla mpi_decode: one MLA layer sharded over MPI ranks, context-parallel (the latent cache
// split by blocks across ranks, partial attention merged by log-sum-exp) or head-parallel (the
// heads split, W_o's partial products summed).
//
//   mpirun -np N mpi_decode --preset small|v2lite|v3 --mode context|heads --prompt P
//                           --steps S [--cache fp32|bf16|fp8] [--block B]
//
// Every rank builds the same seeded random layer and inputs; the prompt is prefilled and S
// tokens decoded sharded. Rank 0 also runs the single-process layer on the same inputs and
// prints
//   max_rel_error_vs_single_process: <relative error of all outputs>
//   step_ms: <mean wall time of a sharded decode step, the slowest rank's>
// and the bytes each rank sends per decode step. Exit 0 on every rank; a wrong use (more ranks
// than heads in head mode, a bad option) ends every rank with the same message and exit 1.

#include <mpi.h>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

#include "inputs.hpp"
#include "mla/mla.hpp"
#include "mla/mpi.hpp"

namespace {

using examples::hidden_states;

using mla::Index;
using mla::RowMatrix;

struct Options {
  std::string preset = "small", mode = "context";
  Index prompt = 64, steps = 8, block = 16;
  mla::CacheStorage cache = mla::CacheStorage::kFloat32;
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    mla::detail::require(i + 1 < argc, "missing value after ", a);
    const std::string v = argv[++i];
    const auto number = [&](Index lo, Index hi) {
      char* end = nullptr;
      const long long n = std::strtoll(v.c_str(), &end, 10);
      mla::detail::require(*end == '\0' && n >= lo && n <= hi, a, " ", v,
                           ": expected an integer in [", lo, ", ", hi, "]");
      return static_cast<Index>(n);
    };
    if (a == "--preset") {
      mla::detail::require(v == "small" || v == "v2lite" || v == "v3", "unknown preset ", v);
      o.preset = v;
    } else if (a == "--mode") {
      mla::detail::require(v == "context" || v == "heads", "unknown mode ", v,
                           " (context or heads)");
      o.mode = v;
    } else if (a == "--prompt") {
      o.prompt = number(1, 1 << 20);
    } else if (a == "--steps") {
      o.steps = number(0, 1 << 20);
    } else if (a == "--block") {
      o.block = number(1, 4096);
    } else if (a == "--cache") {
      if (v == "fp32") {
        o.cache = mla::CacheStorage::kFloat32;
      } else if (v == "bf16") {
        o.cache = mla::CacheStorage::kBFloat16;
      } else if (v == "fp8") {
        o.cache = mla::CacheStorage::kFp8E4M3;
      } else {
        mla::detail::fail("unknown cache format ", v, " (fp32, bf16 or fp8)");
      }
    } else {
      mla::detail::fail("unknown option ", a,
                        "; usage: mpi_decode --preset small|v2lite|v3 --mode context|heads "
                        "--prompt P --steps S [--cache fp32|bf16|fp8] [--block B]");
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int me = mla::mpi::rank(MPI_COMM_WORLD), ranks = mla::mpi::size(MPI_COMM_WORLD);
  int status = 0;
  try {
    // Every rank parses the same command line; a bad one fails on all of them alike.
    const Options o = parse(argc, argv);
    const mla::MlaConfig c = o.preset == "small"    ? mla::MlaConfig::small_v3()
                             : o.preset == "v2lite" ? mla::MlaConfig::deepseek_v2_lite()
                                                    : mla::MlaConfig::deepseek_v3();
    const mla::MlaWeights<float> w = mla::MlaWeights<float>::random(c, 7);
    const Index total = o.prompt + o.steps;
    const RowMatrix<float> x = hidden_states(total, c.hidden_size, 11);
    mla::LatentCacheOptions co;
    co.block_tokens = o.block;
    co.num_blocks = (total + o.block - 1) / o.block + 1;
    co.storage = o.cache;
    mla::MlaWorkspace<float> ws;
    RowMatrix<float> y(total, c.hidden_size);
    double step_seconds = 0.0;
    std::size_t bytes_per_step = 0;
    const auto run = [&](auto& layer) {
      const auto s = layer.add_sequence();
      layer.forward(x.topRows(o.prompt), 0, s, y.topRows(o.prompt), ws);
      for (Index t = o.prompt; t < total; ++t) {
        MPI_Barrier(MPI_COMM_WORLD);
        const double t0 = MPI_Wtime();
        layer.forward(x.row(t), t, s, y.row(t), ws);
        step_seconds += MPI_Wtime() - t0;
      }
    };
    if (o.mode == "context") {
      mla::mpi::ContextParallelLayer layer(MPI_COMM_WORLD, c, w, co);
      run(layer);
      bytes_per_step =
          sizeof(float) * static_cast<std::size_t>(c.num_attention_heads * (c.kv_lora_rank + 1));
    } else {
      mla::mpi::HeadParallelLayer layer(MPI_COMM_WORLD, c, w, co);
      run(layer);
      bytes_per_step = sizeof(float) * static_cast<std::size_t>(c.hidden_size);
    }
    double slowest = 0.0;
    MPI_Reduce(&step_seconds, &slowest, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (me == 0) {
      // The single-process layer on the same inputs, the same chunks.
      const mla::MlaLayer<float> single(c, w);
      mla::LatentCache cache(c, co);
      const auto s = cache.add_sequence();
      RowMatrix<float> want(total, c.hidden_size);
      single.forward(x.topRows(o.prompt), 0, cache, s, want.topRows(o.prompt), ws);
      for (Index t = o.prompt; t < total; ++t) {
        single.forward(x.row(t), t, cache, s, want.row(t), ws);
      }
      const double err = (y - want).cast<double>().norm() / want.cast<double>().norm();
      std::printf("mode: %s  ranks: %d  preset: %s  cache: %s  prompt: %lld  steps: %lld\n",
                  o.mode.c_str(), ranks, o.preset.c_str(), mla::to_string(o.cache),
                  static_cast<long long>(o.prompt), static_cast<long long>(o.steps));
      std::printf("bytes_sent_per_rank_per_step: %zu (one allreduce)\n", bytes_per_step);
      std::printf("max_rel_error_vs_single_process: %.3g\n", err);
      std::printf("step_ms: %.3f\n",
                  o.steps > 0 ? 1e3 * slowest / static_cast<double>(o.steps) : 0.0);
      const double bound = o.cache == mla::CacheStorage::kFloat32 ? 1e-5 : 1e-3;
      if (!(err <= bound)) {
        std::fprintf(stderr, "mpi_decode: error %.3g above %.3g\n", err, bound);
        status = 1;
      }
    }
  } catch (const mla::Error& e) {
    // Collective checks fail on every rank together: each says why and all exit 1.
    std::fprintf(stderr, "mpi_decode rank %d: error: %s\n", me, e.what());
    status = 1;
  } catch (const std::exception& e) {
    // Anything else happened on this rank alone: end every rank rather than leave them
    // waiting in a collective.
    std::fprintf(stderr, "mpi_decode rank %d: fatal: %s\n", me, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  int worst = 0;
  MPI_Allreduce(&status, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
