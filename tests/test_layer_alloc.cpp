// Once a workspace is sized, a decode step allocates nothing: counted through the global
// operator new (std containers, the cache) and Eigen's own allocator (EIGEN_RUNTIME_NO_MALLOC,
// with eigen_assert made to count instead of being compiled out under NDEBUG).

#include <atomic>
#include <cstdlib>
#include <new>

namespace alloc_count {
std::atomic<bool> counting{false};
std::atomic<long> news{0};
std::atomic<long> eigen_failures{0};
const char* first_failure = "";
const char* first_file = "";
int first_line = 0;
// Eigen's assertions in this program count here (the heap check is one of them).
inline void note_eigen(bool ok, const char* what, const char* file, int line) {
  if (ok) return;
  if (eigen_failures++ == 0) {
    first_failure = what;
    first_file = file;
    first_line = line;
  }
}
}  // namespace alloc_count

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) ::alloc_count::note_eigen(static_cast<bool>(x), #x, __FILE__, __LINE__)

#include <gtest/gtest.h>

#include "mla/layer.hpp"
#include "test_util.hpp"

// Counting replacements of the global allocation functions. They pair malloc/aligned_alloc with
// free, which GCC cannot see through the replacement and reports as a mismatch.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  if (alloc_count::counting) ++alloc_count::news;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return ::operator new(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  if (alloc_count::counting) ++alloc_count::news;
  const std::size_t al = static_cast<std::size_t>(a);
  if (void* p = std::aligned_alloc(al, (n + al - 1) / al * al)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) { return ::operator new(n, a); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

using mla::Index;
using mla::MlaConfig;
using mla::RowMatrix;

/// Runs `f` with allocation counting on; returns {operator new calls, Eigen heap allocations}.
template <class F>
std::pair<long, long> count_allocations(F&& f) {
  alloc_count::news = 0;
  alloc_count::eigen_failures = 0;
  Eigen::internal::set_is_malloc_allowed(false);
  alloc_count::counting = true;
  f();
  alloc_count::counting = false;
  Eigen::internal::set_is_malloc_allowed(true);
  return {alloc_count::news.load(), alloc_count::eigen_failures.load()};
}

TEST(DecodeAllocations, TheCountersSeeAllocations) {
  // Positive control: the hooks are live, so a zero below means something.
  const auto [news, eigen] = count_allocations([] {
    std::vector<int> v(10);
    Eigen::VectorXf w(1000);
    w.setZero();
    EXPECT_EQ(v.size(), 10u);
  });
  EXPECT_GE(news, 1);
  EXPECT_GE(eigen, 1);
}

template <class T>
class DecodeAllocationTest : public ::testing::Test {};
using ComputeTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(DecodeAllocationTest, ComputeTypes, );

TYPED_TEST(DecodeAllocationTest, DecodeStepsAllocateNothing) {
  using T = TypeParam;
  for (const MlaConfig& c : {MlaConfig::small_v2_lite(), MlaConfig::small_v3()})
    for (mla::CacheStorage storage :
         {test::exact_storage<T>(), mla::CacheStorage::kBFloat16, mla::CacheStorage::kFp8E4M3}) {
      SCOPED_TRACE(mla::to_string(storage));
      const mla::MlaLayer<T> layer(c, mla::MlaWeights<T>::random(c, 3));
      mla::LatentCacheOptions o;
      o.block_tokens = 16;  // decode steps below cross several block boundaries
      o.num_blocks = 16;
      o.storage = storage;
      mla::LatentCache cache(c, o);
      const auto seq = cache.add_sequence();
      mla::MlaWorkspace<T> ws;
      const RowMatrix<T> x = test::random_input<T>(120, c.hidden_size, 4);
      RowMatrix<T> y(120, c.hidden_size);
      layer.forward(x.topRows(30), 0, cache, seq, y.topRows(30), ws);  // prefill: may allocate
      layer.forward(x.row(30), 30, cache, seq, y.row(30), ws);         // first decode sizes ws
      const auto [news, eigen] = count_allocations([&] {
        for (Index t = 31; t < 120; ++t) layer.forward(x.row(t), t, cache, seq, y.row(t), ws);
      });
      EXPECT_EQ(news, 0) << "operator new calls during 89 decode steps";
      EXPECT_EQ(eigen, 0) << "Eigen heap allocations or assertions during 89 decode steps, first: "
                          << alloc_count::first_failure << " at " << alloc_count::first_file << ":"
                          << alloc_count::first_line;
      EXPECT_EQ(cache.length(seq, 0), 120);
      EXPECT_TRUE(y.allFinite());
    }
}

TYPED_TEST(DecodeAllocationTest, BatchedDecodeStepsAllocateNothing) {
  using T = TypeParam;
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<T> layer(c, mla::MlaWeights<T>::random(c, 3));
  mla::LatentCacheOptions o;
  o.block_tokens = 8;
  o.num_blocks = 32;
  o.storage = mla::CacheStorage::kFp8E4M3;
  mla::LatentCache cache(c, o);
  std::vector<mla::SequenceId> seqs = {cache.add_sequence(), cache.add_sequence(),
                                       cache.add_sequence()};
  mla::MlaWorkspace<T> ws;
  const RowMatrix<T> x = test::random_input<T>(3, c.hidden_size, 6);
  RowMatrix<T> y(3, c.hidden_size);
  std::vector<std::int64_t> pos = {0, 100, 5000};
  layer.forward_batch(x, pos, cache, seqs, y, ws);  // sizes the workspace
  const auto [news, eigen] = count_allocations([&] {
    for (int step = 0; step < 20; ++step) {
      for (auto& p : pos) ++p;
      layer.forward_batch(x, pos, cache, seqs, y, ws);
    }
  });
  EXPECT_EQ(news, 0);
  EXPECT_EQ(eigen, 0);
  EXPECT_EQ(cache.length(seqs[2], 0), 21);
}

TYPED_TEST(DecodeAllocationTest, DecodeWithFp8WeightsAllocatesNothing) {
  using T = TypeParam;
  const MlaConfig c = MlaConfig::small_v3();
  for (mla::Fp8Matmul matmul : {mla::Fp8Matmul::kW8A32, mla::Fp8Matmul::kW8A8}) {
    mla::Fp8Options fp8;
    fp8.matmul = matmul;
    fp8.block_rows = fp8.block_cols = 16;
    const mla::MlaLayer<T> layer(c, mla::MlaWeights<T>::random(c, 3).quantize_fp8(
                                        typename mla::MlaWeights<T>::Fp8Selection{}, fp8));
    mla::LatentCacheOptions o;
    o.num_blocks = 4;
    o.storage = mla::CacheStorage::kFp8E4M3;
    mla::LatentCache cache(c, o);
    const auto seq = cache.add_sequence();
    mla::MlaWorkspace<T> ws;
    const RowMatrix<T> x = test::random_input<T>(40, c.hidden_size, 5);
    RowMatrix<T> y(40, c.hidden_size);
    layer.forward(x.topRows(10), 0, cache, seq, y.topRows(10), ws);
    layer.forward(x.row(10), 10, cache, seq, y.row(10), ws);  // sizes the per-thread scratch
    const auto [news, eigen] = count_allocations([&] {
      for (Index t = 11; t < 40; ++t) layer.forward(x.row(t), t, cache, seq, y.row(t), ws);
    });
    EXPECT_EQ(news, 0);
    EXPECT_EQ(eigen, 0);
  }
}

TYPED_TEST(DecodeAllocationTest, AReservedWorkspaceDecodesWithoutAllocating) {
  using T = TypeParam;
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<T> layer(c, mla::MlaWeights<T>::random(c, 3));
  mla::LatentCacheOptions o;
  o.num_blocks = 4;
  o.storage = test::exact_storage<T>();
  mla::LatentCache cache(c, o);
  const auto seq = cache.add_sequence();
  mla::MlaWorkspace<T> ws;
  ws.reserve(c, 1, mla::AttentionPath::kAbsorbed);
  const RowMatrix<T> x = test::random_input<T>(3, c.hidden_size, 5);
  RowMatrix<T> y(3, c.hidden_size);
  const auto [news, eigen] = count_allocations([&] {
    for (Index t = 0; t < 3; ++t) layer.forward(x.row(t), t, cache, seq, y.row(t), ws);
  });
  EXPECT_EQ(news, 0);
  EXPECT_EQ(eigen, 0);
}

}  // namespace

TEST(DecodeAllocations, ThreadedDecodeStepsAllocateNothing) {
  // The SIMD kernel on a two-thread pool, split over more parts than threads, for every cache
  // format: the pool's hand-off and the kernel's scratch are all preallocated.
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 3));
  mla::ThreadPool pool(2);
  for (mla::CacheStorage storage :
       {mla::CacheStorage::kFloat32, mla::CacheStorage::kBFloat16, mla::CacheStorage::kFp8E4M3}) {
    SCOPED_TRACE(mla::to_string(storage));
    mla::LatentCacheOptions o;
    o.block_tokens = 16;
    o.num_blocks = 16;
    o.storage = storage;
    mla::LatentCache cache(c, o);
    const auto seq = cache.add_sequence();
    mla::MlaWorkspace<float> ws;
    mla::RunOptions run;
    run.executor = &pool;
    run.decode.splits = 5;
    run.decode.tile_tokens = 16;
    const RowMatrix<float> x = test::random_input<float>(100, c.hidden_size, 4);
    RowMatrix<float> y(100, c.hidden_size);
    layer.forward(x.topRows(30), 0, cache, seq, y.topRows(30), ws, run);
    layer.forward(x.row(30), 30, cache, seq, y.row(30), ws, run);
    const auto [news, eigen] = count_allocations([&] {
      for (Index t = 31; t < 100; ++t) layer.forward(x.row(t), t, cache, seq, y.row(t), ws, run);
    });
    EXPECT_EQ(news, 0);
    EXPECT_EQ(eigen, 0) << alloc_count::first_failure << " at " << alloc_count::first_file << ":"
                        << alloc_count::first_line;
    EXPECT_TRUE(y.allFinite());
  }
}

