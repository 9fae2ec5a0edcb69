// mla quickstart: a DeepSeek-V2-Lite-sized MLA layer with seeded random weights prefills a
// 512-token prompt and decodes 64 tokens through the latent cache, checks that the absorbed and
// expanded attention paths agree on the last step, and prints what the cache costs per token
// next to MHA, GQA and MQA, plus the speed.
//
// Run from the repository root with `./run.sh demo`.

#include <chrono>
#include <cstdio>
#include <random>

#include "mla/mla.hpp"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

/// Seeded stand-ins for token embeddings: [tokens, hidden], entries uniform in [-1, 1].
mla::RowMatrix<float> hidden_states(mla::Index tokens, mla::Index hidden, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  mla::RowMatrix<float> x(tokens, hidden);
  for (mla::Index i = 0; i < x.size(); ++i) x.data()[i] = u(rng);
  return x;
}

}  // namespace

int main() {
  const mla::MlaConfig config = mla::MlaConfig::deepseek_v2_lite();
  const mla::Index prompt = 512, decode_steps = 64, total = prompt + decode_steps;
  std::printf(
      "mla %d.%d.%d quickstart: one DeepSeek-V2-Lite attention layer (hidden %lld, %lld heads, "
      "kv_lora_rank %lld, rope %lld)\n\n",
      MLA_VERSION_MAJOR, MLA_VERSION_MINOR, MLA_VERSION_PATCH,
      static_cast<long long>(config.hidden_size),
      static_cast<long long>(config.num_attention_heads),
      static_cast<long long>(config.kv_lora_rank), static_cast<long long>(config.qk_rope_head_dim));

  // The layer: seeded random weights, absorbed matrices computed once here.
  const mla::MlaLayer<float> layer(config, mla::MlaWeights<float>::random(config, 2024));

  // The latent cache: 64-token blocks, enough for the whole sequence, FP32 storage.
  mla::LatentCacheOptions options;
  options.block_tokens = 64;
  options.num_blocks = (total + 63) / 64;
  mla::LatentCache cache(config, options);
  const mla::SequenceId seq = cache.add_sequence();
  mla::MlaWorkspace<float> ws;

  const mla::RowMatrix<float> x = hidden_states(total, config.hidden_size, 7);
  mla::RowMatrix<float> y(total, config.hidden_size);

  // Prefill: the whole prompt in one call (the expanded path).
  auto t0 = Clock::now();
  layer.forward(x.topRows(prompt), 0, cache, seq, y.topRows(prompt), ws);
  const double prefill_s = seconds_since(t0);

  // Decode: one token per call (the absorbed path), all but the last step.
  t0 = Clock::now();
  for (mla::Index t = prompt; t < total - 1; ++t) {
    layer.forward(x.row(t), t, cache, seq, y.row(t), ws);
  }
  const double decode_s = seconds_since(t0) / static_cast<double>(decode_steps - 1);

  // The last step both ways, on the same cache contents (clone is an explicit copy).
  mla::LatentCache cache_copy = cache.clone();
  mla::RowMatrix<float> y_absorbed(1, config.hidden_size), y_expanded(1, config.hidden_size);
  layer.forward(x.row(total - 1), total - 1, cache, seq, y_absorbed, ws,
                mla::AttentionPath::kAbsorbed);
  layer.forward(x.row(total - 1), total - 1, cache_copy, seq, y_expanded, ws,
                mla::AttentionPath::kExpanded);
  const double rel_diff = (y_absorbed - y_expanded).norm() / y_expanded.norm();
  const bool agree = rel_diff <= 1e-5;

  std::printf("prefill %lld tokens:   %8.1f tokens/s\n", static_cast<long long>(prompt),
              static_cast<double>(prompt) / prefill_s);
  std::printf("decode  %lld tokens:    %8.1f tokens/s (context %lld..%lld)\n",
              static_cast<long long>(decode_steps), 1.0 / decode_s, static_cast<long long>(prompt),
              static_cast<long long>(total));
  std::printf("last step, absorbed vs expanded: relative difference %.2e (%s)\n\n", rel_diff,
              agree ? "agree" : "DISAGREE");

  // What one token costs in the KV cache of one layer. MHA keeps K and V of every head, GQA of
  // g groups, MQA of one head; MLA keeps only c^KV and k^R (the library's own accounting).
  const long long H = config.num_attention_heads, dh = config.qk_nope_head_dim;
  const long long mla_values = config.latent_cache_width();
  struct Row {
    const char* name;
    long long values;
  };
  const Row rows[] = {
      {"MHA", 2 * H * dh}, {"GQA-8", 2 * 8 * dh}, {"MQA", 2 * dh}, {"MLA", mla_values}};
  std::printf("KV cache per token per layer (head_dim %lld)\n", dh);
  std::printf("%-8s %8s %12s %12s %10s\n", "cache", "values", "fp32 bytes", "bf16 bytes", "vs MLA");
  for (const Row& r : rows) {
    std::printf("%-8s %8lld %12lld %12lld %9.2fx\n", r.name, r.values, 4 * r.values, 2 * r.values,
                static_cast<double>(r.values) / static_cast<double>(mla_values));
  }
  std::printf("this run's cache: %zu bytes per token per layer (%s), %lld tokens cached\n",
              cache.bytes_per_token_per_layer(), mla::to_string(cache.options().storage),
              static_cast<long long>(cache.length(seq, 0)));
  return agree ? 0 : 1;
}
