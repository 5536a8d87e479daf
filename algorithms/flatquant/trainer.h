// FlatQuant's trainable pieces and its layer-level training (ALGORITHMS.md §5.1-5.2, §5.6;
// arXiv 2410.09426 §3): a Kronecker transform P = P1 ⊗ P2 whose factors take the SVD form
// U diag(σ) Vᵀ with Cayley-parameterised U, V (core/model/transform_grad.h), a per-channel
// scale c before it (x ↦ (x ⊙ c) P, weights W ↦ (W / c) P⁻ᵀ), learnable weight clipping per
// output row and learnable activation clipping per tensor (core/quant_grad.h), trained with
// AdamW and a cosine schedule (core/optim.h) to minimise the MSE between the FP output X Wᵀ and
// the fake-quantized transformed output, the loss divided by its own detached value.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include <functional>

#include "core/model/kv_cache_quant.h"
#include "core/model/quantized_model.h"
#include "core/model/transform_grad.h"
#include "core/model/transforms.h"
#include "core/quant_spec.h"
#include "core/quantize.h"
#include "core/tensor.h"

namespace ql {

/// How a factor is trained (ALGORITHMS.md §5.1): the SVD form U diag(σ) Vᵀ with Cayley-
/// parameterised U, V (its inverse-transpose exact by construction), or the matrix itself with
/// its inverse-transpose computed in double (the reference's "direct inverse").
enum class FactorForm { Svd, DirectInverse };

struct FlatTrainOptions {
  FactorForm form = FactorForm::Svd;
  int epochs = 15;
  double lr = 5e-3;           ///< transforms and channel scales (the reference's flat_lr)
  double clip_lr_factor = 10; ///< clipping logits train at lr × this
  double weight_decay = 0.01; ///< AdamW's default, on every trained tensor (as the reference)
  double diag_alpha = 0.3;    ///< c_j = max|W_:j|^(1-α) / max|x_j|^α
  bool add_diag = true;
  bool lwc = true;
  bool lac = true;
  bool train_transform = true;  ///< false: only c and clipping train (P stays the start)
  uint64_t seed = 0;
  uint64_t stream = 0;
};

/// One trained factor, its parameters in float (the AdamW master copy), materialised in double.
/// SVD form: xu, xv the raw Cayley parameters (their strict lower triangles enter), σ; direct
/// inverse: xu is M itself (xv, σ empty).
struct FactorParam {
  FactorForm form = FactorForm::Svd;
  Matrix xu, xv;
  Vector sigma;
  Matrix gxu, gxv;
  Vector gsigma;
  MatrixD M, M_inv_t;
  SvdFactorTape tape;
  /// The reference's start: SVD form xu, xv random orthogonal (the factor is Cayley of them),
  /// σ = 1; direct inverse M random orthogonal.
  static FactorParam random(Index n, uint64_t seed, uint64_t stream, FactorForm form = FactorForm::Svd);
  void materialize();
  void zero_grad();
  /// Adds the parameters' gradients given ∂L/∂M and ∂L/∂M⁻ᵀ (float, from the row transforms).
  void backward(const Matrix& dM, const Matrix& dM_inv_t);
  /// The factor's condition number: max σ / min σ (SVD form), of M by SVD in double otherwise.
  double condition() const;
};

/// What layer-level training returns: the transform to apply online, the consumer's weight in
/// the transformed space with the learned clipping applied (ready for the weight step), the
/// learned activation clipping, and diagnostics.
struct FlatLayerResult {
  std::shared_ptr<const InputTransform> transform;
  Matrix weight;
  ActClip act_clip;
  double loss_first_epoch = 0, loss_last_epoch = 0;  ///< mean normalised-free MSE per epoch
  double cond_p1 = 0, cond_p2 = 0;
  int steps = 0;
};

/// Trains one linear's input transform against its FP output on calibration inputs X (tokens x
/// d_in), in batches of batch_tokens rows in order, `epochs` times. The weight grid (per-channel,
/// sym or asym) and the activation quantizer (per-token, dynamic) are those the run applies
/// afterwards; null: that side stays float during training. ConfigError (key "weight" / "act")
/// for grids the trainer does not simulate (groups, per-tensor, static ranges).
FlatLayerResult train_flat_layer(const Matrix& X, const Matrix& W, const QuantSpec* wspec, const ActQuantSpec* aspec,
                                 Index batch_tokens, const FlatTrainOptions& o);

/// What block-wise training returns: the transforms of the slots (P_a, P_ug, P_d with their
/// channel scales, P_v per KV head, P_o across heads, P_k per head with a simulated KV cache),
/// the learned weight clipping of the seven linears, their activation clipping and the KV
/// cache grids' clipping, and diagnostics.
struct FlatBlockResult {
  BlockTransforms transforms;
  /// Sum over the epoch's batches of the MSE (the reference's log: its first and last epoch).
  double loss_sum_first_epoch = 0, loss_sum_last_epoch = 0;
  double cond_a = 0, cond_ug = 0, cond_d = 0, cond_v = 0, cond_o = 0, cond_k = 0;  ///< κ(P) of each transform
  int steps = 0;
  int64_t trained_params = 0;
};

/// FlatQuant's block-wise training (ALGORITHMS.md §5.1): calibration windows `inputs` (equal
/// lengths, T x hidden each) and the FP block's outputs on them, batches of batch_size
/// consecutive windows in order, `epochs` passes; the grids are those the run applies after the
/// step (see train_flat_layer). With kv (the KV cache's per-token post-RoPE grids, ShapeError
/// otherwise) P_k and the grids' clipping train with the rest (the reference's W4A4KV4).
/// progress(epoch, loss_sum) after every epoch.
FlatBlockResult train_flat_block(const ModelConfig& cfg, const DecoderBlock& w, const std::vector<Matrix>& inputs,
                                 const std::vector<Matrix>& targets, const QuantSpec* wspec, const ActQuantSpec* aspec,
                                 const ScalarKvSpec* kv, int batch_size, const FlatTrainOptions& o,
                                 const std::function<void(int, double)>& progress = nullptr);

}  // namespace ql
