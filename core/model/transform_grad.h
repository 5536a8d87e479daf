// Learnable transforms as forward/backward pairs (FlatQuant arXiv 2410.09426 §3.1-3.2 and its
// trans_utils.py / flat_utils.py): a Kronecker product applied to the rows of a matrix, a
// per-channel scale, and the SVD-form factor M = U diag(σ) Vᵀ with Cayley-parameterised
// orthogonal U, V, whose inverse-transpose U diag(1/σ) Vᵀ needs no matrix inverse.
//
// Row convention of core/model/transforms.h: a row x (n1·n2 values) reshaped row-major to
// R (n1 x n2) maps to Aᵀ R B, i.e. x ↦ x (A ⊗ B) (FlatQuant's kronecker_matmul). A null factor
// is the identity: (I ⊗ B) is a per-head transform of heads of B's size, (A ⊗ I) mixes heads.
//
// The factor maps (cayley, svd_factor) work on small n x n matrices in double with Eigen's LU
// (n <= a few hundred; no BLAS, no threads, so the bits depend on the inputs only). The row
// transforms are products through core/linalg tiles in fixed shapes, deterministic for any
// thread count. Backward functions ACCUMULATE into parameter gradients and overwrite input
// gradients, like core/model/block_grad.h.
#pragma once
#include "core/tensor.h"

namespace ql {

// ---- Kronecker transform of rows: Y = X (A ⊗ B) ----
/// X is N x (n1·n2) with n1 = A's size (1 when A is null), n2 = B's size (likewise); at least
/// one factor is non-null and n1·n2 == X.cols() (ShapeError otherwise).
template <class S>
void kron_rows_fwd(const MatT<S>& X, const MatT<S>* A, const MatT<S>* B, MatT<S>& Y);
/// dX = dY (A ⊗ B)ᵀ (when non-null, overwritten); dA += Σ_rows R B dYᵣᵀ and dB += Σ_rows Rᵀ A dYᵣ
/// (when non-null and their factor is).
template <class S>
void kron_rows_bwd(const MatT<S>& dY, const MatT<S>& X, const MatT<S>* A, const MatT<S>* B, MatT<S>* dX,
                   MatT<S>* dA, MatT<S>* dB);

// ---- per-channel scale: Y = X diag(c) (or X diag(c)⁻¹ with divide) ----
template <class S>
void scale_cols_fwd(const MatT<S>& X, const VecT<S>& c, bool divide, MatT<S>& Y);
/// dX = dY diag(c)^±1 (overwritten when non-null); dc += Σ_rows dY ⊙ ∂(x c^±1)/∂c.
template <class S>
void scale_cols_bwd(const MatT<S>& dY, const MatT<S>& X, const VecT<S>& c, bool divide, MatT<S>* dX, VecT<S>* dc);

// ---- factors (double) ----
/// torch.nn.utils.parametrizations.orthogonal(..., orthogonal_map="cayley",
/// use_trivialization=False): U = (I - S/2)⁻¹ (I + S/2) with S = tril(X) - tril(X)ᵀ (X's diagonal
/// and upper triangle do not enter). Linv receives (I - S/2)⁻¹ for the backward.
MatrixD cayley(const MatrixD& X, MatrixD* Linv = nullptr);
/// dX += ∂L/∂X given G = ∂L/∂U: ∂L/∂S = ½ L⁻ᵀ G (I + Uᵀ), then ∂S/∂X (strict lower triangle).
void cayley_bwd(const MatrixD& G, const MatrixD& U, const MatrixD& Linv, MatrixD& dX);

/// FlatQuant's SVD factor: M = U diag(σ) Vᵀ and M⁻ᵀ = U diag(1/σ) Vᵀ, U = cayley(Xu),
/// V = cayley(Xv).
struct SvdFactorTape {
  MatrixD U, V, Lu, Lv;
  VectorD sigma;
};
void svd_factor_fwd(const MatrixD& Xu, const MatrixD& Xv, const VectorD& sigma, MatrixD& M, MatrixD& M_inv_t,
                    SvdFactorTape& tape);
/// Given ∂L/∂M and ∂L/∂M⁻ᵀ (either may be empty: no gradient through it): dXu, dXv, dsigma +=.
void svd_factor_bwd(const MatrixD& dM, const MatrixD& dM_inv_t, const SvdFactorTape& tape, MatrixD& dXu,
                    MatrixD& dXv, VectorD& dsigma);

/// FlatQuant's "direct inverse" factor: M is the trained matrix itself and M⁻ᵀ its inverse-
/// transpose by LU in double (the reference inverts in float64). NumericError when M is
/// singular to double precision (full-pivoting LU rank below n).
void inverse_t_fwd(const MatrixD& M, MatrixD& M_inv_t);
/// dM += ∂L/∂M through M⁻ᵀ given G = ∂L/∂M⁻ᵀ: with N = M⁻ᵀ, dN = -N dMᵀ N, so ∂L/∂M = -N Gᵀ N.
void inverse_t_bwd(const MatrixD& G, const MatrixD& M_inv_t, MatrixD& dM);

}  // namespace ql
