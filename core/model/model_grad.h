// Gradients through the whole model: the embedding, every decoder block (core/model/block_grad.h
// chained), the final RMSNorm, lm_head and a language-model loss, as forward/backward pairs over
// a batch of windows. Used by first-order QAT (the exact gradient ZeroQAT's SPSA estimate is
// compared with, arXiv 2509.00031; ALGORITHMS.md §6.6) and by its tests.
//
// Loss over a batch of W windows of T tokens (rows: the windows one after another, each at
// positions 0..T-1 and attending within itself): position t < T-1 of a window predicts token
// t+1, N = W (T-1) scored positions, z_t the logits, q_t = softmax(z_t):
//   CrossEntropy:    L = (1/N) Σ_t -log q_t[y_{t+1}]         dL/dz_t = (q_t - onehot(y_{t+1})) / N
//   KlToReference:   L = (1/N) Σ_t KL(p_t ‖ q_t), p_t = softmax(reference logits)
//                                                              dL/dz_t = (q_t - p_t) / N
// Log-sum-exp and the loss sum in double, per row then rows in order, so the loss depends on
// shapes and the numeric mode only, never on the thread count (as the blocks).
//
// Memory: the tape keeps every block's BlockTape for the batch (the activations a backward
// needs; about 20 MB per block for 4 x 256 tokens at hidden 256) and the batch's logits.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "core/model/block_grad.h"
#include "core/model/model.h"
#include "core/tensor.h"

namespace ql {

/// The whole model's parameters in scalar S; also the shape of its gradient. With tied
/// embeddings lm_head is a copy of embed and its gradient stays in grads.lm_head (the embedding
/// matrix's total gradient is then embed + lm_head).
template <class S>
struct ModelParams {
  MatT<S> embed;  ///< vocab x hidden
  std::vector<BlockParams<S>> blocks;
  VecT<S> final_norm;
  MatT<S> lm_head;  ///< vocab x hidden
  static ModelParams from(const ModelWeights& w);
  static ModelParams zeros_like(const ModelParams& p);
};

enum class LmLoss { CrossEntropy, KlToReference };

/// What model_bwd reads, filled by model_loss_fwd (or model_blocks_fwd alone).
template <class S>
struct ModelTape {
  Index window = 0;
  std::vector<int32_t> tokens;  ///< the batch's ids, windows one after another
  std::vector<BlockTape<S>> blocks;
  RopeTables tab;
  MatT<S> xn;         ///< final-norm output (lm_head's input)
  VecT<S> rstd;       ///< final-norm factors
  MatT<S> dlogits;    ///< dL/dz of every row (zero at the last position of each window)
  double loss = 0;
};

/// Fake quantization of block `block`'s linear inputs (InputQuant of block_grad.h, per block).
template <class S>
using ModelInputQuant = std::function<void(int block, LinearKind first_reader, MatT<S>& X)>;

/// Embedding and blocks [0, n_blocks) on a batch of equal-length windows (T >= 2); the last
/// run block's output is tape.blocks.back().y (the embedding when n_blocks = 0). ShapeError for
/// windows of unequal or too short length, ids outside the vocabulary, n_blocks out of range.
template <class S>
void model_blocks_fwd(const BlockShape& s, const ModelParams<S>& p, const std::vector<std::vector<int32_t>>& windows,
                      int n_blocks, ModelTape<S>& tape, const ModelInputQuant<S>& input_quant = {});

/// The whole forward and the loss; keeps dL/dz in the tape for model_bwd. reference: with
/// KlToReference, one (T x vocab) float logit matrix per window (rows T-1.. unused), else null.
/// Returns the loss (also tape.loss). input_quant: the blocks' activation fake quantization
/// (straight-through in model_bwd), none when empty.
template <class S>
double model_loss_fwd(const BlockShape& s, const ModelParams<S>& p, const std::vector<std::vector<int32_t>>& windows,
                      LmLoss loss, const std::vector<Matrix>* reference, ModelTape<S>& tape,
                      const ModelInputQuant<S>& input_quant = {});

/// The same loss of logits from the inference forward (Transformer::forward_batch: one T_w x
/// vocab matrix per window; lengths may differ, N = Σ (T_w − 1)), without gradient; with
/// KlToReference, the FP model's logits of the same windows. Rows summed in order per window,
/// windows in order.
double lm_loss(const std::vector<Matrix>& logits, const std::vector<std::vector<int32_t>>& windows, LmLoss loss,
               const std::vector<Matrix>* reference);

/// Given dh = dL/d(output of the last block model_blocks_fwd ran): grads += dL/dθ of those
/// blocks and the embedding (rows of the ids, accumulated in token order).
template <class S>
void model_blocks_bwd(const BlockShape& s, const ModelParams<S>& p, const ModelTape<S>& tape, const MatT<S>& dh,
                      ModelParams<S>& grads);

/// grads += dL/dθ of the whole model for the loss model_loss_fwd computed into `tape`.
template <class S>
void model_bwd(const BlockShape& s, const ModelParams<S>& p, const ModelTape<S>& tape, ModelParams<S>& grads);

}  // namespace ql
