#include "core/metrics.h"

#include "core/detmath.h"
#include "core/linalg.h"


#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"

namespace ql {

namespace {

void check_same_shape(const char* what, const Matrix& a, const Matrix& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) {
    throw ShapeError(std::string(what) + ": shapes differ (" + std::to_string(a.rows()) + "x" +
                     std::to_string(a.cols()) + " vs " + std::to_string(b.rows()) + "x" +
                     std::to_string(b.cols()) + ")");
  }
}

// Elements per reduction chunk. The chunking depends only on the element count, never on the
// thread count: each chunk is summed sequentially, then the chunk sums are added in order.
constexpr Index kChunk = Index(1) << 15;

template <class F>
double fixed_order_sum(Index n, F&& term) {
  const Index n_chunks = (n + kChunk - 1) / kChunk;
  if (n_chunks <= 1) {
    double s = 0.0;
    for (Index i = 0; i < n; ++i) s += term(i);
    return s;
  }
  std::vector<double> partial(static_cast<size_t>(n_chunks), 0.0);
#pragma omp parallel for schedule(static)
  for (Index c = 0; c < n_chunks; ++c) {
    const Index lo = c * kChunk, hi = std::min(n, lo + kChunk);
    double s = 0.0;
    for (Index i = lo; i < hi; ++i) s += term(i);
    partial[static_cast<size_t>(c)] = s;
  }
  double s = 0.0;
  for (double p : partial) s += p;
  return s;
}

double sum_sq_diff(const Matrix& a, const Matrix& b) {
  const float* pa = a.data();
  const float* pb = b.data();
  return fixed_order_sum(a.size(), [&](Index i) {
    const double d = static_cast<double>(pa[i]) - static_cast<double>(pb[i]);
    return d * d;
  });
}

double sum_sq(const Matrix& a) {
  const float* pa = a.data();
  return fixed_order_sum(a.size(), [&](Index i) {
    const double v = pa[i];
    return v * v;
  });
}

double dot(const Matrix& a, const Matrix& b) {
  const float* pa = a.data();
  const float* pb = b.data();
  return fixed_order_sum(a.size(), [&](Index i) {
    return static_cast<double>(pa[i]) * static_cast<double>(pb[i]);
  });
}

}  // namespace

double weight_mse(const Matrix& W, const Matrix& Wq) {
  check_same_shape("weight_mse", W, Wq);
  return sum_sq_diff(W, Wq) / static_cast<double>(W.size());
}

double relative_output_error(const Matrix& W, const Matrix& Wq, const Matrix& H) {
  check_same_shape("relative_output_error", W, Wq);
  if (H.rows() != W.cols() || H.cols() != W.cols()) {
    throw ShapeError("relative_output_error: H is " + std::to_string(H.rows()) + "x" +
                     std::to_string(H.cols()) + ", expected " + std::to_string(W.cols()) +
                     "x" + std::to_string(W.cols()) + " (d_in of W)");
  }
  const Index r = W.rows(), d = W.cols();
  if (r == 0 || d == 0) return std::numeric_limits<double>::quiet_NaN();  // tr(W H Wᵀ) = 0
  // tr(A H Aᵀ) = Σ_i (A H)_i · A_i: a GEMM over the stacked [ΔW; W], then row dots in double.
  Matrix A(2 * r, d);
  A.topRows(r) = W - Wq;
  A.bottomRows(r) = W;
  const Matrix AH = matmul_nn(A, H);  // thread-count independent (core/linalg.h)
  const float* pa = A.data();
  const float* ph = AH.data();
  const Index half = r * d;
  const double num = fixed_order_sum(half, [&](Index i) {
    return static_cast<double>(pa[i]) * static_cast<double>(ph[i]);
  });
  const double den = fixed_order_sum(half, [&](Index i) {
    return static_cast<double>(pa[half + i]) * static_cast<double>(ph[half + i]);
  });
  if (den == 0.0) return std::numeric_limits<double>::quiet_NaN();
  return num / den;
}

double output_error(const Matrix& dW, const Matrix& H) {
  if (H.rows() != dW.cols() || H.cols() != dW.cols())
    throw ShapeError("output_error: H is " + std::to_string(H.rows()) + "x" + std::to_string(H.cols()) +
                     ", expected " + std::to_string(dW.cols()) + "x" + std::to_string(dW.cols()));
  if (dW.size() == 0) return 0.0;
  const Matrix AH = matmul_nn(dW, H);
  const float* pa = dW.data();
  const float* ph = AH.data();
  return fixed_order_sum(dW.size(), [&](Index i) { return static_cast<double>(pa[i]) * static_cast<double>(ph[i]); });
}

double output_mse(const Matrix& Y, const Matrix& Yq) {
  check_same_shape("output_mse", Y, Yq);
  return sum_sq_diff(Y, Yq) / static_cast<double>(Y.size());
}

double sqnr_db(const Matrix& ref, const Matrix& q) {
  check_same_shape("sqnr_db", ref, q);
  const double noise = sum_sq_diff(ref, q);
  if (noise == 0.0) return std::numeric_limits<double>::infinity();
  return 10.0 * detmath::log10(sum_sq(ref) / noise);
}

double cosine_similarity(const Matrix& a, const Matrix& b) {
  check_same_shape("cosine_similarity", a, b);
  const double na = sum_sq(a), nb = sum_sq(b);
  if (na == 0.0 && nb == 0.0) return 1.0;
  // Exactly one zero: no direction to compare; 0 (dot is 0) keeps aggregates finite.
  if (na == 0.0 || nb == 0.0) return 0.0;
  return dot(a, b) / (std::sqrt(na) * std::sqrt(nb));
}

double max_abs_error(const Matrix& a, const Matrix& b) {
  check_same_shape("max_abs_error", a, b);
  const float* pa = a.data();
  const float* pb = b.data();
  double m = 0.0;
  for (Index i = 0; i < a.size(); ++i) {
    const double e = std::fabs(static_cast<double>(pa[i]) - static_cast<double>(pb[i]));
    if (std::isnan(e)) return std::numeric_limits<double>::quiet_NaN();
    if (e > m) m = e;
  }
  return m;
}

MeanSd mean_sd(const std::vector<double>& values) {
  MeanSd r;
  r.n = static_cast<int>(values.size());
  if (r.n == 0) {
    r.mean = r.sd = r.se = std::numeric_limits<double>::quiet_NaN();
    return r;
  }
  double s = 0.0;
  for (double v : values) s += v;
  r.mean = s / r.n;
  double ss = 0.0;
  for (double v : values) ss += (v - r.mean) * (v - r.mean);
  r.sd = r.n > 1 ? std::sqrt(ss / (r.n - 1)) : 0.0;
  r.se = r.sd / std::sqrt(static_cast<double>(r.n));
  return r;
}

}  // namespace ql
