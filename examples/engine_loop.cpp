// mla engine_loop: a continuous-batching loop as an inference engine runs it, over one MLA
// layer with seeded random weights and one shared LatentCache.
//
// Requests with random prompt lengths arrive over time. Each step builds one mixed batch of at
// most --max-batch sequences: chunks of waiting prompts (prefill, 32 tokens a chunk) beside the
// decode tokens of running requests, all in one MlaLayer::forward call. Some requests
// fork after their prompt (parallel sampling: the child shares the prompt's full blocks); some
// decode speculatively (three draft tokens verified in one chunk, then the rejected ones
// dropped with LatentCache::truncate). Finished requests free their blocks; a request is
// admitted only when the pool has room for all of it.
//
// Afterwards every sequence (request or fork) is run again alone, on a fresh cache, with the
// tokens it kept in the same chunks, and its outputs are compared with those of the loop:
//   max_rel_error_vs_alone: <largest relative error of one sequence's outputs>
//   tokens_per_s: <tokens through the layer per second inside the loop>
// The exit status is 0 when the error is within the bound of the cache format.
//
//   engine_loop --preset small|v2lite --requests N --max-batch B [--cache fp32|bf16|fp8]
//               [--threads T] [--seed S]

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "inputs.hpp"
#include "mla/mla.hpp"

namespace {

using examples::hidden_states;

using mla::Index;
using mla::RowMatrix;
using mla::SequenceId;

struct Options {
  std::string preset = "small";
  int requests = 16;
  int max_batch = 8;
  mla::CacheStorage cache = mla::CacheStorage::kFloat32;
  int threads = 1;
  unsigned seed = 1;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "engine_loop: %s\nusage: engine_loop --preset small|v2lite --requests N "
               "--max-batch B [--cache fp32|bf16|fp8] [--threads T] [--seed S]\n",
               why);
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) usage(("missing value after " + a).c_str());
    const std::string v = argv[++i];
    const auto number = [&](int lo, int hi) {
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (*end != '\0' || n < lo || n > hi) usage((a + " " + v + ": out of range").c_str());
      return static_cast<int>(n);
    };
    if (a == "--preset") {
      if (v != "small" && v != "v2lite") usage(("unknown preset " + v).c_str());
      o.preset = v;
    } else if (a == "--requests") {
      o.requests = number(1, 100000);
    } else if (a == "--max-batch") {
      o.max_batch = number(1, 4096);
    } else if (a == "--threads") {
      o.threads = number(1, 1024);
    } else if (a == "--seed") {
      o.seed = static_cast<unsigned>(number(0, 1 << 30));
    } else if (a == "--cache") {
      if (v == "fp32") {
        o.cache = mla::CacheStorage::kFloat32;
      } else if (v == "bf16") {
        o.cache = mla::CacheStorage::kBFloat16;
      } else if (v == "fp8") {
        o.cache = mla::CacheStorage::kFp8E4M3;
      } else {
        usage(("unknown cache format " + v).c_str());
      }
    } else {
      usage(("unknown option " + a).c_str());
    }
  }
  return o;
}

/// A chunk a sequence kept: its inputs and the outputs the loop gave them.
struct Chunk {
  std::int64_t start = 0;
  RowMatrix<float> x, y;
};

/// A sequence of the loop: a request's own, or a fork of it.
struct Sequence {
  SequenceId id = -1;
  Index prompt = 0;     // prompt tokens (prefilled in chunks)
  Index to_decode = 0;  // decode tokens still to come
  Index length = 0;     // tokens cached
  bool speculative = false;
  bool forks = false;  // forks a child once the prompt is in
  unsigned seed = 0;   // inputs are drawn from (seed, position, attempt)
  unsigned attempt = 0;
  std::vector<Chunk> kept;
  bool done = false;
};

}  // namespace

