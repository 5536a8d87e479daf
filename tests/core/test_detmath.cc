// core/detmath against long-double references (ulp bounds over the ranges the code uses),
// C99 Annex F special values, and the scalar/vector identity of the float exp.
#include "core/detmath.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/rng.h"

namespace ql {
namespace {

double ulps(double got, long double want) {
  const double w = static_cast<double>(want);
  if (w == 0.0) return got == 0.0 ? 0.0 : INFINITY;
  const double ulp = std::nextafter(std::fabs(w), INFINITY) - std::fabs(w);
  return static_cast<double>(std::fabs(static_cast<long double>(got) - want)) / ulp;
}

double ulps_f(float got, long double want) {
  const float w = static_cast<float>(want);
  const float ulp = std::nextafter(std::fabs(w), INFINITY) - std::fabs(w);
  return static_cast<double>(std::fabs(static_cast<long double>(got) - want) / ulp);
}

TEST(Detmath, DoubleFunctionsAreWithinAFewUlp) {
  CounterRng rng(5, 1);
  double worst[5] = {0, 0, 0, 0, 0};
  for (uint64_t i = 0; i < 200000; ++i) {
    const double u = rng.uniform(i);
    const double x = -700.0 + 1400.0 * u;
    worst[0] = std::max(worst[0], ulps(detmath::exp(x), expl(static_cast<long double>(x))));
    const double y = std::ldexp(0.5 + u, static_cast<int>(i % 2000) - 1000);
    worst[1] = std::max(worst[1], ulps(detmath::log(y), logl(static_cast<long double>(y))));
    const double a = -2e5 + 4e5 * rng.uniform(i + (1ull << 40));
    worst[2] = std::max(worst[2], ulps(detmath::sin(a), sinl(static_cast<long double>(a))));
    worst[3] = std::max(worst[3], ulps(detmath::cos(a), cosl(static_cast<long double>(a))));
    const double b = 1e-3 + 1e3 * u, e = -2.0 + 4.0 * rng.uniform(i + (2ull << 40));
    worst[4] = std::max(worst[4], ulps(detmath::pow(b, e), powl(static_cast<long double>(b), static_cast<long double>(e))));
  }
  EXPECT_LT(worst[0], 1.5) << "exp";
  EXPECT_LT(worst[1], 1.5) << "log";
  EXPECT_LT(worst[2], 4.0) << "sin";
  EXPECT_LT(worst[3], 4.0) << "cos";
  EXPECT_LT(worst[4], 30.0) << "pow (error grows with |y log x| <= 14 here)";
  EXPECT_NEAR(detmath::log10(1000.0), 3.0, 1e-15);
}

TEST(Detmath, SpecialValuesFollowAnnexF) {
  const double inf = INFINITY, nan = NAN;
  EXPECT_TRUE(std::isnan(detmath::exp(nan)));
  EXPECT_EQ(detmath::exp(-inf), 0.0);
  EXPECT_EQ(detmath::exp(inf), inf);
  EXPECT_EQ(detmath::exp(710.0), inf);
  EXPECT_EQ(detmath::exp(-746.0), 0.0);
  EXPECT_GT(detmath::exp(-744.0), 0.0);  // gradual underflow
  EXPECT_EQ(detmath::exp(0.0), 1.0);
  EXPECT_EQ(detmath::log(1.0), 0.0);
  EXPECT_EQ(detmath::log(0.0), -inf);
  EXPECT_TRUE(std::isnan(detmath::log(-1.0)));
  EXPECT_EQ(detmath::log(inf), inf);
  EXPECT_NEAR(detmath::log(std::numeric_limits<double>::denorm_min()), -744.44007192138126, 1e-12);
  EXPECT_EQ(detmath::pow(0.0, 2.0), 0.0);
  EXPECT_EQ(detmath::pow(0.0, -1.0), inf);
  EXPECT_EQ(detmath::pow(5.0, 0.0), 1.0);
  EXPECT_NEAR(detmath::pow(-2.0, 3.0), -8.0, 1e-14);
  EXPECT_TRUE(std::isnan(detmath::pow(-2.0, 0.5)));
  EXPECT_TRUE(std::isnan(detmath::sin(inf)));
  EXPECT_EQ(detmath::sin(0.0), 0.0);
  EXPECT_EQ(detmath::cos(0.0), 1.0);
}

TEST(Detmath, FloatExpIsAccurateAndTheVectorFormEqualsTheScalarForm) {
  std::vector<float> x;
  for (int i = 0; i <= 40000; ++i) x.push_back(-110.0f + 200.0f * static_cast<float>(i) / 40000.0f);
  x.push_back(NAN);
  x.push_back(INFINITY);
  x.push_back(-INFINITY);
  double worst = 0;
  for (float v : x) {
    const long double want = expl(static_cast<long double>(v));
    if (std::isfinite(v) && want > 1.2e-38L && want < 3.4e38L) worst = std::max(worst, ulps_f(detmath::expf(v), want));
  }
  EXPECT_LT(worst, 2.0);
  EXPECT_TRUE(std::isnan(detmath::expf(NAN)));
  EXPECT_EQ(detmath::expf(INFINITY), INFINITY);
  EXPECT_EQ(detmath::expf(-INFINITY), 0.0f);
  EXPECT_EQ(detmath::expf(-104.0f), 0.0f);
  EXPECT_GT(detmath::expf(-100.0f), 0.0f);  // subnormal, not flushed
  EXPECT_EQ(detmath::expf(0.0f), 1.0f);
  // exp_inplace runs 8 lanes at a time and the tail one by one: every element equals expf.
  for (size_t n : {size_t{1}, size_t{7}, size_t{8}, size_t{19}, x.size()}) {
    std::vector<float> v(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(n));
    detmath::exp_inplace(v.data(), static_cast<std::ptrdiff_t>(n));
    for (size_t i = 0; i < n; ++i) {
      const float s = detmath::expf(x[i]);
      ASSERT_EQ(std::memcmp(&v[i], &s, sizeof s), 0) << "x = " << x[i] << " n = " << n;
    }
  }
}

}  // namespace
}  // namespace ql
