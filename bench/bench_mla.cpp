// The benchmark suite: cache size of MLA against MHA, GQA and MQA; decode-step attention speed
// of the absorbed and expanded MLA paths and of GQA-8 and MHA over a plain KV cache; prefill
// speed of a whole MLA layer. DeepSeek-V2-Lite (16 heads) and V3 (128 heads) dimensions.
//
//   bench_mla --benchmark_format=json          (./run.sh bench writes
//   build/<preset>/bench_mla.json)
//
// Names:  cache_bytes/<arch>/<preset>
//         decode/<path>/<preset>/<cache>/<ctx>      path: absorbed (FP32), absorbed_bf16
//                                                   (Precision::kBf16), absorbed_q4 (4
//                                                   query tokens, FP32), expanded, gqa8, mha
//         prefill/<preset>/<tokens>                 whole layer, the preset's checkpoint
//                                                   weights (V2-Lite BF16, V3 FP8); prefill_bf16
//                                                   with Precision::kBf16 projections and
//                                                   attention
//         prefill_chunked/<preset>/<tokens>/<chunk> the same in calls of <chunk> tokens
//         project/<preset>/<matrix>/<dtype>/<batch> one projection (project_bf16: kBf16)
// The FP32 FMA peak, the BF16 dot-product and AMX peaks (where the CPU has them: the tiles with
// operands in registers, and as kernels feed them, A from L1 and B streamed from L2) and the
// read bandwidth are measured at start-up with the same threads and written to the JSON context
// (fma_peak_gflops, bf16_peak_gflops, amx_peak_gflops, amx_streamed_gflops, read_gbs); the
// counters peak_fraction, bf16_peak_fraction, amx_fraction, tile_ceiling_fraction (against the
// streamed tile ceiling), roofline_fraction and read_floor_fraction (the time to read the
// benchmark's bytes once, a decode step's cache, over the step's) compare each benchmark with
// them, so the ratios come from one run.
//
// A decode step here is the attention of one new token over `ctx` cached tokens: the part in
// which the paths differ (the projections before and after are the same GEMVs for all). One
// step per iteration, on 2 threads. Results are checked outside the timed region.

#include <benchmark/benchmark.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#if defined(MLA_BENCH_ONEDNN)
#include <oneapi/dnnl/dnnl.hpp>
#endif

#include "baseline_kv.hpp"
#include "machine.hpp"
#include "mla/mla.hpp"
#include "mla/sparse.hpp"

