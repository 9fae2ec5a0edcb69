#pragma once
// What each translation unit of test_odr_flags computes with its own compile flags: a float
// layer's prefill and decode steps on a pool, and a decode_absorbed call over a BF16 cache.
// Internal linkage, so that the test's own helpers cannot collide; only the library's inline
// functions are shared between the two units.

#include <string>
#include <vector>

#include "mla/mla.hpp"

namespace {

struct OdrResult {
  std::vector<double> layer;   // outputs of 12 prefill tokens and 6 decode steps
  std::vector<double> decode;  // o~ and lse of one decode_absorbed call
  std::string isa;             // mla::active_isa() as this unit sees it
  bool compiled_with_avx2 = false;
};

inline OdrResult odr_run() {
  OdrResult r;
#if defined(__AVX2__)
  r.compiled_with_avx2 = true;
#endif
  r.isa = mla::to_string(mla::active_isa());
  const mla::MlaConfig c = mla::MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 3));
  mla::LatentCacheOptions o;
  o.block_tokens = 8;
  o.num_blocks = 4;
  mla::LatentCache cache(c, o);
  const auto seq = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  mla::ThreadPool pool(2);
  mla::RunOptions run;
  run.executor = &pool;
  mla::RowMatrix<float> x(18, c.hidden_size), y(18, c.hidden_size);
  for (mla::Index i = 0; i < x.size(); ++i)
    x.data()[i] = static_cast<float>((i * 37 % 101) - 50) / 50;
  layer.forward(x.topRows(12), 0, cache, seq, y.topRows(12), ws, run);
  for (mla::Index t = 12; t < 18; ++t) layer.forward(x.row(t), t, cache, seq, y.row(t), ws, run);
  for (mla::Index i = 0; i < y.size(); ++i) r.layer.push_back(y.data()[i]);

  // The kernel alone over a BF16 cache, with 16 heads of DeepSeek widths.
  mla::MlaConfig d = c;
  d.num_attention_heads = 16;
  d.kv_lora_rank = 512;
  d.qk_rope_head_dim = 64;
  o.storage = mla::CacheStorage::kBFloat16;
  o.block_tokens = 16;
  o.num_blocks = 8;
  mla::LatentCache bf16(d, o);
  const auto s = bf16.add_sequence();
  mla::RowMatrix<float> kv(100, 576), q(16, 576), out(16, 512), lse(1, 16);
  for (mla::Index i = 0; i < kv.size(); ++i)
    kv.data()[i] = static_cast<float>((i * 13 % 29) - 14) / 14;
  for (mla::Index i = 0; i < q.size(); ++i) q.data()[i] = static_cast<float>((i * 7 % 17) - 8) / 8;
  bf16.append<float>(s, 0, kv.leftCols(512), kv.rightCols(64));
  mla::DecodeWorkspace dws;
  mla::decode_absorbed(d, bf16.view(s, 0), q, 0.05, out, lse, dws, &pool);
  for (mla::Index i = 0; i < out.size(); ++i) r.decode.push_back(out.data()[i]);
  for (mla::Index i = 0; i < lse.size(); ++i) r.decode.push_back(lse.data()[i]);
  return r;
}

}  // namespace
