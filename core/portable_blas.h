// quantlab's own dense kernels: the products of `numerics: portable` (core/numerics.h).
//
// Contract of gemm, the one kernel every other routine here reduces to: for each element
//   s_ij = (((0 + a_i0 b_0j) + a_i1 b_1j) + ... ) + a_i,k-1 b_k-1,j      (in T, k in order)
//   C_ij = alpha·s_ij                      when beta == 0 (C is not read)
//   C_ij = alpha·s_ij + beta·C_ij          otherwise
// with every product and every sum rounded separately (never fused). The kernels vectorise
// across output columns only, so each lane computes exactly this sequence whatever the vector
// width: the variants for the baseline x86-64 instruction set (SSE2), AVX2 and AVX-512 give
// the same bits (tests/core/test_portable_blas.cc checks each against a scalar loop). The
// variant is chosen once per process: the widest the CPU supports, or QL_PORTABLE_KERNELS=
// baseline|avx2|avx512 (for tests; a variant the CPU lacks is an error). The triangular
// routines and the Cholesky factorisation are fixed blocked algorithms over gemm and plain
// loops compiled for the baseline instruction set, so they inherit the same property.
//
// All matrices are row-major with leading dimensions (row strides) as in CBLAS. Every routine
// runs on the calling thread; callers parallelise over independent tiles.
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"

namespace ql::portable {

enum class Isa { Baseline, Avx2, Avx512 };
const char* isa_name(Isa isa);  ///< "baseline" / "avx2" / "avx512"
/// The variants this CPU can run, baseline first.
std::vector<Isa> supported_isas();
/// The variant used by default (see above); throws ql::Error for a bad QL_PORTABLE_KERNELS.
Isa active_isa();

/// Which elements of C a gemm writes: all, or only those on/above (Upper) or on/below (Lower)
/// the diagonal (i, j in C's own indices); the others are neither read nor written.
enum class Part { All, Upper, Lower };

/// C <- alpha op(A) op(B) + beta C with the contract above. op(A) is m x k (A is k x m when
/// trans_a), op(B) is k x n (B is n x k when trans_b).
void gemm(Isa isa, bool trans_a, bool trans_b, Index m, Index n, Index k, float alpha,
          const float* A, Index lda, const float* B, Index ldb, float beta, float* C, Index ldc,
          Part part = Part::All);
void gemm(Isa isa, bool trans_a, bool trans_b, Index m, Index n, Index k, double alpha,
          const double* A, Index lda, const double* B, Index ldb, double beta, double* C,
          Index ldc, Part part = Part::All);

/// B <- B L⁻ᵀ (B m x n, L n x n lower triangular, non-unit diagonal).
void trsm_right_lower_trans(Isa isa, Index m, Index n, const double* L, Index ldl, double* B,
                            Index ldb);
/// B <- L⁻¹ B (B m x n, L m x m lower triangular, non-unit diagonal).
void trsm_left_lower(Isa isa, Index m, Index n, const double* L, Index ldl, double* B, Index ldb);
/// B <- B U (B m x n, U n x n upper triangular, non-unit diagonal).
void trmm_right_upper(Isa isa, Index m, Index n, const float* U, Index ldu, float* B, Index ldb);
/// A = L Lᵀ in place on the lower triangle of the symmetric n x n A (the strict upper triangle
/// is neither read nor written). Returns 0, or j+1 when the pivot of column j is not positive
/// and finite (A is then partly overwritten).
int potrf_lower(Isa isa, Index n, double* A, Index lda);

}  // namespace ql::portable
