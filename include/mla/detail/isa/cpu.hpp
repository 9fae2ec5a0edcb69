#pragma once
/// \file
/// What the CPU and the operating system offer, read once: CPUID for the instruction sets,
/// XGETBV for the register state the OS saves (AVX, AVX-512, AMX tiles), and on Linux the
/// permission a process must ask for before its first AMX tile instruction. Internal.

#include <cstdint>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
/// 1 when the compiler can build the x86 kernels of detail/isa/ (GCC/Clang function targets).
#define MLA_ISA_X86 1
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define MLA_ISA_X86 0
#endif

namespace mla::detail::isa {

/// The features the kernels care about; every flag means "the CPU has it and the OS enabled
/// its state".
struct CpuFeatures {
  bool avx2 = false;         ///< AVX2 + FMA + F16C, with the YMM state enabled
  bool avx512 = false;       ///< AVX-512 F, BW, DQ, VL, with the ZMM and mask state enabled
  bool avx512_bf16 = false;  ///< AVX512-BF16 (VDPBF16PS)
  bool avx512_fp16 = false;  ///< AVX512-FP16
  bool amx_cpu = false;      ///< AMX-TILE + AMX-BF16 (+ AVX512-BF16) and the tile state in XCR0
  bool amx = false;          ///< amx_cpu and the OS granted this process the tile state
};

#if MLA_ISA_X86
/// XCR0, the state components the OS saves on a context switch (0 when XGETBV is not offered).
inline std::uint64_t read_xcr0(bool osxsave) {
  if (!osxsave) return 0;
  std::uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (std::uint64_t{hi} << 32) | lo;
}

/// Asks Linux for the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
/// without it the first tile instruction raises SIGILL. Idempotent; true when granted.
inline bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr long kReqXcompPerm = 0x1023, kGetXcompPerm = 0x1022, kXtileData = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) return false;
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, kGetXcompPerm, &granted) != 0) return false;
  return (granted >> kXtileData) & 1u;
#else
  return false;  // no way to ask for the tile state on this OS
#endif
}
#endif

/// Reads the features (and asks for the AMX permission when the CPU has AMX).
inline CpuFeatures detect_cpu() {
  CpuFeatures f;
#if MLA_ISA_X86
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(1, 0, &a, &b, &c, &d)) return f;
  const bool fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1,
             f16c = (c >> 29) & 1;
  const std::uint64_t xcr0 = read_xcr0(osxsave);
  const bool ymm_state = (xcr0 & 0x6) == 0x6;                 // SSE and AVX state
  const bool zmm_state = ymm_state && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool tile_state = (xcr0 & 0x60000) == 0x60000;        // XTILECFG and XTILEDATA
  unsigned max_leaf = 0;
  __get_cpuid(0, &max_leaf, &b, &c, &d);
  if (max_leaf < 7) return f;
  __get_cpuid_count(7, 0, &a, &b, &c, &d);
  const bool avx2 = (b >> 5) & 1;
  const bool avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1);
  const bool fp16 = (d >> 23) & 1, amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
  const unsigned leaf7_max = a;
  bool bf16 = false;
  if (leaf7_max >= 1) {
    unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
    __get_cpuid_count(7, 1, &a1, &b1, &c1, &d1);
    bf16 = (a1 >> 5) & 1;
  }
  f.avx2 = avx && avx2 && fma && f16c && ymm_state;
  f.avx512 = f.avx2 && avx512 && zmm_state;
  f.avx512_bf16 = f.avx512 && bf16;
  f.avx512_fp16 = f.avx512 && fp16;
  f.amx_cpu = f.avx512_bf16 && amx_tile && amx_bf16 && tile_state;
  f.amx = f.amx_cpu && request_amx_permission();
#endif
  return f;
}

}  // namespace mla::detail::isa
