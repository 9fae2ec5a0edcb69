#pragma once
/// \file
/// The matrix types of the library's interfaces. Activations are row-major [tokens, features]
/// (one token per row, as in the checkpoints' code); weights are row-major [out, in].

#include <Eigen/Core>
#include <algorithm>
#include <cstddef>
#include <new>
#include <vector>

namespace mla {

/// Index type of all sizes (Eigen's, signed).
using Index = Eigen::Index;

/// Row-major dynamic matrix: [tokens, features] for activations, [out, in] for weights.
template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic column vector (norm weights, per-head scalars).
template <class T>
using Vector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Read-only view of a row-major matrix or of a block of one (rows contiguous, any row stride).
template <class T>
using ConstMatrixRef = Eigen::Ref<const RowMatrix<T>>;

/// Writable view of a row-major matrix or of a block of one.
template <class T>
using MatrixRef = Eigen::Ref<RowMatrix<T>>;

namespace detail {

/// Allocator of 64-byte aligned storage (a cache line, an AVX-512 vector): the workspaces'
/// buffers, whatever alignment the compile flags give Eigen.
template <class T>
struct CacheAlignedAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheAlignedAllocator() = default;
  template <class U>
  CacheAlignedAllocator(const CacheAlignedAllocator<U>&) noexcept {}  // NOLINT: allocator rebind
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, kAlign); }
  template <class U>
  bool operator==(const CacheAlignedAllocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const CacheAlignedAllocator<U>&) const noexcept {
    return false;
  }
};

/// A std::vector whose data is 64-byte aligned.
template <class T>
using AlignedVector = std::vector<T, CacheAlignedAllocator<T>>;

/// Makes a function parameter a non-deduced context, so T comes from another argument and
/// Eigen blocks and maps convert to the Ref parameter.
template <class T>
struct Identity {
  using type = T;
};
template <class T>
using identity_t = typename Identity<T>::type;

/// Makes room for at least n elements in `v` (a std::vector or an Eigen vector), never
/// shrinking it: how every workspace grows, so that calls that fit allocate nothing.
template <class V>
void grow(V& v, Index n) {
  if (static_cast<Index>(v.size()) < n) v.resize(static_cast<decltype(v.size())>(n));
}

/// Makes room for at least `rows` rows of exactly `cols` columns in a matrix, never dropping
/// rows it has.
template <class M>
void grow(M& m, Index rows, Index cols) {
  if (m.rows() < rows || m.cols() != cols) m.resize(std::max(rows, m.rows()), cols);
}
}  // namespace detail

}  // namespace mla
