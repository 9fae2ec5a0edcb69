#pragma once
/// \file
/// The instruction set the library's kernels run on. Every build compiles the kernels of every
/// target (GCC and Clang on x86-64: portable, AVX2, AVX-512, AMX; other compilers and CPUs: the
/// portable one), whatever -march it is given, and the best target the CPU and the OS offer
/// is chosen once per process (CPUID, XGETBV, and on Linux the AMX permission). The choice can
/// be lowered for tests and reproducibility, with the environment variable
/// `MLA_ISA=portable|avx2|avx512|amx` or with force_isa(); asking for a target the machine
/// lacks is an mla::Error. `MLA_AMX_EMULATION=1` makes the AMX target available on CPUs with
/// AVX512-BF16 but no AMX, its tile kernels running on a software model of the tile
/// instructions (for tests; slow; never chosen as the best target).

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "mla/detail/isa/cpu.hpp"
#include "mla/error.hpp"

namespace mla {

/// Kernel targets, from the most portable up. Each includes the ones before it.
enum class Isa : std::uint8_t {
  kPortable,  ///< plain C++ (GCC/Clang vector extensions where the compiler has them)
  kAvx2,      ///< AVX2 + FMA + F16C
  kAvx512,    ///< AVX-512 F/BW/DQ/VL (and BF16 / FP16 instructions where the CPU has them)
  kAmx,       ///< AVX-512 + AMX-TILE / AMX-BF16 tiles
};

/// "portable", "avx2", "avx512" or "amx".
inline const char* to_string(Isa isa) {
  switch (isa) {
    case Isa::kPortable:
      return "portable";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAmx:
      return "amx";
  }
  return "unknown";
}

/// The target called `name` (as to_string writes it); throws mla::Error naming the choices.
inline Isa parse_isa(const std::string& name) {
  for (Isa isa : {Isa::kPortable, Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (name == to_string(isa)) return isa;
  }
  detail::fail("unknown instruction set '", name, "': expected portable, avx2, avx512 or amx");
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
    case Isa::kAmx:
      return MLA_ISA_X86 && (f.amx || f.amx_emulated);
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
  return std::string("this CPU or operating system does not offer ") + to_string(isa);
}

inline void init_state(State& s) {
  s.cpu = detect_cpu();
  for (Isa isa : {Isa::kAvx2, Isa::kAvx512, Isa::kAmx}) {
    if (available(s.cpu, isa)) s.best = isa;
  }
  // The tile model is offered for tests, never chosen as the best target.
  if (const char* emu = std::getenv("MLA_AMX_EMULATION");
      emu != nullptr && std::string(emu) == "1") {
    s.cpu.amx_emulated = MLA_ISA_X86 && !s.cpu.amx && s.cpu.avx512_bf16;
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
