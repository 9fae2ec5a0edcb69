#pragma once
/// \file
/// `Executor`: where the library runs its parallel loops. The projections, the attention
/// kernels and the decode step take an `Executor*` (nullptr: the calling thread) and call
/// parallel_for on it; `mla::ThreadPool` is one implementation, and an engine implements the
/// interface over its own threads (std::thread, OpenMP, TBB, a scheduler's workers).
///
/// The contract an implementation keeps:
///  - parallel_for(n, task) calls task(i, worker) exactly once for every i in [0, n), in any
///    order and on any threads, and returns when all calls have returned;
///  - `worker` is in [0, concurrency()) and no two calls that run at the same time get the
///    same worker (the library keeps scratch memory per worker: it owns no thread-local state);
///  - the library's tasks do not throw and do not call parallel_for themselves.
/// Running the calls one after the other on the calling thread with worker 0 is a correct
/// implementation (concurrency() == 1).

#include <algorithm>
#include <utility>

#include "mla/matrix.hpp"

namespace mla {

/// A non-owning reference to a callable void(Index task, int worker): two pointers, no
/// allocation. Valid while the callable it was made from lives.
class TaskRef {
 public:
  template <class F>
  TaskRef(F& f)  // NOLINT(google-explicit-constructor): made at call sites
      : ctx_(const_cast<void*>(static_cast<const void*>(&f))),
        call_([](void* c, Index i, int w) { (*static_cast<F*>(c))(i, w); }) {}

  void operator()(Index task, int worker) const { call_(ctx_, task, worker); }

 private:
  void* ctx_;
  void (*call_)(void*, Index, int);
};

/// The interface of a parallel loop (see the file comment for the contract).
class Executor {
 public:
  virtual ~Executor() = default;
  /// Workers that may run tasks at the same time; worker ids are below it. At least 1.
  virtual int concurrency() const = 0;
  /// Calls task(i, worker) for every i in [0, n) and returns when all have returned.
  virtual void parallel_for(Index n, TaskRef task) = 0;
};

/// Runs f(i, worker) for i in [0, n) on `executor`, or on the calling thread (worker 0) when
/// it is nullptr, has one worker, or n is 1.
template <class F>
void parallel_for(Executor* executor, Index n, F&& f) {
  if (n <= 0) return;
  if (!executor || n == 1 || executor->concurrency() <= 1) {
    for (Index i = 0; i < n; ++i) f(i, 0);
    return;
  }
  executor->parallel_for(n, TaskRef(f));
}

/// Workers of an executor (1 for nullptr): how many per-worker scratch buffers to size.
inline int concurrency(const Executor* executor) {
  return executor ? std::max(1, executor->concurrency()) : 1;
}

}  // namespace mla
