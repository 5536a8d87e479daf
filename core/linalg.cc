#include "core/linalg.h"

#include <cblas.h>

#include <algorithm>
#include <string>

#include "core/error.h"

namespace ql {

namespace {
inline Index n_panels(Index rows) { return (rows + kPanelRows - 1) / kPanelRows; }
}  // namespace

namespace {

/// C = A op(B) with op(B) = Bᵀ when transpose_b, in fixed row panels of A (one single-threaded
/// GEMM each).
Matrix panel_gemm(const Matrix& A, const Matrix& B, bool transpose_b, const char* name) {
  const Index k = A.cols(), kb = transpose_b ? B.cols() : B.rows();
  if (k != kb)
    throw ShapeError(std::string(name) + ": A is " + std::to_string(A.rows()) + "x" +
                     std::to_string(A.cols()) + ", B is " + std::to_string(B.rows()) + "x" +
                     std::to_string(B.cols()));
  const Index m = A.rows(), n = transpose_b ? B.rows() : B.cols();
  Matrix C(m, n);
  if (m == 0 || n == 0) return C;
  if (k == 0) {
    C.setZero();
    return C;
  }
  const Index np = n_panels(m);
  const Index ldb = B.cols();
#pragma omp parallel for schedule(dynamic, 1)
  for (Index p = 0; p < np; ++p) {
    const Index r0 = p * kPanelRows, rows = std::min(kPanelRows, m - r0);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose_b ? CblasTrans : CblasNoTrans, rows, n, k,
                1.0f, A.data() + r0 * k, k, B.data(), ldb, 0.0f, C.data() + r0 * n, n);
  }
  return C;
}

}  // namespace

Matrix matmul_nt(const Matrix& A, const Matrix& B) { return panel_gemm(A, B, true, "matmul_nt"); }
Matrix matmul_nn(const Matrix& A, const Matrix& B) { return panel_gemm(A, B, false, "matmul_nn"); }

void syrk_upper(const Matrix& X, float alpha, float beta, Matrix& C) {
  const Index n = X.rows(), d = X.cols();
  if (C.rows() != d || C.cols() != d)
    throw ShapeError("syrk_upper: C is " + std::to_string(C.rows()) + "x" + std::to_string(C.cols()) +
                     " for X with " + std::to_string(d) + " columns");
  if (d == 0) return;
  // The upper triangle in fixed kPanelRows x kPanelRows tiles: SYRK on diagonal tiles, GEMM
  // X_iᵀ X_j above them; the same flops as one SYRK, and 2-D tiles balance the threads.
  const Index nb = n_panels(d);
  const Index n_tiles = nb * (nb + 1) / 2;
  const blasint ld = static_cast<blasint>(d), k = static_cast<blasint>(n);
  const float* x = X.data();
  float* c = C.data();
#pragma omp parallel for schedule(dynamic, 1)
  for (Index t = 0; t < n_tiles; ++t) {
    Index bi = 0, rem = t;  // tile t -> (bi, bj), bi <= bj, row by row
    while (rem >= nb - bi) {
      rem -= nb - bi;
      ++bi;
    }
    const Index bj = bi + rem;
    const Index i0 = bi * kPanelRows, j0 = bj * kPanelRows;
    const blasint mi = static_cast<blasint>(std::min(kPanelRows, d - i0));
    const blasint mj = static_cast<blasint>(std::min(kPanelRows, d - j0));
    if (bi == bj)
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, mi, k, alpha, x + i0, ld, beta,
                  c + i0 * d + j0, ld);
    else
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, mi, mj, k, alpha, x + i0, ld, x + j0,
                  ld, beta, c + i0 * d + j0, ld);
  }
}

}  // namespace ql
