// AdamW (PyTorch's update, decoupled weight decay) and the warmup + cosine schedule.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/optim.h"
#include "core/parallel.h"

namespace ql {
namespace {

TEST(AdamW, TheFirstStepMovesEachParameterByLrTimesTheGradientSign) {
  // t = 1: m̂ = g, v̂ = g², so the step is lr · g / (|g| + eps) after the decay.
  AdamWOptions o;
  o.lr = 0.01;
  o.weight_decay = 0.0;
  AdamW opt(o);
  std::vector<float> p = {1.0f, -2.0f, 0.5f}, g = {3.0f, -0.25f, 1e-3f};
  opt.add(p.data(), 3);
  opt.step({g.data()});
  EXPECT_NEAR(p[0], 1.0 - 0.01, 1e-6);
  EXPECT_NEAR(p[1], -2.0 + 0.01, 1e-6);
  EXPECT_NEAR(p[2], 0.5 - 0.01 * 1e-3 / (1e-3 + 1e-8), 1e-6);
  EXPECT_EQ(opt.steps(), 1);
}

TEST(AdamW, WeightDecayIsDecoupledFromTheGradient) {
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.5;
  AdamW opt(o);
  std::vector<float> p = {2.0f}, g = {0.0f};
  opt.add(p.data(), 1);
  for (int t = 0; t < 3; ++t) opt.step({g.data()});
  // Zero gradients: only the decay acts, p · (1 − lr·wd)^3, untouched by the moments.
  EXPECT_FLOAT_EQ(p[0], 2.0f * 0.95f * 0.95f * 0.95f);
}

TEST(AdamW, MatchesTheRecurrenceWrittenOutInDouble) {
  AdamWOptions o;  // PyTorch's defaults
  AdamW opt(o);
  std::vector<float> p = {0.3f, -1.2f};
  opt.add(p.data(), 2);
  std::vector<double> pd = {0.3, -1.2}, m(2, 0.0), v(2, 0.0);
  for (int t = 1; t <= 20; ++t) {
    std::vector<float> g = {static_cast<float>(std::sin(t)), static_cast<float>(0.1 * t - 1.0)};
    opt.step({g.data()}, 2e-3);
    for (int k = 0; k < 2; ++k) {
      pd[k] *= 1.0 - 2e-3 * o.weight_decay;
      m[k] = o.beta1 * m[k] + (1 - o.beta1) * g[k];
      v[k] = o.beta2 * v[k] + (1 - o.beta2) * g[k] * g[k];
      const double mh = m[k] / (1 - std::pow(o.beta1, t)), vh = v[k] / (1 - std::pow(o.beta2, t));
      pd[k] -= 2e-3 * mh / (std::sqrt(vh) + o.eps);
    }
  }
  EXPECT_NEAR(p[0], pd[0], 1e-5);
  EXPECT_NEAR(p[1], pd[1], 1e-5);
}

TEST(AdamW, MinimisesAQuadraticAndIsTheSameForAnyThreadCount) {
  auto run = [](int threads) {
    ThreadCountGuard guard(threads);
    const Index n = 70000;  // above the parallel threshold
    std::vector<float> p(static_cast<size_t>(n)), g(static_cast<size_t>(n));
    for (Index i = 0; i < n; ++i) p[static_cast<size_t>(i)] = static_cast<float>((i % 17) - 8);
    AdamWOptions o;
    o.lr = 0.2;
    o.weight_decay = 0.0;
    AdamW opt(o);
    opt.add(p.data(), n);
    for (int t = 0; t < 500; ++t) {
      for (Index i = 0; i < n; ++i) g[static_cast<size_t>(i)] = 2.0f * (p[static_cast<size_t>(i)] - 1.0f);  // (p − 1)²
      opt.step({g.data()}, cosine_lr(o.lr, t, 500));
    }
    return p;
  };
  const std::vector<float> a = run(1), b = run(2);
  EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * a.size()), 0);
  for (std::size_t i = 0; i < a.size(); i += 997) EXPECT_NEAR(a[i], 1.0f, 0.02f) << i;
}

TEST(AdamW, GradientsMustMatchTheParameters) {
  AdamW opt;
  std::vector<float> p(4), g(4);
  opt.add(p.data(), 4);
  EXPECT_THROW(opt.step({}), ShapeError);
  EXPECT_THROW(opt.step({g.data(), g.data()}), ShapeError);
  AdamWOptions bad;
  bad.beta2 = 1.0;
  EXPECT_THROW(AdamW{bad}, ShapeError);
}

TEST(CosineLr, WarmsUpLinearlyThenAnnealsLikeCosineAnnealingLR) {
  EXPECT_DOUBLE_EQ(cosine_lr(1.0, 0, 10, 2), 0.5);
  EXPECT_DOUBLE_EQ(cosine_lr(1.0, 1, 10, 2), 1.0);
  EXPECT_DOUBLE_EQ(cosine_lr(1.0, 2, 10, 2), 1.0);  // first annealed step: the full rate
  // Half way through T_max = 8: the midpoint between lr and the floor.
  EXPECT_NEAR(cosine_lr(1.0, 6, 10, 2), 0.5 * (1.0 + 1e-3), 1e-12);
  double prev = 2.0;
  for (int t = 2; t < 10; ++t) {
    const double lr = cosine_lr(1.0, t, 10, 2);
    EXPECT_LT(lr, prev);
    EXPECT_GT(lr, 1e-3);
    prev = lr;
  }
  EXPECT_THROW(cosine_lr(1.0, 10, 10), ShapeError);
  EXPECT_THROW(cosine_lr(1.0, 0, 0), ShapeError);
}

}  // namespace
}  // namespace ql
