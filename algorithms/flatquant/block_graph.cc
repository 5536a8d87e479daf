#include "algorithms/flatquant/block_graph.h"

#include "core/error.h"
#include "core/model/transform_grad.h"

namespace ql {

template <class S>
FlatBlockTransforms<S> FlatBlockTransforms<S>::zeros_like(const FlatBlockTransforms& t) {
  FlatBlockTransforms z;
  auto zm = [](const MatT<S>& m) { return MatT<S>::Zero(m.rows(), m.cols()).eval(); };
  auto zv = [](const VecT<S>& v) { return VecT<S>::Zero(v.size()).eval(); };
  z.a1 = zm(t.a1), z.a2 = zm(t.a2), z.a1i = zm(t.a1i), z.a2i = zm(t.a2i), z.ca = zv(t.ca);
  z.u1 = zm(t.u1), z.u2 = zm(t.u2), z.u1i = zm(t.u1i), z.u2i = zm(t.u2i), z.cu = zv(t.cu);
  z.d1 = zm(t.d1), z.d2 = zm(t.d2), z.d1i = zm(t.d1i), z.d2i = zm(t.d2i), z.cd = zv(t.cd);
  z.v = zm(t.v), z.vi = zm(t.vi), z.o = zm(t.o), z.oi = zm(t.oi), z.k = zm(t.k), z.ki = zm(t.ki);
  for (int i = 0; i < 2; ++i) z.kv_hi[i] = zv(t.kv_hi[i]), z.kv_lo[i] = zv(t.kv_lo[i]);
  for (int k = 0; k < kLinearKinds; ++k) {
    z.lwc_hi[k] = zv(t.lwc_hi[k]);
    z.lwc_lo[k] = zv(t.lwc_lo[k]);
    z.lac_hi[k] = zv(t.lac_hi[k]);
    z.lac_lo[k] = zv(t.lac_lo[k]);
  }
  return z;
}

namespace {

/// Where linear `kind`'s weight path reads its transform: channel scale (null: none), the
/// Kronecker factors applied to its rows, and P_v on its output (v_proj only).
template <class S>
struct WeightSide {
  const VecT<S>* c;
  const MatT<S>* A;
  const MatT<S>* B;
  const MatT<S>* pv;
};

template <class S>
WeightSide<S> weight_side(const FlatBlockTransforms<S>& t, LinearKind kind) {
  switch (kind) {
    case LinearKind::Q:
    case LinearKind::K: return {&t.ca, &t.a1i, &t.a2i, nullptr};
    case LinearKind::V: return {&t.ca, &t.a1i, &t.a2i, &t.v};
    case LinearKind::O: return {nullptr, &t.oi, &t.vi, nullptr};
    case LinearKind::Gate:
    case LinearKind::Up: return {&t.cu, &t.u1i, &t.u2i, nullptr};
    case LinearKind::Down: return {&t.cd, &t.d1i, &t.d2i, nullptr};
  }
  throw ShapeError("flatquant: unknown linear");
}

/// The same fields of a gradient struct (mutable).
template <class S>
struct WeightGrad {
  VecT<S>* c;
  MatT<S>* A;
  MatT<S>* B;
  MatT<S>* pv;
};

template <class S>
WeightGrad<S> weight_grad(FlatBlockTransforms<S>& g, LinearKind kind) {
  const WeightSide<S> s = weight_side(static_cast<const FlatBlockTransforms<S>&>(g), kind);
  auto m = [](const MatT<S>* p) { return const_cast<MatT<S>*>(p); };
  return {const_cast<VecT<S>*>(s.c), m(s.A), m(s.B), m(s.pv)};
}

/// W_p = (I ⊗ P_v)ᵀ W_c: P_vᵀ on every head's block of rows (rows of Wᵀ times I ⊗ P_v).
template <class S>
void pv_fwd(const MatT<S>& Wc, const MatT<S>& pv, MatT<S>& Wp) {
  const MatT<S> WcT = Wc.transpose();
  MatT<S> out;
  kron_rows_fwd<S>(WcT, nullptr, &pv, out);
  Wp = out.transpose();
}

template <class S>
void pv_bwd(const MatT<S>& dWp, const MatT<S>& Wc, const MatT<S>& pv, MatT<S>& dWc, MatT<S>* dpv) {
  const MatT<S> WcT = Wc.transpose(), dT = dWp.transpose();
  MatT<S> dWcT;
  kron_rows_bwd<S>(dT, WcT, nullptr, &pv, &dWcT, nullptr, dpv);
  dWc = dWcT.transpose();
}

template <class S>
void weight_fwd(const MatT<S>& W, const FlatBlockTransforms<S>& t, LinearKind kind, const FlatBlockGrids& grids,
                FlatLinearTape<S>& lt) {
  const int ki = static_cast<int>(kind);
  const WeightSide<S> ws = weight_side(t, kind);
  if (ws.c) scale_cols_fwd<S>(W, *ws.c, true, lt.Ws);
  else lt.Ws = W;
  kron_rows_fwd<S>(lt.Ws, ws.A, ws.B, lt.Wt);
  const VecT<S> none;
  if (ws.pv) {  // LWC, then P_v, then the grid (the reference's order for v_proj)
    if (grids.weights) clip_rows_fwd<S>(lt.Wt, t.lwc_hi[ki], t.lwc_lo[ki], lt.Wc);
    else lt.Wc = lt.Wt;
    pv_fwd(lt.Wc, *ws.pv, lt.Wp);
    if (grids.weights) fake_quant_fwd<S>(lt.Wp, grids.w, none, none, lt.Wq, lt.wtape);
    else lt.Wq = lt.Wp;
    return;
  }
  if (grids.weights) fake_quant_fwd<S>(lt.Wt, grids.w, t.lwc_hi[ki], t.lwc_lo[ki], lt.Wq, lt.wtape);
  else lt.Wq = lt.Wt;
}

template <class S>
void weight_bwd(const MatT<S>& dWq, const MatT<S>& W, const FlatBlockTransforms<S>& t, LinearKind kind,
                const FlatBlockGrids& grids, const FlatLinearTape<S>& lt, FlatBlockTransforms<S>& gr) {
  const int ki = static_cast<int>(kind);
  const WeightSide<S> ws = weight_side(t, kind);
  const WeightGrad<S> wg = weight_grad(gr, kind);
  const VecT<S> none;
  MatT<S> dWt, dWs;
  if (ws.pv) {
    MatT<S> dWp, dWc;
    if (grids.weights) fake_quant_bwd<S>(dWq, lt.Wp, grids.w, none, none, lt.wtape, dWp, nullptr, nullptr);
    else dWp = dWq;
    pv_bwd(dWp, lt.Wc, *ws.pv, dWc, wg.pv);
    if (grids.weights) clip_rows_bwd<S>(dWc, lt.Wt, t.lwc_hi[ki], t.lwc_lo[ki], dWt, &gr.lwc_hi[ki], &gr.lwc_lo[ki]);
    else dWt = dWc;
  } else if (grids.weights) {
    fake_quant_bwd<S>(dWq, lt.Wt, grids.w, t.lwc_hi[ki], t.lwc_lo[ki], lt.wtape, dWt, &gr.lwc_hi[ki], &gr.lwc_lo[ki]);
  } else {
    dWt = dWq;
  }
  kron_rows_bwd<S>(dWt, lt.Ws, ws.A, ws.B, ws.c ? &dWs : nullptr, wg.A, wg.B);
  if (ws.c) scale_cols_bwd<S>(dWs, W, *ws.c, true, nullptr, wg.c);
}

template <class S>
void act_fwd(const MatT<S>& X, const FlatBlockTransforms<S>& t, LinearKind kind, const FlatBlockGrids& grids,
             FlatLinearTape<S>& lt) {
  const int ki = static_cast<int>(kind);
  if (grids.acts) fake_quant_fwd<S>(X, grids.a, t.lac_hi[ki], t.lac_lo[ki], lt.Xq, lt.atape);
  else lt.Xq = X;
}

/// dX += the gradient through linear `kind`'s activation quantizer.
template <class S>
void act_bwd(const MatT<S>& dXq, const MatT<S>& X, const FlatBlockTransforms<S>& t, LinearKind kind,
             const FlatBlockGrids& grids, const FlatLinearTape<S>& lt, FlatBlockTransforms<S>& gr, MatT<S>& dX,
             bool accumulate) {
  const int ki = static_cast<int>(kind);
  MatT<S> d;
  if (grids.acts) fake_quant_bwd<S>(dXq, X, grids.a, t.lac_hi[ki], t.lac_lo[ki], lt.atape, d, &gr.lac_hi[ki], &gr.lac_lo[ki]);
  else d = dXq;
  if (accumulate) dX += d;
  else dX = std::move(d);
}

/// One quantized linear: its weight path and input quantizer, then Y = X_q W_qᵀ.
template <class S>
void qlinear_fwd(const MatT<S>& X, const MatT<S>& W, const FlatBlockTransforms<S>& t, LinearKind kind,
                 const FlatBlockGrids& grids, FlatLinearTape<S>& lt, MatT<S>& Y) {
  weight_fwd(W, t, kind, grids, lt);
  act_fwd(X, t, kind, grids, lt);
  linear_fwd<S>(lt.Xq, lt.Wq, nullptr, Y);
}

template <class S>
void qlinear_bwd(const MatT<S>& dY, const MatT<S>& X, const MatT<S>& W, const FlatBlockTransforms<S>& t,
                 LinearKind kind, const FlatBlockGrids& grids, const FlatLinearTape<S>& lt, FlatBlockTransforms<S>& gr,
                 MatT<S>& dX, bool accumulate) {
  MatT<S> dXq, dWq = MatT<S>::Zero(lt.Wq.rows(), lt.Wq.cols());
  linear_bwd<S>(dY, lt.Xq, lt.Wq, &dXq, false, &dWq, nullptr);
  act_bwd(dXq, X, t, kind, grids, lt, gr, dX, accumulate);
  weight_bwd(dWq, W, t, kind, grids, lt, gr);
}

/// The cache grid on rows of groups: X (T x kv_dim) viewed as (T·kv_dim/g) x g, one grid per
/// row of that view (a token's channel group).
template <class S>
MatT<S> as_groups(const MatT<S>& X, Index g) {
  return Eigen::Map<const MatT<S>>(X.data(), X.size() / g, g);
}

template <class S>
void kv_quant_fwd(const MatT<S>& X, const FakeQuantGrad& grid, const VecT<S>& hi, const VecT<S>& lo, Index g,
                  MatT<S>& Y, FakeQuantTape<S>& tape) {
  MatT<S> Yg;
  fake_quant_fwd<S>(as_groups(X, g), grid, hi, lo, Yg, tape);
  Y = Eigen::Map<const MatT<S>>(Yg.data(), X.rows(), X.cols());
}

template <class S>
void kv_quant_bwd(const MatT<S>& dY, const MatT<S>& X, const FakeQuantGrad& grid, const VecT<S>& hi,
                  const VecT<S>& lo, Index g, const FakeQuantTape<S>& tape, MatT<S>& dX, VecT<S>* dhi, VecT<S>* dlo) {
  MatT<S> dXg;
  fake_quant_bwd<S>(as_groups(dY, g), as_groups(X, g), grid, hi, lo, tape, dXg, dhi, dlo);
  dX = Eigen::Map<const MatT<S>>(dXg.data(), X.rows(), X.cols());
}

/// After RoPE: P_k on the keys per head (P_k⁻ᵀ on the queries, scores unchanged), then the
/// cache's grids on keys and values (FlatQuant's KV4 setting).
template <class S>
void keys_values_fwd(const BlockShape& s, const FlatBlockTransforms<S>& t, const FlatBlockGrids& grids,
                     FlatBlockTape<S>& tp) {
  if (t.k.size() > 0) {
    tp.qr = std::move(tp.q);
    tp.kr = std::move(tp.k);
    kron_rows_fwd<S>(tp.qr, nullptr, &t.ki, tp.q);
    kron_rows_fwd<S>(tp.kr, nullptr, &t.k, tp.k);
  }
  if (!grids.kv) return;
  const Index g = grids.kv_group > 0 ? grids.kv_group : s.head_dim;
  tp.kt = std::move(tp.k);
  tp.vt = std::move(tp.v);
  kv_quant_fwd(tp.kt, grids.key, t.kv_hi[0], t.kv_lo[0], g, tp.k, tp.ktape);
  kv_quant_fwd(tp.vt, grids.value, t.kv_hi[1], t.kv_lo[1], g, tp.v, tp.vtape);
}

/// dq, dk, dv (attention's inputs) become the gradients of the post-RoPE q, k and of v.
template <class S>
void keys_values_bwd(const BlockShape& s, const FlatBlockTransforms<S>& t, const FlatBlockGrids& grids,
                     const FlatBlockTape<S>& tp, MatT<S>& dq, MatT<S>& dk, MatT<S>& dv, FlatBlockTransforms<S>& gr) {
  if (grids.kv) {
    const Index g = grids.kv_group > 0 ? grids.kv_group : s.head_dim;
    MatT<S> d;
    kv_quant_bwd(dk, tp.kt, grids.key, t.kv_hi[0], t.kv_lo[0], g, tp.ktape, d, &gr.kv_hi[0], &gr.kv_lo[0]);
    dk = std::move(d);
    kv_quant_bwd(dv, tp.vt, grids.value, t.kv_hi[1], t.kv_lo[1], g, tp.vtape, d, &gr.kv_hi[1], &gr.kv_lo[1]);
    dv = std::move(d);
  }
  if (t.k.size() > 0) {
    MatT<S> d;
    kron_rows_bwd<S>(dq, tp.qr, nullptr, &t.ki, &d, nullptr, &gr.ki);
    dq = std::move(d);
    kron_rows_bwd<S>(dk, tp.kr, nullptr, &t.k, &d, nullptr, &gr.k);
    dk = std::move(d);
  }
}

}  // namespace

template <class S>
void flat_block_fwd(const BlockShape& s, const BlockParams<S>& w, const FlatBlockTransforms<S>& t,
                    const FlatBlockGrids& grids, const MatT<S>& x, Index window, RopeTables& tab,
                    FlatBlockTape<S>& tp) {
  if (w.bq.size() || w.bk.size() || w.bv.size())
    throw ShapeError("flatquant: q/k/v biases are not in the training graph yet (LLaMA/Mistral blocks only)");
  const S eps = static_cast<S>(static_cast<float>(s.eps));
  tp.window = window;
  tp.x = x;
  auto& L = tp.lin;
  auto at = [&](LinearKind k) -> FlatLinearTape<S>& { return L[static_cast<int>(k)]; };
  // Attention: x1 = RMSNorm(x) ⊙ c_a (P_a1 ⊗ P_a2) feeds q, k, v.
  rmsnorm_fwd(x, w.input_norm, eps, tp.xn1, tp.rstd1);
  scale_cols_fwd<S>(tp.xn1, t.ca, false, tp.xs1);
  kron_rows_fwd<S>(tp.xs1, &t.a1, &t.a2, tp.x1);
  qlinear_fwd(tp.x1, w.q, t, LinearKind::Q, grids, at(LinearKind::Q), tp.q);
  qlinear_fwd(tp.x1, w.k, t, LinearKind::K, grids, at(LinearKind::K), tp.k);
  qlinear_fwd(tp.x1, w.v, t, LinearKind::V, grids, at(LinearKind::V), tp.v);
  if (tab.pos0 != 0 || tab.rows < window) rope_tables(0, window, s.head_dim, s.rope, tab);
  rope_fwd(tp.q, window, s.n_heads, s.head_dim, tab);
  rope_fwd(tp.k, window, s.n_kv_heads, s.head_dim, tab);
  keys_values_fwd(s, t, grids, tp);
  attention_fwd(tp.q, tp.k, tp.v, window, s.n_heads, s.n_kv_heads, s.head_dim, tp.attn, tp.P);
  // o_proj reads attn (P_o ⊗ I): P_oᵀ mixes the heads of every token.
  kron_rows_fwd<S>(tp.attn, &t.o, nullptr, tp.ao);
  MatT<S> out;
  qlinear_fwd(tp.ao, w.o, t, LinearKind::O, grids, at(LinearKind::O), out);
  tp.h1 = x + out;
  // MLP: x2 = RMSNorm(h1) ⊙ c_ug (P_ug1 ⊗ P_ug2) feeds gate and up; down reads
  // (silu(g) ⊙ u) ⊙ c_d (P_d1 ⊗ P_d2).
  rmsnorm_fwd(tp.h1, w.post_attn_norm, eps, tp.xn2, tp.rstd2);
  scale_cols_fwd<S>(tp.xn2, t.cu, false, tp.xs2);
  kron_rows_fwd<S>(tp.xs2, &t.u1, &t.u2, tp.x2);
  qlinear_fwd(tp.x2, w.gate, t, LinearKind::Gate, grids, at(LinearKind::Gate), tp.g);
  qlinear_fwd(tp.x2, w.up, t, LinearKind::Up, grids, at(LinearKind::Up), tp.u);
  swiglu_fwd(tp.g, tp.u, tp.a, tp.sig);
  scale_cols_fwd<S>(tp.a, t.cd, false, tp.xs3);
  kron_rows_fwd<S>(tp.xs3, &t.d1, &t.d2, tp.x3);
  qlinear_fwd(tp.x3, w.down, t, LinearKind::Down, grids, at(LinearKind::Down), out);
  tp.y = tp.h1 + out;
}

template <class S>
void flat_block_bwd(const BlockShape& s, const BlockParams<S>& w, const FlatBlockTransforms<S>& t,
                    const FlatBlockGrids& grids, const FlatBlockTape<S>& tp, const RopeTables& tab, const MatT<S>& dy,
                    FlatBlockTransforms<S>& gr) {
  auto L = [&](LinearKind k) -> const FlatLinearTape<S>& { return tp.lin[static_cast<int>(k)]; };
  // MLP branch.
  MatT<S> dx3, dxs3, da, dg, du, dx2, dxs2, dxn2;
  qlinear_bwd(dy, tp.x3, w.down, t, LinearKind::Down, grids, L(LinearKind::Down), gr, dx3, false);
  kron_rows_bwd<S>(dx3, tp.xs3, &t.d1, &t.d2, &dxs3, &gr.d1, &gr.d2);
  scale_cols_bwd<S>(dxs3, tp.a, t.cd, false, &da, &gr.cd);
  swiglu_bwd(da, tp.g, tp.u, tp.sig, dg, du);
  qlinear_bwd(dg, tp.x2, w.gate, t, LinearKind::Gate, grids, L(LinearKind::Gate), gr, dx2, false);
  qlinear_bwd(du, tp.x2, w.up, t, LinearKind::Up, grids, L(LinearKind::Up), gr, dx2, true);
  kron_rows_bwd<S>(dx2, tp.xs2, &t.u1, &t.u2, &dxs2, &gr.u1, &gr.u2);
  scale_cols_bwd<S>(dxs2, tp.xn2, t.cu, false, &dxn2, &gr.cu);
  MatT<S> dh1 = dy;
  rmsnorm_bwd(dxn2, tp.h1, w.post_attn_norm, tp.rstd2, dh1, static_cast<VecT<S>*>(nullptr));
  // Attention branch (the norms are constants; x's own gradient is not needed).
  MatT<S> dao, dattn, dq, dk, dv, dx1, dxs1;
  qlinear_bwd(dh1, tp.ao, w.o, t, LinearKind::O, grids, L(LinearKind::O), gr, dao, false);
  kron_rows_bwd<S>(dao, tp.attn, &t.o, nullptr, &dattn, &gr.o, nullptr);
  attention_bwd(dattn, tp.q, tp.k, tp.v, tp.window, tp.P, s.n_heads, s.n_kv_heads, s.head_dim, dq, dk, dv);
  keys_values_bwd(s, t, grids, tp, dq, dk, dv, gr);
  rope_bwd(dq, tp.window, s.n_heads, s.head_dim, tab);
  rope_bwd(dk, tp.window, s.n_kv_heads, s.head_dim, tab);
  qlinear_bwd(dq, tp.x1, w.q, t, LinearKind::Q, grids, L(LinearKind::Q), gr, dx1, false);
  qlinear_bwd(dk, tp.x1, w.k, t, LinearKind::K, grids, L(LinearKind::K), gr, dx1, true);
  qlinear_bwd(dv, tp.x1, w.v, t, LinearKind::V, grids, L(LinearKind::V), gr, dx1, true);
  kron_rows_bwd<S>(dx1, tp.xs1, &t.a1, &t.a2, &dxs1, &gr.a1, &gr.a2);
  scale_cols_bwd<S>(dxs1, tp.xn1, t.ca, false, nullptr, &gr.ca);
}

#define QL_FLAT_BLOCK_INSTANTIATE(S)                                                                             \
  template struct FlatBlockTransforms<S>;                                                                        \
  template void flat_block_fwd<S>(const BlockShape&, const BlockParams<S>&, const FlatBlockTransforms<S>&,       \
                                  const FlatBlockGrids&, const MatT<S>&, Index, RopeTables&, FlatBlockTape<S>&); \
  template void flat_block_bwd<S>(const BlockShape&, const BlockParams<S>&, const FlatBlockTransforms<S>&,       \
                                  const FlatBlockGrids&, const FlatBlockTape<S>&, const RopeTables&,             \
                                  const MatT<S>&, FlatBlockTransforms<S>&);

QL_FLAT_BLOCK_INSTANTIATE(float)
QL_FLAT_BLOCK_INSTANTIATE(double)

}  // namespace ql
