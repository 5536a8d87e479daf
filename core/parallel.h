// OpenMP helpers. Exceptions must not escape an OpenMP region (the program would terminate),
// so parallel loops capture the first exception and rethrow it after the region.
#pragma once
#include <exception>
#include <mutex>

namespace ql {

/// Capture inside a parallel region: `errs.run([&]{ ... });`; after the region: `errs.rethrow();`.
/// The exception kept is the one from the lowest loop index that failed, so the reported error
/// does not depend on thread scheduling.
class ParallelErrors {
 public:
  template <class F>
  void run(long index, F&& f) {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!first_ || index < index_) {
        first_ = std::current_exception();
        index_ = index;
      }
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mu_;
  std::exception_ptr first_;
  long index_ = 0;
};

/// Set the thread count for OpenMP regions and OpenBLAS (the OpenMP build of OpenBLAS follows
/// omp_set_num_threads). n <= 0 keeps the current setting.
void set_num_threads(int n);
int num_threads();

/// Sets the thread count for its lifetime and restores the previous one (n <= 0 changes
/// nothing), so a library call such as run_sweep leaves its caller's setting as it found it.
class ThreadCountGuard {
 public:
  explicit ThreadCountGuard(int n) : saved_(num_threads()) { set_num_threads(n); }
  ~ThreadCountGuard() { set_num_threads(saved_); }
  ThreadCountGuard(const ThreadCountGuard&) = delete;
  ThreadCountGuard& operator=(const ThreadCountGuard&) = delete;

 private:
  int saved_;
};

}  // namespace ql
