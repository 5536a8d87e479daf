#include "core/model/transform_grad.h"

#include <omp.h>

#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/linalg.h"

namespace ql {

namespace {

/// Rows per task of the row transforms. Fixed: parameter gradients are summed per chunk, then
/// over chunks in order, so it sets the summation order (not the thread count).
constexpr Index kKronRows = 256;

template <class F>
void for_chunks(Index n, const F& f) {
  if (n <= 1 || omp_in_parallel()) {
    for (Index c = 0; c < n; ++c) f(c);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (Index c = 0; c < n; ++c) f(c);
}

/// (n1, n2) for rows of d: a null factor is the identity of the size the other leaves.
template <class S>
std::pair<Index, Index> factor_sizes(const MatT<S>* A, const MatT<S>* B, Index d) {
  for (const MatT<S>* F : {A, B})
    if (F && F->rows() != F->cols()) throw ShapeError("kron_rows: a factor is not square");
  const Index n1 = A ? A->rows() : (B && B->rows() > 0 ? d / B->rows() : 0);
  const Index n2 = B ? B->rows() : (n1 > 0 ? d / n1 : 0);
  if ((!A && !B) || n1 * n2 != d)
    throw ShapeError("kron_rows: factors " + std::to_string(A ? A->rows() : 0) + " x " +
                     std::to_string(B ? B->rows() : 0) + " do not tile rows of " + std::to_string(d));
  return {n1, n2};
}

/// Rows [r0, r0+m) of X (N x n1·n2) as tokens of n1 x n2: Z = R B per token (one product over
/// the chunk's m·n1 rows of n2), then, with A, P (n1 x m·n2) with P[k][t·n2 + j] = Z_t[k][j].
template <class S>
void chunk_right(const S* X, Index m, Index n1, Index n2, const MatT<S>* B, std::vector<S>& Z) {
  Z.resize(static_cast<size_t>(m * n1 * n2));
  if (B)
    gemm(Trans::No, Trans::No, m * n1, n2, n2, S(1), X, n2, B->data(), n2, S(0), Z.data(), n2);
  else
    std::copy(X, X + m * n1 * n2, Z.data());
}

template <class S>
void to_head_major(const S* Z, Index m, Index n1, Index n2, std::vector<S>& P) {
  P.resize(static_cast<size_t>(m * n1 * n2));
  for (Index t = 0; t < m; ++t)
    for (Index k = 0; k < n1; ++k)
      std::copy(Z + (t * n1 + k) * n2, Z + (t * n1 + k + 1) * n2, P.data() + k * m * n2 + t * n2);
}

template <class S>
void from_head_major(const S* P, Index m, Index n1, Index n2, S* Z) {
  for (Index t = 0; t < m; ++t)
    for (Index k = 0; k < n1; ++k)
      std::copy(P + k * m * n2 + t * n2, P + k * m * n2 + (t + 1) * n2, Z + (t * n1 + k) * n2);
}

}  // namespace

template <class S>
void kron_rows_fwd(const MatT<S>& X, const MatT<S>* A, const MatT<S>* B, MatT<S>& Y) {
  const auto [n1, n2] = factor_sizes(A, B, X.cols());
  const Index N = X.rows();
  Y.resize(N, X.cols());
  const Index d = X.cols();
  for_chunks((N + kKronRows - 1) / kKronRows, [&](Index c) {
    const Index r0 = c * kKronRows, m = std::min(kKronRows, N - r0);
    std::vector<S> Z, P, Yp;
    chunk_right(X.data() + r0 * d, m, n1, n2, B, Z);
    if (!A) {
      std::copy(Z.begin(), Z.end(), Y.data() + r0 * d);
      return;
    }
    to_head_major(Z.data(), m, n1, n2, P);
    Yp.resize(P.size());
    gemm(Trans::Yes, Trans::No, n1, m * n2, n1, S(1), A->data(), n1, P.data(), m * n2, S(0), Yp.data(), m * n2);
    from_head_major(Yp.data(), m, n1, n2, Y.data() + r0 * d);
  });
}

template <class S>
void kron_rows_bwd(const MatT<S>& dY, const MatT<S>& X, const MatT<S>* A, const MatT<S>* B, MatT<S>* dX, MatT<S>* dA,
                   MatT<S>* dB) {
  const auto [n1, n2] = factor_sizes(A, B, X.cols());
  const Index N = X.rows(), d = X.cols();
  if (dY.rows() != N || dY.cols() != d) throw ShapeError("kron_rows: dY shape differs from X's");
  if (dX) dX->resize(N, d);
  const Index n_chunks = (N + kKronRows - 1) / kKronRows;
  const bool want_a = A && dA, want_b = B && dB;
  std::vector<MatT<S>> pa(static_cast<size_t>(want_a ? n_chunks : 0)), pb(static_cast<size_t>(want_b ? n_chunks : 0));
  for_chunks(n_chunks, [&](Index c) {
    const Index r0 = c * kKronRows, m = std::min(kKronRows, N - r0);
    const S* Xc = X.data() + r0 * d;
    std::vector<S> Z, dZ(static_cast<size_t>(m * d));
    if (A) {
      std::vector<S> P, dYp, dZp(static_cast<size_t>(m * d));
      to_head_major(dY.data() + r0 * d, m, n1, n2, dYp);
      if (want_a) {  // Y_t = Aᵀ Z_t: dA = Σ_t Z_t dY_tᵀ = P dYpᵀ
        chunk_right(Xc, m, n1, n2, B, Z);
        to_head_major(Z.data(), m, n1, n2, P);
        pa[static_cast<size_t>(c)].resize(n1, n1);
        gemm(Trans::No, Trans::Yes, n1, n1, m * n2, S(1), P.data(), m * n2, dYp.data(), m * n2, S(0),
             pa[static_cast<size_t>(c)].data(), n1);
      }
      gemm(Trans::No, Trans::No, n1, m * n2, n1, S(1), A->data(), n1, dYp.data(), m * n2, S(0), dZp.data(), m * n2);
      from_head_major(dZp.data(), m, n1, n2, dZ.data());
    } else {
      std::copy(dY.data() + r0 * d, dY.data() + (r0 + m) * d, dZ.data());
    }
    if (want_b) {  // Z_t = R_t B: dB = Σ_t R_tᵀ dZ_t
      pb[static_cast<size_t>(c)].resize(n2, n2);
      gemm(Trans::Yes, Trans::No, n2, n2, m * n1, S(1), Xc, n2, dZ.data(), n2, S(0), pb[static_cast<size_t>(c)].data(),
           n2);
    }
    if (!dX) return;
    if (B)
      gemm(Trans::No, Trans::Yes, m * n1, n2, n2, S(1), dZ.data(), n2, B->data(), n2, S(0), dX->data() + r0 * d, n2);
    else
      std::copy(dZ.begin(), dZ.end(), dX->data() + r0 * d);
  });
  for (const MatT<S>& p : pa) *dA += p;  // chunk order: thread-count independent
  for (const MatT<S>& p : pb) *dB += p;
}

template <class S>
void scale_cols_fwd(const MatT<S>& X, const VecT<S>& c, bool divide, MatT<S>& Y) {
  if (c.size() != X.cols()) throw ShapeError("scale_cols: scale size differs from the width");
  Y.resize(X.rows(), X.cols());
  for (Index t = 0; t < X.rows(); ++t)
    for (Index j = 0; j < X.cols(); ++j) Y(t, j) = divide ? X(t, j) / c[j] : X(t, j) * c[j];
}

template <class S>
void scale_cols_bwd(const MatT<S>& dY, const MatT<S>& X, const VecT<S>& c, bool divide, MatT<S>* dX, VecT<S>* dc) {
  if (dX) dX->resize(X.rows(), X.cols());
  for (Index t = 0; t < X.rows(); ++t)
    for (Index j = 0; j < X.cols(); ++j) {
      const S g = dY(t, j);
      if (dX) (*dX)(t, j) = divide ? g / c[j] : g * c[j];
      if (dc) (*dc)[j] += divide ? -g * X(t, j) / (c[j] * c[j]) : g * X(t, j);
    }
}

MatrixD cayley(const MatrixD& X, MatrixD* Linv) {
  if (X.rows() != X.cols()) throw ShapeError("cayley: the parameter is not square");
  const Index n = X.rows();
  MatrixD S = MatrixD::Zero(n, n);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < i; ++j) {
      S(i, j) = X(i, j);
      S(j, i) = -X(i, j);
    }
  const MatrixD I = MatrixD::Identity(n, n);
  // I - S/2 is invertible for every skew S (its eigenvalues are 1 - iλ/2).
  const MatrixD Li = (I - 0.5 * S).partialPivLu().inverse();
  if (Linv) *Linv = Li;
  return Li * (I + 0.5 * S);
}

void cayley_bwd(const MatrixD& G, const MatrixD& U, const MatrixD& Linv, MatrixD& dX) {
  const Index n = U.rows();
  const MatrixD dS = 0.5 * Linv.transpose() * G * (MatrixD::Identity(n, n) + U.transpose());
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < i; ++j) dX(i, j) += dS(i, j) - dS(j, i);
}

