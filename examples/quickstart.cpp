// mla quickstart: the FP8 storage formats and the latent-cache arithmetic that motivates MLA.
//
// Build and run from the repository root with `./run.sh demo`.

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

struct Model {
  const char* name;
  int layers, heads, head_dim, kv_lora_rank, qk_rope_head_dim;
};

// Per token per layer: MHA keeps K and V for every head, GQA for g groups, MQA for one head;
// MLA keeps only the latent c^KV and the shared rotary key k^R (DeepSeek-V2, Table 1).
void print_cache(const Model& m) {
  const long mha = 2L * m.heads * m.head_dim;
  const long gqa8 = 2L * 8 * m.head_dim;
  const long mqa = 2L * m.head_dim;
  const long mla = m.kv_lora_rank + m.qk_rope_head_dim;
  // FP8 latent (FlashMLA layout): e4m3 latent bytes, one fp32 scale per 128 values, bf16 k^R.
  const long mla_fp8 =
      m.kv_lora_rank + 4L * ((m.kv_lora_rank + 127) / 128) + 2L * m.qk_rope_head_dim;
  std::printf("%-10s %6d %10ld %10ld %9ld %10ld %9ld %9ld %7.1fx %14ld %12ld\n", m.name, m.layers,
              2 * mha, 2 * gqa8, 2 * mqa, 4 * mla, 2 * mla, mla_fp8,
              static_cast<double>(mha) / static_cast<double>(mla), 2 * mla * m.layers,
              mla_fp8 * m.layers);
}

}  // namespace

int main() {
  std::printf("mla %d.%d.%d quickstart\n\n", MLA_VERSION_MAJOR, MLA_VERSION_MINOR,
              MLA_VERSION_PATCH);

  std::printf("FP8 storage formats (OCP OFP8; round to nearest even, then saturate)\n");
  std::printf("%-8s %6s %5s %4s %10s %10s %12s %14s %8s    %4s %4s\n", "format", "finite", "NaN",
              "Inf", "subnormal", "max", "min normal", "min subnormal", "epsilon", "1.0", "pi");
  print_format<mla::float8_e4m3fn>("e4m3fn");
  print_format<mla::float8_e5m2>("e5m2");
  std::printf("e4m3fn(464) = %g (a tie rounds to even before the overflow check)\n\n",
              static_cast<float>(mla::float8_e4m3fn(464.0f)));

  std::printf("KV cache bytes per token per layer, and per token for the whole model\n");
  std::printf("%-10s %6s %10s %10s %9s %10s %9s %9s %8s %14s %12s\n", "model", "layers", "MHA bf16",
              "GQA-8 bf16", "MQA bf16", "MLA fp32", "MLA bf16", "MLA fp8", "MHA/MLA",
              "model MLA bf16", "model MLA fp8");
  print_cache({"V2-Lite", 27, 16, 128, 512, 64});
  print_cache({"V2", 60, 128, 128, 512, 64});
  print_cache({"V3", 61, 128, 128, 512, 64});
  return 0;
}
