#include "core/detmath.h"

#include <xmmintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace ql::detmath {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

inline uint64_t bits(double x) {
  uint64_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}
inline double from_bits(uint64_t b) {
  double x;
  std::memcpy(&x, &b, sizeof x);
  return x;
}
/// 2^e for e in [-1022, 1023].
inline double pow2(int e) { return from_bits(static_cast<uint64_t>(e + 1023) << 52); }

/// Adding and subtracting 1.5·2^52 rounds a double of magnitude < 2^51 to the nearest integer
/// (ties to even) in the default rounding mode.
constexpr double kRoundShift = 6755399441055744.0;

constexpr double kLog2e = 1.4426950408889634;  // 1/ln 2
// ln 2 = kLn2Hi + kLn2Lo with kLn2Hi's low 21 bits zero, so k·kLn2Hi is exact for |k| < 2^21.
constexpr double kLn2Hi = 0x1.62e42feep-1;
constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
constexpr double kSqrt2 = 1.4142135623730951;
constexpr double kLn10 = 2.302585092994046;

// π/2 = kPio2A + kPio2B + kPio2C (+ 2.9e-28): 30 significant bits each, so k·kPio2A and
// k·kPio2B are exact for |k| < 2^23 (Cody–Waite reduction).
constexpr double kTwoOverPi = 0x1.45f306dc9c883p-1;
constexpr double kPio2A = 0x1.921fb54p+0;
constexpr double kPio2B = 0x1.10b46118p-30;
constexpr double kPio2C = 0x1.313198ap-61;

/// e^r for |r| <= ln2/2 (+ rounding): Taylor series to r^13 (truncation < 5e-18 relative).
inline double exp_reduced(double r) {
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  return (p * r) * r + r + 1.0;
}

/// sin r and cos r for |r| <= π/4 (+ rounding): Taylor series to r^17 / r^18.
inline double sin_reduced(double r) {
  const double z = r * r;
  double p = 1.0 / 355687428096000.0;  // 1/17!
  p = p * z - 1.0 / 1307674368000.0;
  p = p * z + 1.0 / 6227020800.0;
  p = p * z - 1.0 / 39916800.0;
  p = p * z + 1.0 / 362880.0;
  p = p * z - 1.0 / 5040.0;
  p = p * z + 1.0 / 120.0;
  p = p * z - 1.0 / 6.0;
  return r + (r * z) * p;
}
inline double cos_reduced(double r) {
  const double z = r * r;
  double p = -1.0 / 6402373705728000.0;  // -1/18!
  p = p * z + 1.0 / 20922789888000.0;
  p = p * z - 1.0 / 87178291200.0;
  p = p * z + 1.0 / 479001600.0;
  p = p * z - 1.0 / 3628800.0;
  p = p * z + 1.0 / 40320.0;
  p = p * z - 1.0 / 720.0;
  p = p * z + 1.0 / 24.0;
  // cos r = (1 - z/2) + z² (1/24 - z/720 + ...): the large terms first.
  return (1.0 - 0.5 * z) + (z * z) * p;
}

/// x = k·π/2 + r; the quadrant k mod 4 in [0, 4).
struct Quadrant {
  double r;
  int q;
};
inline Quadrant reduce_pio2(double x) {
  const double kd = (x * kTwoOverPi + kRoundShift) - kRoundShift;
  const double r = ((x - kd * kPio2A) - kd * kPio2B) - kd * kPio2C;
  // fmod is exact (no rounding), so every correct implementation returns the same value.
  const int q = (static_cast<int>(std::fmod(kd, 4.0)) + 4) & 3;
  return {r, q};
}

// ---- float exp: the same operations per lane in the scalar and the vector form ----------------

constexpr float kLog2eF = 1.44269504f;
// ln 2 = kLn2HiF + kLn2LoF with kLn2HiF = 0x1.62p-1 (9 bits): k·kLn2HiF exact for |k| < 2^15.
constexpr float kLn2HiF = 0x1.62p-1f;
constexpr float kLn2LoF = 0.0017409305599453094f;
constexpr float kRoundShiftF = 12582912.0f;  // 1.5·2^23
constexpr float kExpLoF = -104.0f;           // e^-104 rounds to 0 in float
constexpr float kExpHiF = 89.0f;             // e^89 overflows to inf

}  // namespace

double exp(double x) {
  if (x != x) return x;
  if (x > 709.782712893384) return kInf;
  if (x < -745.1332191019412) return 0.0;
  const double kd = (x * kLog2e + kRoundShift) - kRoundShift;
  const double r = (x - kd * kLn2Hi) - kd * kLn2Lo;
  const int k = static_cast<int>(kd);
  // 2^k in two factors, each a normal double, so underflow rounds once (gradually).
  const int k1 = k / 2, k2 = k - k1;
  return exp_reduced(r) * pow2(k1) * pow2(k2);
}

