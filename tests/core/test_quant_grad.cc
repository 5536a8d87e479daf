// Fake quantization with straight-through gradients (core/quant_grad.h): the forward against
// hand-computed grids, the STE gradient of the scale on a hand-computed row, and every gradient
// path (values, range, clip logits; LWC, LAC, asymmetric KV rows) against central differences
// of the surrogate without rounding, whose exact gradient the STE gradient is.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "core/quant_grad.h"
#include "tests/fd_util.h"

namespace ql {
namespace {

MatrixD rnd(Index r, Index c, uint64_t stream) { return fd::gaussian(r, c, 31, stream); }

double fd_error(const std::function<double()>& loss, double* x, Index n, const double* analytic) {
  return fd::error(loss, x, n, analytic, 1e-7);
}

TEST(QuantGrad, SymmetricForwardIsTheReferenceGrid) {
  MatrixD X(1, 4);
  X << 0.3, -1.2, 2.0, 0.05;
  FakeQuantGrad spec;  // 4-bit symmetric, no clipping: s = 2/7
  MatrixD Y;
  FakeQuantTape<double> tape;
  fake_quant_fwd<double>(X, spec, VectorD(), VectorD(), Y, tape);
  const double s = 2.0 / 7;
  EXPECT_NEAR(tape.scale[0], s, 1e-15);
  EXPECT_NEAR(Y(0, 0), 1 * s, 1e-15);   // round(1.05) = 1
  EXPECT_NEAR(Y(0, 1), -4 * s, 1e-15);  // round(-4.2) = -4
  EXPECT_NEAR(Y(0, 2), 7 * s, 1e-15);
  EXPECT_EQ(Y(0, 3), 0.0);              // round(0.175) = 0
}

TEST(QuantGrad, AsymmetricForwardClampsOnTheShiftedGrid) {
  MatrixD X(1, 3);
  X << -0.5, 1.0, 0.2;
  FakeQuantGrad spec;
  spec.symmetric = false;  // s = 1.5/15 = 0.1, z = round(5) = 5
  MatrixD Y;
  FakeQuantTape<double> tape;
  fake_quant_fwd<double>(X, spec, VectorD(), VectorD(), Y, tape);
  EXPECT_NEAR(tape.scale[0], 0.1, 1e-15);
  EXPECT_EQ(tape.zero[0], 5.0);
  EXPECT_NEAR(Y(0, 0), -0.5, 1e-12);
  EXPECT_NEAR(Y(0, 1), 1.0, 1e-12);
  EXPECT_NEAR(Y(0, 2), 0.2, 1e-12);
}

TEST(QuantGrad, SteGradientOfTheScaleOnAHandComputedRow) {
  // ds = Σ dy (q - x/s) = (1 - 1.05) + (-4 + 4.2) + (7 - 7) + (0 - 0.175) = -0.025; the range is
  // the max element's, so it gets 1 (pass-through) + ds/7.
  MatrixD X(1, 4);
  X << 0.3, -1.2, 2.0, 0.05;
  FakeQuantGrad spec;
  MatrixD Y, dX;
  FakeQuantTape<double> tape;
  fake_quant_fwd<double>(X, spec, VectorD(), VectorD(), Y, tape);
  fake_quant_bwd<double>(MatrixD::Ones(1, 4), X, spec, VectorD(), VectorD(), tape, dX, nullptr, nullptr);
  EXPECT_NEAR(dX(0, 0), 1.0, 1e-12);
  EXPECT_NEAR(dX(0, 1), 1.0, 1e-12);
  EXPECT_NEAR(dX(0, 2), 1.0 - 0.025 / 7, 1e-12);
  EXPECT_NEAR(dX(0, 3), 1.0, 1e-12);
}

/// FD check of dX and the logits' gradients for one configuration, on the rounding-free surrogate.
void check_surrogate(FakeQuantGrad spec, Index rows, Index cols, Index n_logits, double logit, uint64_t stream) {
  spec.round_values = false;
  MatrixD X = rnd(rows, cols, stream), R = rnd(rows, cols, stream + 1);
  VectorD lh = VectorD::Constant(n_logits, logit), ll = VectorD::Constant(n_logits, logit - 0.3);
  auto loss = [&] {
    MatrixD Y;
    FakeQuantTape<double> t;
    fake_quant_fwd<double>(X, spec, lh, ll, Y, t);
    return (Y.array() * R.array()).sum();
  };
  MatrixD Y, dX;
  FakeQuantTape<double> tape;
  fake_quant_fwd<double>(X, spec, lh, ll, Y, tape);
  VectorD dlh = VectorD::Zero(n_logits), dll = VectorD::Zero(n_logits);
  fake_quant_bwd<double>(R, X, spec, lh, ll, tape, dX, &dlh, &dll);
  EXPECT_LT(fd_error(loss, X.data(), X.size(), dX.data()), 1e-6);
  if (n_logits > 0) {
    EXPECT_GT(dlh.norm(), 0.0);
    EXPECT_LT(fd_error(loss, lh.data(), lh.size(), dlh.data()), 1e-6);
    EXPECT_LT(fd_error(loss, ll.data(), ll.size(), dll.data()), 1e-6);
  }
}

TEST(QuantGrad, ActivationClippingMatchesFiniteDifferences) {
  FakeQuantGrad spec;  // A4 per token, one LAC pair for the tensor
  check_surrogate(spec, 9, 16, 1, 1.2, 10);
}

TEST(QuantGrad, WeightClippingMatchesFiniteDifferences) {
  FakeQuantGrad spec;  // W4 per output row, LWC pair per row: values clamped before the range
  spec.clip = ClipStyle::ClampValues;
  spec.min_range = 1e-5;
  check_surrogate(spec, 7, 12, 7, 1.0, 20);
}

TEST(QuantGrad, AsymmetricKvClippingMatchesFiniteDifferences) {
  FakeQuantGrad spec;  // K4/V4 per token and head, asymmetric
  spec.symmetric = false;
  check_surrogate(spec, 8, 8, 1, 2.0, 30);
  check_surrogate(spec, 8, 8, 0, 0.0, 40);
}

TEST(QuantGrad, ClippedValuesSendTheirGradientToTheBound) {
  // LWC: an element above max·σ(α) is clamped; its gradient (times the grid's pass-through) goes
  // to the bound and from there to α and the row's max element, never to itself.
  MatrixD X(1, 4);
  X << 1.0, 0.1, -0.2, 0.5;
  FakeQuantGrad spec;
  spec.clip = ClipStyle::ClampValues;
  spec.round_values = false;
  VectorD lh = VectorD::Constant(1, 0.0), ll = VectorD::Constant(1, 0.0);  // σ = 0.5: clamp to [-0.1, 0.5]
  MatrixD Y, dX;
  FakeQuantTape<double> tape;
  fake_quant_fwd<double>(X, spec, lh, ll, Y, tape);
  EXPECT_NEAR(Y(0, 0), 0.5, 1e-12);
  EXPECT_NEAR(Y(0, 2), -0.1, 1e-12);
  MatrixD G = MatrixD::Zero(1, 4);
  G(0, 2) = 1.0;  // only the clamped negative element's output matters
  VectorD dlh = VectorD::Zero(1), dll = VectorD::Zero(1);
  fake_quant_bwd<double>(G, X, spec, lh, ll, tape, dX, &dlh, &dll);
  EXPECT_EQ(dX(0, 1), 0.0);
  EXPECT_NEAR(dX(0, 2), 0.5, 1e-12);    // the row's min element, through lo_b = min·σ(β)
  EXPECT_NEAR(dll[0], -0.2 * 0.25, 1e-12);  // ∂lo_b/∂β = min σ(1-σ)
  EXPECT_EQ(dlh[0], 0.0);
}

TEST(QuantGrad, RowClippingAloneMatchesFiniteDifferences) {
  MatrixD X = rnd(6, 10, 50), R = rnd(6, 10, 51);
  VectorD lh = VectorD::Constant(6, 0.7), ll = VectorD::Constant(6, 0.4);
  auto loss = [&] {
    MatrixD Y;
    clip_rows_fwd<double>(X, lh, ll, Y);
    return (Y.array() * R.array()).sum();
  };
  MatrixD Y, dX;
  clip_rows_fwd<double>(X, lh, ll, Y);
  EXPECT_LT(Y.maxCoeff(), X.maxCoeff());  // something was clipped
  VectorD dlh = VectorD::Zero(6), dll = VectorD::Zero(6);
  clip_rows_bwd<double>(R, X, lh, ll, dX, &dlh, &dll);
  EXPECT_LT(fd_error(loss, X.data(), X.size(), dX.data()), 1e-6);
  EXPECT_LT(fd_error(loss, lh.data(), lh.size(), dlh.data()), 1e-6);
  EXPECT_LT(fd_error(loss, ll.data(), ll.size(), dll.data()), 1e-6);
}

}  // namespace
}  // namespace ql
