#pragma once
/// \file
/// `ThreadPool`: a small fixed pool of worker threads, the library's own Executor. The calling
/// thread works too, so a pool of n threads starts n - 1 workers. Running a batch of tasks
/// allocates nothing, which keeps decode steps allocation-free.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#include "mla/error.hpp"
#include "mla/executor.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// Fixed set of threads that run batches of independent tasks, one batch at a time: callers on
/// different threads take turns (the second waits), and a task that calls run() on its own
/// pool runs that inner batch itself, on its thread.
class ThreadPool final : public Executor {
 public:
  /// A pool of `threads` threads in all (the caller of run() counts as one). 0 means
  /// std::thread::hardware_concurrency(). Throws mla::Error for a negative or absurd count.
  explicit ThreadPool(int threads = 0) {
    if (threads == 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    detail::require(threads >= 1 && threads <= 1024,
                    "ThreadPool: threads must be in [1, 1024], got ", threads);
    size_ = threads;
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int w = 1; w < threads; ++w) workers_.emplace_back([this, w] { work(w); });
    for (const std::thread& t : workers_) worker_ids_.push_back(t.get_id());
  }

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  /// Threads in the pool, the caller included.
  int size() const { return size_; }
  int concurrency() const override { return size_; }

  void parallel_for(Index n, TaskRef task) override {
    run(n, [&](Index i, int thread) { task(i, thread); });
  }

  /// Calls f(task, thread) for every task in [0, tasks), spread over the pool's threads, and
  /// returns when all have finished. `thread` in [0, size()) identifies the thread that runs
  /// the task (0 is the caller), for per-thread scratch memory. When a task throws, the other
  /// tasks still run and the first exception is rethrown here.
  template <class F>
  void run(Index tasks, F&& f) {
    if (tasks <= 0) return;
    using Fn = std::remove_reference_t<F>;
    Batch batch;
    batch.tasks = tasks;
    batch.context = const_cast<void*>(static_cast<const void*>(&f));
    batch.call = [](void* ctx, Index task, int thread) { (*static_cast<Fn*>(ctx))(task, thread); };
    const int inner = inside();
    if (size_ == 1 || tasks == 1 || inner >= 0) {
      // Alone, or inside one of this pool's tasks (whose thread id it keeps): in place.
      const int thread = inner >= 0 ? inner : 0;
      for (Index t = 0; t < tasks; ++t) batch.call(batch.context, t, thread);
      return;
    }
    std::lock_guard<std::mutex> turn(run_mutex_);  // one batch at a time
    owner_.store(std::this_thread::get_id(), std::memory_order_relaxed);
    struct Release {
      std::atomic<std::thread::id>& owner;
      ~Release() { owner.store(std::thread::id(), std::memory_order_relaxed); }
    } release{owner_};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      batch_ = &batch;
      ++generation_;
    }
    wake_.notify_all();
    drain(batch, 0);
    // Wait for the workers that joined this batch to leave it.
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return batch.active == 0; });
    batch_ = nullptr;
    if (batch.error) std::rethrow_exception(batch.error);
  }

 private:
  struct Batch {
    Index tasks = 0;
    void* context = nullptr;
    void (*call)(void*, Index, int) = nullptr;
    std::atomic<Index> next{0};
    int active = 0;  // workers inside drain(); guarded by mutex_
    std::exception_ptr error;
    std::mutex error_mutex;
  };

  /// The pool thread id of the calling thread when it is running one of this pool's batches
  /// (0: the caller of run(); w: worker w), else -1.
  int inside() const {
    const std::thread::id me = std::this_thread::get_id();
    if (owner_.load(std::memory_order_relaxed) == me) return 0;
    for (std::size_t w = 0; w < worker_ids_.size(); ++w) {
      if (worker_ids_[w] == me) return static_cast<int>(w) + 1;
    }
    return -1;
  }

  static void drain(Batch& b, int thread) {
    for (Index t = b.next.fetch_add(1, std::memory_order_relaxed); t < b.tasks;
         t = b.next.fetch_add(1, std::memory_order_relaxed)) {
      try {
        b.call(b.context, t, thread);
      } catch (...) {
        std::lock_guard<std::mutex> lock(b.error_mutex);
        if (!b.error) b.error = std::current_exception();
      }
    }
  }

  void work(int thread) {
    std::uint64_t seen = 0;
    for (;;) {
      Batch* b = nullptr;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (generation_ != seen && batch_ != nullptr); });
        if (stop_) return;
        seen = generation_;
        b = batch_;
        ++b->active;
      }
      drain(*b, thread);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --b->active;
      }
      done_.notify_all();
    }
  }

  int size_ = 1;
  std::vector<std::thread> workers_;
  std::vector<std::thread::id> worker_ids_;
  std::mutex run_mutex_;                  // held by the thread whose batch is running
  std::atomic<std::thread::id> owner_{};  // that thread
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  Batch* batch_ = nullptr;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
};

}  // namespace mla
