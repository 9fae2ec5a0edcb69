// Runs one attention layer of a real checkpoint of an MLA model (Hugging Face format: DeepSeek
// V2 / V3 / V3.2, GLM-4.7-Flash, GLM-5, Mistral Large 3, LongCat-Flash, Kimi Linear, Kimi K3)
// on hidden states from a .npy file and writes the layer's attention output as .npy.
//
//   deepseek_layer --model DIR --layer N --input X.npy --output Y.npy [--start POS]
//                  [--prefill K] [--cache fp32|bf16|fp8] [--fp8 w8a32|w8a8] [--threads T]
//                  [--attn-block B]
//
// DIR holds config.json and model.safetensors (or model.safetensors.index.json and its shards).
// The rows of X ([tokens, hidden_size], float32) are consecutive tokens of one sequence at
// positions POS, POS + 1, ... (default 0). The first K tokens (default: all) run as one prefill,
// every remaining token as one decode step through the latent cache. FP8 checkpoints run W8A32
// (activations stay FP32) or, with --fp8 w8a8, W8A8 as DeepSeek's fp8_gemm (power-of-two
// activation scales when config.json's quantization_config.scale_fmt is "ue8m0"). --threads sets
// the threads (an mla::ThreadPool) of the projections and of the attention. DeepSeek-V3.2
// checkpoints (config.json with index_topk) run their sparse attention: the indexer's keys are
// cached beside the latent, and a token that sees more than index_topk cached tokens attends to
// the ones the indexer selects; other checkpoints run dense MLA. --attn-block chooses the MLA
// block of a layer with several (LongCat-Flash: 0 or 1; default 0). A model type or config
// field the library does not implement is refused, never ignored.
//
// On success the output ([tokens, hidden_size], float32) is written to Y and the line
// `cache_bytes_per_token_per_layer: <n>` is printed. On any error the program prints
// `error: <what, and where>` to stderr, writes nothing to Y and exits 1.

#include <cstdio>
#include <cstdlib>
#include <string>

#include "cli.hpp"
#include "mla/io.hpp"

