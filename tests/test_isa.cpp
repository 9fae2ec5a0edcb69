// mla/isa.hpp: the run-time choice of instruction set (forcing, errors, the environment), and
// the kernels of every target this machine runs against scalar references: the vector exp, the
// conversions, and (where AMX is offered) one tile product.

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "mla/mla.hpp"
#if MLA_ISA_X86
#include "mla/detail/isa/amx.hpp"  // the tile backends themselves (not only through the table)
#endif
#include "reference/fp8_reference.hpp"
#include "test_util.hpp"

namespace {

using mla::Isa;
const auto& kAll = mla::kAllIsas;

TEST(Isa, NamesRoundTripAndUnknownNamesAreErrors) {
  for (Isa isa : kAll) EXPECT_EQ(mla::parse_isa(mla::to_string(isa)), isa);
  EXPECT_TRUE(test::throws_error_containing(
      [] { mla::parse_isa("avx9"); },
      "unknown instruction set 'avx9': expected portable, avx2, avx512, avx512_bf16, amx or "
      "amx_model"));
}

TEST(Isa, AvailableTargetsAreNestedAndTheBestIsChosen) {
  EXPECT_TRUE(mla::isa_available(Isa::kPortable));
  // Each of portable .. amx includes the ones before it; the tile model needs AVX512-BF16.
  for (int i = 1; i <= static_cast<int>(Isa::kAmx); ++i) {
    if (mla::isa_available(static_cast<Isa>(i))) {
      EXPECT_TRUE(mla::isa_available(static_cast<Isa>(i - 1))) << mla::to_string(kAll[i]);
    }
  }
  EXPECT_EQ(mla::isa_available(Isa::kAmxModel), mla::isa_available(Isa::kAvx512Bf16));
  // The best available target, except the AMX tile model, which is offered but never chosen.
  Isa best = Isa::kPortable;
  for (Isa isa : kAll) {
    if (isa != Isa::kAmxModel && mla::isa_available(isa)) best = isa;
  }
  EXPECT_EQ(mla::best_isa(), best);
  std::printf("    [machine] best instruction set: %s\n", mla::to_string(best));
}

TEST(Isa, ForcingATargetSwitchesTheKernelsAndResetRestoresTheChoice) {
  const Isa before = mla::active_isa();
  for (Isa isa : kAll) {
    if (!mla::isa_available(isa)) {
      // A target the machine lacks: a clear error, nothing changed.
      const Isa current = mla::active_isa();
      EXPECT_TRUE(test::throws_error_containing([&] { mla::force_isa(isa); },
                                                std::string("force_isa(") + mla::to_string(isa)));
      EXPECT_EQ(mla::active_isa(), current);
      continue;
    }
    mla::force_isa(isa);
    EXPECT_EQ(mla::active_isa(), isa);
    const mla::detail::isa::Kernels& k = mla::detail::isa::kernels();
    EXPECT_EQ(k.isa, isa);
    EXPECT_EQ(k.width, isa == Isa::kPortable ? 4 : isa == Isa::kAvx2 ? 8 : 16);
    EXPECT_EQ(k.fast_dp_bf16, isa >= Isa::kAvx512Bf16);
    EXPECT_EQ(k.tiles, isa >= Isa::kAmx);
  }
  mla::reset_isa();
  EXPECT_EQ(mla::active_isa(), before);
}

#ifdef MLA_ISA_REPORT
using ReportRun = test::CommandResult;

/// Runs isa_report with MLA_ISA set to `value` (unset when empty).
ReportRun run_report(const std::string& value) {
  return test::run_command(
      (value.empty() ? std::string("env -u MLA_ISA ") : "env MLA_ISA=" + value + " ") +
          MLA_ISA_REPORT,
      ::testing::TempDir());
}

TEST(Isa, TheEnvironmentLowersTheChoiceAndBadValuesAreErrors) {
  const ReportRun best = run_report("");
  ASSERT_EQ(best.status, 0) << best.err;
  EXPECT_EQ(best.out.rfind(std::string("active: ") + mla::to_string(mla::best_isa()) + "\n", 0), 0u)
      << best.out;
  for (Isa isa : kAll) {
    const ReportRun r = run_report(mla::to_string(isa));
    if (mla::isa_available(isa)) {
      EXPECT_EQ(r.status, 0) << r.err;
      EXPECT_EQ(r.out.rfind(std::string("active: ") + mla::to_string(isa) + "\n", 0), 0u) << r.out;
    } else {
      EXPECT_EQ(r.status, 1);
      EXPECT_NE(r.err.find(std::string("MLA_ISA=") + mla::to_string(isa) + ": "), std::string::npos)
          << r.err;
    }
  }
  const ReportRun bad = run_report("avx9");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("unknown instruction set 'avx9'"), std::string::npos) << bad.err;
}
#endif

