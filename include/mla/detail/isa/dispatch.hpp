#pragma once
/// \file
/// The one seam between the width-independent headers and the instruction-set targets:
/// kernels() returns the kernel table of the active target (mla::active_isa()). Every target's
/// kernels are compiled in every build; only this choice, made at run time, differs between
/// machines. Internal.
///
/// By default every translation unit that calls a kernel compiles all of them (header-only).
/// A program may compile them once instead: define MLA_SEPARATE_KERNELS in every unit of the
/// program, and in exactly one of them also MLA_KERNELS_IMPLEMENTATION before including any
/// mla header (mla's own tests, benchmarks and examples do this, src/kernels.cpp). The units
/// then only declare kernels_for(); the one defines it. A program must not mix the two modes.

#include "mla/detail/isa/kernels.hpp"
#include "mla/detail/isa/portable.hpp"
#include "mla/isa.hpp"
#if defined(MLA_SEPARATE_KERNELS) && !defined(MLA_KERNELS_IMPLEMENTATION)
#define MLA_KERNELS_DECLARED_ONLY 1
#else
#define MLA_KERNELS_DECLARED_ONLY 0
#endif
#if MLA_ISA_X86 && !MLA_KERNELS_DECLARED_ONLY
#include "mla/detail/isa/amx.hpp"
#include "mla/detail/isa/avx2.hpp"
#include "mla/detail/isa/avx512.hpp"
#endif

namespace mla::detail::isa {

#if MLA_KERNELS_DECLARED_ONLY
/// The kernel table of `isa` (which must be available): defined in the program's one unit
/// with MLA_KERNELS_IMPLEMENTATION.
const Kernels& kernels_for(Isa isa);
#else
#ifdef MLA_SEPARATE_KERNELS
#define MLA_KERNELS_LINKAGE  // the one definition of the program
#else
#define MLA_KERNELS_LINKAGE inline
#endif
/// The kernel table of `isa` (which must be available).
MLA_KERNELS_LINKAGE const Kernels& kernels_for(Isa isa) {
  switch (isa) {
#if MLA_ISA_X86
    case Isa::kAvx2:
      return avx2::table();
    case Isa::kAvx512:
      return avx512::table();
    case Isa::kAvx512Bf16:
      return avx512_bf16::table();
    case Isa::kAmx:
      return amx::table_on<amx::HardwareTiles>();
    case Isa::kAmxModel:
      return amx::table_on<amx::EmulatedTiles>();
#endif
    default:
      return portable::table();
  }
}
#undef MLA_KERNELS_LINKAGE
#endif
#undef MLA_KERNELS_DECLARED_ONLY

/// The kernel table of the active target. Throws mla::Error when MLA_ISA asks for a target the
/// machine lacks.
inline const Kernels& kernels() { return kernels_for(active_isa()); }

}  // namespace mla::detail::isa

namespace mla::detail {

/// dst[i] = float(bf16 at src + 2 i) for n values (exact), on the active target.
inline void bfloat16_to_float(const unsigned char* src, std::size_t n, float* dst) {
  isa::kernels().widen_bf16(src, n, dst);
}

}  // namespace mla::detail
