// Matrix products whose results do not depend on the thread count.
//
// A multi-threaded OpenBLAS sgemm/ssyrk is not bitwise reproducible across thread counts (the
// work split changes the summation blocking; measured: 1-21% of elements differ between 1 and
// 2 threads). quantlab promises identical metrics for a given seed whatever the thread count,
// so every product on a result path goes through these functions: the output is cut into
// fixed-size row panels (boundaries independent of the thread count), the panels are
// distributed over OpenMP threads, and each panel is one single-threaded BLAS call (OpenBLAS's
// OpenMP build runs single-threaded inside an active parallel region). Throughput stays close
// to threaded BLAS because panels are large.
#pragma once
#include "core/tensor.h"

namespace ql {

/// Rows per panel. Fixed: changing it changes results in the last bits.
constexpr Index kPanelRows = 256;

/// C = A Bᵀ  (A: m x k, B: n x k, C: m x n). The Y = X Wᵀ of a linear layer.
Matrix matmul_nt(const Matrix& A, const Matrix& B);
/// C = A B  (A: m x k, B: k x n).
Matrix matmul_nn(const Matrix& A, const Matrix& B);

/// Upper triangle of C <- beta C + alpha XᵀX  (X: n x d, C: d x d; the strictly lower part of
/// C is left untouched). The Hessian accumulation: fixed kPanelRows-square tiles, a SYRK on each
/// diagonal tile and a GEMM on each tile above it, so the flops are those of one SYRK.
void syrk_upper(const Matrix& X, float alpha, float beta, Matrix& C);

}  // namespace ql
