#pragma once
/// \file
/// Everything kernels.inl uses, included once before any target namespace opens (kernels.inl
/// itself includes nothing: it is compiled once per target, inside that target's namespace and
/// instruction-set region). Internal.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "mla/detail/bfloat16.hpp"
#include "mla/detail/bit_cast.hpp"
#include "mla/detail/decode_workspace.hpp"
#include "mla/detail/fp8_codec.hpp"
#include "mla/detail/isa/kernels.hpp"
#include "mla/detail/latent_blocks.hpp"
#include "mla/detail/lse_merge.hpp"
#include "mla/detail/record_layout.hpp"
#include "mla/matrix.hpp"
#include "mla/thread_pool.hpp"

/// Inline, and inlined even where the compiler's heuristics would not: the register-blocked
/// inner kernels, whose arrays of vector accumulators must stay in registers.
#if defined(__GNUC__) || defined(__clang__)
#define MLA_KERNEL_INLINE inline __attribute__((always_inline))
#else
#define MLA_KERNEL_INLINE inline
#endif

/// Kept out of line: a register-blocked kernel whose callers would otherwise spill its
/// accumulators.
#if defined(__GNUC__) || defined(__clang__)
#define MLA_KERNEL_NOINLINE __attribute__((noinline))
#else
#define MLA_KERNEL_NOINLINE
#endif