namespace {

using mla::CacheStorage;
using mla::Index;
using mla::MlaConfig;
using mla::RowMatrix;
using Clock = std::chrono::steady_clock;

constexpr int kThreads = 2;
constexpr Index kHeadDim = 128;  // per-head K and V width of the MHA/GQA/MQA baselines

bench::MachineLimits g_limits;

mla::ThreadPool& pool() {
  static mla::ThreadPool p(kThreads);
  return p;
}

struct Preset {
  const char* name;
  MlaConfig config;
};
Preset preset(const std::string& name) {
  if (name == "v32") return {"v32", MlaConfig::deepseek_v32()};
  return {name == "v3" ? "v3" : "v2lite",
          name == "v3" ? MlaConfig::deepseek_v3() : MlaConfig::deepseek_v2_lite()};
}

using bench::fill_random;

RowMatrix<float> random_matrix(Index rows, Index cols, std::uint32_t seed, float scale = 1.0f) {
  RowMatrix<float> m(rows, cols);
  fill_random(m.data(), m.size(), seed);
  m *= scale;
  return m;
}

/// A one-sequence latent cache of `tokens` random tokens.
struct FilledCache {
  mla::LatentCache cache;
  mla::SequenceId seq;
};
FilledCache fill_cache(const MlaConfig& c, CacheStorage storage, Index tokens) {
  mla::LatentCacheOptions o;
  o.block_tokens = 64;
  o.num_blocks = tokens / 64 + 1;
  o.storage = storage;
  FilledCache f{mla::LatentCache(c, o), 0};
  f.seq = f.cache.add_sequence();
  const RowMatrix<float> chunk = random_matrix(1024, c.latent_cache_width(), 7);
  // V3.2: random index keys (distinct per chunk, so that the selection moves around).
  RowMatrix<float> keys(1024, std::max<Index>(c.index_head_dim, 1));
  for (Index t = 0; t < tokens; t += 1024) {
    const Index n = std::min<Index>(1024, tokens - t);
    if (c.has_indexer()) {
      fill_random(keys.data(), keys.size(), static_cast<std::uint32_t>(11 + t));
      f.cache.append<float>(f.seq, 0, chunk.topLeftCorner(n, c.kv_lora_rank),
                            chunk.block(0, c.kv_lora_rank, n, c.qk_rope_head_dim), keys.topRows(n),
                            t);
    } else {
      f.cache.append<float>(f.seq, 0, chunk.topLeftCorner(n, c.kv_lora_rank),
                            chunk.block(0, c.kv_lora_rank, n, c.qk_rope_head_dim));
    }
  }
  return f;
}

/// Times `step` once per iteration (manual time) and sets the rate counters: GFLOP/s,
/// peak_fraction, and roofline_fraction against min(peak, bandwidth x flops / bytes).
template <class Step>
void run_steps(benchmark::State& state, double flops, double bytes, Step&& step) {
  double total = 0.0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    step();
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    state.SetIterationTime(dt);
    total += dt;
  }
  const double gflops = flops * static_cast<double>(state.iterations()) / total / 1e9;
  const double roof = std::min(g_limits.fma_gflops, g_limits.read_gbs * flops / bytes);
  state.counters["GFLOP/s"] = gflops;
  state.counters["peak_fraction"] = gflops / g_limits.fma_gflops;
  if (g_limits.bf16_gflops > 0)
    state.counters["bf16_peak_fraction"] = gflops / g_limits.bf16_gflops;
  if (g_limits.amx_gflops > 0) state.counters["amx_fraction"] = gflops / g_limits.amx_gflops;
  if (g_limits.amx_streamed_gflops > 0) {
    state.counters["tile_ceiling_fraction"] = gflops / g_limits.amx_streamed_gflops;
  }
  state.counters["roofline_fraction"] = gflops / roof;
  const double seconds = total / static_cast<double>(state.iterations());
  state.counters["step_ms"] = seconds * 1e3;
  // The time to read `bytes` once at the measured bandwidth, over the step's.
  state.counters["read_floor_fraction"] = bytes / (g_limits.read_gbs * 1e9) / seconds;
}

void require_finite(benchmark::State& state, const RowMatrix<float>& m) {
  if (!m.allFinite()) state.SkipWithError("non-finite attention output");
}

// ---------------------------------------------------------------------------------------------
// cache_bytes/<arch>/<preset>

void cache_bytes(benchmark::State& state, std::string arch, std::string preset_name) {
  const Preset p = preset(preset_name);
  const MlaConfig& c = p.config;
  std::size_t bytes = 0;
  double elements = 0;
  for (auto _ : state) {
    if (arch == "mla_fp32" || arch == "mla_bf16" || arch == "mla_fp8") {
      const CacheStorage s = arch == "mla_fp32"   ? CacheStorage::kFloat32
                             : arch == "mla_bf16" ? CacheStorage::kBFloat16
                                                  : CacheStorage::kFp8E4M3;
      bytes = mla::LatentCache::bytes_per_token_per_layer(c, s);
      elements = static_cast<double>(c.latent_cache_width());
    } else {
      // Baselines in BF16, the usual KV cache type: mha = H KV heads, mqa = 1, gqa<g> = g.
      const Index groups = arch == "mha"   ? c.num_attention_heads
                           : arch == "mqa" ? 1
                                           : std::stol(arch.substr(3));
      bytes = bench::KvCache::bytes_per_token(groups, kHeadDim, true);
      elements = static_cast<double>(2 * groups * kHeadDim);
    }
    benchmark::DoNotOptimize(bytes);
  }
  const auto layers = static_cast<double>(c.num_hidden_layers);
  state.counters["bytes_per_token_per_layer"] = static_cast<double>(bytes);
  state.counters["elements_per_token_per_layer"] = elements;
  state.counters["model_bytes_4k"] = static_cast<double>(bytes) * layers * 4096;
  state.counters["model_bytes_32k"] = static_cast<double>(bytes) * layers * 32768;
  state.counters["model_bytes_128k"] = static_cast<double>(bytes) * layers * 131072;
}

// ---------------------------------------------------------------------------------------------
// decode/<path>/<preset>/<cache>/<ctx>

