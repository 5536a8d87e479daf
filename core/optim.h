// First-order optimisation for block-local objectives (FlatQuant's transforms and clipping,
// the first-order QAT baseline): AdamW exactly as PyTorch's torch.optim.AdamW computes it, and a
// learning-rate schedule of optional linear warmup then cosine annealing to a floor
// (PyTorch's CosineAnnealingLR with eta_min = lr · min_factor; FlatQuant anneals to lr · 1e-3).
//
// Parameters are flat float32 arrays owned by the caller, registered once; the optimiser keeps
// the moments beside them. Every update is elementwise (no reductions), so results are the
// same for any thread count. Moments are float32 like PyTorch's for float32 parameters.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace ql {

/// torch.optim.AdamW's defaults.
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

class AdamW {
 public:
  explicit AdamW(AdamWOptions o = {});
  /// Registers a parameter of n floats at p (its gradient must be passed to step() in the same
  /// order). Returns its index.
  int add(float* p, Index n);
  /// One update of every parameter with gradients grads[i] (n_i floats each) at learning rate
  /// lr (the schedule's value; the options' lr when lr < 0). Per element, as PyTorch:
  ///   p ← p · (1 − lr·wd);  m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²;
  ///   p ← p − lr / (1 − β1ᵗ) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + eps).
  /// ShapeError when grads do not match the registered parameters.
  void step(const std::vector<const float*>& grads, double lr = -1.0);
  int64_t steps() const { return t_; }
  const AdamWOptions& options() const { return o_; }

 private:
  struct Param {
    float* p;
    Index n;
    std::vector<float> m, v;
  };
  AdamWOptions o_;
  std::vector<Param> params_;
  int64_t t_ = 0;
};

/// Learning rate at step t (0-based) of `total`: linear warmup lr·(t+1)/warmup for t < warmup,
/// then PyTorch's CosineAnnealingLR over the remaining steps, T_max = total − warmup,
/// eta_min = lr·min_factor: floor + (lr − floor)(1 + cos(π (t − warmup)/T_max))/2 (lr at the
/// first step after warmup; the floor would be reached one step after the last). ShapeError for
/// total < 1, warmup < 0 or t outside [0, total).
double cosine_lr(double lr, int64_t t, int64_t total, int64_t warmup = 0, double min_factor = 1e-3);

}  // namespace ql