double log(double x) {
  if (x != x) return x;
  if (x < 0.0) return kNaN;
  if (x == 0.0) return -kInf;
  if (x == kInf) return kInf;
  int e = 0;
  uint64_t b = bits(x);
  if (b < (uint64_t{1} << 52)) {  // subnormal: scale into the normal range
    x *= 0x1p54;
    b = bits(x);
    e = -54;
  }
  e += static_cast<int>(b >> 52) - 1023;
  double m = from_bits((b & ((uint64_t{1} << 52) - 1)) | (uint64_t{1023} << 52));  // [1, 2)
  if (m > kSqrt2) {
    m *= 0.5;
    e += 1;
  }
  // log m = log(1+f) = 2 atanh(s), s = f/(2+f), |s| <= 0.172: f - (f²/2 - s(f²/2 + R)) with
  // R = Σ_{k>=1} 2 s^{2k}/(2k+1) (to s^22: truncation < 1e-17 relative).
  const double f = m - 1.0;  // exact
  const double s = f / (2.0 + f);
  const double z = s * s;
  double R = 2.0 / 23.0;
  R = R * z + 2.0 / 21.0;
  R = R * z + 2.0 / 19.0;
  R = R * z + 2.0 / 17.0;
  R = R * z + 2.0 / 15.0;
  R = R * z + 2.0 / 13.0;
  R = R * z + 2.0 / 11.0;
  R = R * z + 2.0 / 9.0;
  R = R * z + 2.0 / 7.0;
  R = R * z + 2.0 / 5.0;
  R = R * z + 2.0 / 3.0;
  R *= z;
  const double hfsq = 0.5 * f * f;
  const double lm = f - (hfsq - s * (hfsq + R));
  const double ed = static_cast<double>(e);
  return ed * kLn2Hi + (lm + ed * kLn2Lo);
}

double pow(double x, double y) {
  if (y == 0.0 || x == 1.0) return 1.0;
  if (x != x || y != y) return kNaN;
  if (x == 0.0) return y > 0.0 ? 0.0 : kInf;
  if (x < 0.0) {
    if (std::floor(y) != y) return kNaN;  // floor and fmod are exact
    const double r = exp(y * log(-x));
    return std::fmod(y, 2.0) != 0.0 ? -r : r;
  }
  return exp(y * log(x));
}

double sin(double x) {
  if (x != x || x == kInf || x == -kInf) return kNaN;
  const Quadrant t = reduce_pio2(x);
  switch (t.q) {
    case 0: return sin_reduced(t.r);
    case 1: return cos_reduced(t.r);
    case 2: return -sin_reduced(t.r);
    default: return -cos_reduced(t.r);
  }
}

double cos(double x) {
  if (x != x || x == kInf || x == -kInf) return kNaN;
  const Quadrant t = reduce_pio2(x);
  switch (t.q) {
    case 0: return cos_reduced(t.r);
    case 1: return -sin_reduced(t.r);
    case 2: return -cos_reduced(t.r);
    default: return sin_reduced(t.r);
  }
}

double log10(double x) { return log(x) / kLn10; }

namespace {

// One definition of the float exp's arithmetic, for a scalar (V = float, I = int32_t) or a
// GCC vector of floats (V = v4f, I = v4i: one SSE register, the baseline instruction set): the
// same IEEE operations per lane either way.
template <class V, class I>
inline V expf_lanes(V x) {
  // Clamp (NaN lanes may come out as anything: they are restored at the end).
  V v;
  if constexpr (std::is_same_v<V, float>) {
    v = x < kExpLoF ? kExpLoF : x;
    v = v > kExpHiF ? kExpHiF : v;
  } else {
    v = V(_mm_min_ps(_mm_max_ps(__m128(x), _mm_set1_ps(kExpLoF)), _mm_set1_ps(kExpHiF)));
  }
  const V kf = (v * kLog2eF + kRoundShiftF) - kRoundShiftF;
  const V r = (v - kf * kLn2HiF) - kf * kLn2LoF;
  // e^r, |r| <= ln2/2: Taylor series to r^7 (truncation < 6e-9 relative, below half an ulp).
  V p = r * (1.0f / 5040.0f) + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = (p * r) * r + r + 1.0f;
  I k;
  if constexpr (std::is_same_v<V, float>)
    k = static_cast<int32_t>(kf);  // |kf| <= 151: in range
  else
    k = __builtin_convertvector(kf, I);  // cvttps2dq; a NaN lane gives INT_MIN, restored below
  const I k1 = k >> 1, k2 = k - k1;  // 2^k in two normal factors: one rounding at the end
  const I b1 = (k1 + 127) << 23, b2 = (k2 + 127) << 23;
  V s1, s2;
  std::memcpy(&s1, &b1, sizeof s1);
  std::memcpy(&s2, &b2, sizeof s2);
  const V y = p * s1 * s2;
  return x != x ? x : y;
}

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

}  // namespace

float expf(float x) {
  if (x != x) return x;
  return expf_lanes<float, int32_t>(x);
}

void exp_inplace(float* x, std::ptrdiff_t n) {
  std::ptrdiff_t i = 0;
  for (; i + 8 <= n; i += 8) {  // two independent vectors per step: more work in flight
    v4f a, b;
    std::memcpy(&a, x + i, sizeof a);
    std::memcpy(&b, x + i + 4, sizeof b);
    a = expf_lanes<v4f, v4i>(a);
    b = expf_lanes<v4f, v4i>(b);
    std::memcpy(x + i, &a, sizeof a);
    std::memcpy(x + i + 4, &b, sizeof b);
  }
  for (; i < n; ++i) x[i] = expf(x[i]);
}

}  // namespace ql::detmath
