// Converts an MHA (or GQA) attention layer to MLA at several latent ranks, and to GQA with
// mean-pooled KV heads at matching cache sizes, and prints how much of the attention output
// each loses on sample inputs.
//
//   convert_mha [--hidden N] [--heads H] [--kv-heads G] [--head-dim D] [--v-head-dim V]
//               [--rope-dim R] [--decay S] [--rope-shared F] [--tokens T] [--calibration N]
//               [--seed K] [--rope-keep N[,N...]] [--rope-criterion frequency|contribution]
//               [--context L[,L...]] [--model DIR --layer L] [--json OUT]
//
// Without --model the layer is random: the stacked non-rotary key and value projections have
// singular values S^0, S^1, S^2, ... (S = --decay, 0.98 by default; trained projections decay
// too), queries and output projection are Gaussian, and each KV head's rotary key rows are
// sqrt(F) times rows shared by all heads plus sqrt(1 - F) times its own (F = --rope-shared, 0 by
// default: independent heads, the hardest case for MLA's one shared rotary key). With --model DIR
// the layer
// is layer L of a Llama-style checkpoint (config.json and model.safetensors with
// model.layers.L.self_attn.{q,k,v,o}_proj.weight; RoPE on the whole head, half-split).
//
// Inputs are T Gaussian tokens (64 by default) at positions 0 .. T-1; --calibration N fits the
// factorisation to the covariance of N further samples (0, the default: unweighted). The error
// is |y - y_MHA| / |y_MHA| over all tokens, y_MHA the source layer's output. Cache bytes are
// per token and layer in FP32: G (D + V) * 4 for GQA with G groups, (r + N) * 4 for MLA keeping
// N rotary dimensions.
//
// --rope-keep lists how many rotary dimensions stay rotary (partial RoPE: the other pairs join
// the latent; default R, the conversion without partial RoPE), chosen by --rope-criterion
// (frequency: the highest, the default; contribution: MHA2MLA's query-norm x key-norm).
// --context lists context lengths L >= T to measure at: the T sample tokens then sit L / T
// positions apart (RoPE frequencies scaled by L / T, the same thing), so that relative
// distances reach L (default: T, consecutive positions).
//
// --json OUT writes the rows as a JSON list of objects with keys method ("mla" or "gqa"),
// rank (null for gqa), groups (null for mla), rope_keep (null for gqa), context,
// cache_bytes_per_token and rel_error. On an error the program prints `error: ...`, leaves OUT
// as it was and exits 1.

#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "cli.hpp"
#include "mla/convert.hpp"
#include "mla/io.hpp"
#include "mla/mla.hpp"

