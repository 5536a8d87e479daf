// Learnable transforms (core/model/transform_grad.h): the Kronecker row transform against the
// dense Kronecker product and against core/model/transforms.h's InputTransform (one
// convention), every backward against central finite differences in double, the Cayley map's
// orthogonality and PyTorch's form, and the SVD factor's exact inverse-transpose.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>

#include "core/error.h"
#include "core/model/transform_grad.h"
#include "core/model/transforms.h"
#include "core/rng.h"
#include "tests/fd_util.h"

namespace ql {
namespace {

MatrixD rnd(Index r, Index c, uint64_t stream, double scale = 1.0) { return fd::gaussian(r, c, 37, stream, scale); }

using fd::dot;
const auto fd_error = [](const std::function<double()>& loss, double* x, Index n, const double* analytic) {
  return fd::error(loss, x, n, analytic);
};

MatrixD kron(const MatrixD& A, const MatrixD& B) {
  MatrixD K(A.rows() * B.rows(), A.cols() * B.cols());
  for (Index i = 0; i < A.rows(); ++i)
    for (Index j = 0; j < A.cols(); ++j) K.block(i * B.rows(), j * B.cols(), B.rows(), B.cols()) = A(i, j) * B;
  return K;
}

TEST(TransformGrad, KronRowsIsTheDenseKroneckerProduct) {
  const MatrixD A = rnd(4, 4, 1), B = rnd(3, 3, 2), X = rnd(300, 12, 3);  // 300 rows: two chunks
  MatrixD Y;
  kron_rows_fwd<double>(X, &A, &B, Y);
  EXPECT_LT((Y - X * kron(A, B)).norm(), 1e-12 * Y.norm());
  kron_rows_fwd<double>(X, nullptr, &B, Y);  // per head of 3
  EXPECT_LT((Y - X * kron(MatrixD::Identity(4, 4), B)).norm(), 1e-12 * Y.norm());
  kron_rows_fwd<double>(X, &A, nullptr, Y);  // mixing 4 heads of 3
  EXPECT_LT((Y - X * kron(A, MatrixD::Identity(3, 3))).norm(), 1e-12 * Y.norm());
}

TEST(TransformGrad, KronRowsAgreesWithInputTransform) {
  const MatrixD A = random_orthogonal(4, 5, 0), B = random_orthogonal(8, 5, 1);
  const InputTransform P = InputTransform::kronecker(TransformFactor::orthogonal(A), TransformFactor::orthogonal(B));
  Matrix X = rnd(50, 32, 4).cast<float>(), Y;
  const Matrix Af = A.cast<float>(), Bf = B.cast<float>();
  kron_rows_fwd<float>(X, &Af, &Bf, Y);
  P.apply(X);
  EXPECT_LT((Y - X).norm(), 1e-5 * X.norm());
}

TEST(TransformGrad, KronRowsBackwardMatchesFiniteDifferences) {
  for (int mode = 0; mode < 3; ++mode) {
    MatrixD A = rnd(4, 4, 5), B = rnd(3, 3, 6), X = rnd(300, 12, 7), R = rnd(300, 12, 8);
    MatrixD* pa = mode == 2 ? nullptr : &A;
    MatrixD* pb = mode == 1 ? nullptr : &B;
    auto loss = [&] {
      MatrixD Y;
      kron_rows_fwd<double>(X, pa, pb, Y);
      return dot(Y, R);
    };
    MatrixD dX, dA = MatrixD::Zero(4, 4), dB = MatrixD::Zero(3, 3);
    kron_rows_bwd<double>(R, X, pa, pb, &dX, &dA, &dB);
    EXPECT_LT(fd_error(loss, X.data(), X.size(), dX.data()), 1e-8) << mode;
    if (pa) {
      EXPECT_LT(fd_error(loss, A.data(), A.size(), dA.data()), 1e-8) << mode;
    }
    if (pb) {
      EXPECT_LT(fd_error(loss, B.data(), B.size(), dB.data()), 1e-8) << mode;
    }
  }
}

TEST(TransformGrad, ScaleColsBackwardMatchesFiniteDifferences) {
  for (bool divide : {false, true}) {
    MatrixD X = rnd(6, 5, 9), R = rnd(6, 5, 10);
    VectorD c = (rnd(5, 1, 11, 0.3).array() + 1.0).matrix();
    auto loss = [&] {
      MatrixD Y;
      scale_cols_fwd<double>(X, c, divide, Y);
      return dot(Y, R);
    };
    MatrixD dX;
    VectorD dc = VectorD::Zero(5);
    scale_cols_bwd<double>(R, X, c, divide, &dX, &dc);
    EXPECT_LT(fd_error(loss, X.data(), X.size(), dX.data()), 1e-8);
    EXPECT_LT(fd_error(loss, c.data(), c.size(), dc.data()), 1e-8);
  }
}

TEST(TransformGrad, CayleyIsOrthogonalAndIgnoresTheUpperTriangle) {
  MatrixD X = rnd(6, 6, 12);
  const MatrixD U = cayley(X);
  EXPECT_LT((U.transpose() * U - MatrixD::Identity(6, 6)).norm(), 1e-12);
  X(1, 4) += 3.0;  // upper triangle and diagonal do not enter
  X(2, 2) -= 1.0;
  EXPECT_LT((cayley(X) - U).norm(), 1e-15);
  // The reference's start: X itself orthogonal, yet Cayley(tril(X) - tril(X)ᵀ) differs from X.
  const MatrixD Q = random_orthogonal(6, 1, 2);
  EXPECT_GT((cayley(Q) - Q).norm(), 0.1);
}

TEST(TransformGrad, SvdFactorInverseTransposeAndGradients) {
  MatrixD Xu = rnd(5, 5, 13), Xv = rnd(5, 5, 14);
  VectorD sigma = (rnd(5, 1, 15, 0.2).array() + 1.0).matrix();
  MatrixD M, Mi;
  SvdFactorTape tape;
  svd_factor_fwd(Xu, Xv, sigma, M, Mi, tape);
  EXPECT_LT((M * Mi.transpose() - MatrixD::Identity(5, 5)).norm(), 1e-12);
  const MatrixD R1 = rnd(5, 5, 16), R2 = rnd(5, 5, 17);
  auto loss = [&] {
    MatrixD m, mi;
    SvdFactorTape t;
    svd_factor_fwd(Xu, Xv, sigma, m, mi, t);
    return dot(m, R1) + dot(mi, R2);
  };
  MatrixD dXu = MatrixD::Zero(5, 5), dXv = MatrixD::Zero(5, 5);
  VectorD ds = VectorD::Zero(5);
  svd_factor_bwd(R1, R2, tape, dXu, dXv, ds);
  EXPECT_LT(fd_error(loss, Xu.data(), Xu.size(), dXu.data()), 1e-7);
  EXPECT_LT(fd_error(loss, Xv.data(), Xv.size(), dXv.data()), 1e-7);
  EXPECT_LT(fd_error(loss, sigma.data(), sigma.size(), ds.data()), 1e-7);
}

TEST(TransformGrad, DirectInverseTransposeAndGradient) {
  MatrixD M = (rnd(5, 5, 21, 0.3) + MatrixD::Identity(5, 5)).eval();
  MatrixD Mi;
  inverse_t_fwd(M, Mi);
  EXPECT_LT((M * Mi.transpose() - MatrixD::Identity(5, 5)).norm(), 1e-12);
  const MatrixD R = rnd(5, 5, 22);
  auto loss = [&] {
    MatrixD mi;
    inverse_t_fwd(M, mi);
    return dot(mi, R);
  };
  MatrixD dM = MatrixD::Zero(5, 5);
  inverse_t_bwd(R, Mi, dM);
  EXPECT_LT(fd_error(loss, M.data(), M.size(), dM.data()), 1e-7);
  // Accumulates.
  MatrixD twice = dM;
  inverse_t_bwd(R, Mi, twice);
  EXPECT_LT((twice - 2 * dM).norm(), 1e-12 * dM.norm());
  // A singular factor is refused, not inverted into infinities.
  MatrixD S = M;
  S.row(3) = S.row(1);
  EXPECT_THROW(inverse_t_fwd(S, Mi), NumericError);
}

}  // namespace
}  // namespace ql
