#pragma once
/// \file
/// The instruction set the library's kernels run on: one list of targets (kAllIsas), each
/// with one kernel table. Every build compiles the kernels of every target (GCC and Clang on
/// x86-64: all of them; other compilers and CPUs: the portable one), whatever -march it is
/// given, and the best target the CPU and the OS offer is chosen once per process (CPUID,
/// XGETBV, and on Linux the AMX permission: read in detail/isa/cpu.hpp only). The choice can
/// be set for tests and reproducibility, with the environment variable
/// `MLA_ISA=portable|avx2|avx512|avx512_bf16|amx|amx_model` or with force_isa(); asking for a
/// target the machine lacks is an mla::Error. Feature variants are targets of their own:
/// `avx512` runs without AVX512-BF16 even on a CPU that has it, and `amx_model` runs the AMX
/// tile kernels on a software model of the tile instructions (on any CPU with AVX512-BF16; for
/// tests; slow; never chosen as the best target).

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "mla/detail/isa/cpu.hpp"
#include "mla/error.hpp"

namespace mla {

/// Kernel targets, from the most portable up. Each of the first five includes the ones before
/// it; amx_model is amx's kernels on a software model of the tiles.
enum class Isa : std::uint8_t {
  kPortable,    ///< plain C++ (GCC/Clang vector extensions where the compiler has them)
  kAvx2,        ///< AVX2 + FMA + F16C
  kAvx512,      ///< AVX-512 F/BW/DQ/VL (BF16 dot products emulated)
  kAvx512Bf16,  ///< AVX-512 + AVX512-BF16 (VDPBF16PS)
  kAmx,         ///< AVX512-BF16 + AMX-TILE / AMX-BF16 tiles
  kAmxModel,    ///< the AMX kernels on a software model of the tiles (tests; never the best)
};

/// Every target, in the order above.
inline constexpr Isa kAllIsas[] = {Isa::kPortable,   Isa::kAvx2, Isa::kAvx512,
                                   Isa::kAvx512Bf16, Isa::kAmx,  Isa::kAmxModel};

/// "portable", "avx2", "avx512", "avx512_bf16", "amx" or "amx_model".
inline const char* to_string(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return "portable";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAmx:
      return "amx";
    case Isa::kAmxModel:
      return "amx_model";
  }
  return "unknown";
}

/// The target called `name` (as to_string writes it); throws mla::Error naming the choices.
inline Isa parse_isa(const std::string& name) {
  for (Isa isa : kAllIsas) {
    if (name == to_string(isa)) return isa;
  }
  detail::fail("unknown instruction set '", name,
               "': expected portable, avx2, avx512, avx512_bf16, amx or amx_model");
}

namespace detail::isa {

/// The process's view of the machine and its choice of target.
struct State {
  CpuFeatures cpu;
  Isa best = Isa::kPortable;
  /// Set by MLA_ISA when it names an available target.
  int from_environment = -1;
  /// Why MLA_ISA could not be honoured ("" when it was, or is unset).
  std::string environment_error;
  /// Set by force_isa(); -1 when not forced.
  std::atomic<int> forced{-1};
};

inline bool available(const CpuFeatures& f, Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return true;
    case Isa::kAvx2:
      return MLA_ISA_X86 && f.avx2;
    case Isa::kAvx512:
      return MLA_ISA_X86 && f.avx512;
    case Isa::kAvx512Bf16:
    case Isa::kAmxModel:  // the model computes its tile products with VDPBF16PS
      return MLA_ISA_X86 && f.avx512_bf16;
    case Isa::kAmx:
      return MLA_ISA_X86 && f.amx;
  }
  return false;
}

/// Why `isa` is not available here (for error messages).
inline std::string why_unavailable(const CpuFeatures& f, Isa isa) {
  if (!MLA_ISA_X86) {
    return "this build has only the portable kernels (they need GCC or Clang on x86-64)";
  }
  if (isa == Isa::kAmx && f.amx_cpu) {
    return "the operating system did not grant the AMX tile state (Linux arch_prctl "
           "ARCH_REQ_XCOMP_PERM, kernel 5.16 or later)";
  }
  if (isa == Isa::kAmxModel) {
    return "the AMX tile model computes its tile products with AVX512-BF16, which this CPU or "
           "operating system does not offer";
  }
  return std::string("this CPU or operating system does not offer ") + to_string(isa);
}

inline void init_state(State& s) {
  s.cpu = detect_cpu();
  // The tile model is offered for tests, never chosen as the best target.
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16, Isa::kAmx}) {
    if (available(s.cpu, isa)) s.best = isa;
  }
  if (const char* env = std::getenv("MLA_ISA"); env != nullptr && *env != '\0') {
    try {
      const Isa want = parse_isa(env);
      if (available(s.cpu, want)) {
        s.from_environment = static_cast<int>(want);
      } else {
        s.environment_error = "MLA_ISA=" + std::string(env) + ": " + why_unavailable(s.cpu, want);
      }
    } catch (const Error& e) {
      s.environment_error = std::string("MLA_ISA: ") + e.what();
    }
  }
}

/// The process-wide state, detected on first use (thread-safe).
inline State& state() {
  static State s;
  static const bool initialised = (init_state(s), true);
  (void)initialised;
  return s;
}

}  // namespace detail::isa

/// True when the CPU and the OS can run the kernels of `isa` (and this build has them).
inline bool isa_available(Isa isa) { return detail::isa::available(detail::isa::state().cpu, isa); }

/// The best target this machine offers.
inline Isa best_isa() { return detail::isa::state().best; }

/// The target the kernels use now: the one force_isa() set, else the one MLA_ISA names, else
/// best_isa(). Throws mla::Error when MLA_ISA names an unknown target or one the machine lacks
/// (and force_isa() has not overridden it).
inline Isa active_isa() {
  detail::isa::State& s = detail::isa::state();
  const int forced = s.forced.load(std::memory_order_acquire);
  if (forced >= 0) return static_cast<Isa>(forced);
  detail::require(s.environment_error.empty(), s.environment_error);
  return s.from_environment >= 0 ? static_cast<Isa>(s.from_environment) : s.best;
}

/// Makes every later kernel call use `isa` (for tests and reproducible runs). Throws
/// mla::Error, changing nothing, when the machine cannot run it. Not meant to be called while
/// other threads run kernels.
inline void force_isa(Isa isa) {
  detail::isa::State& s = detail::isa::state();
  detail::require(detail::isa::available(s.cpu, isa), "force_isa(", to_string(isa),
                  "): ", detail::isa::why_unavailable(s.cpu, isa));
  s.forced.store(static_cast<int>(isa), std::memory_order_release);
}

/// Undoes force_isa(): back to MLA_ISA or the best target.
inline void reset_isa() { detail::isa::state().forced.store(-1, std::memory_order_release); }

}  // namespace mla
