// One LLaMA decoder block as FlatQuant trains it (arXiv 2410.09426 §3; the reference's
// model_tools/llama_utils.py and flat_linear.py), forward and backward, in float (training) and
// double (the finite-difference check in tests/algorithms/test_flatquant.cc):
//
//   x1 = RMSNorm(x) ⊙ c_a (P_a1 ⊗ P_a2)                      shared by q, k, v
//   q, k = Q_a(x1) Q_w(clip((W / c_a)(P_a1⁻ᵀ ⊗ P_a2⁻ᵀ)))ᵀ     each linear its own LAC / LWC
//   v    = Q_a(x1) Q_w((I ⊗ P_v)ᵀ clip((W_v / c_a)(P_a1⁻ᵀ ⊗ P_a2⁻ᵀ)))ᵀ   (P_v per KV head, after LWC)
//   RoPE(q, k); with a quantized KV cache q ← q (I ⊗ P_k⁻ᵀ), k ← Q_kv(k (I ⊗ P_k)), v ← Q_kv(v)
//   (P_k per head; Q_kv asymmetric per token and channel group with LAC, the cache's grid)
//   attn = causal GQA attention
//   h1 = x + Q_a(attn (P_o ⊗ I)) Q_w(clip(W_o (P_o⁻ᵀ ⊗ P_v⁻ᵀ)))ᵀ
//   x2 = RMSNorm(h1) ⊙ c_ug (P_ug1 ⊗ P_ug2); g, u as q (own LAC / LWC)
//   y  = h1 + Q_a((silu(g) ⊙ u) ⊙ c_d (P_d1 ⊗ P_d2)) Q_w(clip((W_d / c_d)(P_d1⁻ᵀ ⊗ P_d2⁻ᵀ)))ᵀ
//
// Q_a: per-token activation fake quantization with LAC, Q_w: per-row weight fake quantization
// with LWC (core/quant_grad.h), both with the straight-through estimator. The graph reads
// the transforms materialised (each factor M and its inverse-transpose as independent inputs);
// the trainer maps their gradients to the factor parameters. The FP weights and norms are
// constants.
#pragma once
#include <array>
#include <vector>

#include "core/model/block_grad.h"
#include "core/quant_grad.h"

namespace ql {

/// The materialised transforms and clipping logits of one block; also the shape of their
/// gradient. Empty clip vectors: that clipping is off.
template <class S>
struct FlatBlockTransforms {
  MatT<S> a1, a2, a1i, a2i;  ///< P_a factors and inverse-transposes (q/k/v input)
  VecT<S> ca;
  MatT<S> u1, u2, u1i, u2i;  ///< P_ug (gate/up input)
  VecT<S> cu;
  MatT<S> d1, d2, d1i, d2i;  ///< P_d (down input)
  VecT<S> cd;
  MatT<S> v, vi;             ///< P_v, head_dim x head_dim
  MatT<S> o, oi;             ///< P_o, heads x heads
  MatT<S> k, ki;             ///< P_k, head_dim x head_dim (empty: no key transform)
  std::array<VecT<S>, 2> kv_hi, kv_lo;  ///< LAC of the K [0] and V [1] cache grids (empty: off)
  std::array<VecT<S>, kLinearKinds> lwc_hi, lwc_lo;  ///< per output row
  std::array<VecT<S>, kLinearKinds> lac_hi, lac_lo;  ///< one pair per linear input

  static FlatBlockTransforms zeros_like(const FlatBlockTransforms& t);
};

/// The grids simulated: weights per output row (sym or asym, LWC style), activations per token.
struct FlatBlockGrids {
  bool weights = true, acts = true;
  FakeQuantGrad w, a;
  /// The KV cache's grids (asymmetric, per token and group of kv_group channels) on post-RoPE
  /// keys and values; off: the cache stays exact.
  bool kv = false;
  FakeQuantGrad key, value;
  Index kv_group = 0;
};

/// One quantized linear's saved state: its weight path and its input's quantizer.
template <class S>
struct FlatLinearTape {
  MatT<S> Ws, Wt, Wc, Wp, Wq;  ///< W / c, transformed, clipped (v only), P_v (v only), quantized
  FakeQuantTape<S> wtape, atape;
  MatT<S> Xq;                  ///< the quantized input it multiplies
};

template <class S>
struct FlatBlockTape {
  Index window = 0;
  MatT<S> x, xn1, xs1, x1, h1, xn2, xs2, x2, g, u, sig, a, xs3, x3, ao, y;
  VecT<S> rstd1, rstd2;
  MatT<S> q, k, v, attn;         ///< what attention reads
  MatT<S> qr, kr, kt, vt;         ///< post-RoPE q, k before P_k; k, v before the cache grid
  FakeQuantTape<S> ktape, vtape;
  std::vector<MatT<S>> P;
  std::array<FlatLinearTape<S>, kLinearKinds> lin;
};

template <class S>
void flat_block_fwd(const BlockShape& s, const BlockParams<S>& w, const FlatBlockTransforms<S>& t,
                    const FlatBlockGrids& grids, const MatT<S>& x, Index window, RopeTables& tab,
                    FlatBlockTape<S>& tape);
/// grads += ∂L/∂(transforms, logits) given dy = ∂L/∂y.
template <class S>
void flat_block_bwd(const BlockShape& s, const BlockParams<S>& w, const FlatBlockTransforms<S>& t,
                    const FlatBlockGrids& grids, const FlatBlockTape<S>& tape, const RopeTables& tab, const MatT<S>& dy,
                    FlatBlockTransforms<S>& grads);

}  // namespace ql