int main(int argc, char** argv) try {
  const Options opt = parse(argc, argv);
  const mla::MlaConfig c =
      opt.preset == "small" ? mla::MlaConfig::small_v3() : mla::MlaConfig::deepseek_v2_lite();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, opt.seed));
  std::unique_ptr<mla::ThreadPool> pool;
  if (opt.threads > 1) pool = std::make_unique<mla::ThreadPool>(opt.threads);

  // Requests: prompt lengths and decode lengths drawn from the seed.
  std::mt19937 rng(opt.seed * 7919u + 17u);
  const Index max_prompt = opt.preset == "small" ? 96 : 384;
  std::uniform_int_distribution<Index> prompt_len(8, max_prompt), decode_len(4, 24);
  std::uniform_int_distribution<int> coin(0, 3), accepted(0, 3);
  constexpr Index kChunk = 32, kDrafts = 3, kBlock = 16;
  std::vector<Sequence> seqs;
  seqs.reserve(static_cast<std::size_t>(opt.requests) * 2);
  std::vector<std::size_t> waiting;
  for (int r = 0; r < opt.requests; ++r) {
    Sequence s;
    s.prompt = prompt_len(rng);
    s.to_decode = decode_len(rng);
    s.speculative = coin(rng) == 0;
    s.forks = coin(rng) == 1;
    s.seed = opt.seed * 100003u + static_cast<unsigned>(r) * 7u;
    seqs.push_back(std::move(s));
    waiting.push_back(seqs.size() - 1);
  }
  // A pool for about max_batch requests at once; admission waits for room.
  const Index per_request = 2 * ((max_prompt + 24 + kDrafts + kBlock - 1) / kBlock + 1);
  mla::LatentCacheOptions co;
  co.block_tokens = kBlock;
  co.num_blocks = per_request * std::max(2, opt.max_batch);
  co.storage = opt.cache;
  mla::LatentCache cache(c, co);

  mla::MlaWorkspace<float> ws;
  mla::RunOptions run;
  run.executor = pool.get();
  std::vector<std::size_t> running;  // indices into seqs
  Index tokens_through = 0;
  int steps = 0, forks = 0, rollbacks = 0, max_rows = 0;
  const auto t0 = std::chrono::steady_clock::now();
  while (!running.empty() || !waiting.empty()) {
    // Admit requests while the pool has room for the whole request (and a fork).
    while (!waiting.empty() && static_cast<int>(running.size()) < opt.max_batch) {
      Sequence& s = seqs[waiting.front()];
      const Index need = 2 * ((s.prompt + s.to_decode + kDrafts + kBlock - 1) / kBlock + 1);
      Index reserved = 0;
      for (std::size_t i : running) {
        const Sequence& r = seqs[i];
        reserved += (r.prompt + r.to_decode + kDrafts + kBlock - 1) / kBlock + 1;
      }
      if (reserved + need > co.num_blocks) break;
      s.id = cache.add_sequence();
      running.push_back(waiting.front());
      waiting.erase(waiting.begin());
    }
    // One mixed batch: a chunk or a decode step (or a draft chunk) for every running sequence.
    std::vector<mla::BatchEntry> entries;
    std::vector<std::size_t> owner;
    for (std::size_t i : running) {
      Sequence& s = seqs[i];
      Index n = 0;
      if (s.length < s.prompt) {
        n = std::min(kChunk, s.prompt - s.length);
      } else if (s.to_decode > 0) {
        n = s.speculative ? std::min(kDrafts, s.to_decode) : 1;
      }
      if (n == 0) continue;
      entries.push_back({s.id, s.length, n});
      owner.push_back(i);
    }
    Index rows = 0;
    for (const auto& e : entries) rows += e.tokens;
    RowMatrix<float> x(rows, c.hidden_size), y(rows, c.hidden_size);
    Index r = 0;
    for (std::size_t k = 0; k < entries.size(); ++k) {
      Sequence& s = seqs[owner[k]];
      x.middleRows(r, entries[k].tokens) =
          hidden_states(entries[k].tokens, c.hidden_size, s.seed + 1000003u * (++s.attempt));
      r += entries[k].tokens;
    }
    layer.forward(x, entries, cache, y, ws, run);
    tokens_through += rows;
    max_rows = std::max(max_rows, static_cast<int>(rows));
    ++steps;
    // Keep what each sequence accepts; drop rejected drafts; fork and finish.
    r = 0;
    std::vector<std::size_t> next_running;
    for (std::size_t k = 0; k < entries.size(); ++k) {
      const std::size_t idx = owner[k];
      const Index n = entries[k].tokens;
      const bool prefill = seqs[idx].length < seqs[idx].prompt;
      Index keep = n;
      if (!prefill && seqs[idx].speculative && n > 1) {
        keep = std::min<Index>(n, 1 + accepted(rng));  // the first draft is always verified
        if (keep < n) {
          cache.truncate(seqs[idx].id, seqs[idx].length + keep);
          ++rollbacks;
        }
      }
      Chunk ch;
      ch.start = seqs[idx].length;
      ch.x = x.middleRows(r, keep);
      ch.y = y.middleRows(r, keep);
      seqs[idx].kept.push_back(std::move(ch));
      seqs[idx].length += keep;
      if (!prefill) seqs[idx].to_decode -= keep;
      r += n;
      if (seqs[idx].forks && seqs[idx].length == seqs[idx].prompt) {
        // Parallel sampling: a child that shares the prompt and decodes on its own.
        Sequence child;
        child.id = cache.fork(seqs[idx].id);
        child.prompt = seqs[idx].prompt;
        child.length = seqs[idx].length;
        child.to_decode = seqs[idx].to_decode;
        child.seed = seqs[idx].seed + 500009u;
        child.kept = seqs[idx].kept;  // the shared prompt chunks, for the check
        seqs[idx].forks = false;
        seqs.push_back(std::move(child));
        next_running.push_back(seqs.size() - 1);
        ++forks;
      }
    }
    for (std::size_t i : running) {
      Sequence& s = seqs[i];
      if (s.length >= s.prompt && s.to_decode == 0) {
        cache.remove_sequence(s.id);
        s.done = true;
      } else {
        next_running.push_back(i);
      }
    }
    running.swap(next_running);
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (cache.blocks_in_use() != 0) {
    std::fprintf(stderr, "engine_loop: %lld blocks still in use after every request finished\n",
                 static_cast<long long>(cache.blocks_in_use()));
    return 1;
  }

  // Every sequence alone: a fresh cache, the chunks it kept, one call each.
  double worst = 0.0;
  for (const Sequence& s : seqs) {
    mla::LatentCache alone(c, co);
    const SequenceId id = alone.add_sequence();
    double err2 = 0.0, ref2 = 0.0;
    for (const Chunk& ch : s.kept) {
      RowMatrix<float> y(ch.x.rows(), c.hidden_size);
      layer.forward(ch.x, ch.start, alone, id, y, ws, run);
      err2 += (y - ch.y).cast<double>().squaredNorm();
      ref2 += y.cast<double>().squaredNorm();
    }
    worst = std::max(worst, std::sqrt(err2 / std::max(ref2, 1e-300)));
  }
  // Bounds: the batch's height changes only the projections' FP32 rounding; a cached value
  // may then round to a neighbouring BF16 or E4M3 value.
  const double bound = opt.cache == mla::CacheStorage::kFloat32    ? 1e-5
                       : opt.cache == mla::CacheStorage::kBFloat16 ? 1e-3
                                                                   : 1e-2;
  std::printf("preset: %s  cache: %s  threads: %d  requests: %d  forks: %d  rollbacks: %d\n",
              opt.preset.c_str(), mla::to_string(opt.cache), opt.threads, opt.requests, forks,
              rollbacks);
  std::printf("steps: %d  largest batch: %d rows  tokens: %lld\n", steps, max_rows,
              static_cast<long long>(tokens_through));
  std::printf("max_rel_error_vs_alone: %.3g\n", worst);
  std::printf("tokens_per_s: %.1f\n", static_cast<double>(tokens_through) / seconds);
  if (worst > bound) {
    std::fprintf(stderr, "engine_loop: error %.3g above the bound %.3g for %s\n", worst, bound,
                 mla::to_string(opt.cache));
    return 1;
  }
  return 0;
} catch (const mla::Error& e) {
  std::fprintf(stderr, "engine_loop: %s\n", e.what());
  return 1;
}
