#pragma once
// Glue between the library's types and the independent references in tests/reference/.

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "mla/mla.hpp"
#include "reference/dsa_reference.hpp"
#include "reference/mla_reference.hpp"

namespace test {

/// ||got - want|| / ||want|| (Frobenius). +Inf when either side holds a NaN or Inf, so that a
/// comparison `rel_error(...) <= tol` fails instead of passing on NaN.
inline double rel_error(const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double diff = 0.0, norm = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(want[i])) {
      return std::numeric_limits<double>::infinity();
    }
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  return norm == 0.0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

/// max |got - want|; +Inf for a NaN or Inf on either side, or sizes that differ.
inline double max_abs_error(const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double worst = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(want[i])) {
      return std::numeric_limits<double>::infinity();
    }
    worst = std::max(worst, std::abs(got[i] - want[i]));
  }
  return worst;
}

/// Row-major contents of a matrix, as doubles.
template <class Derived>
std::vector<double> to_vec(const Eigen::MatrixBase<Derived>& m) {
  std::vector<double> v;
  v.reserve(static_cast<std::size_t>(m.size()));
  for (Eigen::Index i = 0; i < m.rows(); ++i) {
    for (Eigen::Index j = 0; j < m.cols(); ++j) v.push_back(static_cast<double>(m(i, j)));
  }
  return v;
}

template <class T>
mla::RowMatrix<T> from_vec(const std::vector<double>& v, Eigen::Index rows, Eigen::Index cols) {
  mla::RowMatrix<T> m(rows, cols);
  for (Eigen::Index i = 0; i < rows; ++i) {
    for (Eigen::Index j = 0; j < cols; ++j)
      m(i, j) = static_cast<T>(v[static_cast<std::size_t>(i * cols + j)]);
  }
  return m;
}

inline ref::RopeSpec to_ref_rope(const mla::MlaConfig& c) {
  ref::RopeSpec r;
  r.dim = static_cast<int>(c.qk_rope_head_dim);
  r.theta = c.rope_theta;
  r.yarn = c.rope_scaling.type == mla::RopeScaling::Type::kYarn;
  r.factor = c.rope_scaling.factor;
  r.original_max_pos = static_cast<double>(c.rope_scaling.original_max_position_embeddings);
  r.beta_fast = c.rope_scaling.beta_fast;
  r.beta_slow = c.rope_scaling.beta_slow;
  r.mscale = c.rope_scaling.mscale;
  r.mscale_all_dim = c.rope_scaling.mscale_all_dim;
  r.attention_factor = c.rope_scaling.attention_factor;
  r.interleaved = c.rope_layout == mla::RopeLayout::kInterleaved;
  r.inv_freq = c.rope_inv_freq;
  return r;
}

inline ref::MlaSpec to_ref(const mla::MlaConfig& c) {
  ref::MlaSpec s;
  s.hidden = static_cast<int>(c.hidden_size);
  s.heads = static_cast<int>(c.num_attention_heads);
  s.q_lora = static_cast<int>(c.q_lora_rank);
  s.kv_lora = static_cast<int>(c.kv_lora_rank);
  s.nope = static_cast<int>(c.qk_nope_head_dim);
  s.v = static_cast<int>(c.v_head_dim);
  s.eps = c.rms_norm_eps;
  s.rope = to_ref_rope(c);
  s.no_rope = c.mla_use_nope;
  s.output_gate = c.mla_use_output_gate;
  s.llama4_beta = c.llama_4_scaling.beta;
  s.llama4_orig = c.llama_4_scaling.original_max_position_embeddings;
  s.q_lora_scale = c.q_lora_scale;
  s.kv_lora_scale = c.kv_lora_scale;
  return s;
}

template <class T>
ref::MlaWeights to_ref(const mla::MlaWeights<T>& w) {
  ref::MlaWeights r;
  // FP8 projections enter the reference dequantised.
  r.wq = to_vec(w.wq.to_dense());
  r.wq_a = to_vec(w.wq_a.to_dense());
  r.q_norm = to_vec(w.q_norm.transpose());
  r.wq_b = to_vec(w.wq_b.to_dense());
  r.wkv_a = to_vec(w.wkv_a.to_dense());
  r.kv_norm = to_vec(w.kv_norm.transpose());
  r.wkv_b = to_vec(w.wkv_b.to_dense());
  r.wo = to_vec(w.wo.to_dense());
  r.wg = to_vec(w.wg.to_dense());
  return r;
}

