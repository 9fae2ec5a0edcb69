#pragma once
// Seeded inputs shared by the example programs.

#include <random>

#include "mla/matrix.hpp"

namespace examples {

/// Seeded stand-ins for token embeddings: [tokens, hidden], entries uniform in [-1, 1]; the
/// same for the same seed in every process.
inline mla::RowMatrix<float> hidden_states(mla::Index tokens, mla::Index hidden, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  mla::RowMatrix<float> x(tokens, hidden);
  for (mla::Index i = 0; i < x.size(); ++i) x.data()[i] = u(rng);
  return x;
}

}  // namespace examples
