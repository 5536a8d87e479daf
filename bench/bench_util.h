// Helpers shared by the benchmark programs: wall-clock timing and seeded random matrices.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>

#include "core/rng.h"
#include "core/tensor.h"

namespace ql::bench {

/// Wall-clock seconds of one call of f.
inline double seconds_of(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Best of `reps` calls: the least disturbed measurement on a shared machine.
inline double best_seconds(int reps, const std::function<void()>& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) best = std::min(best, seconds_of(f));
  return best;
}

/// rows x cols standard normal entries, a pure function of (seed, stream).
inline Matrix random_matrix(Index rows, Index cols, uint64_t seed, uint64_t stream) {
  Matrix m(rows, cols);
  CounterRng rng(seed, stream);
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(rng.normal(i));
  return m;
}

}  // namespace ql::bench
