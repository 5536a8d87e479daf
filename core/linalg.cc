#include "core/linalg.h"

#include <cblas.h>
#include <lapacke.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "core/numerics.h"
#include "core/portable_blas.h"

namespace ql {

namespace {

inline Index n_panels(Index rows) { return (rows + kPanelRows - 1) / kPanelRows; }

/// OpenBLAS's OpenMP build runs a call on one thread inside an active parallel region and on
/// omp_get_max_threads() threads otherwise. Outside a region (or in a team of one) this sets
/// the calling task's thread-count ICV to 1 for the call, so every tile call is single-threaded.
class OneBlasThread {
 public:
  OneBlasThread() : saved_(omp_in_parallel() ? 0 : omp_get_max_threads()) {
    if (saved_ > 1) omp_set_num_threads(1);
  }
  ~OneBlasThread() {
    if (saved_ > 1) omp_set_num_threads(saved_);
  }

 private:
  int saved_;
};

inline bool portable_mode() { return current_numerics() == Numerics::Portable; }
inline CBLAS_TRANSPOSE cblas_op(Trans t) { return t == Trans::Yes ? CblasTrans : CblasNoTrans; }
inline blasint bi(Index v) { return static_cast<blasint>(v); }

}  // namespace

void gemm(Trans ta, Trans tb, Index m, Index n, Index k, float alpha, const float* A, Index lda,
          const float* B, Index ldb, float beta, float* C, Index ldc) {
  if (m <= 0 || n <= 0) return;
  if (portable_mode())
    return portable::gemm(portable::active_isa(), ta == Trans::Yes, tb == Trans::Yes, m, n, k,
                          alpha, A, lda, B, ldb, beta, C, ldc);
  OneBlasThread one;
  cblas_sgemm(CblasRowMajor, cblas_op(ta), cblas_op(tb), bi(m), bi(n), bi(k), alpha, A, bi(lda), B,
              bi(ldb), beta, C, bi(ldc));
}

void gemm(Trans ta, Trans tb, Index m, Index n, Index k, double alpha, const double* A,
          Index lda, const double* B, Index ldb, double beta, double* C, Index ldc) {
  if (m <= 0 || n <= 0) return;
  if (portable_mode())
    return portable::gemm(portable::active_isa(), ta == Trans::Yes, tb == Trans::Yes, m, n, k,
                          alpha, A, lda, B, ldb, beta, C, ldc);
  OneBlasThread one;
  cblas_dgemm(CblasRowMajor, cblas_op(ta), cblas_op(tb), bi(m), bi(n), bi(k), alpha, A, bi(lda), B,
              bi(ldb), beta, C, bi(ldc));
}

void syrk_upper_tile(Index n, Index k, float alpha, const float* A, Index lda, float beta, float* C,
                     Index ldc) {
  if (n <= 0) return;
  if (portable_mode())
    return portable::gemm(portable::active_isa(), true, false, n, n, k, alpha, A, lda, A, lda, beta,
                          C, ldc, portable::Part::Upper);
  OneBlasThread one;
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, bi(n), bi(k), alpha, A, bi(lda), beta, C,
              bi(ldc));
}

void trsm_right_lower_trans(Index m, Index n, const double* L, Index ldl, double* B, Index ldb) {
  if (m <= 0 || n <= 0) return;
  if (portable_mode()) return portable::trsm_right_lower_trans(portable::active_isa(), m, n, L, ldl, B, ldb);
  OneBlasThread one;
  cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasTrans, CblasNonUnit, bi(m), bi(n), 1.0, L,
              bi(ldl), B, bi(ldb));
}

void trsm_left_lower(Index m, Index n, const double* L, Index ldl, double* B, Index ldb) {
  if (m <= 0 || n <= 0) return;
  if (portable_mode()) return portable::trsm_left_lower(portable::active_isa(), m, n, L, ldl, B, ldb);
  OneBlasThread one;
  cblas_dtrsm(CblasRowMajor, CblasLeft, CblasLower, CblasNoTrans, CblasNonUnit, bi(m), bi(n), 1.0, L,
              bi(ldl), B, bi(ldb));
}

void trmm_right_upper(Index m, Index n, const float* U, Index ldu, float* B, Index ldb) {
  if (m <= 0 || n <= 0) return;
  if (portable_mode()) return portable::trmm_right_upper(portable::active_isa(), m, n, U, ldu, B, ldb);
  OneBlasThread one;
  cblas_strmm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, bi(m), bi(n), 1.0f,
              U, bi(ldu), B, bi(ldb));
}