namespace {

using mla::Index;
using mla::RowMatrix;

constexpr const char* kUsage =
    "usage: convert_mha [--hidden N] [--heads H] [--kv-heads G] [--head-dim D] [--v-head-dim V] "
    "[--rope-dim R] [--decay S] [--rope-shared F] [--tokens T] [--calibration N] [--seed K] "
    "[--rope-keep N[,N...]] [--rope-criterion frequency|contribution] [--context L[,L...]] "
    "[--model DIR --layer L] [--json OUT]";

constexpr const char* kHelp =
    "usage: convert_mha [--hidden N] [--heads H] [--kv-heads G] [--head-dim D] [--v-head-dim V]\n"
    "                   [--rope-dim R] [--decay S] [--rope-shared F] [--tokens T]\n"
    "                   [--calibration N] [--seed K] [--rope-keep N[,N...]]\n"
    "                   [--rope-criterion frequency|contribution] [--context L[,L...]]\n"
    "                   [--model DIR --layer L] [--json OUT]\n"
    "\n"
    "Converts an MHA/GQA attention layer to MLA at several latent ranks, and to GQA with\n"
    "mean-pooled KV heads at matching cache sizes, and prints each one's relative error of the\n"
    "attention output against the source layer.\n"
    "\n"
    "  --hidden N        model width of the random layer (default 512)\n"
    "  --heads H         query heads (default 8)\n"
    "  --kv-heads G      KV heads (default 8: MHA; fewer: GQA)\n"
    "  --head-dim D      key width per head (default 64)\n"
    "  --v-head-dim V    value width per head (default 64)\n"
    "  --rope-dim R      rotary dimensions at the end of every key (default 16)\n"
    "  --decay S         singular-value decay of the random K/V projections (default 0.98)\n"
    "  --rope-shared F   share of the rotary keys common to all heads, in [0, 1] (default 0)\n"
    "  --tokens T        sample tokens at positions 0 .. T-1 (default 64)\n"
    "  --calibration N   fit the factorisation to N further samples (default 0: unweighted)\n"
    "  --seed K          random seed (default 1)\n"
    "  --rope-keep LIST  rotary dimensions that stay rotary, e.g. 16,8,4,0 (partial RoPE: the\n"
    "                    other pairs join the latent; default: all of them)\n"
    "  --rope-criterion  which stay: frequency (the highest; default) or contribution\n"
    "  --context LIST    contexts to measure at, each >= T: the T tokens sit L/T positions\n"
    "                    apart (default: T)\n"
    "  --model DIR       a Llama-style checkpoint instead of the random layer, with --layer L\n"
    "  --json OUT        also write the rows as JSON\n"
    "  --help            this text\n";

struct Args {
  mla::MhaConfig mha;
  double decay = 0.98, rope_shared = 0.0;
  long long tokens = 64, calibration = 0, seed = 1, layer = -1;
  std::string model, json;
  std::vector<long long> rope_keep, contexts;
  mla::RopeKeep criterion = mla::RopeKeep::kHighestFrequency;
  long long rope_rank = 1;
};

/// A comma-separated list of integers in [lo, hi].
std::vector<long long> parse_list(const std::string& flag, const std::string& value, long long lo,
                                  long long hi) {
  std::vector<long long> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = value.find(',', start);
    const long long v = cli::parse_integer(flag, value.substr(start, comma - start));
    mla::detail::require(v >= lo && v <= hi, flag, " values must be in [", lo, ", ", hi, "], got ",
                         v);
    out.push_back(v);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

Args parse_args(int argc, char** argv) {
  Args a;
  a.mha.hidden_size = 512;
  a.mha.num_heads = 8;
  a.mha.num_kv_heads = 8;
  a.mha.head_dim = 64;
  a.mha.v_head_dim = 64;
  a.mha.rope_dim = 16;
  for (const auto& option : cli::options(argc, argv, kUsage)) {
    const std::string& flag = option.first;
    const std::string& value = option.second;
    const auto count = [&](long long lo, long long hi) {
      const long long v = cli::parse_integer(flag, value);
      mla::detail::require(v >= lo && v <= hi, flag, " must be in [", lo, ", ", hi, "], got ", v);
      return v;
    };
    if (flag == "--hidden") {
      a.mha.hidden_size = count(1, 1 << 14);
    } else if (flag == "--heads") {
      a.mha.num_heads = count(1, 1024);
    } else if (flag == "--kv-heads") {
      a.mha.num_kv_heads = count(1, 1024);
    } else if (flag == "--head-dim") {
      a.mha.head_dim = count(1, 1024);
    } else if (flag == "--v-head-dim") {
      a.mha.v_head_dim = count(1, 1024);
    } else if (flag == "--rope-dim") {
      a.mha.rope_dim = count(0, 1024);
    } else if (flag == "--decay") {
      a.decay = cli::parse_number(flag, value);
      mla::detail::require(a.decay > 0 && a.decay <= 1, "--decay must be in (0, 1], got ", value);
    } else if (flag == "--rope-shared") {
      a.rope_shared = cli::parse_number(flag, value);
      mla::detail::require(a.rope_shared >= 0 && a.rope_shared <= 1,
                           "--rope-shared must be in [0, 1], got ", value);
    } else if (flag == "--tokens") {
      a.tokens = count(1, 1 << 16);
    } else if (flag == "--calibration") {
      a.calibration = count(0, 1 << 20);
    } else if (flag == "--seed") {
      a.seed = count(0, (1LL << 62));
    } else if (flag == "--model") {
      a.model = value;
    } else if (flag == "--layer") {
      a.layer = count(0, 1 << 20);
    } else if (flag == "--json") {
      a.json = value;
    } else if (flag == "--rope-keep") {
      a.rope_keep = parse_list(flag, value, 0, 1024);
    } else if (flag == "--context") {
      a.contexts = parse_list(flag, value, 1, 1 << 30);
    } else if (flag == "--rope-rank") {
      a.rope_rank = count(1, 1024);
    } else if (flag == "--rope-criterion") {
      mla::detail::require(value == "frequency" || value == "contribution",
                           "--rope-criterion must be frequency or contribution, got '", value, "'");
      a.criterion =
          value == "frequency" ? mla::RopeKeep::kHighestFrequency : mla::RopeKeep::kContribution;
    } else {
      mla::detail::fail("unknown option '", flag, "'\n", kUsage);
    }
  }
  mla::detail::require(a.model.empty() == (a.layer < 0), "--model and --layer go together\n",
                       kUsage);
  return a;
}

RowMatrix<double> gaussian(Index rows, Index cols, std::mt19937_64& rng, double sd) {
  std::normal_distribution<double> nd(0.0, sd);
  RowMatrix<double> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
  return m;
}

/// A random layer whose stacked non-rotary key and value rows have singular values decay^k
/// (scaled so that the stack has the Frobenius norm of a Gaussian one with variance 1/hidden).
mla::MhaWeights<double> random_layer(const mla::MhaConfig& c, double decay, double rope_shared,
                                     std::mt19937_64& rng) {
  const Index hid = c.hidden_size, G = c.num_kv_heads, dk = c.head_dim, dv = c.v_head_dim,
              P = dk - c.rope_dim, width = G * (P + dv), n = std::min(width, hid);
  const double sd = 1.0 / std::sqrt(static_cast<double>(hid));
  mla::MhaWeights<double> w{
      gaussian(c.num_heads * dk, hid, rng, sd), gaussian(G * dk, hid, rng, sd),
      RowMatrix<double>(G * dv, hid),
      gaussian(hid, c.num_heads * dv, rng, 1.0 / std::sqrt(static_cast<double>(c.num_heads * dv)))};
  // M = U diag(s) V^T with orthonormal U [width, n], V [hid, n].
  const Eigen::MatrixXd u =
      Eigen::HouseholderQR<Eigen::MatrixXd>(gaussian(width, n, rng, 1.0)).householderQ() *
      Eigen::MatrixXd::Identity(width, n);
  const Eigen::MatrixXd v =
      Eigen::HouseholderQR<Eigen::MatrixXd>(gaussian(hid, n, rng, 1.0)).householderQ() *
      Eigen::MatrixXd::Identity(hid, n);
  Eigen::VectorXd s(n);
  for (Index k = 0; k < n; ++k) s(k) = std::pow(decay, static_cast<double>(k));
  s *= std::sqrt(static_cast<double>(width) * static_cast<double>(hid) * sd * sd) / s.norm();
  const Eigen::MatrixXd m = u * s.asDiagonal() * v.transpose();
  const RowMatrix<double> shared = gaussian(c.rope_dim, hid, rng, sd);
  for (Index g = 0; g < G; ++g) {
    w.wk.middleRows(g * dk, P) = m.middleRows(g * (P + dv), P);
    w.wv.middleRows(g * dv, dv) = m.middleRows(g * (P + dv) + P, dv);
    w.wk.middleRows(g * dk + P, c.rope_dim) =
        std::sqrt(rope_shared) * shared +
        std::sqrt(1 - rope_shared) * w.wk.middleRows(g * dk + P, c.rope_dim);
  }
  return w;
}

/// Output of a converted MLA layer for x (one prefill on a double cache).
RowMatrix<double> run_mla(const mla::MlaConversion<double>& m, const RowMatrix<double>& x) {
  const mla::MlaLayer<double> layer(m.config, m.weights);
  mla::LatentCacheOptions o;
  o.block_tokens = 64;
  o.num_blocks = (x.rows() + 63) / 64;
  o.storage = mla::CacheStorage::kFloat64;
  mla::LatentCache cache(m.config, o);
  const auto seq = cache.add_sequence();
  mla::MlaWorkspace<double> ws;
  RowMatrix<double> y(x.rows(), x.cols());
  layer.forward(x, 0, cache, seq, y, ws);
  return y;
}

struct Row {
  std::string method;
  Index rank = 0, groups = 0, rope_keep = 0, context = 0, bytes = 0;
  double error = 0;
};

/// The source's RoPE frequencies (from rope_theta, or its explicit ones).
std::vector<double> frequencies(const mla::MhaConfig& c) {
  if (c.rope_dim == 0) return {};
  return mla::Rope(mla::detail::convert::mla_shape(c, 1)).inv_freq();
}

int run(const Args& a) {
  std::mt19937_64 rng(static_cast<std::uint64_t>(a.seed));
  mla::MhaConfig c = a.mha;
  mla::MhaWeights<double> w;
  if (a.model.empty()) {
    c.validate();
    w = random_layer(c, a.decay, a.rope_shared, rng);
  } else {
    const mla::io::LlamaConfig cfg = mla::io::read_llama_config(a.model + "/config.json");
    w = mla::io::load_llama_attention<double>(mla::io::Checkpoint::open(a.model), cfg, a.layer);
    c = cfg.attention;
  }
  const RowMatrix<double> x = gaussian(a.tokens, c.hidden_size, rng, 1.0);
  const RowMatrix<double> calibration = gaussian(a.calibration, c.hidden_size, rng, 1.0);
  std::vector<long long> keeps = a.rope_keep, contexts = a.contexts;
  if (keeps.empty()) keeps = {c.rope_dim};
  if (contexts.empty()) contexts = {a.tokens};
  for (long long k : keeps) {
    mla::detail::require(k <= c.rope_dim && k % 2 == 0,
                         "--rope-keep values must be even and at "
                         "most the rotary width ",
                         c.rope_dim, ", got ", k);
  }
  for (long long L : contexts) {
    mla::detail::require(L >= a.tokens, "--context values must be >= --tokens (", a.tokens,
                         "), got ", L);
  }
  const std::vector<double> freq = frequencies(c);

  std::vector<Row> rows;
  double rotary = -1.0;  // with every rotary dimension kept
  for (long long L : contexts) {
    // The tokens L / T positions apart: every frequency times L / T.
    const double stretch = static_cast<double>(L) / static_cast<double>(a.tokens);
    mla::MhaConfig cs = c;
    cs.rope_inv_freq.clear();
    for (double f : freq) cs.rope_inv_freq.push_back(f * stretch);
    const RowMatrix<double> want = mla::mha_forward<double>(cs, w, x);
    const auto error = [&](const RowMatrix<double>& y) { return (y - want).norm() / want.norm(); };
    // GQA: every group count that divides the KV heads.
    std::vector<Row> gqa;
    for (Index g = 1; g <= c.num_kv_heads; ++g) {
      if (c.num_kv_heads % g != 0) continue;
      mla::MhaConfig pc;
      const auto p = mla::pool_kv_heads(cs, w, g, pc);
      gqa.push_back({"gqa", 0, g, 0, L, pc.cache_bytes_per_token(),
                     error(mla::mha_forward<double>(pc, p, x))});
    }
    rows.insert(rows.end(), gqa.begin(), gqa.end());
    for (long long keep : keeps) {
      // MLA: the ranks whose cache matches each GQA row's, and powers of two, up to full rank.
      const Index full = c.num_kv_heads * (c.head_dim - keep + c.v_head_dim);
      std::vector<Index> ranks;
      for (Index r = 8; r < full; r *= 2) ranks.push_back(r);
      for (const Row& g : gqa) {
        const Index r = g.bytes / 4 - keep * a.rope_rank;
        if (r >= 1 && r < full) ranks.push_back(r);
      }
      ranks.push_back(full);
      std::sort(ranks.begin(), ranks.end());
      ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
      for (Index r : ranks) {
        auto m = mla::convert_to_mla(c, w, r, calibration, {keep, a.criterion, a.rope_rank});
        if (keep == c.rope_dim) rotary = m.rotary_retained;
        // The kept pairs at the stretched frequencies.
        m.config.rope_inv_freq.clear();
        for (Index i : m.rope_pairs_kept) {
          for (long long d = 0; d < a.rope_rank; ++d) {
            m.config.rope_inv_freq.push_back(freq[static_cast<std::size_t>(i)] * stretch);
          }
        }
        rows.push_back({"mla", r, 0, keep, L, (r + keep * a.rope_rank) * 4, error(run_mla(m, x))});
      }
    }
  }

  std::printf(
      "source: hidden %lld, %lld heads, %lld KV heads, head %lld (+%lld rotary of them), "
      "v %lld; MHA cache %lld bytes/token\n",
      static_cast<long long>(c.hidden_size), static_cast<long long>(c.num_heads),
      static_cast<long long>(c.num_kv_heads), static_cast<long long>(c.head_dim),
      static_cast<long long>(c.rope_dim), static_cast<long long>(c.v_head_dim),
      static_cast<long long>(c.cache_bytes_per_token()));
  if (rotary >= 0) {
    std::printf("shared rotary key keeps %.1f%% of the rotary keys' energy\n", 100.0 * rotary);
  }
  std::printf("\n");
  std::printf("%-6s %6s %6s %9s %8s %12s %10s\n", "method", "rank", "groups", "rope_keep",
              "context", "bytes/token", "rel_error");
  for (const Row& r : rows) {
    const std::string rank = r.method == "mla" ? std::to_string(r.rank) : "-";
    const std::string groups = r.method == "gqa" ? std::to_string(r.groups) : "-";
    const std::string keep = r.method == "mla" ? std::to_string(r.rope_keep) : "-";
    std::printf("%-6s %6s %6s %9s %8lld %12lld %10.3e\n", r.method.c_str(), rank.c_str(),
                groups.c_str(), keep.c_str(), static_cast<long long>(r.context),
                static_cast<long long>(r.bytes), r.error);
  }

  if (!a.json.empty()) {
    nlohmann::json out = nlohmann::json::array();
    for (const Row& r : rows) {
      nlohmann::json o;
      o["method"] = r.method;
      o["rank"] = r.method == "mla" ? nlohmann::json(r.rank) : nlohmann::json(nullptr);
      o["groups"] = r.method == "gqa" ? nlohmann::json(r.groups) : nlohmann::json(nullptr);
      o["rope_keep"] = r.method == "mla" ? nlohmann::json(r.rope_keep) : nlohmann::json(nullptr);
      o["context"] = r.context;
      o["cache_bytes_per_token"] = r.bytes;
      o["rel_error"] = r.error;
      out.push_back(o);
    }
    // Written to a temporary and renamed, so OUT is never left half-written.
    const std::string tmp = a.json + ".tmp";
    {
      std::ofstream f(tmp);
      f << out.dump(2) << "\n";
      mla::detail::require(static_cast<bool>(f), tmp, ": cannot write");
    }
    mla::detail::require(std::rename(tmp.c_str(), a.json.c_str()) == 0, a.json,
                         ": cannot replace with ", tmp);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return cli::main(argc, argv, kHelp, parse_args, run); }