void svd_factor_fwd(const MatrixD& Xu, const MatrixD& Xv, const VectorD& sigma, MatrixD& M, MatrixD& M_inv_t,
                    SvdFactorTape& tape) {
  if (Xu.rows() != sigma.size() || Xv.rows() != sigma.size())
    throw ShapeError("svd_factor: U, V and sigma differ in size");
  tape.U = cayley(Xu, &tape.Lu);
  tape.V = cayley(Xv, &tape.Lv);
  tape.sigma = sigma;
  M = tape.U * sigma.asDiagonal() * tape.V.transpose();
  M_inv_t = tape.U * sigma.cwiseInverse().asDiagonal() * tape.V.transpose();
}

void svd_factor_bwd(const MatrixD& dM, const MatrixD& dM_inv_t, const SvdFactorTape& tape, MatrixD& dXu,
                    MatrixD& dXv, VectorD& dsigma) {
  const Index n = tape.sigma.size();
  const VectorD inv = tape.sigma.cwiseInverse();
  MatrixD dU = MatrixD::Zero(n, n), dV = MatrixD::Zero(n, n);
  // M = U Σ Vᵀ: dU = dM V Σ, dV = dMᵀ U Σ, dσ_k = (Uᵀ dM V)_kk; M⁻ᵀ = U Σ⁻¹ Vᵀ likewise with
  // dσ_k = -(Uᵀ dM⁻ᵀ V)_kk / σ_k².
  if (dM.size() > 0) {
    dU += dM * tape.V * tape.sigma.asDiagonal();
    dV += dM.transpose() * tape.U * tape.sigma.asDiagonal();
    dsigma += (tape.U.transpose() * dM * tape.V).diagonal();
  }
  if (dM_inv_t.size() > 0) {
    dU += dM_inv_t * tape.V * inv.asDiagonal();
    dV += dM_inv_t.transpose() * tape.U * inv.asDiagonal();
    dsigma -= (tape.U.transpose() * dM_inv_t * tape.V).diagonal().cwiseProduct(inv.cwiseProduct(inv));
  }
  cayley_bwd(dU, tape.U, tape.Lu, dXu);
  cayley_bwd(dV, tape.V, tape.Lv, dXv);
}

