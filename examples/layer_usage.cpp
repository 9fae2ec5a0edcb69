#include <mla/mla.hpp>

int main() {
  const mla::MlaConfig config = mla::MlaConfig::deepseek_v2_lite();  // or deepseek_v3(), ...
  const mla::MlaLayer<float> layer(config, mla::MlaWeights<float>::random(config, /*seed=*/1));

  mla::LatentCacheOptions options;  // 64-token blocks from a fixed pool
  options.num_blocks = 16;          // room for 1024 tokens of this layer
  mla::LatentCache cache(config, options);
  const mla::SequenceId seq = cache.add_sequence();
  mla::MlaWorkspace<float> ws;  // scratch, sized on first use, then reused

  mla::RowMatrix<float> prompt = mla::RowMatrix<float>::Random(100, config.hidden_size);
  mla::RowMatrix<float> out(100, config.hidden_size);
  layer.forward(prompt, /*start_pos=*/0, cache, seq, out, ws);  // prefill: expanded path

  mla::RowMatrix<float> token = mla::RowMatrix<float>::Random(1, config.hidden_size);
  mla::RowMatrix<float> next(1, config.hidden_size);
  layer.forward(token, 100, cache, seq, next, ws);  // decode: absorbed path, no allocation
  return cache.length(seq, 0) == 101 ? 0 : 1;       // 576 numbers cached per token
}