CacheStorage storage_of(const std::string& cache) {
  return cache == "fp8"    ? CacheStorage::kFp8E4M3
         : cache == "bf16" ? CacheStorage::kBFloat16
                           : CacheStorage::kFloat32;
}

/// The absorbed decode step of `tokens` query tokens (decode_absorbed) in the given precision.
void decode_absorbed(benchmark::State& state, std::string preset_name, std::string cache, Index ctx,
                     mla::Precision precision, Index tokens) {
  const MlaConfig c = preset(preset_name).config;
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim;
  const FilledCache f = fill_cache(c, storage_of(cache), ctx);
  const mla::LatentView view = f.cache.view(f.seq, 0);
  const RowMatrix<float> q = random_matrix(tokens * H, D + R, 3);
  RowMatrix<float> out(tokens * H, D), lse(tokens, H);
  mla::DecodeWorkspace ws;
  mla::DecodeOptions o;
  o.precision = precision;
  const double scale = mla::softmax_scale(c);
  auto step = [&] { mla::decode_absorbed(c, view, q, scale, out, lse, ws, &pool(), o); };
  step();
  require_finite(state, out);
  // Token t sees ctx - (tokens - 1 - t) keys.
  const double pairs = static_cast<double>(tokens) * static_cast<double>(ctx) -
                       static_cast<double>(tokens * (tokens - 1) / 2);
  const double flops = 2.0 * static_cast<double>(H) * pairs * static_cast<double>(D + R + D);
  const double bytes = static_cast<double>(ctx) * static_cast<double>(view.token_bytes());
  run_steps(state, flops, bytes, step);
}

