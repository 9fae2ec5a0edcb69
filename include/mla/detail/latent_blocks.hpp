#pragma once
/// \file
/// Where one sequence's records of one layer are: the pool's base, the block table, the record
/// layout and the length, and optionally a selection of them (the sparse path attends to the
/// records of chosen positions where they are, without copying them). What LatentView holds and
/// what the kernels read. Internal.

#include <cstddef>
#include <cstdint>

#include "mla/detail/record_layout.hpp"
#include "mla/error.hpp"
#include "mla/matrix.hpp"

namespace mla::detail {

struct LatentBlocks {
  const unsigned char* layer_base = nullptr;  ///< block 0 of the layer's part of the pool
  const std::int32_t* block_table = nullptr;  ///< the sequence's blocks, in order
  std::size_t block_bytes = 0;                ///< bytes of one block (block_tokens records)
  Index block_tokens = 0;
  Index tokens = 0;  ///< records of the sequence in this layer (of the selection, if any)
  LatentLayout layout;
  /// A selection: record j is the sequence's token positions[j] (j < tokens). Null: record j is
  /// token j.
  const std::int32_t* positions = nullptr;

  /// Start of the records of the sequence's b-th block (not for a selection).
  const unsigned char* block(Index b) const {
    MLA_ASSERT(b >= 0 && positions == nullptr);
    return layer_base + static_cast<std::size_t>(block_table[b]) * block_bytes;
  }
  /// The record of one token (of the selection's j-th, for a selection).
  const unsigned char* record(Index token) const {
    if (positions) token = positions[token];
    return layer_base + static_cast<std::size_t>(block_table[token / block_tokens]) * block_bytes +
           static_cast<std::size_t>(token % block_tokens) * layout.token_bytes;
  }
};

}  // namespace mla::detail
