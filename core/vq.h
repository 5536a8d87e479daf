// Residual additive vector quantization with two sub-tables per stage, fitted by annealed
// soft EM: the codebook math of CommVQ ("CommVQ: Commutative Vector Quantization for KV Cache
// Compression", arXiv 2506.18879; ALGORITHMS.md §7.1).
//
// A vector x (dim entries, dim even) is approximated by x̂ = Σ_s (U_s[A_s] + V_s[B_s]): at each
// of S residual stages one entry A of sub-table U_s and one entry B of V_s (E = 2^sub_bits
// entries each; 6 + 6 bits = 4096 codewords per stage, as the reference's 12-bit stages).
//
// Structures:
//  - Commutative: the vector is read as dim/2 complex numbers (entries 2j, 2j+1 = pair j) and
//    V_s[B] = i·U_s[B] per pair, so codeword (A, B) of pair j is u_j[A] + i·u_j[B]: the
//    reference's T-matrix parametrisation (XAB = XA − YB, YAB = XB + YA). As a 2x2 block acting
//    on the pair this is [[a, b], [−b, a]], which commutes with every rotation, so RoPE can be
//    applied after decoding or folded into the query (the fast scoring path).
//  - Free: U_s and V_s unconstrained (the ablation without commutativity, and the value
//    codebooks; the paper trains a value encoder instead, see algorithms/commvq).
//
// EM per stage (reference training/quantize_key_cache.py): E-step soft assignments
// softmax(−‖x − c‖ / T) over the E² codewords; M-step the weighted least-squares fit of the
// structured parameters to the soft assignments (the reference's θ = (TᵀNT)⁻¹TᵀN m, solved
// here from the assignment marginals, which is the same normal equation); T annealed
// exponentially from t_start to t_end over max_steps, times a scale that drops 10x after
// stage 0 and then every anneal_every stages; the parameters of the lowest hard-assignment MSE
// are kept; stop when the MSE stops improving (by less than 1e-5 relative).
// Deviations, stated: (1) entry 0 of both sub-tables is pinned to zero, so codeword (0, 0) is
// the zero vector and a stage never increases a vector's error beyond the rounding of the
// distance formula (it also removes the Free
// form's gauge U + c, V − c); (2) initialisation from random data points (codeword (k, k) =
// a data point) without the reference's extra E-step at T = 1; (3) soft assignments below
// e^-30 of the best are dropped (their weight is < 1e-13).
//
// Deterministic for a given seed and kernel set at any thread count: points are processed in
// fixed chunks and their statistics summed in chunk order.
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace ql {

enum class VqStructure { Commutative, Free };

struct VqFitOptions {
  VqStructure structure = VqStructure::Commutative;
  int stages = 1;
  int sub_bits = 6;        ///< entries per sub-table = 2^sub_bits (1..8)
  int max_steps = 100;     ///< EM steps per stage
  double t_start = 1e-3, t_end = 1e-5;
  int anneal_every = 4;
  uint64_t seed = 0;
};

/// One stage's fit: EM steps run, and the weighted hard-assignment MSE per element of the
/// residual before and after the stage (after <= before: the zero codeword is always a
/// candidate; a near-tie decided by the float distance formula can cost at most its rounding).
struct VqStageReport {
  int steps = 0;
  double mse_before = 0, mse_after = 0;
};

class ResidualVq {
 public:
  ResidualVq() = default;
  /// Fits S stages on the rows of X (N x dim; the caller normalises them). weight (N, or empty
  /// for all 1) weighs each row's error in the reported MSE and the kept-best selection (the
  /// reference weighs by the squared token norm); the M-step is unweighted, as the reference's.
  /// Throws ShapeError for dim odd, N < 2^sub_bits, or bad options.
  static ResidualVq fit(const Matrix& X, const Vector& weight, const VqFitOptions& opt,
                        std::vector<VqStageReport>* reports = nullptr);

  VqStructure structure() const { return structure_; }
  int stages() const { return static_cast<int>(U_.size()); }
  int entries() const { return entries_; }
  int sub_bits() const { return sub_bits_; }
  Index dim() const { return dim_; }
  /// Sub-tables of stage s: entries() x dim each (row 0 = 0).
  const Matrix& U(int s) const { return U_.at(s); }
  const Matrix& V(int s) const { return V_.at(s); }

  /// Greedy residual encoding of the rows of X: codes (rows x 2·stages bytes, row-major:
  /// A_0, B_0, A_1, B_1, ...), each stage the exact nearest of its E² codewords to the residual.
  void encode(const Matrix& X, uint8_t* codes) const;
  /// X = rows x dim, row r = Σ_s U_s[A_s] + V_s[B_s] of codes row r.
  void decode(const uint8_t* codes, Index rows, Matrix& X) const;
  /// Code bits per vector: 2 · sub_bits · stages.
  int code_bits() const { return 2 * sub_bits_ * stages(); }

 private:
  void add_stage(Matrix U, Matrix V);
  void nearest(int s, const Matrix& R, uint8_t* codes, Index code_stride) const;

  VqStructure structure_ = VqStructure::Free;
  int entries_ = 0, sub_bits_ = 0;
  Index dim_ = 0;
  std::vector<Matrix> U_, V_;
  /// Per stage: 2 U Vᵀ (E x E), ‖U_A‖², ‖V_B‖² for the separable distance.
  std::vector<Matrix> G2_;
  std::vector<Vector> uu_, vv_;
};

}  // namespace ql