/// DeepSeek-V3.2's sparse decode step over a `ctx`-token cache: the indexer's scores (64 heads
/// x 128 over every cached index key), top-2048, and the absorbed attention over the selected
/// records; and, in the same run, the dense absorbed step over the same latent records, for the
/// ratio. Projections are excluded from both (as in decode/absorbed).
void decode_sparse(benchmark::State& state, std::string preset_name, std::string cache, Index ctx) {
  const MlaConfig c = preset(preset_name).config;
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim;
  const Index HI = c.index_n_heads, DI = c.index_head_dim;
  const FilledCache f = fill_cache(c, storage_of(cache), ctx);
  const mla::LatentView view = f.cache.view(f.seq, 0);
  const mla::IndexKeyView keys = f.cache.index_view(f.seq, 0);
  const RowMatrix<float> q = random_matrix(H, D + R, 3);
  // Index queries as prepare_index_queries leaves them: E4M3 values, folded head weights.
  RowMatrix<float> iq = random_matrix(HI, DI, 4), iw = random_matrix(1, HI, 5);
  {
    const mla::Rope rope = mla::index_rope(c);
    std::vector<float> scratch(static_cast<std::size_t>(R));
    std::vector<unsigned char> codes(static_cast<std::size_t>(DI));
    mla::prepare_index_queries(c, rope, ctx - 1, iq.data(), iw.data(), scratch.data(),
                               codes.data());
  }
  RowMatrix<float> out(H, D), lse(1, H), scores(1, ctx);
  mla::IndexerWorkspace iws;
  mla::SparseWorkspace<float> sws;
  mla::DecodeWorkspace dws;
  std::vector<std::int32_t> selected(static_cast<std::size_t>(c.index_topk));
  std::vector<std::uint64_t> order;
  const Index visible = ctx;
  const double scale = mla::softmax_scale(c);
  double t_index = 0, t_topk = 0, t_attend = 0;
  Index count = 0;
  auto step = [&] {
    const auto t0 = Clock::now();
    mla::index_scores(keys, iq, iw, &visible, scores, iws, &pool());
    const auto t1 = Clock::now();
    count = mla::select_top_k(scores.data(), ctx, c.index_topk, selected.data(), order);
    const auto t2 = Clock::now();
    mla::sparse_attention_absorbed<float>(c, view, selected.data(), count, q, scale, out, lse, sws,
                                          &pool());
    const auto t3 = Clock::now();
    t_index += std::chrono::duration<double>(t1 - t0).count();
    t_topk += std::chrono::duration<double>(t2 - t1).count();
    t_attend += std::chrono::duration<double>(t3 - t2).count();
  };
  step();
  require_finite(state, out);
  t_index = t_topk = t_attend = 0;
  const auto sel = static_cast<double>(count);
  const double flops = 2.0 * static_cast<double>(HI * DI) * static_cast<double>(ctx) +
                       2.0 * static_cast<double>(H) * sel * static_cast<double>(D + R + D);
  const double bytes = static_cast<double>(ctx) * static_cast<double>(DI + 4) +
                       sel * static_cast<double>(view.token_bytes());
  run_steps(state, flops, bytes, step);
  const auto iters = static_cast<double>(state.iterations());
  state.counters["indexer_ms"] = t_index / iters * 1e3;
  state.counters["topk_ms"] = t_topk / iters * 1e3;
  state.counters["attention_ms"] = t_attend / iters * 1e3;
  // The dense step over the same records, timed here for the ratio (same run, same machine
  // state): the best of a few.
  double dense = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t0 = Clock::now();
    mla::decode_absorbed(c, view, q, scale, out, lse, dws, &pool());
    dense = std::min(dense, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  require_finite(state, out);
  state.counters["dense_ms"] = dense * 1e3;
  state.counters["dense_over_sparse"] = dense / ((t_index + t_topk + t_attend) / iters);
}

#if defined(MLA_BENCH_ONEDNN)
/// The peer: the same step over a BF16 cache as three oneDNN primitives, the way a generic
/// library composes it: S = Q K^T (matmul, BF16 in, FP32 out), P = softmax(S) (BF16 out), O = P C
/// (matmul, FP32 out), the keys and latents read in place from the cache's [ctx][576] rows.
void decode_onednn_bf16(benchmark::State& state, std::string preset_name, Index ctx) {
  using namespace dnnl;
  using dt = memory::data_type;
  const MlaConfig c = preset(preset_name).config;
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, K = c.latent_cache_width();
  // The cache as one contiguous [ctx][K] BF16 array (a single block), and the queries.
  std::vector<std::uint16_t> cache(static_cast<std::size_t>(ctx * K));
  std::vector<std::uint16_t> q(static_cast<std::size_t>(H * K));
  {
    const RowMatrix<float> kv = random_matrix(ctx, K, 7), qf = random_matrix(H, K, 3);
    for (Index i = 0; i < kv.size(); ++i)
      cache[static_cast<std::size_t>(i)] =
          mla::detail::bit_cast<std::uint16_t>(mla::detail::to_bfloat16(kv.data()[i]));
    for (Index i = 0; i < qf.size(); ++i)
      q[static_cast<std::size_t>(i)] = mla::detail::bit_cast<std::uint16_t>(
          mla::detail::to_bfloat16(qf.data()[i] * static_cast<float>(mla::softmax_scale(c))));
  }
  engine eng(engine::kind::cpu, 0);
  stream strm(eng);
  const memory::dims qd = {H, K}, kd = {K, ctx}, sd = {H, ctx}, cd = {ctx, D}, od = {H, D};
  const memory::desc q_md(qd, dt::bf16, memory::dims{K, 1});
  const memory::desc k_md(kd, dt::bf16, memory::dims{1, K});  // K^T over the cache rows
  const memory::desc s_md(sd, dt::f32, memory::dims{ctx, 1});
  const memory::desc p_md(sd, dt::bf16, memory::dims{ctx, 1});
  const memory::desc c_md(cd, dt::bf16, memory::dims{K, 1});  // the latent part of each row
  const memory::desc o_md(od, dt::f32, memory::dims{D, 1});
  std::vector<float> s(static_cast<std::size_t>(H * ctx)), o(static_cast<std::size_t>(H * D));
  std::vector<std::uint16_t> pbuf(static_cast<std::size_t>(H * ctx));
  memory q_mem(q_md, eng, q.data()), k_mem(k_md, eng, cache.data()), s_mem(s_md, eng, s.data());
  memory p_mem(p_md, eng, pbuf.data()), c_mem(c_md, eng, cache.data()), o_mem(o_md, eng, o.data());
  const matmul qk(matmul::primitive_desc(matmul::desc(q_md, k_md, s_md), eng));
  const softmax_forward sm(softmax_forward::primitive_desc(
      softmax_forward::desc(prop_kind::forward_inference, s_md, 1), eng));
  // softmax in 2.6 writes the source type; the weights go to BF16 by a reorder.
  const reorder to_bf16(s_mem, p_mem);
  const matmul pc(matmul::primitive_desc(matmul::desc(p_md, c_md, o_md), eng));
  auto step = [&] {
    qk.execute(strm, {{DNNL_ARG_SRC, q_mem}, {DNNL_ARG_WEIGHTS, k_mem}, {DNNL_ARG_DST, s_mem}});
    sm.execute(strm, {{DNNL_ARG_SRC, s_mem}, {DNNL_ARG_DST, s_mem}});
    to_bf16.execute(strm, s_mem, p_mem);
    pc.execute(strm, {{DNNL_ARG_SRC, p_mem}, {DNNL_ARG_WEIGHTS, c_mem}, {DNNL_ARG_DST, o_mem}});
    strm.wait();
  };
  step();
  for (float x : o) {
    if (!std::isfinite(x)) state.SkipWithError("non-finite oneDNN output");
  }
  const double flops = 2.0 * static_cast<double>(H * ctx * (K + D));
  const double bytes = static_cast<double>(ctx) * static_cast<double>(K * 2);
  run_steps(state, flops, bytes, step);
}
#endif

/// Rebuilds every head's K and V from the latent in each step (attention_expanded), the key
/// range split in two at a block boundary, one part per thread, merged by log-sum-exp.
void decode_expanded(benchmark::State& state, std::string preset_name, std::string cache,
                     Index ctx) {
  const MlaConfig c = preset(preset_name).config;
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, P = c.qk_nope_head_dim;
  const Index R = c.qk_rope_head_dim, V = c.v_head_dim;
  const FilledCache f = fill_cache(c, storage_of(cache), ctx);
  const mla::LatentView view = f.cache.view(f.seq, 0);
  const mla::Linear<float> wkv_b(random_matrix(H * (P + V), D, 5, 1.0f / std::sqrt(512.0f)));
  const RowMatrix<float> q = random_matrix(1, H * (P + R), 3);
  const Index half = (ctx / 2) / 64 * 64;
  const mla::LatentView parts[2] = {view.subview(0, half), view.subview(half, ctx - half)};
  RowMatrix<float> out[2] = {RowMatrix<float>(1, H * V), RowMatrix<float>(1, H * V)};
  RowMatrix<float> lse[2] = {RowMatrix<float>(1, H), RowMatrix<float>(1, H)};
  RowMatrix<float> merged(1, H * V);
  mla::AttentionWorkspace<float> ws[2];
  const double scale = mla::softmax_scale(c);
  auto step = [&] {
    pool().run(2, [&](Index i, int) {
      if (parts[i].tokens() == 0) {
        lse[i].setConstant(-INFINITY);
        out[i].setZero();
        return;
      }
      mla::attention_expanded<float>(c, parts[i], q, wkv_b, scale, out[i], lse[i], ws[i]);
    });
    for (Index h = 0; h < H; ++h) {
      const float m = std::max(lse[0](0, h), lse[1](0, h));
      const float w0 = std::exp(lse[0](0, h) - m), w1 = std::exp(lse[1](0, h) - m);
      merged.middleCols(h * V, V) =
          (w0 * out[0].middleCols(h * V, V) + w1 * out[1].middleCols(h * V, V)) / (w0 + w1);
    }
  };
  step();
  require_finite(state, merged);
  const double flops = 2.0 * static_cast<double>(ctx) * static_cast<double>(H) *
                       static_cast<double>((P + V) * D + (P + R) + V);
  const double bytes = static_cast<double>(ctx) * static_cast<double>(view.token_bytes());
  run_steps(state, flops, bytes, step);
}

/// Sets Eigen's thread count for a scope.
class EigenThreads {
 public:
  explicit EigenThreads(int n) : saved_(Eigen::nbThreads()) { Eigen::setNbThreads(n); }
  ~EigenThreads() { Eigen::setNbThreads(saved_); }
  EigenThreads(const EigenThreads&) = delete;
  EigenThreads& operator=(const EigenThreads&) = delete;

 private:
  int saved_;
};

/// GQA with `groups` KV heads (groups == H: MHA) over a plain KV cache of the same head count.
void decode_kv(benchmark::State& state, std::string preset_name, std::string cache, Index ctx,
               Index groups) {
  const MlaConfig c = preset(preset_name).config;
  const Index H = c.num_attention_heads;
  if (groups == 0) groups = H;
  // The pool's threads run the KV heads; Eigen's own OpenMP threads inside them would
  // oversubscribe the cores (measured: GQA-8 at V3 sizes 100x slower from 16K tokens on).
  const EigenThreads single(1);
  const bench::KvCache kv(ctx, groups, kHeadDim, cache == "bf16");
  const RowMatrix<float> q = random_matrix(H, kHeadDim, 3);
  RowMatrix<float> out(H, kHeadDim);
  bench::KvWorkspace ws;
  ws.reserve(kThreads, H / groups, kHeadDim);
  const auto scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(kHeadDim)));
  auto step = [&] { bench::gqa_decode(kv, q, scale, out, pool(), ws); };
  step();
  require_finite(state, out);
  const double flops = 2.0 * static_cast<double>(H * ctx * 2 * kHeadDim);
  const double bytes =
      static_cast<double>(ctx) *
      static_cast<double>(bench::KvCache::bytes_per_token(groups, kHeadDim, kv.bf16()));
  run_steps(state, flops, bytes, step);
}

