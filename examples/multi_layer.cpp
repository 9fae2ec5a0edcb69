#include <cstdint>
#include <cstdio>
#include <mla/mla.hpp>
#include <vector>

int main() {
  const mla::MlaConfig config = mla::MlaConfig::small_v3();  // deepseek_v3() for the real sizes
  const mla::Index num_layers = 4, hidden = config.hidden_size;

  // One MlaLayer per layer of the model: its own weights and its slot in the shared cache.
  std::vector<mla::MlaLayer<float>> layers;
  for (mla::Index l = 0; l < num_layers; ++l) {
    layers.emplace_back(config, mla::MlaWeights<float>::random(config, 10 + l), /*layer_index=*/l);
  }

  // One cache for every layer and sequence: a block holds 64 tokens of one sequence, all layers.
  mla::LatentCacheOptions options;
  options.num_layers = num_layers;
  options.num_blocks = 8;
  options.storage = mla::CacheStorage::kBFloat16;
  mla::LatentCache cache(config, options);
  mla::MlaWorkspace<float> ws;  // serves every layer, one call at a time

  // Prefill two prompts of different lengths through every layer. (h += attention stands in
  // for the rest of a transformer block.)
  std::vector<mla::SequenceId> seqs;
  for (mla::Index tokens : {37, 90}) {
    const mla::SequenceId seq = cache.add_sequence();
    mla::RowMatrix<float> h = mla::RowMatrix<float>::Random(tokens, hidden), attn(tokens, hidden);
    for (const mla::MlaLayer<float>& layer : layers) {
      layer.forward(h, /*start_pos=*/0, cache, seq, attn, ws);
      h += attn;
    }
    seqs.push_back(seq);
  }

  // Decode: every step runs the next token of each sequence through every layer, batched.
  mla::RowMatrix<float> h(2, hidden), attn(2, hidden);
  for (int step = 0; step < 8; ++step) {
    h.setRandom();                        // the embeddings of the tokens sampled last step
    std::vector<std::int64_t> positions;  // where each sequence continues (the same per layer)
    for (mla::SequenceId seq : seqs) positions.push_back(cache.next_position(seq, 0));
    for (const mla::MlaLayer<float>& layer : layers) {
      layer.forward_batch(h, positions, cache, seqs, attn, ws);
      h += attn;
    }
  }
  std::printf("cached tokens: %lld and %lld per layer, %zu bytes in use\n",
              static_cast<long long>(cache.length(seqs[0], 3)),
              static_cast<long long>(cache.length(seqs[1], 3)), cache.bytes_in_use());
  return cache.length(seqs[0], 3) == 45 && cache.length(seqs[1], 3) == 98 ? 0 : 1;
}
