#pragma once
/// \file
/// What the AMX tile model (the amx_model target) counts while the tile kernels run on it: the
/// tile instructions they issue and the cache bytes they fetch. The structure of a kernel (how
/// often each operand and accumulator moves per key block) is checked with them on CPUs
/// without AMX, where the kernels' speed cannot be measured. The hardware backend counts
/// nothing. Internal.

#include <atomic>
#include <cstdint>

namespace mla::detail::isa {

struct TileCounts {
  std::atomic<std::int64_t> products{0};       ///< TDPBF16PS
  std::atomic<std::int64_t> operand_bytes{0};  ///< A and B tile loads
  std::atomic<std::int64_t> c_load_bytes{0};   ///< accumulator tile loads
  std::atomic<std::int64_t> c_store_bytes{0};  ///< accumulator tile stores
  std::atomic<std::int64_t> c_zeros{0};        ///< accumulator tiles zeroed
  std::atomic<std::int64_t> record_bytes{0};   ///< cache records fetched by the decode blocks

  void reset() {
    for (std::atomic<std::int64_t>* c :
         {&products, &operand_bytes, &c_load_bytes, &c_store_bytes, &c_zeros, &record_bytes}) {
      c->store(0);
    }
  }
};

/// The process's counts (every thread adds to them).
inline TileCounts& tile_counts() {
  static TileCounts counts;
  return counts;
}

}  // namespace mla::detail::isa