TEST(IsaKernels, ExpIsWithinTwoUlpOnEveryTarget) {
  std::vector<float> x;
  for (float v = -90.0f; v <= 88.0f; v += 0.0137f) x.push_back(v);
  for (float v :
       {0.0f, -0.0f, 1e-8f, -1e-8f, -87.3f, 88.0f, -std::numeric_limits<float>::infinity(),
        std::numeric_limits<float>::quiet_NaN()}) {
    x.push_back(v);
  }
  test::for_each_isa([&](Isa) {
    std::vector<float> y(x.size());
    mla::detail::isa::kernels().exp(x.data(), x.size(), y.data());
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double want = std::exp(static_cast<double>(x[i]));
      if (std::isnan(x[i])) {
        EXPECT_TRUE(std::isnan(y[i]));
      } else if (x[i] < -87.33654475f) {
        EXPECT_EQ(y[i], 0.0f) << x[i];  // exp(-inf) = 0 clears a softmax state
      } else {
        const double ulp = std::ldexp(1.0, std::ilogb(want) - 23);
        ASSERT_LE(std::fabs(y[i] - want), 2 * ulp) << "exp(" << x[i] << ")";
      }
    }
  });
}

TEST(IsaKernels, ConversionsEqualTheScalarCodecsOnEveryTarget) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-600.0f, 600.0f);
  std::vector<float> x(1000);
  for (float& v : x) v = u(rng);
  x[3] = std::numeric_limits<float>::quiet_NaN();
  x[4] = std::numeric_limits<float>::infinity();
  x[5] = 1e-9f;
  std::vector<std::uint8_t> all(256);
  for (int c = 0; c < 256; ++c) all[static_cast<std::size_t>(c)] = static_cast<std::uint8_t>(c);
  test::for_each_isa([&](Isa) {
    const auto& k = mla::detail::isa::kernels();
    for (float scale : {1.0f, 0.37f}) {
      for (bool sat : {true, false}) {
        std::vector<std::uint8_t> q(x.size()), q5(x.size());
        k.encode_e4m3(x.data(), x.size(), q.data(), scale, sat);
        k.encode_e5m2(x.data(), x.size(), q5.data(), scale, sat);
        for (std::size_t i = 0; i < x.size(); ++i) {
          const float v = scale == 1.0f ? x[i] : x[i] / scale;
          const mla::Fp8Overflow mode =
              sat ? mla::Fp8Overflow::kSaturate : mla::Fp8Overflow::kNoSaturate;
          ASSERT_EQ(q[i], mla::float8_e4m3fn(v, mode).bits()) << i;
          ASSERT_EQ(q5[i], mla::float8_e5m2(v, mode).bits()) << i;
        }
      }
      // Every code, odd lengths so that the vector loops leave tails.
      for (std::size_t n : {std::size_t{256}, std::size_t{255}, std::size_t{17}}) {
        std::vector<float> d(n), d5(n);
        k.decode_e4m3(all.data(), n, d.data(), scale);
        k.decode_e5m2(all.data(), n, d5.data(), scale);
        for (std::size_t c = 0; c < n; ++c) {
          const double want = ref::fp8_value(ref::kE4M3FN, static_cast<unsigned>(c));
          const double want5 = ref::fp8_value(ref::kE5M2, static_cast<unsigned>(c));
          if (std::isnan(want)) {
            EXPECT_TRUE(std::isnan(d[c]));
          } else {
            ASSERT_EQ(d[c], static_cast<float>(want) * scale) << c;
          }
          if (std::isnan(want5)) {
            EXPECT_TRUE(std::isnan(d5[c]));
          } else {
            ASSERT_EQ(d5[c], static_cast<float>(want5) * scale) << c;
          }
        }
      }
    }
    // BF16: every pattern's high half.
    std::vector<std::uint16_t> b(65536);
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = static_cast<std::uint16_t>(i);
    std::vector<float> f(b.size() - 3);
    k.widen_bf16(reinterpret_cast<const unsigned char*>(b.data()) + 2, f.size(), f.data());
    for (std::size_t i = 0; i < f.size(); ++i) {
      std::uint32_t bits;
      std::memcpy(&bits, &f[i], 4);
      ASSERT_EQ(bits, static_cast<std::uint32_t>(b[i + 1]) << 16) << i;
    }
  });
}

