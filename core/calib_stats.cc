#include "core/calib_stats.h"

#include "core/linalg.h"


#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/error.h"

namespace ql {

namespace {

void check_dim(const char* what, Index expected, Index got) {
  if (expected != got) {
    throw ShapeError(std::string(what) + ": input has " + std::to_string(got) +
                     " channels, the accumulator expects " + std::to_string(expected));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// HessianAccumulator
// ---------------------------------------------------------------------------------------------

HessianAccumulator::HessianAccumulator(Index d) : d_(d) {
  if (d < 0) throw ShapeError("HessianAccumulator: negative dimension " + std::to_string(d));
  upper_ = Matrix::Zero(d, d);
}

void HessianAccumulator::add(const Matrix& X) {
  check_dim("HessianAccumulator::add", d_, X.cols());
  const Index m = X.rows();
  if (m == 0 || d_ == 0) {
    count_ += m;
    weight_sum_ += static_cast<double>(m);
    return;
  }
  // Running mean over the total weight W: H' = H * W/(W+m) + XᵀX/(W+m). Folding the rescale
  // into SYRK's beta adds no pass over X or H and makes H independent of how the rows are split
  // into batches (up to float rounding).
  const double total = weight_sum_ + static_cast<double>(m);
  const float beta = static_cast<float>(weight_sum_ / total);
  const float alpha = static_cast<float>(1.0 / total);
  syrk_upper(X, alpha, beta, upper_);  // thread-count independent (core/linalg.h)
  count_ += m;
  weight_sum_ = total;
}

void HessianAccumulator::add_weighted(const Matrix& X, const Vector& w) {
  check_dim("HessianAccumulator::add_weighted", d_, X.cols());
  const Index m = X.rows();
  if (w.size() != m) {
    throw ShapeError("HessianAccumulator::add_weighted: " + std::to_string(w.size()) +
                     " weights for " + std::to_string(m) + " rows");
  }
  double s = 0.0;
  for (Index t = 0; t < m; ++t) {
    const float wt = w[t];
    if (!(wt >= 0.0f) || !std::isfinite(wt)) {
      throw NumericError("HessianAccumulator::add_weighted: weight " + std::to_string(t) +
                         " is " + std::to_string(wt) + ", expected a finite value >= 0");
    }
    s += static_cast<double>(wt);
  }
  count_ += m;
  if (s == 0.0 || d_ == 0) return;  // zero total weight contributes nothing to the mean
  // Xᵀ diag(w) X = (diag(√w) X)ᵀ (diag(√w) X): scale a copy, then the same SYRK.
  Matrix Xs(m, d_);
  for (Index t = 0; t < m; ++t) Xs.row(t) = X.row(t) * std::sqrt(w[t]);
  const double total = weight_sum_ + s;
  const float beta = static_cast<float>(weight_sum_ / total);
  const float alpha = static_cast<float>(1.0 / total);
  syrk_upper(Xs, alpha, beta, upper_);
  weight_sum_ = total;
}

void HessianAccumulator::merge(const HessianAccumulator& other) {
  check_dim("HessianAccumulator::merge", d_, other.d_);
  count_ += other.count_;
  if (other.weight_sum_ == 0.0) return;
  // Weighted mean of two running means: (W_a H_a + W_b H_b) / (W_a + W_b).
  const double total = weight_sum_ + other.weight_sum_;
  const float a = static_cast<float>(weight_sum_ / total);
  const float b = static_cast<float>(other.weight_sum_ / total);
  if (weight_sum_ == 0.0) {
    upper_ = other.upper_;
  } else {
    upper_.triangularView<Eigen::Upper>() =
        (a * upper_ + b * other.upper_).triangularView<Eigen::Upper>();
  }
  weight_sum_ = total;
}

void HessianAccumulator::scale_channels(const VectorD& s) {
  check_dim("HessianAccumulator::scale_channels", d_, s.size());
  // E[(Dx)(Dx)ᵀ] = D E[x xᵀ] D with D = diag(s); only the upper triangle is maintained.
  for (Index i = 0; i < d_; ++i) {
    for (Index j = i; j < d_; ++j) {
      upper_(i, j) = static_cast<float>(static_cast<double>(upper_(i, j)) * s[i] * s[j]);
    }
  }
}

Matrix HessianAccumulator::hessian() const {
  Matrix H = upper_.selfadjointView<Eigen::Upper>();
  return H;
}

// ---------------------------------------------------------------------------------------------
// ChannelStats
// ---------------------------------------------------------------------------------------------

ChannelStats::ChannelStats(Index d) {
  if (d < 0) throw ShapeError("ChannelStats: negative dimension " + std::to_string(d));
  absmax_ = Vector::Zero(d);
  sum_abs_ = VectorD::Zero(d);
  sum_sq_ = VectorD::Zero(d);
  chan_min_ = Vector::Constant(d, std::numeric_limits<float>::infinity());
  chan_max_ = Vector::Constant(d, -std::numeric_limits<float>::infinity());
}

void ChannelStats::add(const Matrix& X) {
  check_dim("ChannelStats::add", dim(), X.cols());
  const Index n = X.rows(), d = X.cols();
  if (n == 0) return;
  float* amax = absmax_.data();
  float* cmin = chan_min_.data();
  float* cmax = chan_max_.data();
  double* sa = sum_abs_.data();
  double* sq = sum_sq_.data();
  // Rows in order, so each channel's double sums have one fixed summation order.
  for (Index t = 0; t < n; ++t) {
    const float* x = X.data() + t * d;
    for (Index j = 0; j < d; ++j) {
      const float v = x[j];
      const float a = std::fabs(v);
      amax[j] = std::max(amax[j], a);
      cmin[j] = std::min(cmin[j], v);
      cmax[j] = std::max(cmax[j], v);
      sa[j] += static_cast<double>(a);
      sq[j] += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  count_ += n;
  if (count_ > 0 && dim() > 0) {
    min_ = chan_min_.minCoeff();
    max_ = chan_max_.maxCoeff();
  }
}

void ChannelStats::scale_channels(const VectorD& s) {
  check_dim("ChannelStats::scale_channels", dim(), s.size());
  for (Index j = 0; j < dim(); ++j) {
    const double sj = s[j], aj = std::fabs(sj);
    absmax_[j] = static_cast<float>(absmax_[j] * aj);
    sum_abs_[j] *= aj;
    sum_sq_[j] *= sj * sj;
    if (count_ == 0) continue;
    // A negative scale swaps the channel's extremes.
    const float lo = static_cast<float>(chan_min_[j] * sj);
    const float hi = static_cast<float>(chan_max_[j] * sj);
    chan_min_[j] = std::min(lo, hi);
    chan_max_[j] = std::max(lo, hi);
  }
  if (count_ > 0 && dim() > 0) {
    min_ = chan_min_.minCoeff();
    max_ = chan_max_.maxCoeff();
  }
}

void ChannelStats::merge(const ChannelStats& other) {
  check_dim("ChannelStats::merge", dim(), other.dim());
  if (other.count_ == 0) return;
  if (count_ == 0) {
    *this = other;
    return;
  }
  absmax_ = absmax_.cwiseMax(other.absmax_);
  chan_min_ = chan_min_.cwiseMin(other.chan_min_);
  chan_max_ = chan_max_.cwiseMax(other.chan_max_);
  sum_abs_ += other.sum_abs_;
  sum_sq_ += other.sum_sq_;
  count_ += other.count_;
  if (count_ > 0 && dim() > 0) {
    min_ = chan_min_.minCoeff();
    max_ = chan_max_.maxCoeff();
  }
}

// With no rows the means are 0/0 = NaN: "no data" rather than a plausible-looking zero.
VectorD ChannelStats::mean_abs() const { return sum_abs_ / static_cast<double>(count_); }

VectorD ChannelStats::mean_sq() const { return sum_sq_ / static_cast<double>(count_); }

}  // namespace ql
