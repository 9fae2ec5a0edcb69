#pragma once
/// \file
/// Decoupled rotary position embedding (RoPE) with YaRN context extension, and the softmax
/// scale that YaRN adjusts. Always computed in the compute type (float or double), never in a
/// storage type; angles pos * theta are formed in double.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mla/config.hpp"
#include "mla/error.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// The softmax scale sigma = (P + R)^-1/2, times mscale^2 under YaRN with a nonzero
/// mscale_all_dim (mscale = yarn_get_mscale(factor, mscale_all_dim)). Note the width is P + R
/// (192 for DeepSeek), not the absorbed path's d_c + R.
inline double softmax_scale(const MlaConfig& c) {
  double sigma = 1.0 / std::sqrt(static_cast<double>(c.qk_head_dim()));
  const RopeScaling& y = c.rope_scaling;
  if (y.type == RopeScaling::Type::kYarn && y.mscale_all_dim != 0.0) {
    const double m = yarn_get_mscale(y.factor, y.mscale_all_dim);
    sigma *= m * m;
  }
  return sigma;
}

/// The factor YaRN multiplies cos and sin by, by Hugging Face's rule
/// (`_compute_yarn_parameters`): attention_factor when set (> 0); else
/// yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim) when both are
/// non-zero; else yarn_get_mscale(factor, 1). DeepSeek's configs set mscale == mscale_all_dim
/// (magnitude 1); Mistral Large 3 writes attention_factor 1.
inline double yarn_magnitude(const RopeScaling& y) {
  if (y.attention_factor > 0.0) return y.attention_factor;
  if (y.mscale != 0.0 && y.mscale_all_dim != 0.0) {
    return yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim);
  }
  return yarn_get_mscale(y.factor, 1.0);
}

/// YaRN's correction range in pair indices: pairs i <= low keep their frequency, pairs
/// i >= high are divided by the factor, and the ones between are blended linearly.
struct YarnRange {
  double low;
  double high;
};

/// The pair index at which a frequency makes `rotations` full turns over the original context:
/// R * ln(orig / (2 pi rotations)) / (2 ln base).
inline double yarn_correction_dim(double rotations, const MlaConfig& c) {
  const double pi = 3.14159265358979323846;
  const auto orig = static_cast<double>(c.rope_scaling.original_max_position_embeddings);
  return static_cast<double>(c.qk_rope_head_dim) * std::log(orig / (2.0 * pi * rotations)) /
         (2.0 * std::log(c.rope_theta));
}

/// low = max(floor(corr(beta_fast)), 0), high = min(ceil(corr(beta_slow)), R - 1), and
/// high += 0.001 when they meet (DeepSeek-V3 defaults: low 10, high 23).
inline YarnRange yarn_correction_range(const MlaConfig& c) {
  double low = std::floor(yarn_correction_dim(c.rope_scaling.beta_fast, c));
  double high = std::ceil(yarn_correction_dim(c.rope_scaling.beta_slow, c));
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(c.qk_rope_head_dim - 1));
  if (low == high) high += 0.001;
  return {low, high};
}

/// The rotary frequencies of one config, and their application to queries and keys.
///
/// Frequency of pair i (i < R/2): theta_i = base^(-2i/R); under YaRN
/// theta'_i = theta_i / factor * ramp_i + theta_i * (1 - ramp_i), with
/// ramp_i = clamp((i - low) / (high - low), 0, 1). Pair i of a vector at position p is rotated
/// by the angle p * theta'_i; cos and sin are multiplied by yarn_magnitude() (1 for every
/// published DeepSeek config). A NoPE config (MlaConfig::mla_use_nope) rotates nothing.
/// The two dimensions RoPE turns together as pair i (i < dim / 2) of a dim-wide slice:
/// (2i, 2i + 1) interleaved, (i, i + dim / 2) half-split. The pair turns by theta_i like the
/// complex number x[first] + i x[second].
struct RopePair {
  Index first, second;
};
inline RopePair rope_pair(RopeLayout layout, Index dim, Index i) {
  return layout == RopeLayout::kInterleaved ? RopePair{2 * i, 2 * i + 1} : RopePair{i, i + dim / 2};
}

