#include "core/model/transforms.h"

#include <Eigen/QR>

#include <cmath>

#include "core/error.h"
#include "core/linalg.h"
#include "core/rng.h"

namespace ql {

TransformFactor TransformFactor::orthogonal(MatrixD Q) {
  TransformFactor f;
  f.M_inv_t = Q;
  f.M = std::move(Q);
  return f;
}

namespace {

void check_factor(const TransformFactor& f, const char* what) {
  if (f.M.rows() == 0 || f.M.rows() != f.M.cols() || f.M_inv_t.rows() != f.M.rows() ||
      f.M_inv_t.cols() != f.M.cols())
    throw ShapeError(std::string("transform: ") + what + " factor is not square with a matching inverse");
  if (!f.M.allFinite() || !f.M_inv_t.allFinite()) throw NumericError(std::string("transform: ") + what + " factor is not finite");
}

MatrixD kron(const MatrixD& A, const MatrixD& B) {
  MatrixD K(A.rows() * B.rows(), A.cols() * B.cols());
  for (Index i = 0; i < A.rows(); ++i)
    for (Index j = 0; j < A.cols(); ++j) K.block(i * B.rows(), j * B.cols(), B.rows(), B.cols()) = A(i, j) * B;
  return K;
}

}  // namespace

InputTransform InputTransform::dense(TransformFactor P) {
  check_factor(P, "dense");
  InputTransform t;
  t.kind_ = Kind::Dense;
  t.width_ = P.size();
  t.af_ = P.M.cast<float>();
  t.a_ = std::move(P);
  return t;
}

InputTransform InputTransform::kronecker(TransformFactor A, TransformFactor B) {
  check_factor(A, "left Kronecker");
  check_factor(B, "right Kronecker");
  InputTransform t;
  t.kind_ = Kind::Kronecker;
  t.width_ = A.size() * B.size();
  t.af_ = A.M.cast<float>();
  t.bf_ = B.M.cast<float>();
  t.a_ = std::move(A);
  t.b_ = std::move(B);
  return t;
}

InputTransform InputTransform::per_head(TransformFactor A, int heads) {
  check_factor(A, "per-head");
  if (heads < 1) throw ShapeError("transform: per-head transform over " + std::to_string(heads) + " heads");
  InputTransform t;
  t.kind_ = Kind::PerHead;
  t.blocks_ = heads;
  t.width_ = A.size() * heads;
  t.af_ = A.M.cast<float>();
  t.a_ = std::move(A);
  return t;
}

InputTransform InputTransform::across_heads(TransformFactor A, int head_dim) {
  check_factor(A, "across-heads");
  if (head_dim < 1) throw ShapeError("transform: across-heads transform with head_dim " + std::to_string(head_dim));
  InputTransform t;
  t.kind_ = Kind::AcrossHeads;
  t.blocks_ = head_dim;
  t.width_ = A.size() * head_dim;
  t.af_ = A.M.cast<float>();
  t.a_ = std::move(A);
  return t;
}

InputTransform InputTransform::with_channel_scale(VectorD c) const {
  if (c.size() != width_)
    throw ShapeError("transform: channel scale of " + std::to_string(c.size()) + " for a " + describe());
  if (!c.allFinite() || !(c.minCoeff() > 0)) throw NumericError("transform: channel scale not positive and finite");
  InputTransform t = *this;
  if (t.scale_.size() > 0) c = c.cwiseProduct(t.scale_);
  t.scalef_ = c.cast<float>();
  t.scale_ = std::move(c);
  return t;
}

InputTransform InputTransform::without_channel_scale() const {
  InputTransform t = *this;
  t.scale_.resize(0);
  t.scalef_.resize(0);
  return t;
}

std::string InputTransform::describe() const {
  const std::string a = std::to_string(a_.size()) + "x" + std::to_string(a_.size());
  const std::string diag = scale_.size() > 0 ? "diag · " : "";
  switch (kind_) {
    case Kind::Dense: return diag + "dense " + a;
    case Kind::Kronecker:
      return diag + "kronecker " + a + " (x) " + std::to_string(b_.size()) + "x" + std::to_string(b_.size());
    case Kind::PerHead: return diag + "per-head " + a + " x " + std::to_string(blocks_) + " heads";
    case Kind::AcrossHeads: return diag + "across-heads " + a + " (x) I_" + std::to_string(blocks_);
  }
  return "?";
}

void InputTransform::apply(Matrix& X) const {
  if (X.cols() != width_)
    throw ShapeError("transform: input of width " + std::to_string(X.cols()) + " for a " + describe());
  const Index T = X.rows();
  if (T == 0) return;
  if (scalef_.size() > 0) X = X * scalef_.asDiagonal();
  Matrix Y(T, width_);
  const Index na = af_.rows();
  switch (kind_) {
    case Kind::Dense:  // Y = X P
      gemm(Trans::No, Trans::No, T, width_, width_, 1.0f, X.data(), width_, af_.data(), na, 0.0f, Y.data(), width_);
      break;
    case Kind::PerHead:  // (T·H x hd) rows times A
      gemm(Trans::No, Trans::No, T * blocks_, na, na, 1.0f, X.data(), na, af_.data(), na, 0.0f, Y.data(), na);
      break;
    case Kind::AcrossHeads:  // per token: (H x hd) <- Aᵀ (H x hd)
      for (Index t = 0; t < T; ++t)
        gemm(Trans::Yes, Trans::No, na, blocks_, na, 1.0f, af_.data(), na, X.data() + t * width_, blocks_, 0.0f,
             Y.data() + t * width_, blocks_);
      break;
    case Kind::Kronecker: {  // per token: (n1 x n2) <- Aᵀ X B, the right factor for all tokens at once
      const Index nb = bf_.rows();
      Matrix Z(T, width_);
      gemm(Trans::No, Trans::No, T * na, nb, nb, 1.0f, X.data(), nb, bf_.data(), nb, 0.0f, Z.data(), nb);
      for (Index t = 0; t < T; ++t)
        gemm(Trans::Yes, Trans::No, na, nb, na, 1.0f, af_.data(), na, Z.data() + t * width_, nb, 0.0f,
             Y.data() + t * width_, nb);
      break;
    }
  }
  X.swap(Y);
}

namespace {

MatrixD structured(InputTransform::Kind kind, const MatrixD& A, const MatrixD& B, Index blocks) {
  switch (kind) {
    case InputTransform::Kind::Dense: return A;
    case InputTransform::Kind::Kronecker: return kron(A, B);
    case InputTransform::Kind::PerHead: return kron(MatrixD::Identity(blocks, blocks), A);
    case InputTransform::Kind::AcrossHeads: return kron(A, MatrixD::Identity(blocks, blocks));
  }
  return {};
}

}  // namespace

MatrixD InputTransform::matrix() const {
  MatrixD P = structured(kind_, a_.M, b_.M, blocks_);
  if (scale_.size() > 0) P = scale_.asDiagonal() * P;  // diag(c) P
  return P;
}

MatrixD InputTransform::inverse_transpose() const {
  MatrixD P = structured(kind_, a_.M_inv_t, b_.M_inv_t, blocks_);
  if (scale_.size() > 0) P = scale_.cwiseInverse().asDiagonal() * P;  // (diag(c) P)⁻ᵀ = diag(1/c) P⁻ᵀ
  return P;
}

InputTransform InputTransform::inverse_transposed() const {
  InputTransform t = *this;
  if (t.scale_.size() > 0) {
    t.scale_ = t.scale_.cwiseInverse().eval();
    t.scalef_ = t.scale_.cast<float>();
  }
  std::swap(t.a_.M, t.a_.M_inv_t);
  std::swap(t.b_.M, t.b_.M_inv_t);
  t.af_ = t.a_.M.cast<float>();
  if (t.b_.size() > 0) t.bf_ = t.b_.M.cast<float>();
  return t;
}

double InputTransform::inverse_error() const {
  double e = 0;
  for (const TransformFactor* f : {&a_, &b_}) {
    if (f->size() == 0) continue;
    const MatrixD I = matmul_nn(f->M, MatrixD(f->M_inv_t.transpose()));
    e = std::max(e, (I - MatrixD::Identity(f->size(), f->size())).cwiseAbs().maxCoeff());
  }
  return e;
}

void merge_input_transform(Matrix& W, const InputTransform& P) {
  if (W.cols() != P.width())
    throw ShapeError("merge_input_transform: weight with " + std::to_string(W.cols()) + " inputs for a " +
                     P.describe());
  W = matmul_nn(W.cast<double>(), P.inverse_transpose()).cast<float>();
}

void merge_output_transform(Matrix& W, Vector& b, const InputTransform& P) {
  if (W.rows() != P.width())
    throw ShapeError("merge_output_transform: weight with " + std::to_string(W.rows()) + " outputs for a " +
                     P.describe());
  const MatrixD M = P.matrix();
  W = matmul_nn(MatrixD(M.transpose()), W.cast<double>()).cast<float>();
  if (b.size() > 0) b = (matmul_nn(MatrixD(b.cast<double>().transpose()), M)).transpose().cast<float>();
}

MatrixD random_orthogonal(Index n, uint64_t seed, uint64_t stream) {
  CounterRng rng(seed, stream);
  MatrixD G(n, n);
  for (Index i = 0; i < G.size(); ++i) G.data()[i] = rng.normal(static_cast<uint64_t>(i));
  Eigen::HouseholderQR<MatrixD> qr(G);
  MatrixD Q = qr.householderQ() * MatrixD::Identity(n, n);
  const MatrixD R = qr.matrixQR().triangularView<Eigen::Upper>();
  for (Index j = 0; j < n; ++j)
    if (R(j, j) < 0) Q.col(j) = -Q.col(j);
  return Q;
}

MatrixD random_hadamard(Index n, uint64_t seed, uint64_t stream) {
  if (n < 1 || (n & (n - 1)) != 0) throw ShapeError("random_hadamard: " + std::to_string(n) + " is not a power of two");
  MatrixD H = MatrixD::Ones(1, 1);
  while (H.rows() < n) {
    MatrixD H2(2 * H.rows(), 2 * H.rows());
    H2 << H, H, H, -H;
    H.swap(H2);
  }
  CounterRng rng(seed, stream);
  for (Index j = 0; j < n; ++j)
    if (rng.uniform(static_cast<uint64_t>(j)) < 0.5) H.row(j) = -H.row(j);  // D H: signs on the input side
  return H / std::sqrt(static_cast<double>(n));
}

std::pair<Index, Index> kronecker_factor_sizes(Index n) {
  for (Index a = static_cast<Index>(std::ceil(std::sqrt(static_cast<double>(n)))); a <= n; ++a) {
    const Index r = a * a - n;
    const Index b = static_cast<Index>(std::llround(std::sqrt(static_cast<double>(r))));
    if (b * b == r) return {a - b, a + b};
  }
  return {1, n};
}

}  // namespace ql
