// Every dense product on a result path, in one place, for both numeric modes
// (core/numerics.h): `fast` calls the system OpenBLAS/LAPACKE, `portable` calls quantlab's own
// kernels (core/portable_blas.h). Nothing else on a result path calls BLAS or LAPACK (Eigen is
// built without EIGEN_USE_BLAS, and no result path uses an Eigen matrix product; benchmarks call
// cblas directly for their reference timings).
//
// Two levels:
//  - Tile calls (gemm, syrk_upper_tile, trsm_*, trmm_*, potrf_lower): row-major, CBLAS-style
//    leading dimensions, run single-threaded on the calling thread in both modes (OpenBLAS is
//    kept to one thread inside them). Callers cut their work into tiles whose bounds depend on
//    the shapes only and may run tiles on different threads: results then do not depend on
//    the thread count. (A multi-threaded OpenBLAS call is not bitwise reproducible across
//    thread counts: the work split changes the summation blocking; measured: 1-21% of elements
//    differ between 1 and 2 threads.)
//  - Whole products (matmul_nt, matmul_nn, syrk_upper): fixed panels of tile calls spread over
//    the OpenMP threads.
#pragma once
#include "core/tensor.h"

namespace ql {

/// Rows per panel. Fixed: changing it changes results in the last bits.
constexpr Index kPanelRows = 256;

enum class Trans { No, Yes };

/// C <- alpha op(A) op(B) + beta C; op(A) m x k (A is k x m when ta == Yes), op(B) k x n.
/// With beta == 0, C is not read.
void gemm(Trans ta, Trans tb, Index m, Index n, Index k, float alpha, const float* A, Index lda,
          const float* B, Index ldb, float beta, float* C, Index ldc);
void gemm(Trans ta, Trans tb, Index m, Index n, Index k, double alpha, const double* A,
          Index lda, const double* B, Index ldb, double beta, double* C, Index ldc);
/// Upper triangle of the n x n C <- alpha AᵀA + beta C, A k x n; C's strictly lower part is
/// neither read nor written.
void syrk_upper_tile(Index n, Index k, float alpha, const float* A, Index lda, float beta, float* C,
                     Index ldc);
/// B <- B L⁻ᵀ (B m x n, L n x n lower triangular).
void trsm_right_lower_trans(Index m, Index n, const double* L, Index ldl, double* B, Index ldb);
/// B <- L⁻¹ B (B m x n, L m x m lower triangular).
void trsm_left_lower(Index m, Index n, const double* L, Index ldl, double* B, Index ldb);
/// B <- B U (B m x n, U n x n upper triangular).
void trmm_right_upper(Index m, Index n, const float* U, Index ldu, float* B, Index ldb);
/// Cholesky A = L Lᵀ in place on the lower triangle of the n x n symmetric A (strict upper
/// triangle untouched). Returns 0, or a positive value when A is not positive definite.
int potrf_lower(Index n, double* A, Index lda);

/// Tile of the blocked factorisation (rows and columns). Fixed: it sets the summation order.
constexpr Index kFactorTile = 256;

/// A = L Lᵀ in place on the n x n symmetric A (only its lower triangle is read), blocked in
/// fixed kFactorTile tiles spread over the OpenMP threads, so L does not depend on the thread
/// count. The lower triangle becomes L; the strict upper triangle is scratch afterwards. False
/// when a pivot L_jj² is not above min_pivot or not finite (A not positive definite enough for
/// the caller's use; e.g. GPTQ's fp32 column loop needs pivots above 2^-23 mean diag).
bool cholesky_lower_blocked(MatrixD& A, double min_pivot);

/// C = A Bᵀ  (A: m x k, B: n x k, C: m x n). The Y = X Wᵀ of a linear layer.
Matrix matmul_nt(const Matrix& A, const Matrix& B);
/// C = A B  (A: m x k, B: k x n).
Matrix matmul_nn(const Matrix& A, const Matrix& B);
/// The same in double (transform merges).
MatrixD matmul_nn(const MatrixD& A, const MatrixD& B);

/// Upper triangle of C <- beta C + alpha XᵀX  (X: n x d, C: d x d; the strictly lower part of
/// C is left untouched). The Hessian accumulation: fixed kPanelRows-square tiles, a SYRK on each
/// diagonal tile and a GEMM on each tile above it, so the flops are those of one SYRK.
void syrk_upper(const Matrix& X, float alpha, float beta, Matrix& C);

}  // namespace ql
