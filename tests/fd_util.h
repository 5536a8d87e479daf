// Helpers shared by the finite-difference tests of the training ops (core/quant_grad,
// core/model/block_grad, core/model/transform_grad, algorithms/flatquant): seeded Gaussian
// matrices and the relative error of an analytic gradient against central differences.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>

#include "core/rng.h"
#include "core/tensor.h"

namespace ql::fd {

/// r x c standard normal values times `scale` from CounterRng(seed, stream), plus `diag` on the
/// diagonal.
inline MatrixD gaussian(Index r, Index c, uint64_t seed, uint64_t stream, double scale = 1.0, double diag = 0.0) {
  const CounterRng rng(seed, stream);
  MatrixD m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = scale * rng.normal(static_cast<uint64_t>(i));
  for (Index i = 0; i < std::min(r, c); ++i) m(i, i) += diag;
  return m;
}

/// offset + scale · N(0, 1) per entry.
inline VectorD gaussian_vec(Index n, uint64_t seed, uint64_t stream, double scale = 1.0, double offset = 0.0) {
  return (gaussian(n, 1, seed, stream, scale).array() + offset).matrix();
}

/// ||analytic - numeric||_F / ||numeric||_F over the n values at x, which loss() reads; numeric
/// = central differences with step h.
inline double error(const std::function<double()>& loss, double* x, Index n, const double* analytic,
                    double h = 1e-6) {
  double num = 0.0, den = 0.0;
  for (Index i = 0; i < n; ++i) {
    const double keep = x[i];
    x[i] = keep + h;
    const double lp = loss();
    x[i] = keep - h;
    const double lm = loss();
    x[i] = keep;
    const double g = (lp - lm) / (2 * h);
    num += (analytic[i] - g) * (analytic[i] - g);
    den += g * g;
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

/// Σ a ⊙ b, the linear loss the tests differentiate.
inline double dot(const MatrixD& a, const MatrixD& b) { return (a.array() * b.array()).sum(); }

}  // namespace ql::fd
