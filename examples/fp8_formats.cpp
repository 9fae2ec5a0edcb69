// The FP8 storage formats: their code space, range and a few encodings.
//
// Build: cmake --build --preset release --target fp8_formats; run
// build/release/examples/fp8_formats

#include <cmath>
#include <cstdio>
#include <limits>

#include "mla/mla.hpp"

namespace {

// Prints one row of the FP8 table: the code space, the range and a few example encodings.
template <class F8>
void print_format(const char* name) {
  using L = std::numeric_limits<F8>;
  int finite = 0, nan = 0, inf = 0, subnormal = 0;
  for (unsigned c = 0; c < 256; ++c) {
    const float v = F8::from_bits(static_cast<std::uint8_t>(c));
    if (std::isnan(v)) {
      ++nan;
    } else if (std::isinf(v)) {
      ++inf;
    } else {
      ++finite;
      if (v != 0.0f && std::fabs(v) < static_cast<float>(L::min())) ++subnormal;
    }
  }
  std::printf("%-8s %6d %5d %4d %10d %10g %12g %14g %8g    0x%02X 0x%02X\n", name, finite, nan, inf,
              subnormal, static_cast<float>(L::max()), static_cast<float>(L::min()),
              static_cast<float>(L::denorm_min()), static_cast<float>(L::epsilon()),
              F8(1.0f).bits(), F8(3.14159f).bits());
}

}  // namespace

int main() {
  std::printf("FP8 storage formats (OCP OFP8; round to nearest even, then saturate)\n");
  std::printf("%-8s %6s %5s %4s %10s %10s %12s %14s %8s    %4s %4s\n", "format", "finite", "NaN",
              "Inf", "subnormal", "max", "min normal", "min subnormal", "epsilon", "1.0", "pi");
  print_format<mla::float8_e4m3fn>("e4m3fn");
  print_format<mla::float8_e5m2>("e5m2");
  std::printf("e4m3fn(464) = %g (a tie rounds to even before the overflow check)\n",
              static_cast<float>(mla::float8_e4m3fn(464.0f)));

  return 0;
}
