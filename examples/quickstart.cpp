// mla quickstart: a DeepSeek-V2-Lite-sized MLA layer with seeded random weights prefills a
// 512-token prompt and decodes 64 tokens through the latent cache, in FP32, BF16 and FP8
// storage; checks that the absorbed and expanded attention paths agree on the last step; and
// prints what the cache costs per token next to MHA, GQA and MQA, plus the speed.
//
// Run from the repository root with `./run.sh demo`.

#include <chrono>
#include <cstdio>
#include <random>

#include "inputs.hpp"
#include "mla/mla.hpp"

namespace {

using examples::hidden_states;

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Run {
  double prefill_tokens_per_s = 0, decode_tokens_per_s = 0;
  double absorbed_vs_expanded = 0;  // relative difference on the last step
  mla::RowMatrix<float> last;       // the last token's output (absorbed)
  std::size_t bytes_per_token_per_layer = 0;
};

/// Prefill `prompt` rows of x, decode the rest one token at a time; the last step runs both
/// attention paths on the same cache contents (clone() is an explicit copy).
Run run(const mla::MlaLayer<float>& layer, const mla::RowMatrix<float>& x, mla::Index prompt,
        mla::CacheStorage storage) {
  const mla::MlaConfig& config = layer.config();
  const mla::Index total = x.rows();
  mla::LatentCacheOptions options;  // 64-token blocks, enough for the whole sequence
  options.block_tokens = 64;
  options.num_blocks = (total + 63) / 64;
  options.storage = storage;
  mla::LatentCache cache(config, options);
  const mla::SequenceId seq = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  mla::RowMatrix<float> y(total, config.hidden_size);
  Run r;
  r.bytes_per_token_per_layer = cache.bytes_per_token_per_layer();

  auto t0 = Clock::now();
  layer.forward(x.topRows(prompt), 0, cache, seq, y.topRows(prompt), ws);  // expanded path
  r.prefill_tokens_per_s = static_cast<double>(prompt) / seconds_since(t0);

  t0 = Clock::now();
  for (mla::Index t = prompt; t < total - 1; ++t) {
    layer.forward(x.row(t), t, cache, seq, y.row(t), ws);  // absorbed path
  }
  r.decode_tokens_per_s = static_cast<double>(total - 1 - prompt) / seconds_since(t0);

  mla::LatentCache copy = cache.clone();
  mla::RowMatrix<float> y_absorbed(1, config.hidden_size), y_expanded(1, config.hidden_size);
  layer.forward(x.row(total - 1), total - 1, cache, seq, y_absorbed, ws,
                mla::AttentionPath::kAbsorbed);
  layer.forward(x.row(total - 1), total - 1, copy, seq, y_expanded, ws,
                mla::AttentionPath::kExpanded);
  r.absorbed_vs_expanded = (y_absorbed - y_expanded).norm() / y_expanded.norm();
  r.last = y_absorbed;
  return r;
}

}  // namespace

int main() {
  const mla::MlaConfig config = mla::MlaConfig::deepseek_v2_lite();
  const mla::Index prompt = 512, decode_steps = 64;
  std::printf(
      "mla %d.%d.%d quickstart: one DeepSeek-V2-Lite attention layer (hidden %lld, %lld heads, "
      "kv_lora_rank %lld, rope %lld), seeded random weights\n",
      MLA_VERSION_MAJOR, MLA_VERSION_MINOR, MLA_VERSION_PATCH,
      static_cast<long long>(config.hidden_size),
      static_cast<long long>(config.num_attention_heads),
      static_cast<long long>(config.kv_lora_rank), static_cast<long long>(config.qk_rope_head_dim));
  std::printf("prefill %lld tokens, then decode %lld tokens one at a time\n\n",
              static_cast<long long>(prompt), static_cast<long long>(decode_steps));

  // The layer: weights checked and absorbed matrices computed once, here.
  const mla::MlaLayer<float> layer(config, mla::MlaWeights<float>::random(config, 2024));
  const mla::RowMatrix<float> x = hidden_states(prompt + decode_steps, config.hidden_size, 7);

  const mla::CacheStorage storages[] = {mla::CacheStorage::kFloat32, mla::CacheStorage::kBFloat16,
                                        mla::CacheStorage::kFp8E4M3};
  Run runs[3];
  bool ok = true;
  std::printf("%-6s %10s %12s %12s %12s %17s %14s\n", "cache", "B/token", "model B/tok",
              "prefill t/s", "decode t/s", "absorbed~expanded", "last vs fp32");
  for (int i = 0; i < 3; ++i) {
    runs[i] = run(layer, x, prompt, storages[i]);
    const Run& r = runs[i];
    const double vs_fp32 = (r.last - runs[0].last).norm() / runs[0].last.norm();
    const bool agree = r.absorbed_vs_expanded <= 1e-5;
    ok = ok && agree;
    std::printf("%-6s %10zu %12zu %12.0f %12.1f %10.1e %-6s %14.1e\n", mla::to_string(storages[i]),
                r.bytes_per_token_per_layer,
                r.bytes_per_token_per_layer * static_cast<std::size_t>(config.num_hidden_layers),
                r.prefill_tokens_per_s, r.decode_tokens_per_s, r.absorbed_vs_expanded,
                agree ? "agree" : "DIFFER", vs_fp32);
  }
  std::printf(
      "(B/token: one layer; model: all %lld layers. The two paths read the same cache, so "
      "they agree for every storage;\n FP8 and BF16 change what is cached, hence the "
      "difference to FP32.)\n\n",
      static_cast<long long>(config.num_hidden_layers));

  // What one token costs in the KV cache of one layer: MHA keeps K and V of every head, GQA of
  // g groups, MQA of one head; MLA keeps only c^KV and k^R (the library's own accounting).
  const long long H = config.num_attention_heads, dh = config.qk_nope_head_dim;
  struct Row {
    const char* name;
    long long bytes;
  };
  const long long mla_bf16 = static_cast<long long>(runs[1].bytes_per_token_per_layer);
  const Row rows[] = {{"MHA (bf16)", 2 * 2 * H * dh},
                      {"GQA-8 (bf16)", 2 * 2 * 8 * dh},
                      {"MQA (bf16)", 2 * 2 * dh},
                      {"MLA fp32", static_cast<long long>(runs[0].bytes_per_token_per_layer)},
                      {"MLA bf16", mla_bf16},
                      {"MLA fp8", static_cast<long long>(runs[2].bytes_per_token_per_layer)}};
  std::printf("KV cache bytes per token per layer (head_dim %lld)\n", dh);
  std::printf("%-14s %8s %12s\n", "cache", "bytes", "vs MLA bf16");
  for (const Row& r : rows) {
    std::printf("%-14s %8lld %11.2fx\n", r.name, r.bytes,
                static_cast<double>(r.bytes) / static_cast<double>(mla_bf16));
  }
  return ok ? 0 : 1;
}
