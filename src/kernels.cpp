// The one translation unit of mla's own programs (tests, benchmarks, examples) that compiles
// every instruction-set target's kernels: they are built with MLA_SEPARATE_KERNELS, so their
// other units only declare the kernel table (see mla/detail/isa/dispatch.hpp). Users who
// include mla header-only need nothing of this.

#define MLA_KERNELS_IMPLEMENTATION
#include "mla/detail/isa/dispatch.hpp"
