#pragma once
// The machine's two ceilings, measured inside the benchmark program so that every figure can be
// reported as a fraction of a peak taken in the same run: the FP32 FMA rate of all threads and
// the read bandwidth from memory. Same method as the project's machine_limits tool: many
// independent FMA chains per thread; a streaming sum over a buffer far larger than the caches.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <thread>
#include <vector>

#include "mla/detail/simd.hpp"

namespace bench {

struct MachineLimits {
  double fma_gflops = 0;  // FP32, all threads
  double read_gbs = 0;    // GB/s, all threads
};

namespace detail {

using Clock = std::chrono::steady_clock;
using Isa = mla::simd::Native;

inline float fma_chains(long iterations) {
  using V = Isa::V;
  constexpr int kChains = 12;
  V acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = Isa::set1(1.0f + 1e-3f * static_cast<float>(i));
  const V a = Isa::set1(0.999999f), b = Isa::set1(1e-7f);
  for (long k = 0; k < iterations; ++k) {
    for (int i = 0; i < kChains; ++i) acc[i] = Isa::fmadd(acc[i], a, b);
  }
  float out[Isa::kWidth];
  float s = 0;
  for (int i = 0; i < kChains; ++i) {
    Isa::store(out, acc[i]);
    for (float x : out) s += x;
  }
  return s;
}

template <class F>
double best_seconds(int threads, int repeats, F&& work) {
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    std::vector<std::thread> pool;
    const auto t0 = Clock::now();
    for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { work(t); });
    for (auto& th : pool) th.join();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

}  // namespace detail

/// Measures both ceilings with `threads` threads (about a second in all).
inline MachineLimits measure_machine(int threads) {
  MachineLimits m;
  const long iterations = 20'000'000;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  const double s = detail::best_seconds(threads, 3, [&](int t) {
    sink[static_cast<std::size_t>(t)] = detail::fma_chains(iterations);
  });
  m.fma_gflops =
      2.0 * detail::Isa::kWidth * 12 * static_cast<double>(iterations) * threads / s / 1e9;

  std::vector<float> buffer(std::size_t{1} << 27, 1.0f);  // 512 MiB
  const std::size_t per_thread = buffer.size() / static_cast<std::size_t>(threads);
  const double r = detail::best_seconds(threads, 3, [&](int t) {
    const float* p = buffer.data() + per_thread * static_cast<std::size_t>(t);
    using Isa = detail::Isa;
    constexpr std::size_t W = Isa::kWidth;
    Isa::V a = Isa::zero(), b = a, c = a, d = a;
    const Isa::V one = Isa::set1(1.0f);
    for (std::size_t i = 0; i + 4 * W <= per_thread; i += 4 * W) {
      a = Isa::fmadd(Isa::load(p + i), one, a);
      b = Isa::fmadd(Isa::load(p + i + W), one, b);
      c = Isa::fmadd(Isa::load(p + i + 2 * W), one, c);
      d = Isa::fmadd(Isa::load(p + i + 3 * W), one, d);
    }
    float out[W];
    Isa::store(out, Isa::fmadd(a, one, Isa::fmadd(b, one, Isa::fmadd(c, one, d))));
    sink[static_cast<std::size_t>(t)] = out[0];
  });
  m.read_gbs =
      static_cast<double>(per_thread * static_cast<std::size_t>(threads) * sizeof(float)) / r / 1e9;
  if (sink[0] == 42.0f) m.read_gbs += 0;  // keep the sums alive
  return m;
}

}  // namespace bench
