#pragma once
// The machine's ceilings, measured inside the benchmark program so that every figure can be
// reported as a fraction of a peak taken in the same run: the FP32 FMA rate of all threads, the
// BF16 dot-product rate (AVX512-BF16 VDPBF16PS, where the CPU has it), the AMX-BF16 tile rate
// (where the CPU and the OS offer AMX), and the read bandwidth from memory. Same method as the
// project's machine_limits tool: many independent chains per thread; a streaming sum over a
// buffer far larger than the caches. The kernels use function target attributes and run only on
// the instruction sets mla::isa_available reports.

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "mla/detail/isa/intrinsics.hpp"
#include "mla/isa.hpp"
#include "mla/matrix.hpp"

namespace bench {

struct MachineLimits {
  double fma_gflops = 0;   // FP32 FMA, all threads
  double bf16_gflops = 0;  // AVX512-BF16 dot products, all threads (0 without them)
  double amx_gflops = 0;   // AMX-BF16 tiles, all threads (0 without AMX): operands in registers
  /// AMX-BF16 tiles as kernels can feed them: 2 x 2 accumulators, A reloaded from L1 and B
  /// streamed from L2 every k step (the decode kernels' pattern; 0 without AMX).
  double amx_streamed_gflops = 0;
  double read_gbs = 0;  // GB/s, all threads
  int fma_width = 0;    // floats per FMA vector measured
};

namespace detail {

using Clock = std::chrono::steady_clock;
constexpr int kChains = 12;  // independent chains hide the FMA latency on current x86 cores

__attribute__((target("avx512f"))) inline float fma_chains_512(long iterations) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f + 1e-3f * static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (long k = 0; k < iterations; ++k) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  float s = 0, out[16];
  for (int i = 0; i < kChains; ++i) {
    _mm512_storeu_ps(out, acc[i]);
    for (float x : out) s += x;
  }
  return s;
}

__attribute__((target("avx2,fma"))) inline float fma_chains_256(long iterations) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(1.0f + 1e-3f * static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (long k = 0; k < iterations; ++k) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  float s = 0, out[8];
  for (int i = 0; i < kChains; ++i) {
    _mm256_storeu_ps(out, acc[i]);
    for (float x : out) s += x;
  }
  return s;
}

/// VDPBF16PS: 32 BF16 pairs into 16 FP32 lanes, 64 flops per instruction.
__attribute__((target("avx512f,avx512bf16"))) inline float bf16_chains(long iterations) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(1.0f);
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3F80), b = (__m512bh)_mm512_set1_epi16(0x3380);
  for (long k = 0; k < iterations; ++k) {
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  float s = 0, out[16];
  for (int i = 0; i < kChains; ++i) {
    _mm512_storeu_ps(out, acc[i]);
    for (float x : out) s += x;
  }
  return s;
}

struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};
};

/// Every tile 16 rows of 64 bytes, the 4 accumulators zero.
__attribute__((target("amx-tile,amx-bf16"))) inline void start_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

/// One accumulator's first value (keeps the products alive), the tile state released.
__attribute__((target("amx-tile,amx-bf16"))) inline float finish_tiles() {
  alignas(64) static thread_local float c[16 * 16];
  _tile_stored(0, c, 64);
  _tile_release();
  return c[0];
}

/// 4 accumulator tiles, 2 A and 2 B tiles; each TDPBF16PS is 16 x 16 x 32 multiply-adds.
__attribute__((target("amx-tile,amx-bf16"))) inline float amx_chains(long iterations) {
  start_tiles();
  alignas(64) static thread_local std::uint16_t a[16 * 32], b[16 * 32];
  std::fill(a, a + 16 * 32, std::uint16_t{0x3f80});
  std::fill(b, b + 16 * 32, std::uint16_t{0x3f80});
  _tile_loadd(4, a, 64);
  _tile_loadd(5, b, 64);
  _tile_loadd(6, a, 64);
  _tile_loadd(7, b, 64);
  for (long k = 0; k < iterations; ++k) {
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 6, 5);
    _tile_dpbf16ps(3, 6, 7);
  }
  return finish_tiles();
}