void inverse_t_fwd(const MatrixD& M, MatrixD& M_inv_t) {
  if (M.rows() != M.cols() || M.rows() == 0) throw ShapeError("inverse_t: factor is not square");
  // Full pivoting: its rank test (pivots below n·eps of the largest) catches a factor that
  // training has made singular, which partial pivoting would invert into huge entries.
  const Eigen::FullPivLU<MatrixD> lu(M);
  if (!lu.isInvertible() || !M.allFinite())
    throw NumericError("direct-inverse factor is singular (rank " + std::to_string(lu.rank()) + " of " +
                       std::to_string(M.rows()) + ")");
  M_inv_t = lu.inverse().transpose();
}

void inverse_t_bwd(const MatrixD& G, const MatrixD& M_inv_t, MatrixD& dM) {
  dM.noalias() -= M_inv_t * G.transpose() * M_inv_t;
}

#define QL_TRANSFORM_GRAD_INSTANTIATE(S)                                                                        \
  template void kron_rows_fwd<S>(const MatT<S>&, const MatT<S>*, const MatT<S>*, MatT<S>&);                   \
  template void kron_rows_bwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>*, const MatT<S>*, MatT<S>*,    \
                                 MatT<S>*, MatT<S>*);                                                         \
  template void scale_cols_fwd<S>(const MatT<S>&, const VecT<S>&, bool, MatT<S>&);                            \
  template void scale_cols_bwd<S>(const MatT<S>&, const MatT<S>&, const VecT<S>&, bool, MatT<S>*, VecT<S>*);

QL_TRANSFORM_GRAD_INSTANTIATE(float)
QL_TRANSFORM_GRAD_INSTANTIATE(double)

}  // namespace ql
