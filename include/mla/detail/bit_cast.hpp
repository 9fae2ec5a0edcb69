#pragma once
/// \file
/// C++17 stand-in for std::bit_cast (C++20). Internal; users never include this header.

#include <cstring>
#include <type_traits>

#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
#define MLA_DETAIL_HAS_BUILTIN_BIT_CAST 1
#endif
#endif

namespace mla::detail {

/// Reinterprets the object representation of `from` as a `To` of the same size.
template <class To, class From>
inline To bit_cast(const From& from) noexcept {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs two types of the same size");
  static_assert(std::is_trivially_copyable_v<To> && std::is_trivially_copyable_v<From>,
                "bit_cast needs trivially copyable types");
#ifdef MLA_DETAIL_HAS_BUILTIN_BIT_CAST
  return __builtin_bit_cast(To, from);
#else
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
#endif
}

}  // namespace mla::detail
