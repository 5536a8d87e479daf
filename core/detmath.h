// Elementary functions whose results are the same bits on every x86-64 machine.
//
// Why not <cmath>: glibc picks exp/log/pow/sin/cos (double and float) implementations at load
// time by the CPU's features, and its FMA variants round differently from the SSE2 ones in a
// fraction of cases (measured here: a hash of 2M values of exp/log/sin/cos/pow changes when
// GLIBC_TUNABLES masks FMA). Eigen's vectorised exp calls the C library for the elements that do
// not fill a packet. These functions use only IEEE additions, multiplications, divisions and
// integer bit operations, compiled once for the baseline instruction set with
// -ffp-contract=off, so their bits depend on the inputs only. Every transcendental function on
// a result path goes through here, in both numeric modes (core/numerics.h).
//
// Accuracy: within a few ulp of the correctly rounded result over the ranges below (measured
// against long double in tests/core/test_detmath.cc); special values follow C99 Annex F
// (NaN in -> NaN, exp(-inf) = 0, log(0) = -inf, log(x < 0) = NaN, overflow -> inf).
#pragma once
#include <cstddef>

namespace ql::detmath {

/// e^x; overflows to inf above ~709.78, gradual underflow below ~-708.4, 0 below ~-745.1.
double exp(double x);
/// Natural logarithm (subnormal inputs included).
double log(double x);
/// x^y for x > 0 as exp(y log x) (relative error grows with |y log x|: ~1e-16 · |y log x|),
/// x == 0 (0 for y > 0, inf for y < 0, 1 for y == 0) and x < 0 with an integral y.
double pow(double x, double y);
/// sin and cos with a three-part Cody–Waite reduction by π/2: a few ulp for |x| < 2^23·π/2;
/// beyond that the reduction loses accuracy (still deterministic).
double sin(double x);
double cos(double x);
/// log10(x) = log(x) / ln 10.
double log10(double x);

/// e^x in float (~2 ulp; 0 below ~-103.97, inf above ~88.72, subnormals gradual). The scalar
/// and the vectorised array form run the same operations per element, so their bits agree.
float expf(float x);
/// x[i] <- e^{x[i]} for i < n.
void exp_inplace(float* x, std::ptrdiff_t n);

}  // namespace ql::detmath
