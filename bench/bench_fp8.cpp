// Throughput of the bulk FP8 conversions, against two baselines in the same binary: a plain
// float copy (the memory-bound ceiling) and the scalar conversion called element by element
// (what the bulk routines must beat by vectorising). Results are checked outside the timed loop.

#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "mla/fp8.hpp"
#include "mla/quant.hpp"  // the bulk conversions

namespace {

std::vector<float> random_activations(std::size_t n) {
  std::mt19937 rng(1);
  std::normal_distribution<float> dist(0.0f, 40.0f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

template <class F8>
bool same_as_scalar(const std::vector<float>& x, const std::vector<F8>& q, float scale) {
  for (std::size_t i = 0; i < x.size(); ++i) {
    if (q[i].bits() != F8(x[i] / scale).bits()) return false;
  }
  return true;
}

void copy_float(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const std::vector<float> x = random_activations(n);
  std::vector<float> y(n);
  for (auto _ : state) {
    std::memcpy(y.data(), x.data(), n * sizeof(float));
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  if (y != x) state.SkipWithError("copy mismatch");
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

template <class F8>
void to_fp8_bulk(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const std::vector<float> x = random_activations(n);
  std::vector<F8> q(n);
  const float scale = 0.37f;
  for (auto _ : state) {
    mla::to_fp8(x.data(), n, q.data(), scale);
    benchmark::DoNotOptimize(q.data());
    benchmark::ClobberMemory();
  }
  if (!same_as_scalar(x, q, scale)) state.SkipWithError("bulk result differs from scalar");
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

template <class F8>
void to_fp8_scalar(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const std::vector<float> x = random_activations(n);
  std::vector<F8> q(n);
  const float scale = 0.37f;
  for (auto _ : state) {
    for (std::size_t i = 0; i < n; ++i) {
      q[i] = F8(x[i] / scale);
      benchmark::DoNotOptimize(q[i]);  // keeps the loop element by element
    }
  }
  if (!same_as_scalar(x, q, scale)) state.SkipWithError("scalar loop result wrong");
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

template <class F8>
void from_fp8_bulk(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const std::vector<float> x = random_activations(n);
  std::vector<F8> q(n);
  mla::to_fp8(x.data(), n, q.data(), 0.37f);
  std::vector<float> y(n);
  for (auto _ : state) {
    mla::from_fp8(q.data(), n, y.data(), 0.37f);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (y[i] != static_cast<float>(q[i]) * 0.37f) {
      state.SkipWithError("bulk decode differs from scalar");
      break;
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * n));
}

constexpr int kN = 1 << 16;  // 256 KiB of floats: stays in L2, so this measures compute

}  // namespace

BENCHMARK(copy_float)->Name("fp8/copy_float")->Arg(kN);
BENCHMARK(to_fp8_bulk<mla::float8_e4m3fn>)->Name("fp8/to_fp8/e4m3fn")->Arg(kN);
BENCHMARK(to_fp8_scalar<mla::float8_e4m3fn>)->Name("fp8/to_fp8_scalar_loop/e4m3fn")->Arg(kN);
BENCHMARK(from_fp8_bulk<mla::float8_e4m3fn>)->Name("fp8/from_fp8/e4m3fn")->Arg(kN);
BENCHMARK(to_fp8_bulk<mla::float8_e5m2>)->Name("fp8/to_fp8/e5m2")->Arg(kN);
BENCHMARK(to_fp8_scalar<mla::float8_e5m2>)->Name("fp8/to_fp8_scalar_loop/e5m2")->Arg(kN);
BENCHMARK(from_fp8_bulk<mla::float8_e5m2>)->Name("fp8/from_fp8/e5m2")->Arg(kN);
BENCHMARK_MAIN();
