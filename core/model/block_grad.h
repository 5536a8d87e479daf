// Gradients through one decoder block: the block's ops as forward/backward pairs (llm.c's
// layout: each *_fwd keeps exactly what its *_bwd reads) and the block's forward/backward built
// from them. Used by block-local training (FlatQuant's transforms, VLMQ's token importance) and
// by whole-model first-order QAT, which chains blocks.
//
// Every op is a template over the scalar: float for training, double for the finite-difference
// checks (tests/model/test_block_grad.cc), which compare each op's backward with central
// differences of its own forward. The float forward equals Transformer::block to float32
// rounding (not bitwise: attention keeps its probabilities here, and products are cut
// differently).
//
// Layout as core/model/ops.h: activations T x d row-major (row = token), weights d_out x d_in,
// head h = columns [h*head_dim, (h+1)*head_dim), rotate-half RoPE. Every backward ACCUMULATES
// into its weight-gradient outputs (so windows of a batch sum into one gradient) and, where
// the doc says so, into its input gradient (residual branches).
//
// Determinism: products are fixed tiles (kPanelRows x kTileCols) of single-threaded tile calls
// of core/linalg.h spread over the OpenMP threads; weight gradients are one product over all
// tokens of a window per tile, windows added in order; attention's tasks are whole KV heads
// (the query heads of a group in order), so K/V gradients are summed in a fixed order; all
// other reductions are sequential loops. Results depend on shapes and the numeric mode only,
// never on the thread count.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "core/model/model.h"
#include "core/model/ops.h"
#include "core/tensor.h"

namespace ql {

// ---- linear: Y = X Wᵀ (+ b) ----
/// Y is resized to T x d_out. b may be null or empty.
template <class S>
void linear_fwd(const MatT<S>& X, const MatT<S>& W, const VecT<S>* b, MatT<S>& Y);
/// dX (= or += with accumulate_dx) dY W; dW += dYᵀ X; db += Σ_t dY_t. Any output may be null.
/// dW and db must already have W's / b's shape.
template <class S>
void linear_bwd(const MatT<S>& dY, const MatT<S>& X, const MatT<S>& W, MatT<S>* dX, bool accumulate_dx,
                MatT<S>* dW, VecT<S>* db);
/// Linears that read one input (q/k/v; gate/up) in one parallel region: more tiles per region
/// and one pass over dX. W and b (null or empty: no bias) of each.
template <class S>
struct LinearRef {
  const MatT<S>* W;
  const VecT<S>* b;
};
/// Y[j] = X W_jᵀ (+ b_j) for j < n.
template <class S>
void linear_fwd_group(const MatT<S>& X, const LinearRef<S>* lin, int n, MatT<S>* const* Y);
/// dX (= or +=) Σ_j dY_j W_j (j in order, per tile); dW[j] += dY_jᵀ X; db[j] += Σ_t dY_j. dW, db
/// and their entries may be null.
template <class S>
void linear_bwd_group(const MatT<S>* const* dY, const MatT<S>& X, const LinearRef<S>* lin, int n, MatT<S>* dX,
                      bool accumulate_dx, MatT<S>* const* dW, VecT<S>* const* db);

// ---- RMSNorm (Hugging Face LlamaRMSNorm): y = w ⊙ x · r, r = 1/sqrt(mean(x²) + eps) ----
/// Keeps r per row in rstd (the backward's only saved state besides x and w).
template <class S>
void rmsnorm_fwd(const MatT<S>& x, const VecT<S>& w, S eps, MatT<S>& y, VecT<S>& rstd);
/// dx += r (w ⊙ dy) - x r³/d Σ_k w_k dy_k x_k;  dw += Σ_t dy ⊙ x r  (dw may be null).
template <class S>
void rmsnorm_bwd(const MatT<S>& dy, const MatT<S>& x, const VecT<S>& w, const VecT<S>& rstd, MatT<S>& dx,
                 VecT<S>* dw);

// Batches: the ops below that mix tokens take `window`: the rows are consecutive windows of
// that many tokens, each at positions 0.. of its own (its row r is at the tables' row r % window)
// and attending within itself only. The other ops are row-wise, so a batch is just rows.

// ---- rotate-half RoPE with the tables of core/model/ops.h (float32 angles, as HF) ----
/// In place on every head of X (rows: whole windows).
template <class S>
void rope_fwd(MatT<S>& X, Index window, int n_heads, int head_dim, const RopeTables& tab);
/// RoPE is a rotation, so its backward is the inverse rotation of the incoming gradient.
template <class S>
void rope_bwd(MatT<S>& dX, Index window, int n_heads, int head_dim, const RopeTables& tab);

// ---- causal grouped-query attention (query t of a window sees keys 0..t of its window) ----
/// out_j = softmax(Q_j K_gᵀ / sqrt(head_dim), causal) V_g, g = j / (n_heads / n_kv_heads).
/// P receives the probabilities, one window x window matrix per window and query head (index
/// w * n_heads + j; above the diagonal: zeros within the causal chunk of 64 query rows, never
/// written or read beyond it): the backward's saved state (the forward of
/// core/model/ops.h recomputes instead, which inference prefers).
template <class S>
void attention_fwd(const MatT<S>& Q, const MatT<S>& K, const MatT<S>& V, Index window, int n_heads,
                   int n_kv_heads, int head_dim, MatT<S>& out, std::vector<MatT<S>>& P);
/// dQ, dK, dV (resized, overwritten) through the softmax backward dS = P ⊙ (dP - rowsum(dP ⊙ P)),
/// dP = dout_j V_gᵀ:  dQ_j = dS K_g / sqrt(hd), dK_g = Σ_j dSᵀ Q_j / sqrt(hd), dV_g = Σ_j Pᵀ dout_j
/// (the query heads of a group summed in order).
template <class S>
void attention_bwd(const MatT<S>& dout, const MatT<S>& Q, const MatT<S>& K, const MatT<S>& V, Index window,
                   const std::vector<MatT<S>>& P, int n_heads, int n_kv_heads, int head_dim, MatT<S>& dQ,
                   MatT<S>& dK, MatT<S>& dV);

// ---- SwiGLU: a = silu(g) ⊙ u, silu(g) = g σ(g) ----
/// sig receives σ(g), which the forward computes anyway and the backward needs (no second exp).
template <class S>
void swiglu_fwd(const MatT<S>& g, const MatT<S>& u, MatT<S>& a, MatT<S>& sig);
/// dg = da ⊙ u ⊙ σ(g)(1 + g(1 - σ(g))),  du = da ⊙ g σ(g)  (both resized, overwritten).
template <class S>
void swiglu_bwd(const MatT<S>& da, const MatT<S>& g, const MatT<S>& u, const MatT<S>& sig, MatT<S>& dg,
                MatT<S>& du);

// ---- the block ----
/// A decoder block's parameters in scalar S (Hugging Face layout; biases empty unless the
/// architecture has q/k/v biases). Also the shape of its gradient.
template <class S>
struct BlockParams {
  VecT<S> input_norm, post_attn_norm;
  MatT<S> q, k, v, o, gate, up, down;
  VecT<S> bq, bk, bv;

