// The block-FP8 matmul (W8A32 and W8A8) against an FP32 Eigen matmul of the same shape, for the
// projections of one DeepSeek-V3 layer at batch 1 (decode) and 512 (prefill).
//
// Each iteration times the FP8 product and the FP32 product back to back, so the counter
// `vs_fp32` (FP8 time / FP32 time) compares the two under the same machine conditions. The
// benchmark's own time is the FP8 time. Results are checked outside the timed region.

#include <benchmark/benchmark.h>

#include <chrono>
#include <random>
#include <string>

#include "mla/projection.hpp"

namespace {

using mla::Index;
using mla::RowMatrix;
using Clock = std::chrono::steady_clock;

struct Shape {
  const char* name;
  Index out, in;
};

// DeepSeek-V3: hidden 7168, 128 heads, q_lora 1536, kv_lora 512, P 128, R 64, V 128.
constexpr Shape kShapes[] = {{"wq_a", 1536, 7168},
                             {"wq_b", 128 * 192, 1536},
                             {"wkv_a", 512 + 64, 7168},
                             {"wkv_b", 128 * 256, 512},
                             {"wo", 7168, 128 * 128}};

RowMatrix<float> random_matrix(Index rows, Index cols, float scale, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  RowMatrix<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = nd(rng);
  return m;
}

double seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

void fp8_matmul(benchmark::State& state, Shape shape, mla::Fp8Matmul mode) {
  const Index batch = state.range(0);
  const RowMatrix<float> w = random_matrix(shape.out, shape.in, 0.02f, 1);
  const RowMatrix<float> x = random_matrix(batch, shape.in, 1.0f, 2);
  mla::Fp8Options options;
  options.matmul = mode;
  const mla::Linear<float> fp8 = mla::Linear<float>::quantize_fp8(w, options);
  const mla::Linear<float> fp32(w);
  RowMatrix<float> y8(batch, shape.out), y32(batch, shape.out);
  mla::project(fp8, x, y8);  // warm up (sizes the per-thread scratch)
  mla::project(fp32, x, y32);
  double t8 = 0.0, t32 = 0.0;
  for (auto _ : state) {
    const auto a = Clock::now();
    mla::project(fp8, x, y8);
    benchmark::ClobberMemory();
    const auto b = Clock::now();
    mla::project(fp32, x, y32);
    benchmark::ClobberMemory();
    const auto c = Clock::now();
    t8 += seconds(a, b);
    t32 += seconds(b, c);
    state.SetIterationTime(seconds(a, b));
  }
  // Outside the timed region: DeepSeek's closeness measure against the FP32 product.
  const double xy = (y8.cast<double>().array() * y32.cast<double>().array()).sum();
  const double sq = y8.cast<double>().squaredNorm() + y32.cast<double>().squaredNorm();
  if (!(1.0 - 2.0 * xy / sq < 1e-3)) state.SkipWithError("FP8 result is not close to FP32");
  const double flops = 2.0 * static_cast<double>(batch * shape.out * shape.in);
  const auto n = static_cast<double>(state.iterations());
  state.counters["vs_fp32"] = t8 / t32;
  state.counters["GFLOP/s"] = flops * n / t8 * 1e-9;
  state.counters["fp32_GFLOP/s"] = flops * n / t32 * 1e-9;
}

}  // namespace

int main(int argc, char** argv) {
  for (const Shape& s : kShapes) {
    for (auto [mode, mode_name] :
         {std::pair{mla::Fp8Matmul::kW8A32, "w8a32"}, std::pair{mla::Fp8Matmul::kW8A8, "w8a8"}}) {
      const std::string name = std::string("fp8_matmul/v3/") + s.name + "/" + mode_name;
      benchmark::RegisterBenchmark(name.c_str(), fp8_matmul, s, mode)
          ->ArgName("batch")
          ->Arg(1)
          ->Arg(512)
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(0.3);
    }
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