namespace {

constexpr const char* kUsage =
    "usage: deepseek_layer --model DIR --layer N --input X.npy --output Y.npy [--start POS] "
    "[--prefill K] [--cache fp32|bf16|fp8] [--fp8 w8a32|w8a8] [--threads T] [--attn-block B]";

constexpr const char* kHelp =
    "usage: deepseek_layer --model DIR --layer N --input X.npy --output Y.npy [--start POS]\n"
    "                      [--prefill K] [--cache fp32|bf16|fp8] [--fp8 w8a32|w8a8] [--threads T]\n"
    "                      [--attn-block B]\n"
    "\n"
    "Runs the attention of layer N of an MLA model's checkpoint (Hugging Face format: DeepSeek\n"
    "V2/V3/V3.2, GLM-4.7-Flash, GLM-5, Mistral Large 3, LongCat-Flash, Kimi Linear, Kimi K3) on\n"
    "the hidden states in X.npy ([tokens, hidden_size], float32) through the latent KV cache and\n"
    "writes the attention output to Y.npy. Sparse models (DeepSeek-V3.2, GLM-5) run their\n"
    "lightning indexer's top-k, others dense MLA. A model type or config field the library does\n"
    "not implement is refused.\n"
    "\n"
    "  --model DIR     config.json and model.safetensors (or an index and its shards)\n"
    "  --layer N       the decoder layer, 0 <= N < num_hidden_layers (LongCat: num_layers)\n"
    "  --input X.npy   consecutive tokens of one sequence\n"
    "  --output Y.npy  written only when everything succeeded\n"
    "  --start POS     position of the first token (default 0)\n"
    "  --prefill K     the first K tokens run as one prefill, the rest as decode steps\n"
    "                  (default: all tokens in one prefill)\n"
    "  --cache S       latent cache storage: fp32 (default), bf16 or fp8\n"
    "  --fp8 M         FP8 checkpoints: w8a32 (default; activations stay FP32) or w8a8\n"
    "                  (activations quantised per 1x128 tile; config.json's scale_fmt applies)\n"
    "  --threads T     threads of the projections and of the decode attention (default 1)\n"
    "  --attn-block B  the MLA block of the layer (LongCat-Flash: 0 or 1; default 0)\n"
    "  --help          this text\n";

struct Args {
  std::string model, input, output;
  long long layer = -1, start = 0, prefill = -1, threads = 1, attn_block = 0;
  mla::CacheStorage cache = mla::CacheStorage::kFloat32;
  mla::Fp8Matmul fp8 = mla::Fp8Matmul::kW8A32;
};

Args parse_args(int argc, char** argv) {
  Args a;
  bool have_layer = false;
  for (const auto& option : cli::options(argc, argv, kUsage)) {
    const std::string& flag = option.first;
    const std::string& value = option.second;
    if (flag == "--model") {
      a.model = value;
    } else if (flag == "--layer") {
      a.layer = cli::parse_integer(flag, value);
      have_layer = true;
    } else if (flag == "--input") {
      a.input = value;
    } else if (flag == "--output") {
      a.output = value;
    } else if (flag == "--start") {
      a.start = cli::parse_integer(flag, value);
      mla::detail::require(a.start >= 0, "--start must be >= 0, got ", a.start);
    } else if (flag == "--prefill") {
      a.prefill = cli::parse_integer(flag, value);
      mla::detail::require(a.prefill >= 0, "--prefill must be >= 0, got ", a.prefill);
    } else if (flag == "--cache") {
      if (value == "fp32") {
        a.cache = mla::CacheStorage::kFloat32;
      } else if (value == "bf16") {
        a.cache = mla::CacheStorage::kBFloat16;
      } else if (value == "fp8") {
        a.cache = mla::CacheStorage::kFp8E4M3;
      } else {
        mla::detail::fail("--cache must be fp32, bf16 or fp8, got '", value, "'");
      }
    } else if (flag == "--fp8") {
      if (value == "w8a32") {
        a.fp8 = mla::Fp8Matmul::kW8A32;
      } else if (value == "w8a8") {
        a.fp8 = mla::Fp8Matmul::kW8A8;
      } else {
        mla::detail::fail("--fp8 must be w8a32 or w8a8, got '", value, "'");
      }
    } else if (flag == "--attn-block") {
      a.attn_block = cli::parse_integer(flag, value);
      mla::detail::require(a.attn_block >= 0, "--attn-block must be >= 0, got ", a.attn_block);
    } else if (flag == "--threads") {
      a.threads = cli::parse_integer(flag, value);
      mla::detail::require(a.threads >= 1 && a.threads <= 1024,
                           "--threads must be in [1, 1024], got ", a.threads);
    } else {
      mla::detail::fail("unknown option '", flag, "'\n", kUsage);
    }
  }
  mla::detail::require(!a.model.empty() && have_layer && !a.input.empty() && !a.output.empty(),
                       "--model, --layer, --input and --output are required\n", kUsage);
  return a;
}

int run(const Args& a) {
  Eigen::setNbThreads(static_cast<int>(a.threads));
  const mla::io::CheckpointConfig cfg = mla::io::read_config(a.model + "/config.json");
  const mla::io::Checkpoint ckpt = mla::io::Checkpoint::open(a.model);
  const mla::MlaConfig config = cfg.layer_config(a.layer);
  // A layer that reuses an earlier layer's top-k (GLM-5.1's IndexShare) cannot run alone.
  mla::detail::require(
      !config.index_shared, "layer ", a.layer,
      " has no indexer of its own: it reuses the top-k of the previous full "
      "layer (indexer_types \"shared\"), which one layer alone cannot compute; "
      "run the layers in order through the library (MlaWorkspace::topk_selection)");
  mla::io::LoadOptions load;
  load.fp8_matmul = a.fp8;
  load.attention_block = a.attn_block;
  const mla::MlaLayer<float> layer(
      config, mla::io::load_attention_weights<float>(ckpt, cfg, a.layer, load));

  const mla::RowMatrix<float> x = mla::io::read_npy(a.input);
  const mla::Index tokens = x.rows();
  mla::detail::require(x.cols() == config.hidden_size, a.input, ": has ", x.cols(),
                       " columns, expected hidden_size = ", config.hidden_size);
  const mla::Index prefill = a.prefill < 0 ? tokens : a.prefill;
  mla::detail::require(prefill <= tokens, "--prefill ", prefill, " exceeds the ", tokens,
                       " tokens of ", a.input);

  // A one-layer cache with room for the whole sequence.
  mla::LatentCacheOptions options;
  options.block_tokens = 64;
  options.num_blocks = std::max<mla::Index>(1, (tokens + 63) / 64);
  options.storage = a.cache;
  mla::LatentCache cache(config, options);
  const mla::SequenceId seq = cache.add_sequence();
  mla::ThreadPool pool(static_cast<int>(a.threads));
  mla::MlaWorkspace<float> ws;
  mla::RunOptions run;
  run.executor = &pool;
  mla::RowMatrix<float> y(tokens, config.hidden_size);
  if (prefill > 0) {
    layer.forward(x.topRows(prefill), a.start, cache, seq, y.topRows(prefill), ws, run);
  }
  for (mla::Index t = prefill; t < tokens; ++t) {
    layer.forward(x.row(t), a.start + t, cache, seq, y.row(t), ws, run);
  }
  // Nothing is written before the whole computation has succeeded.
  mla::io::write_npy(a.output, y);
  std::printf("cache_bytes_per_token_per_layer: %zu\n", cache.bytes_per_token_per_layer());
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return cli::main(argc, argv, kHelp, parse_args, run); }