// ---------------------------------------------------------------------------------------------
// prefill/<preset>/<tokens>

/// The layer's weights in the preset's checkpoint format: V2-Lite's BF16, V3's block FP8
/// (128 x 128 blocks, W8A32).
mla::MlaWeights<float> checkpoint_weights(const std::string& preset_name, const MlaConfig& c) {
  mla::MlaWeights<float> w = mla::MlaWeights<float>::random(c, 1);
  if (preset_name == "v3") return w.quantize_fp8({});
  for (mla::Linear<float>* l : {&w.wq, &w.wq_a, &w.wq_b, &w.wkv_a, &w.wkv_b, &w.wo}) {
    if (!l->empty()) *l = mla::Linear<float>::bf16(l->dense());
  }
  return w;
}

/// One prefill of `tokens` tokens through a whole layer with the preset's checkpoint weights,
/// projections and attention in `precision`; in one call, or (chunk > 0) in calls of `chunk`
/// tokens, each after the earlier ones are cached (the path each call takes is kAuto's).
void prefill(benchmark::State& state, std::string preset_name, Index tokens,
             mla::Precision precision, Index chunk) {
  const MlaConfig c = preset(preset_name).config;
  const mla::MlaLayer<float> layer(c, checkpoint_weights(preset_name, c));
  mla::LatentCacheOptions o;
  o.num_blocks = tokens / 64 + 1;
  mla::LatentCache cache(c, o);
  const RowMatrix<float> x = random_matrix(tokens, c.hidden_size, 2);
  RowMatrix<float> y(tokens, c.hidden_size);
  mla::MlaWorkspace<float> ws;
  mla::RunOptions run;
  run.executor = &pool();
  run.projection_precision = precision;
  run.decode.precision = precision;
  auto step = [&] {
    const mla::SequenceId seq = cache.add_sequence();
    const Index n = chunk > 0 ? chunk : tokens;
    for (Index t0 = 0; t0 < tokens; t0 += n) {
      const Index m = std::min(n, tokens - t0);
      layer.forward(x.middleRows(t0, m), t0, cache, seq, y.middleRows(t0, m), ws, run);
    }
    cache.remove_sequence(seq);
  };
  step();
  require_finite(state, y);
  const auto T = static_cast<double>(tokens), hid = static_cast<double>(c.hidden_size);
  const auto H = static_cast<double>(c.num_attention_heads),
             D = static_cast<double>(c.kv_lora_rank);
  const auto P = static_cast<double>(c.qk_nope_head_dim),
             R = static_cast<double>(c.qk_rope_head_dim);
  const auto V = static_cast<double>(c.v_head_dim), Q = static_cast<double>(c.q_lora_rank);
  const double q_proj = c.has_q_lora() ? hid * Q + Q * H * (P + R) : hid * H * (P + R);
  const double projections = 2 * T * (q_proj + hid * (D + R) + H * V * hid);
  const double rebuild = 2 * T * H * (P + V) * D;
  const double attention = 2 * H * (T * (T + 1) / 2) * (P + R + V);
  const double flops = projections + rebuild + attention;
  run_steps(state, flops, static_cast<double>(layer.weight_bytes()), step);
  state.counters["tokens_per_s"] =
      benchmark::Counter(T * static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}

// ---------------------------------------------------------------------------------------------
// project/<preset>/<matrix>/<dtype>/<batch>

/// One projection of the layer at `batch` tokens, weights in `dtype` (fp32, bf16 or fp8), on
/// the pool. Batch 1 streams the weights: bandwidth_fraction is their bytes per second over the
/// measured read bandwidth.
void project(benchmark::State& state, std::string preset_name, std::string matrix,
             std::string dtype, Index batch, mla::Precision precision) {
  const MlaConfig c = preset(preset_name).config;
  const Index H = c.num_attention_heads, hid = c.hidden_size;
  Index rows = 0, cols = 0;
  if (matrix == "wq") {
    rows = H * c.qk_head_dim(), cols = hid;
  } else if (matrix == "wq_a") {
    rows = c.q_lora_rank, cols = hid;
  } else if (matrix == "wq_b") {
    rows = H * c.qk_head_dim(), cols = c.q_lora_rank;
  } else if (matrix == "wkv_a") {
    rows = c.latent_cache_width(), cols = hid;
  } else if (matrix == "wkv_b") {
    rows = H * (c.qk_nope_head_dim + c.v_head_dim), cols = c.kv_lora_rank;
  } else {
    rows = hid, cols = H * c.v_head_dim;
  }
  const RowMatrix<float> w =
      random_matrix(rows, cols, 4, 1.0f / std::sqrt(static_cast<float>(cols)));
  const mla::Linear<float> lin = dtype == "fp8"    ? mla::Linear<float>::quantize_fp8(w)
                                 : dtype == "bf16" ? mla::Linear<float>::bf16(w)
                                                   : mla::Linear<float>(w);
  const RowMatrix<float> x = random_matrix(batch, cols, 5);
  RowMatrix<float> y(batch, rows);
  mla::ProjectionWorkspace ws;
  const mla::ProjectionContext ctx{&pool(), precision, &ws};
  auto step = [&] { lin.apply(x, y, ctx); };
  step();
  require_finite(state, y);
  const double flops = 2.0 * static_cast<double>(batch) * static_cast<double>(rows * cols);
  const double bytes = static_cast<double>(lin.weight_bytes());
  run_steps(state, flops, bytes, step);
  state.counters["bandwidth_fraction"] =
      bytes / (state.counters["step_ms"] * 1e-3) / (g_limits.read_gbs * 1e9);
}

void register_all() {
  const char* presets[] = {"v2lite", "v3"};
  for (const char* p : presets) {
    for (const char* arch : {"mha", "gqa1", "gqa2", "gqa4", "gqa8", "gqa16", "mqa", "mla_fp32",
                             "mla_bf16", "mla_fp8"}) {
      benchmark::RegisterBenchmark((std::string("cache_bytes/") + arch + "/" + p).c_str(),
                                   [arch = std::string(arch), p = std::string(p)](
                                       benchmark::State& s) { cache_bytes(s, arch, p); });
    }
  }
  const Index contexts[] = {1024, 4096, 16384, 32768};
  for (const char* p : presets) {
    for (const char* cache : {"fp32", "bf16", "fp8"}) {
      for (Index ctx : contexts) {
        const std::string tail = std::string(p) + "/" + cache + "/" + std::to_string(ctx);
        benchmark::RegisterBenchmark(("decode/absorbed/" + tail).c_str(), decode_absorbed, p, cache,
                                     ctx, mla::Precision::kFp32, Index{1})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("decode/absorbed_bf16/" + tail).c_str(), decode_absorbed, p,
                                     cache, ctx, mla::Precision::kBf16, Index{1})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("decode/absorbed_q4/" + tail).c_str(), decode_absorbed, p,
                                     cache, ctx, mla::Precision::kFp32, Index{4})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  // DeepSeek-V3.2's sparse decode against V3's dense one (same MLA dims, FP8 latent), 4K-128K.
  for (Index ctx : {4096, 8192, 16384, 32768, 65536, 131072}) {
    const std::string tail = "/fp8/" + std::to_string(ctx);
    benchmark::RegisterBenchmark(("decode/sparse/v32" + tail).c_str(), decode_sparse, "v32", "fp8",
                                 ctx)
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond);
    if (ctx > 32768) {  // the shorter ones are registered above
      benchmark::RegisterBenchmark(("decode/absorbed/v3" + tail).c_str(), decode_absorbed, "v3",
                                   "fp8", ctx, mla::Precision::kFp32, Index{1})
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
#if defined(MLA_BENCH_ONEDNN)
  for (const char* p : presets) {
    for (Index ctx : contexts) {
      benchmark::RegisterBenchmark(
          (std::string("decode/onednn_bf16/") + p + "/" + std::to_string(ctx)).c_str(),
          decode_onednn_bf16, p, ctx)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond);
    }
  }
#endif
  for (const char* p : presets) {
    for (const char* cache : {"fp32", "bf16", "fp8"}) {
      for (Index ctx : contexts) {
        const std::string tail = std::string(p) + "/" + cache + "/" + std::to_string(ctx);
        benchmark::RegisterBenchmark(("decode/expanded/" + tail).c_str(), decode_expanded, p, cache,
                                     ctx)
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(0.2);
      }
    }
    for (const char* cache : {"fp32", "bf16"}) {
      for (Index ctx : contexts) {
        const std::string tail = std::string(p) + "/" + cache + "/" + std::to_string(ctx);
        benchmark::RegisterBenchmark(("decode/gqa8/" + tail).c_str(), decode_kv, p, cache, ctx,
                                     Index{8})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
        benchmark::RegisterBenchmark(("decode/mha/" + tail).c_str(), decode_kv, p, cache, ctx,
                                     Index{0})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond);
      }
    }
  }
  for (const char* p : presets) {
    for (Index tokens : {512, 2048, 4096}) {
      for (mla::Precision precision : {mla::Precision::kFp32, mla::Precision::kBf16}) {
        const std::string name =
            std::string(precision == mla::Precision::kBf16 ? "prefill_bf16/" : "prefill/") + p +
            "/" + std::to_string(tokens);
        benchmark::RegisterBenchmark(name.c_str(), prefill, p, tokens, precision, Index{0})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(0.2);
      }
    }
    // The same prompt in chunks of 512 after the earlier ones are cached.
    for (Index tokens : {2048, 4096}) {
      for (mla::Precision precision : {mla::Precision::kFp32, mla::Precision::kBf16}) {
        const std::string name =
            std::string(precision == mla::Precision::kBf16 ? "prefill_chunked_bf16/"
                                                           : "prefill_chunked/") +
            p + "/" + std::to_string(tokens) + "/512";
        benchmark::RegisterBenchmark(name.c_str(), prefill, p, tokens, precision, Index{512})
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(0.2);
      }
    }
  }
  for (const char* p : presets) {
    const std::vector<const char*> matrices =
        std::string(p) == "v3" ? std::vector<const char*>{"wq_a", "wq_b", "wkv_a", "wkv_b", "wo"}
                               : std::vector<const char*>{"wq", "wkv_a", "wkv_b", "wo"};
    for (const char* m : matrices) {
      for (const char* dtype : {"fp32", "bf16", "fp8"}) {
        for (Index batch : {1, 512}) {
          for (mla::Precision precision : {mla::Precision::kFp32, mla::Precision::kBf16}) {
            if (precision == mla::Precision::kBf16 && std::string(dtype) == "fp32") continue;
            const std::string name =
                std::string(precision == mla::Precision::kBf16 ? "project_bf16/" : "project/") + p +
                "/" + m + "/" + dtype + "/" + std::to_string(batch);
            benchmark::RegisterBenchmark(name.c_str(), project, p, m, dtype, batch, precision)
                ->UseManualTime()
                ->Unit(benchmark::kMillisecond);
          }
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#if defined(_OPENMP)
  Eigen::setNbThreads(kThreads);  // the projections' GEMMs in prefill
  omp_set_num_threads(kThreads);  // and the oneDNN peer's primitives
#endif
  g_limits = bench::measure_machine(kThreads);
  benchmark::AddCustomContext("fma_peak_gflops", std::to_string(g_limits.fma_gflops));
  benchmark::AddCustomContext("read_gbs", std::to_string(g_limits.read_gbs));
  benchmark::AddCustomContext("threads", std::to_string(kThreads));
  benchmark::AddCustomContext("bf16_peak_gflops", std::to_string(g_limits.bf16_gflops));
  benchmark::AddCustomContext("amx_peak_gflops", std::to_string(g_limits.amx_gflops));
  benchmark::AddCustomContext("amx_streamed_gflops", std::to_string(g_limits.amx_streamed_gflops));
  benchmark::AddCustomContext("active_isa", mla::to_string(mla::active_isa()));
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
