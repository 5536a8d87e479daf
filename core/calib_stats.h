// Calibration statistics of one linear's inputs (ALGORITHMS.md §0.2): the Hessian proxy
// H = E[x xᵀ] as a running mean with a count, and per-input-channel absmax, mean |x|, mean x².
// Both are mergeable, so shards (threads, calibration batches, processes) combine exactly:
// merge(a, b) equals accumulating a's rows then b's rows up to float rounding.
//
// Scaling: hessian() returns the running mean (1/n) Σ_t w_t x_t x_tᵀ / mean(w), i.e. XᵀX/n for
// unit weights. GPTQ's H = 2XᵀX/n differs by the factor 2, which no algorithm depends on
// (damping is relative to mean diag H); the reference code's per-sequence normalisation only
// rescales too.
//
// Thread safety: an accumulator is not shared between threads; give each thread its own and
// merge them in a fixed order for results independent of the thread count.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace ql {

class HessianAccumulator {
 public:
  HessianAccumulator() = default;
  explicit HessianAccumulator(Index d);

  /// Add the rows of X (n x d), each with weight 1. One tiled SYRK (core/linalg.h syrk_upper).
  void add(const Matrix& X);
  /// Add rows with per-token weights w (n, all >= 0): accumulates Xᵀ diag(w) X (VLMQ's XᵀGX).
  void add_weighted(const Matrix& X, const Vector& w);
  /// Combine with another accumulator of the same dimension.
  void merge(const HessianAccumulator& other);
  /// Become the statistics of inputs x' = diag(s) x (an equivalence transform folded into the
  /// inputs): H' = diag(s) H diag(s). s has dim() entries.
  void scale_channels(const VectorD& s);

  Index dim() const { return d_; }
  /// Number of rows added (tokens), whatever their weights.
  int64_t count() const { return count_; }
  /// Sum of the row weights (== count() for unweighted adds).
  double weight_sum() const { return weight_sum_; }
  /// The full symmetric d x d running mean (see the header comment for the scale).
  Matrix hessian() const;
  /// The same running mean without the copy: row i holds columns j >= i; the strictly lower
  /// part is unspecified. For consumers that read one triangle of a large H (GPTQ).
  const Matrix& upper_triangle() const { return upper_; }

 private:
  Index d_ = 0;
  int64_t count_ = 0;
  double weight_sum_ = 0.0;
  Matrix upper_;  // upper triangle holds the running mean; the lower part is not maintained
};

class ChannelStats {
 public:
  ChannelStats() = default;
  explicit ChannelStats(Index d);
  void add(const Matrix& X);
  void merge(const ChannelStats& other);
  /// Become the statistics of inputs x' = diag(s) x; exact up to rounding, min()/max() included
  /// (per-channel extremes are kept for this). s has dim() entries, any sign.
  void scale_channels(const VectorD& s);

  Index dim() const { return absmax_.size(); }
  int64_t count() const { return count_; }
  const Vector& absmax() const { return absmax_; }  ///< max |x_j| over rows
  VectorD mean_abs() const;                          ///< mean |x_j|
  VectorD mean_sq() const;                           ///< mean x_j²
  float min() const { return min_; }                 ///< over all entries (static act ranges)
  float max() const { return max_; }

 private:
  int64_t count_ = 0;
  Vector absmax_;
  VectorD sum_abs_, sum_sq_;
  float min_ = 0.0f, max_ = 0.0f;
  Vector chan_min_, chan_max_;  // per-channel extremes, so scale_channels keeps min_/max_ exact
};

}  // namespace ql
