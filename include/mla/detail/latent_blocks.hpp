#pragma once
/// \file
/// Where one sequence's records of one layer are: the pool's base, the block table, the record
/// layout and the length. What LatentView holds and what the kernels read. Internal.

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
  Index tokens = 0;  ///< records of the sequence in this layer
  LatentLayout layout;

  /// Start of the records of the sequence's b-th block.
  const unsigned char* block(Index b) const {
    MLA_ASSERT(b >= 0 && b * block_tokens < tokens);
    return layer_base + static_cast<std::size_t>(block_table[b]) * block_bytes;
  }
  /// The record of one token.
  const unsigned char* record(Index token) const {
    return block(token / block_tokens) +
           static_cast<std::size_t>(token % block_tokens) * layout.token_bytes;
  }
};

}  // namespace mla::detail