inline ref::IndexerSpec to_ref_indexer(const mla::MlaConfig& c) {
  ref::IndexerSpec s;
  s.heads = static_cast<int>(c.index_n_heads);
  s.dim = static_cast<int>(c.index_head_dim);
  s.topk = static_cast<int>(c.index_topk);
  s.pow2_scales = c.index_scales == mla::ScaleFormat::kPowerOfTwo;
  s.interleaved_rope = c.index_rope_layout == mla::RopeLayout::kInterleaved;
  return s;
}

template <class T>
ref::IndexerWeights to_ref_indexer(const mla::IndexerWeights<T>& w) {
  ref::IndexerWeights r;
  r.wq_b = test::to_vec(w.wq_b.to_dense());
  r.wk = test::to_vec(w.wk.to_dense());
  r.k_norm = test::to_vec(w.k_norm.transpose());
  r.k_norm_bias = test::to_vec(w.k_norm_bias.transpose());
  r.weights_proj = test::to_vec(w.weights_proj.to_dense());
  return r;
}

/// Random hidden states [n, hidden] with entries uniform in [-1, 1], seeded.
template <class T>
mla::RowMatrix<T> random_input(Eigen::Index n, Eigen::Index hidden, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  mla::RowMatrix<T> x(n, hidden);
  for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(u(rng));
  return x;
}

/// The cache storage that holds T exactly.
template <class T>
mla::CacheStorage exact_storage() {
  return sizeof(T) == 8 ? mla::CacheStorage::kFloat64 : mla::CacheStorage::kFloat32;
}

/// Tolerance of a whole-layer comparison against the double reference: relative error of the
/// output. float: a few ulps amplified by the layer's sums (1e-5, the bound); double:
/// 1e-12.
template <class T>
constexpr double layer_tolerance() {
  return sizeof(T) == 8 ? 1e-12 : 1e-5;
}

/// Everything a view holds, dequantised to double: [tokens, d_c + R], [c^KV ; k^R] per row.
inline mla::RowMatrix<double> cache_contents_of(const mla::LatentView& v) {
  mla::RowMatrix<double> c(v.tokens(), v.kv_lora_rank()), k(v.tokens(), v.rope_dim());
  v.read<double>(0, v.tokens(), c, k);
  mla::RowMatrix<double> both(v.tokens(), v.kv_lora_rank() + v.rope_dim());
  both << c, k;
  return both;
}

/// Everything (seq, layer) holds, dequantised to double: [tokens, d_c + R], [c^KV ; k^R] per row.
inline mla::RowMatrix<double> cache_contents(const mla::LatentCache& cache, mla::SequenceId seq,
                                             Eigen::Index layer) {
  return cache_contents_of(cache.view(seq, layer));
}

/// The instruction sets this machine runs (mla::kAllIsas: avx512 with and without AVX512-BF16,
/// and the AMX tile model wherever the CPU has AVX512-BF16), each forced in turn for f(isa),
/// then the default choice restored (also when f throws). Every kernel variant runs the test
/// this way; no CPU fact is changed.
template <class F>
void for_each_isa(F&& f) {
  struct Restore {
    ~Restore() { mla::reset_isa(); }
  } restore;
  for (mla::Isa isa : mla::kAllIsas) {
    if (!mla::isa_available(isa)) continue;
    mla::force_isa(isa);
    SCOPED_TRACE(std::string("isa ") + mla::to_string(isa));
    f(isa);
  }
}

/// Checks that running `f` throws mla::Error whose message contains `needle`.
template <class F>
::testing::AssertionResult throws_error_containing(F&& f, const std::string& needle) {
  try {
    f();
  } catch (const mla::Error& e) {
    if (std::string(e.what()).find(needle) != std::string::npos) {
      return ::testing::AssertionSuccess();
    }
    return ::testing::AssertionFailure()
           << "message \"" << e.what() << "\" lacks \"" << needle << "\"";
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-mla::Error: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw (expected \"" << needle << "\")";
}

/// What a command printed and how it ended.
struct CommandResult {
  int status;  ///< the exit status, -1 when it did not exit normally
  std::string out, err;
};

/// Runs `command` through the shell with its stdout and stderr captured in files of `dir`
/// (named after this process, so that tests running at once do not share them; removed after).
inline CommandResult run_command(const std::string& command, const std::string& dir) {
  const std::string stem = dir + "/run." + std::to_string(::getpid());
  const std::string out = stem + ".out", err = stem + ".err";
  const int status = std::system((command + " > " + out + " 2> " + err).c_str());
  const auto slurp = [](const std::string& p) {
    std::ifstream in(p);
    std::stringstream s;
    s << in.rdbuf();
    std::remove(p.c_str());
    return s.str();
  };
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
}

}  // namespace test
