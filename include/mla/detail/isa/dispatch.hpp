#pragma once
/// \file
/// The one seam between the width-independent headers and the instruction-set targets:
/// kernels() returns the kernel table of the active target (mla::active_isa()). Every target's
/// kernels are compiled in every build; only this choice, made at run time, differs between
/// machines. Internal.

#include "mla/detail/isa/kernels.hpp"
#include "mla/detail/isa/portable.hpp"
#include "mla/isa.hpp"
#if MLA_ISA_X86
#include "mla/detail/isa/amx.hpp"
#include "mla/detail/isa/avx2.hpp"
#include "mla/detail/isa/avx512.hpp"
#endif

namespace mla::detail::isa {

/// The kernel table of `isa` (which must be available).
inline const Kernels& kernels_for(Isa isa) {
  switch (isa) {
#if MLA_ISA_X86
    case Isa::kAvx2:
      return avx2::table();
    case Isa::kAvx512:
      return avx512::table_for_cpu();
    case Isa::kAmx:
      return amx::table();
#endif
    default:
      return portable::table();
  }
}

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
