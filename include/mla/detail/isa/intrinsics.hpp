#pragma once
/// \file
/// <immintrin.h> for the x86 targets (and the benchmarks' own kernels), read with GCC 12's false
/// -Wmaybe-uninitialized / -Wuninitialized warnings switched off for its lines: some intrinsics
/// raise them once inlined (fixed in GCC 13). Internal.

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
