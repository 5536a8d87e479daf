#include "core/optim.h"

#include <cmath>

#include "core/detmath.h"
#include "core/error.h"

namespace ql {

AdamW::AdamW(AdamWOptions o) : o_(o) {
  if (!(o.lr >= 0) || !(o.beta1 >= 0 && o.beta1 < 1) || !(o.beta2 >= 0 && o.beta2 < 1) || !(o.eps >= 0) ||
      !(o.weight_decay >= 0))
    throw ShapeError("adamw: lr, eps, weight_decay must be >= 0 and betas in [0, 1)");
}

int AdamW::add(float* p, Index n) {
  if (!p || n < 0) throw ShapeError("adamw: null parameter or negative size");
  params_.push_back({p, n, std::vector<float>(static_cast<size_t>(n), 0.0f), std::vector<float>(static_cast<size_t>(n), 0.0f)});
  return static_cast<int>(params_.size()) - 1;
}

void AdamW::step(const std::vector<const float*>& grads, double lr) {
  if (grads.size() != params_.size())
    throw ShapeError("adamw: " + std::to_string(grads.size()) + " gradients for " + std::to_string(params_.size()) +
                     " parameters");
  if (lr < 0) lr = o_.lr;
  ++t_;
  // The scalars in double, rounded once to float as PyTorch's float32 arithmetic sees them.
  const double bc1 = 1.0 - detmath::pow(o_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - detmath::pow(o_.beta2, static_cast<double>(t_));
  const float decay = static_cast<float>(1.0 - lr * o_.weight_decay);
  // 1 − β computed in double and rounded once, as PyTorch passes them as Python floats.
  const float a1 = static_cast<float>(1.0 - o_.beta1), a2 = static_cast<float>(1.0 - o_.beta2);
  const float b2 = static_cast<float>(o_.beta2);
  const float step_size = static_cast<float>(lr / bc1), bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float eps = static_cast<float>(o_.eps);
  for (std::size_t i = 0; i < params_.size(); ++i) {
    Param& P = params_[i];
    const float* g = grads[i];
    if (!g && P.n > 0) throw ShapeError("adamw: null gradient for parameter " + std::to_string(i));
#pragma omp parallel for schedule(static) if (P.n >= 65536)
    for (Index k = 0; k < P.n; ++k) {
      P.p[k] *= decay;
      P.m[k] += (g[k] - P.m[k]) * a1;  // torch: exp_avg.lerp_(grad, 1 - beta1)
      P.v[k] = P.v[k] * b2 + a2 * g[k] * g[k];
      P.p[k] -= step_size * (P.m[k] / (std::sqrt(P.v[k]) / bc2_sqrt + eps));
    }
  }
}

double cosine_lr(double lr, int64_t t, int64_t total, int64_t warmup, double min_factor) {
  if (total < 1 || warmup < 0 || t < 0 || t >= total)
    throw ShapeError("cosine_lr: step " + std::to_string(t) + " of " + std::to_string(total) + " (warmup " +
                     std::to_string(warmup) + ")");
  if (t < warmup) return lr * static_cast<double>(t + 1) / static_cast<double>(warmup);
  // CosineAnnealingLR(T_max = total − warmup, eta_min = lr · min_factor).
  const double frac = static_cast<double>(t - warmup) / static_cast<double>(total - warmup);
  const double floor = lr * min_factor;
  return floor + (lr - floor) * 0.5 * (1.0 + detmath::cos(3.141592653589793 * frac));
}

}  // namespace ql