/// 2 x 2 accumulators; per k step A0, A1 reloaded from 2 KB (L1) and B0, B1 from the next 2 KB
/// of 1 MB (L2), then 4 TDPBF16PS. Tile rows 64-byte aligned, as the kernels keep them.
__attribute__((target("amx-tile,amx-bf16"))) inline float amx_streamed(long iterations) {
  start_tiles();
  constexpr std::size_t kB = std::size_t{1} << 20;  // bytes of streamed B tiles
  static thread_local mla::detail::AlignedVector<std::uint16_t> a(2 * 16 * 32,
                                                                  std::uint16_t{0x3f80});
  static thread_local mla::detail::AlignedVector<std::uint16_t> b(kB / 2, std::uint16_t{0x3f80});
  const long steps = static_cast<long>(kB / 2048);
  for (long k = 0; k < iterations; ++k) {
    const std::uint16_t* bk = b.data() + (k % steps) * 1024;
    _tile_loadd(4, a.data(), 64);
    _tile_loadd(5, a.data() + 512, 64);
    _tile_loadd(6, bk, 64);
    _tile_loadd(7, bk + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  return finish_tiles();
}

inline float sum_floats(const float* p, std::size_t n) {
  float a = 0, b = 0, c = 0, d = 0;
  std::size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += p[i];
    b += p[i + 1];
    c += p[i + 2];
    d += p[i + 3];
  }
  for (; i < n; ++i) a += p[i];
  return (a + b) + (c + d);
}

__attribute__((target("avx512f"))) inline float sum_floats_512(const float* p, std::size_t n) {
  __m512 a = _mm512_setzero_ps(), b = a, c = a, d = a;
  std::size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a = _mm512_add_ps(a, _mm512_loadu_ps(p + i));
    b = _mm512_add_ps(b, _mm512_loadu_ps(p + i + 16));
    c = _mm512_add_ps(c, _mm512_loadu_ps(p + i + 32));
    d = _mm512_add_ps(d, _mm512_loadu_ps(p + i + 48));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
  for (; i < n; ++i) s += p[i];
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

/// Measures the ceilings with `threads` threads (a few seconds in all).
inline MachineLimits measure_machine(int threads) {
  MachineLimits m;
  std::vector<float> sink(static_cast<std::size_t>(threads));
  const long iterations = 20'000'000;
  const bool avx512 = mla::isa_available(mla::Isa::kAvx512);
  m.fma_width = avx512 ? 16 : 8;
  const double s = detail::best_seconds(threads, 3, [&](int t) {
    sink[static_cast<std::size_t>(t)] =
        avx512 ? detail::fma_chains_512(iterations) : detail::fma_chains_256(iterations);
  });
  m.fma_gflops =
      2.0 * m.fma_width * detail::kChains * static_cast<double>(iterations) * threads / s / 1e9;
  if (mla::isa_available(mla::Isa::kAvx512Bf16)) {
    const double b = detail::best_seconds(threads, 3, [&](int t) {
      sink[static_cast<std::size_t>(t)] = detail::bf16_chains(iterations);
    });
    m.bf16_gflops = 64.0 * detail::kChains * static_cast<double>(iterations) * threads / b / 1e9;
  }
  if (mla::isa_available(mla::Isa::kAmx)) {  // the hardware (not the tile model)
    const long tiles = 5'000'000;
    const double a = detail::best_seconds(
        threads, 3, [&](int t) { sink[static_cast<std::size_t>(t)] = detail::amx_chains(tiles); });
    m.amx_gflops = 4.0 * 16 * 16 * 32 * 2 * static_cast<double>(tiles) * threads / a / 1e9;
    const double st = detail::best_seconds(threads, 3, [&](int t) {
      sink[static_cast<std::size_t>(t)] = detail::amx_streamed(tiles);
    });
    m.amx_streamed_gflops =
        4.0 * 16 * 16 * 32 * 2 * static_cast<double>(tiles) * threads / st / 1e9;
  }

  std::vector<float> buffer(std::size_t{1} << 27, 1.0f);  // 512 MiB
  const std::size_t per_thread = buffer.size() / static_cast<std::size_t>(threads);
  const double r = detail::best_seconds(threads, 3, [&](int t) {
    const float* p = buffer.data() + per_thread * static_cast<std::size_t>(t);
    sink[static_cast<std::size_t>(t)] =
        avx512 ? detail::sum_floats_512(p, per_thread) : detail::sum_floats(p, per_thread);
  });
  m.read_gbs =
      static_cast<double>(per_thread * static_cast<std::size_t>(threads) * sizeof(float)) / r / 1e9;
  if (sink[0] == 42.0f) m.read_gbs += 0;  // keep the sums alive
  return m;
}

}  // namespace bench
