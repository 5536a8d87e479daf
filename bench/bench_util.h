// Helpers shared by the benchmark programs: wall-clock timing and seeded random matrices.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>

#include <any>
#include <cmath>

#include "algorithms/algorithm.h"
#include "core/calib_stats.h"
#include "core/linalg.h"
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

/// n x d calibration inputs with a realistic, correlated Hessian: x = A z with A's columns
/// decaying as (1+j)^-0.7 and 4 outlier channels x10.
inline Matrix correlated_inputs(Index n, Index d, uint64_t seed) {
  Matrix mix = random_matrix(d, d, seed, 3);
  for (Index j = 0; j < d; ++j) mix.col(j) *= std::pow(1.0f + static_cast<float>(j), -0.7f);
  Matrix X = matmul_nt(random_matrix(n, d, seed, 4), mix);
  for (Index c : {Index(17), d / 3, d / 2 + 5, d - 40}) X.col(c) *= 10.0f;
  return X;
}

/// The input of a layer-scope plugin run on W with Hessian H (all must outlive the call).
inline LayerInput layer_input(const Matrix& W, const HessianAccumulator& H, const QuantSpec& spec) {
  LayerInput in;
  in.name = "bench";
  in.W = &W;
  in.hessian = &H;
  in.spec = spec;
  return in;
}

}  // namespace ql::bench