class Rope {
 public:
  explicit Rope(const MlaConfig& config)
      : dim_(config.qk_rope_head_dim), layout_(config.rope_layout), rotates_(!config.mla_use_nope) {
    config.validate();
    const Index pairs = dim_ / 2;
    inv_freq_.resize(static_cast<std::size_t>(pairs));
    const RopeScaling& y = config.rope_scaling;
    const bool yarn = y.type == RopeScaling::Type::kYarn;
    const YarnRange range = yarn ? yarn_correction_range(config) : YarnRange{0.0, 1.0};
    for (Index i = 0; i < pairs; ++i) {
      const double theta =
          std::pow(config.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(dim_));
      double f = theta;
      if (yarn) {
        const double ramp =
            std::clamp((static_cast<double>(i) - range.low) / (range.high - range.low), 0.0, 1.0);
        f = theta / y.factor * ramp + theta * (1.0 - ramp);
      }
      inv_freq_[static_cast<std::size_t>(i)] = f;
    }
    if (!config.rope_inv_freq.empty()) inv_freq_ = config.rope_inv_freq;
    magnitude_ = yarn ? yarn_magnitude(y) : 1.0;
  }

  /// R, the rotary width.
  Index dim() const { return dim_; }
  RopeLayout layout() const { return layout_; }
  /// theta'_i for i < R/2, in double.
  const std::vector<double>& inv_freq() const { return inv_freq_; }
  /// The factor applied to cos and sin.
  double magnitude() const { return magnitude_; }
  /// False for a NoPE config (MlaConfig::mla_use_nope): apply() leaves its input as it is.
  bool rotates() const { return rotates_; }

  /// cos(pos * theta'_i) and sin(pos * theta'_i), times magnitude(), for i < R/2. The angle is
  /// formed and reduced in double (at pos 1.6e5 a float angle would be off by ~0.01 rad), then
  /// rounded once to T.
  template <class T>
  void cos_sin(std::int64_t pos, T* cos, T* sin) const {
    const auto p = static_cast<double>(pos);
    for (std::size_t i = 0; i < inv_freq_.size(); ++i) {
      const double angle = p * inv_freq_[i];
      cos[i] = static_cast<T>(std::cos(angle) * magnitude_);
      sin[i] = static_cast<T>(std::sin(angle) * magnitude_);
    }
  }

  /// Rotates one R-wide vector in place with precomputed cos/sin (R/2 each).
  template <class T>
  void rotate(T* x, const T* cos, const T* sin) const {
    const Index pairs = dim_ / 2;
    for (Index i = 0; i < pairs; ++i) {
      const RopePair p = rope_pair(layout_, dim_, i);
      T& a = x[p.first];
      T& b = x[p.second];
      const T a0 = a;
      a = a0 * cos[i] - b * sin[i];
      b = a0 * sin[i] + b * cos[i];
    }
  }

  /// Rotates, in every row t of x (the token at position pos0 + t), the `heads` R-wide slices
  /// that start at columns first + h * stride. `scratch` holds R values of T. Nothing, for a
  /// NoPE config.
  template <class T>
  void apply(MatrixRef<detail::identity_t<T>> x, std::int64_t pos0, Index first, Index heads,
             Index stride, T* scratch) const {
    if (dim_ == 0 || !rotates_) return;
    MLA_ASSERT(first + (heads - 1) * stride + dim_ <= x.cols());
    T* cos = scratch;
    T* sin = scratch + dim_ / 2;
    for (Index t = 0; t < x.rows(); ++t) {
      cos_sin(pos0 + t, cos, sin);  // once per token, shared by all heads
      T* row = x.row(t).data();
      for (Index h = 0; h < heads; ++h) rotate(row + first + h * stride, cos, sin);
    }
  }

 private:
  Index dim_;
  RopeLayout layout_;
  bool rotates_;
  std::vector<double> inv_freq_;
  double magnitude_ = 1.0;
};

}  // namespace mla
