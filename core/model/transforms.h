// Invertible linear transforms of a linear's input (or of a head's values / keys), as rotation
// and affine-transform methods place them (QuaRot arXiv 2404.00456, FlatQuant arXiv 2410.09426,
// ALGORITHMS.md §5.1). Row-vector convention of the forward pass: x (1 x d) ↦ x P, and a linear
// y = x Wᵀ reading x keeps its output when its weight becomes W P⁻ᵀ:
//   (x P)(W P⁻ᵀ)ᵀ = x P P⁻¹ Wᵀ = x Wᵀ.
// Structures (P is never formed densely to apply it):
//   Dense        P (d x d)
//   Kronecker    P = A ⊗ B (d = n1 n2): x reshaped row-major to X (n1 x n2) ↦ Aᵀ X B, which is
//                x (A ⊗ B) flattened (FlatQuant's kronecker_matmul convention)
//   PerHead      P = I_H ⊗ A (A head_dim x head_dim on every head block)
//   AcrossHeads  P = A ⊗ I_hd (A H x H mixes the heads, the same way at every head dimension)
// Each factor is stored with its inverse-transpose so that general invertible (FlatQuant) and
// orthogonal (rotation, A⁻ᵀ = A) transforms share one code path. Merging into weights is in
// double precision (core/linalg tiles); applying online is float32 through core/linalg tiles,
// so both are deterministic for a given numeric mode.
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace ql {

/// One invertible factor: M and M⁻ᵀ (n x n, double).
struct TransformFactor {
  MatrixD M, M_inv_t;
  Index size() const { return M.rows(); }
  /// An orthogonal factor (M⁻ᵀ = M).
  static TransformFactor orthogonal(MatrixD Q);
};

class InputTransform {
 public:
  enum class Kind { Dense, Kronecker, PerHead, AcrossHeads };

  static InputTransform dense(TransformFactor P);
  static InputTransform kronecker(TransformFactor A, TransformFactor B);
  /// A acts on each of `heads` blocks of A.size() channels.
  static InputTransform per_head(TransformFactor A, int heads);
  /// A (heads x heads) mixes heads of head_dim channels each.
  static InputTransform across_heads(TransformFactor A, int head_dim);

  /// This transform preceded by a per-channel scale: x ↦ (x ⊙ c) P, i.e. P' = diag(c) P and
  /// P'⁻ᵀ = diag(1/c) P⁻ᵀ (FlatQuant's `add_diag`, where no norm absorbs c). c must be positive
  /// and finite, of the transform's width (ShapeError / NumericError).
  InputTransform with_channel_scale(VectorD c) const;
  const VectorD& channel_scale() const { return scale_; }  ///< empty: none
  /// The same transform without its channel scale (what stays online once the scale is folded
  /// into the producer of the input).
  InputTransform without_channel_scale() const;

  Kind kind() const { return kind_; }
  Index width() const { return width_; }
  /// "kronecker 16x16 (x) 16x16", for results.
  std::string describe() const;

  /// X (T x width) <- X P in float32.
  void apply(Matrix& X) const;
  /// The dense d x d matrices P and P⁻ᵀ (double), for merging and tests.
  MatrixD matrix() const;
  MatrixD inverse_transpose() const;
  /// The transform by P⁻ᵀ (factors and their inverse-transposes swapped): what queries get when
  /// keys get P, so that scores q kᵀ are unchanged.
  InputTransform inverse_transposed() const;
  /// max |P P⁻¹ - I| over the factors: how far the stored inverse is from exact.
  double inverse_error() const;

 private:
  Kind kind_ = Kind::Dense;
  TransformFactor a_, b_;
  Matrix af_, bf_;  // float copies of the factors for apply()
  Index width_ = 0;
  int blocks_ = 1;  // PerHead: heads; AcrossHeads: head_dim
  VectorD scale_;   // per-channel scale applied before the factors (empty: none)
  Vector scalef_;
};

/// W (d_out x d_in) <- W P⁻ᵀ, computed in double and rounded once: the weight of a linear whose
/// input is transformed by P.
void merge_input_transform(Matrix& W, const InputTransform& P);
/// W (d_out x d_in) <- Pᵀ W and b <- b P (b may be empty): the linear's output y ↦ y P, with P
/// acting on d_out (e.g. P_v per head on v_proj's output).
void merge_output_transform(Matrix& W, Vector& b, const InputTransform& P);

/// A Haar-random orthogonal n x n matrix: Q of the QR of a standard Gaussian matrix drawn from
/// CounterRng(seed, stream), columns multiplied by sign(diag R) so the draw is unique (the
/// distribution QuaRot's and FlatQuant's get_random_orthg use).
MatrixD random_orthogonal(Index n, uint64_t seed, uint64_t stream);
/// A randomized Hadamard matrix H D / sqrt(n) (Sylvester H, D random ±1 from CounterRng(seed,
/// stream)); n must be a power of two (ShapeError).
MatrixD random_hadamard(Index n, uint64_t seed, uint64_t stream);
/// FlatQuant's factor sizes for width n (ALGORITHMS.md §5.1, get_decompose_dim): the smallest
/// a >= sqrt(n) with a² - n a perfect square b², giving (a - b, a + b): 256 -> (16, 16), 768 ->
/// (24, 32).
std::pair<Index, Index> kronecker_factor_sizes(Index n);

}  // namespace ql