TEST(DecodeAllocations, Bf16AndMultiTokenDecodeStepsAllocateNothing) {
  // Precision::kBf16, and chunks of several tokens on the absorbed path (one kernel call
  // for up to 8 query tokens), on every instruction set this machine runs.
  const MlaConfig c = MlaConfig::small_v3();
  const mla::MlaLayer<float> layer(c, mla::MlaWeights<float>::random(c, 3));
  mla::ThreadPool pool(2);
  test::for_each_isa([&](mla::Isa) {
    for (mla::Precision p : {mla::Precision::kFp32, mla::Precision::kBf16}) {
      for (mla::CacheStorage storage : {mla::CacheStorage::kFloat32, mla::CacheStorage::kBFloat16,
                                        mla::CacheStorage::kFp8E4M3}) {
        SCOPED_TRACE(std::string(mla::to_string(storage)) +
                     (p == mla::Precision::kBf16 ? " bf16" : " fp32"));
        mla::LatentCacheOptions o;
        o.block_tokens = 16;
        o.num_blocks = 16;
        o.storage = storage;
        mla::LatentCache cache(c, o);
        const auto seq = cache.add_sequence();
        mla::MlaWorkspace<float> ws;
        mla::RunOptions run(mla::AttentionPath::kAbsorbed);
        run.executor = &pool;
        run.decode.splits = 3;
        run.decode.tile_tokens = 16;
        run.decode.precision = p;
        mla::RunOptions run_auto = run;
        run_auto.path = mla::AttentionPath::kAuto;
        const RowMatrix<float> x = test::random_input<float>(120, c.hidden_size, 4);
        RowMatrix<float> y(120, c.hidden_size);
        layer.forward(x.topRows(30), 0, cache, seq, y.topRows(30), ws, run_auto);
        // One absorbed chunk of 8 sizes the workspace; then steps of 1 and chunks of 5 and 8.
        layer.forward(x.middleRows(30, 8), 30, cache, seq, y.middleRows(30, 8), ws, run);
        const auto [news, eigen] = count_allocations([&] {
          Index t = 38;
          for (Index len : {1, 5, 8, 1, 8, 3}) {
            layer.forward(x.middleRows(t, len), t, cache, seq, y.middleRows(t, len), ws, run);
            t += len;
          }
        });
        EXPECT_EQ(news, 0);
        EXPECT_EQ(eigen, 0) << alloc_count::first_failure << " at " << alloc_count::first_file
                            << ":" << alloc_count::first_line;
        EXPECT_TRUE(y.topRows(64).allFinite());
      }
    }
  });
}