  /// A copy of a model block converted to S.
  static BlockParams from(const DecoderBlock& blk);
  /// Zeros of p's shapes (a gradient accumulator).
  static BlockParams zeros_like(const BlockParams& p);
  /// The weight of linear `kind` (for tests and reports that walk the seven linears).
  const MatT<S>& linear(LinearKind kind) const;
  MatT<S>& linear(LinearKind kind);
};

/// The sizes a block's ops need (from ModelConfig).
struct BlockShape {
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  double eps = 1e-6;
  RopeSpec rope;
  static BlockShape of(const ModelConfig& c);
};

/// What block_bwd reads: the forward's intermediate activations of a batch of windows.
template <class S>
struct BlockTape {
  Index window = 0;     ///< tokens per window
  MatT<S> x;            ///< block input
  VecT<S> rstd1, rstd2;  ///< RMSNorm factors
  MatT<S> xn1;          ///< q/k/v input (fake-quantized with an InputQuant, as attn, xn2, a)
  MatT<S> q, k, v;      ///< after RoPE (q, k)
  std::vector<MatT<S>> P;  ///< attention probabilities per window and query head
  MatT<S> attn;         ///< o_proj input
  MatT<S> h1;           ///< residual after attention
  MatT<S> xn2;          ///< gate/up input
  MatT<S> g, u;         ///< gate / up pre-activations
  MatT<S> sig;          ///< σ(g)
  MatT<S> a;            ///< down_proj input (silu(g) ⊙ u)
  MatT<S> y;            ///< block output
  /// The backward's buffers, kept here so that repeated training steps do not allocate (page
  /// faults cost ~5% of a step otherwise); not part of the saved state.
  struct Scratch {
    MatT<S> da, dg, du, dxn2, dh1, dattn, dq, dk, dv, dxn1;
  };
  mutable Scratch scratch;
};

/// Fake quantization of the linears' inputs for quantization-aware training of W-A quantized
/// models: called in place once per input the linears share, with the first linear reading it
/// (Q for q/k/v, O, Gate for gate/up, Down), so the linears sharing an input must share its
/// quantizer (the caller checks). The tape keeps the quantized input: each weight's gradient is
/// dYᵀ Q(X) and the input's gradient passes through unchanged, dX = dY W (the straight-through
/// estimator). Empty: the inputs stay float.
template <class S>
using InputQuant = std::function<void(LinearKind first_reader, MatT<S>& X)>;

/// The block on a batch x (N x hidden, N a multiple of `window`): consecutive windows, each at
/// positions pos0 .. pos0+window-1; tape.y is the output. `tab` is reused when it already holds
/// these positions (rope_tables of ops.h). Linears run over the whole batch (taller products,
/// more tiles), attention per window. `input_quant`: see InputQuant.
template <class S>
void block_fwd(const BlockShape& s, const BlockParams<S>& p, const MatT<S>& x, Index window, int64_t pos0,
               RopeTables& tab, BlockTape<S>& tape, const InputQuant<S>& input_quant = {});
/// Given dy = dL/dy of the batch: dx = dL/dx (resized, overwritten) and grads += dL/dθ (one
/// product over all the batch's tokens per weight tile).
template <class S>
void block_bwd(const BlockShape& s, const BlockParams<S>& p, const BlockTape<S>& tape, const RopeTables& tab,
               const MatT<S>& dy, MatT<S>& dx, BlockParams<S>& grads);

}  // namespace ql