int potrf_lower(Index n, double* A, Index lda) {
  if (n <= 0) return 0;
  if (portable_mode()) return portable::potrf_lower(portable::active_isa(), n, A, lda);
  OneBlasThread one;
  // Row-major lower == column-major upper: dpotrf('U') on the same memory gives L.
  return LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', static_cast<lapack_int>(n), A,
                             static_cast<lapack_int>(lda));
}

namespace {

/// C = A op(B) with op(B) = Bᵀ when transpose_b, in fixed row panels of A (one tile call each).
template <class M>
M panel_gemm(const M& A, const M& B, bool transpose_b, const char* name) {
  using S = typename M::Scalar;
  const Index k = A.cols(), kb = transpose_b ? B.cols() : B.rows();
  if (k != kb)
    throw ShapeError(std::string(name) + ": A is " + std::to_string(A.rows()) + "x" +
                     std::to_string(A.cols()) + ", B is " + std::to_string(B.rows()) + "x" +
                     std::to_string(B.cols()));
  const Index m = A.rows(), n = transpose_b ? B.rows() : B.cols();
  M C(m, n);
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
    gemm(Trans::No, transpose_b ? Trans::Yes : Trans::No, rows, n, k, S(1), A.data() + r0 * k, k,
         B.data(), ldb, S(0), C.data() + r0 * n, n);
  }
  return C;
}

}  // namespace

Matrix matmul_nt(const Matrix& A, const Matrix& B) { return panel_gemm(A, B, true, "matmul_nt"); }
Matrix matmul_nn(const Matrix& A, const Matrix& B) { return panel_gemm(A, B, false, "matmul_nn"); }
MatrixD matmul_nn(const MatrixD& A, const MatrixD& B) { return panel_gemm(A, B, false, "matmul_nn"); }

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
    const Index mi = std::min(kPanelRows, d - i0), mj = std::min(kPanelRows, d - j0);
    if (bi == bj)
      syrk_upper_tile(mi, n, alpha, x + i0, d, beta, c + i0 * d + j0, d);
    else
      gemm(Trans::Yes, Trans::No, mi, mj, n, alpha, x + i0, d, x + j0, d, beta, c + i0 * d + j0, d);
  }
}

// Right-looking with kFactorTile panels: factor the diagonal tile, solve the panel below it,
// update the trailing lower triangle; each step's tiles are independent tile calls.
bool cholesky_lower_blocked(MatrixD& A, double min_pivot) {
  const Index n = A.rows();
  double* a = A.data();
  bool ok = true;
#pragma omp parallel
  for (Index k0 = 0; k0 < n; k0 += kFactorTile) {
    const Index kb = std::min(kFactorTile, n - k0);
#pragma omp single
    {
      double* t = a + k0 * n + k0;
      ok = potrf_lower(kb, t, n) == 0;
      for (Index j = 0; ok && j < kb; ++j) {
        const double p = t[j * n + j] * t[j * n + j];
        ok = p > min_pivot && std::isfinite(p);
      }
    }  // implicit barrier: every thread sees ok
    if (!ok) break;
    const Index r0 = k0 + kb;
    if (r0 >= n) break;
    const Index tiles = (n - r0 + kFactorTile - 1) / kFactorTile;
    // Panel below the diagonal tile: A21 <- A21 L11⁻ᵀ.
#pragma omp for schedule(dynamic, 1)
    for (Index t = 0; t < tiles; ++t) {
      const Index i0 = r0 + t * kFactorTile, ib = std::min(kFactorTile, n - i0);
      trsm_right_lower_trans(ib, kb, a + k0 * n + k0, n, a + i0 * n + k0, n);
    }
    // Trailing update, one row tile per task (largest first):
    // A[i-tile, r0 : end of tile i] -= A21[i-tile] A21[r0 : end of tile i]ᵀ. Reads columns
    // k0..r0, writes columns >= r0, so tasks do not overlap.
#pragma omp for schedule(dynamic, 1)
    for (Index tt = 0; tt < tiles; ++tt) {
      const Index t = tiles - 1 - tt;
      const Index i0 = r0 + t * kFactorTile, ib = std::min(kFactorTile, n - i0);
      const Index w = i0 + ib - r0;
      gemm(Trans::No, Trans::Yes, ib, w, kb, -1.0, a + i0 * n + k0, n, a + r0 * n + k0, n, 1.0,
           a + i0 * n + r0, n);
    }
  }
  return ok;
}


}  // namespace ql
