#pragma once
/// \file
/// `mla::Error`, the exception for bad input at the library's boundaries, and `MLA_ASSERT`
/// for internal invariants on hot paths.

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>

namespace mla {

/// Thrown for bad input at a boundary: an invalid config, a shape that does not match, a full
/// cache, a malformed file. The message says what was expected and what was given. An
/// operation that throws leaves the objects it was given as they were.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

/// Throws mla::Error with the streamed arguments as its message.
template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw Error(os.str());
}

/// Throws mla::Error with the streamed arguments unless `ok`.
template <class... Args>
void require(bool ok, const Args&... args) {
  if (!ok) fail(args...);
}

[[noreturn]] inline void assert_fail(const char* condition, const char* file, int line) {
  std::fprintf(stderr, "%s:%d: MLA_ASSERT(%s) failed\n", file, line, condition);
  std::abort();
}

}  // namespace detail
}  // namespace mla

/// Internal invariant on a hot path: aborts with the condition when it does not hold. Off
/// under NDEBUG unless MLA_ENABLE_ASSERT is defined. Never used for user input (that throws
/// mla::Error).
#if defined(NDEBUG) && !defined(MLA_ENABLE_ASSERT)
#define MLA_ASSERT(condition) ((void)0)
#else
#define MLA_ASSERT(condition) \
  ((condition) ? (void)0 : ::mla::detail::assert_fail(#condition, __FILE__, __LINE__))
#endif