#if MLA_ISA_X86
// C [16][16] = A [16][64] B [64][16] in two k blocks through tile_dot_bf16 on a tile backend,
// BF16 inputs (small integers: every sum exact), against plain sums in double.
template <class Tiles>
void check_tile_product() {
  std::vector<std::uint16_t> a(16 * 64), b(2 * 512);
  std::vector<double> A(16 * 64), B(64 * 16);
  auto bf16 = [](float v) {
    std::uint32_t bits;
    std::memcpy(&bits, &v, 4);
    return static_cast<std::uint16_t>(bits >> 16);
  };
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 64; ++k) {
      const float v = static_cast<float>((i * 7 + k * 3) % 11 - 5);
      a[static_cast<std::size_t>(i * 64 + k)] = bf16(v);
      A[static_cast<std::size_t>(i * 64 + k)] = v;
    }
  for (int k = 0; k < 64; ++k)
    for (int n = 0; n < 16; ++n) {
      const float v = static_cast<float>((k * 5 + n) % 7 - 3);
      B[static_cast<std::size_t>(k * 16 + n)] = v;
      // Pair layout: block k / 32, pair row (k % 32) / 2, column n, element k % 2.
      b[static_cast<std::size_t>((k / 32) * 512 + ((k % 32) / 2) * 32 + n * 2 + k % 2)] = bf16(v);
    }
  std::vector<float> c(16 * 16);
  mla::detail::isa::amx::tile_dot_bf16<Tiles>(a.data(), 128, b.data(), 2, c.data(), 16);
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 16; ++n) {
      double want = 0;
      for (int k = 0; k < 64; ++k)
        want += A[static_cast<std::size_t>(i * 64 + k)] * B[static_cast<std::size_t>(k * 16 + n)];
      EXPECT_EQ(c[static_cast<std::size_t>(i * 16 + n)], want) << i << ", " << n;
    }
}
#endif

TEST(IsaKernels, AnAmxTileProductMatchesScalarSums) {
#if MLA_ISA_X86
  if (!mla::isa_available(Isa::kAmx)) {
    GTEST_SKIP() << "this machine does not offer AMX (" << mla::to_string(mla::best_isa())
                 << " is its best target)";
  }
  check_tile_product<mla::detail::isa::amx::HardwareTiles>();
#else
  GTEST_SKIP() << "this build has only the portable kernels";
#endif
}

TEST(IsaKernels, EveryE4M3CodeWidensToItsExactBf16Value) {
  // The AMX decode step's widening of FP8 keys (bit arithmetic, a table for the subnormals):
  // each of the 256 codes, in every lane position, against the scalar decoder; NaN stays NaN.
#if MLA_ISA_X86
  if (!mla::isa_available(Isa::kAmxModel)) GTEST_SKIP() << "needs AVX512-BF16 (AVX512-BW)";
  std::vector<unsigned char> codes(256 + 31);
  for (std::size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<unsigned char>(i * 37 + 5);
  for (std::size_t shift = 0; shift < 32; ++shift) {  // each code through each lane
    std::vector<std::uint16_t> got(256);
    mla::detail::isa::amx::decode_amx::e4m3_to_bf16(codes.data() + shift, 256, got.data());
    for (std::size_t i = 0; i < 256; ++i) {
      const float want = mla::detail::decode_fp8<mla::detail::E4M3FNFormat>(codes[i + shift]);
      const std::uint32_t bits = std::uint32_t{got[i]} << 16;
      float value;
      std::memcpy(&value, &bits, sizeof value);
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(value)) << "code " << int{codes[i + shift]};
      } else {
        EXPECT_EQ(value, want) << "code " << int{codes[i + shift]};
      }
    }
  }
#else
  GTEST_SKIP() << "this build has only the portable kernels";
#endif
}

TEST(IsaKernels, TheTileModelMatchesScalarSums) {
  // The software model the amx_model target runs the AMX kernels on: the same products, so
  // that the tile kernels' operand layouts are tested on any AVX512-BF16 CPU.
#if MLA_ISA_X86
  if (!mla::isa_available(Isa::kAmxModel)) {
    GTEST_SKIP() << "the tile model needs AVX512-BF16";
  }
  check_tile_product<mla::detail::isa::amx::EmulatedTiles>();
#else
  GTEST_SKIP() << "this build has only the portable kernels";
#endif
}

}  // namespace
