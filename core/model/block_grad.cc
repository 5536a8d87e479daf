#include "core/model/block_grad.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/detmath.h"
#include "core/error.h"
#include "core/linalg.h"

namespace ql {

namespace {

/// f(task) for task < n over the OpenMP threads (serially inside an enclosing parallel
/// region). Tasks write disjoint outputs, so the bits do not depend on the schedule.
template <class F>
void for_tasks(Index n, const F& f) {
  if (n <= 1 || omp_in_parallel()) {
    for (Index t = 0; t < n; ++t) f(t);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (Index t = 0; t < n; ++t) f(t);
}

Index n_tiles(Index n, Index tile) { return (n + tile - 1) / tile; }

/// e^x elementwise: core/detmath in both precisions (same bits on every CPU).
void exp_row(float* x, Index n) { detmath::exp_inplace(x, n); }
void exp_row(double* x, Index n) {
  for (Index i = 0; i < n; ++i) x[i] = detmath::exp(x[i]);
}
float exp_one(float x) { return detmath::expf(x); }
double exp_one(double x) { return detmath::exp(x); }

template <class S>
void check_cols(const MatT<S>& A, Index cols, const char* what) {
  if (A.cols() != cols)
    throw ShapeError(std::string("block_grad: ") + what + " has " + std::to_string(A.cols()) + " columns, expected " +
                     std::to_string(cols));
}

}  // namespace

// ---------------------------------------------------------------- linear

template <class S>
void linear_fwd(const MatT<S>& X, const MatT<S>& W, const VecT<S>* b, MatT<S>& Y) {
  check_cols(X, W.cols(), "linear input");
  const Index T = X.rows(), k = X.cols(), n = W.rows();
  Y.resize(T, n);
  const bool bias = b && b->size() > 0;
  const Index tc = n_tiles(n, kTileCols);
  for_tasks(n_tiles(T, kPanelRows) * tc, [&](Index task) {
    const Index r0 = task / tc * kPanelRows, c0 = task % tc * kTileCols;
    const Index rows = std::min(kPanelRows, T - r0), cols = std::min(kTileCols, n - c0);
    S* C = Y.data() + r0 * n + c0;
    if (bias)
      for (Index r = 0; r < rows; ++r) std::copy(b->data() + c0, b->data() + c0 + cols, C + r * n);
    gemm(Trans::No, Trans::Yes, rows, cols, k, S(1), X.data() + r0 * k, k, W.data() + c0 * k, k, bias ? S(1) : S(0),
         C, n);
  });
}

template <class S>
void linear_bwd(const MatT<S>& dY, const MatT<S>& X, const MatT<S>& W, MatT<S>* dX, bool accumulate_dx, MatT<S>* dW,
                VecT<S>* db) {
  const Index T = X.rows(), k = X.cols(), n = W.rows();
  if (dY.rows() != T || dY.cols() != n) throw ShapeError("block_grad: linear dY shape differs from the output's");
  if (dX) {
    if (!accumulate_dx) dX->resize(T, k);
    else if (dX->rows() != T || dX->cols() != k) throw ShapeError("block_grad: accumulated dX has the wrong shape");
    const Index tc = n_tiles(k, kTileCols);
    for_tasks(n_tiles(T, kPanelRows) * tc, [&](Index task) {
      const Index r0 = task / tc * kPanelRows, c0 = task % tc * kTileCols;
      const Index rows = std::min(kPanelRows, T - r0), cols = std::min(kTileCols, k - c0);
      gemm(Trans::No, Trans::No, rows, cols, n, S(1), dY.data() + r0 * n, n, W.data() + c0, k,
           accumulate_dx ? S(1) : S(0), dX->data() + r0 * k + c0, k);
    });
  }
  if (dW) {
    if (dW->rows() != n || dW->cols() != k) throw ShapeError("block_grad: dW has the wrong shape");
    // dW[r0.., c0..] += dY[:, r0..]ᵀ X[:, c0..]: one product over all T tokens per tile.
    const Index tc = n_tiles(k, kTileCols);
    for_tasks(n_tiles(n, kPanelRows) * tc, [&](Index task) {
      const Index r0 = task / tc * kPanelRows, c0 = task % tc * kTileCols;
      const Index rows = std::min(kPanelRows, n - r0), cols = std::min(kTileCols, k - c0);
      gemm(Trans::Yes, Trans::No, rows, cols, T, S(1), dY.data() + r0, n, X.data() + c0, k, S(1),
           dW->data() + r0 * k + c0, k);
    });
  }
  if (db && db->size() > 0) {
    if (db->size() != n) throw ShapeError("block_grad: db has the wrong size");
    for (Index t = 0; t < T; ++t)
      for (Index j = 0; j < n; ++j) (*db)[j] += dY(t, j);
  }
}

// ---------------------------------------------------------------- RMSNorm

template <class S>
void rmsnorm_fwd(const MatT<S>& x, const VecT<S>& w, S eps, MatT<S>& y, VecT<S>& rstd) {
  const Index T = x.rows(), d = x.cols();
  if (w.size() != d) throw ShapeError("block_grad: RMSNorm weight size differs from the width");
  y.resize(T, d);
  rstd.resize(T);
  for (Index t = 0; t < T; ++t) {
    const S* xr = x.data() + t * d;
    double ss = 0.0;  // mean of squares in double, rounded once (as ops.h's forward)
    for (Index j = 0; j < d; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    const S ms = static_cast<S>(ss / static_cast<double>(d));
    const S r = S(1) / std::sqrt(ms + eps);
    rstd[t] = r;
    S* yr = y.data() + t * d;
    for (Index j = 0; j < d; ++j) yr[j] = w[j] * (xr[j] * r);
  }
}

template <class S>
void rmsnorm_bwd(const MatT<S>& dy, const MatT<S>& x, const VecT<S>& w, const VecT<S>& rstd, MatT<S>& dx,
                 VecT<S>* dw) {
  const Index T = x.rows(), d = x.cols();
  if (dx.rows() != T || dx.cols() != d) throw ShapeError("block_grad: RMSNorm dx has the wrong shape");
  for (Index t = 0; t < T; ++t) {
    const S* xr = x.data() + t * d;
    const S* g = dy.data() + t * d;
    const S r = rstd[t];
    // d/dx_j of w_j x_j r: r w_j dy_j, plus the path through r = (mean x² + eps)^-1/2:
    // dr/dx_j = -r³ x_j / d.
    double dot = 0.0;
    for (Index j = 0; j < d; ++j) dot += static_cast<double>(w[j]) * g[j] * xr[j];
    const S c = static_cast<S>(dot) * r * r * r / static_cast<S>(d);
    S* o = dx.data() + t * d;
    for (Index j = 0; j < d; ++j) o[j] += r * w[j] * g[j] - xr[j] * c;
    if (dw)
      for (Index j = 0; j < d; ++j) (*dw)[j] += g[j] * (xr[j] * r);
  }
}

// ---------------------------------------------------------------- RoPE

namespace {

template <class S>
void rotate(MatT<S>& X, int n_heads, int head_dim, const RopeTables& tab, S sign) {
  const Index T = X.rows(), half = head_dim / 2;
  if (tab.rows < T || tab.cos.cols() != half)
    throw ShapeError("block_grad: RoPE tables do not cover " + std::to_string(T) + " rows of head_dim " +
                     std::to_string(head_dim));
  for (Index t = 0; t < T; ++t)
    for (int h = 0; h < n_heads; ++h) {
      S* x = X.data() + t * X.cols() + static_cast<Index>(h) * head_dim;
      for (Index i = 0; i < half; ++i) {
        const S c = tab.cos(t, i), s = sign * static_cast<S>(tab.sin(t, i));
        const S x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
      }
    }
}

}  // namespace

template <class S>
void rope_fwd(MatT<S>& X, int n_heads, int head_dim, const RopeTables& tab) {
  rotate<S>(X, n_heads, head_dim, tab, S(1));
}

template <class S>
void rope_bwd(MatT<S>& dX, int n_heads, int head_dim, const RopeTables& tab) {
  rotate<S>(dX, n_heads, head_dim, tab, S(-1));
}

// ---------------------------------------------------------------- attention

template <class S>
void attention_fwd(const MatT<S>& Q, const MatT<S>& K, const MatT<S>& V, int n_heads, int n_kv_heads, int head_dim,
                   MatT<S>& out, std::vector<MatT<S>>& P) {
  const Index T = Q.rows(), qd = Q.cols(), kvd = K.cols(), hd = head_dim;
  const int group = n_heads / n_kv_heads;
  const S scale = S(1) / std::sqrt(static_cast<S>(head_dim));
  out.resize(T, qd);
  P.resize(static_cast<size_t>(n_heads));
  for_tasks(n_kv_heads, [&](Index g) {
    for (int j = 0; j < group; ++j) {
      const Index h = g * group + j;
      MatT<S>& Ph = P[static_cast<size_t>(h)];
      Ph.resize(T, T);
      gemm(Trans::No, Trans::Yes, T, T, hd, scale, Q.data() + h * hd, qd, K.data() + g * hd, kvd, S(0), Ph.data(), T);
      for (Index t = 0; t < T; ++t) {  // causal softmax over keys 0..t
        S* p = Ph.data() + t * T;
        const S m = *std::max_element(p, p + t + 1);
        for (Index i = 0; i <= t; ++i) p[i] -= m;
        exp_row(p, t + 1);
        S sum = 0;
        for (Index i = 0; i <= t; ++i) sum += p[i];
        const S inv = S(1) / sum;
        for (Index i = 0; i <= t; ++i) p[i] *= inv;
        std::fill(p + t + 1, p + T, S(0));
      }
      gemm(Trans::No, Trans::No, T, hd, T, S(1), Ph.data(), T, V.data() + g * hd, kvd, S(0), out.data() + h * hd, qd);
    }
  });
}

template <class S>
void attention_bwd(const MatT<S>& dout, const MatT<S>& Q, const MatT<S>& K, const MatT<S>& V,
                   const std::vector<MatT<S>>& P, int n_heads, int n_kv_heads, int head_dim, MatT<S>& dQ, MatT<S>& dK,
                   MatT<S>& dV) {
  const Index T = Q.rows(), qd = Q.cols(), kvd = K.cols(), hd = head_dim;
  const int group = n_heads / n_kv_heads;
  const S scale = S(1) / std::sqrt(static_cast<S>(head_dim));
  dQ.resize(T, qd);
  dK.resize(T, kvd);
  dV.resize(T, kvd);
  // One task per KV head: its query heads in order, so dK_g and dV_g are summed in a fixed order.
  for_tasks(n_kv_heads, [&](Index g) {
    MatT<S> dS(T, T);
    for (int j = 0; j < group; ++j) {
      const Index h = g * group + j;
      const MatT<S>& Ph = P[static_cast<size_t>(h)];
      const S beta = j == 0 ? S(0) : S(1);
      // dV_g += P_hᵀ dout_h;  dP = dout_h V_gᵀ (into dS).
      gemm(Trans::Yes, Trans::No, T, hd, T, S(1), Ph.data(), T, dout.data() + h * hd, qd, beta, dV.data() + g * hd,
           kvd);
      gemm(Trans::No, Trans::Yes, T, T, hd, S(1), dout.data() + h * hd, qd, V.data() + g * hd, kvd, S(0), dS.data(), T);
      // Softmax backward per row: dS = P ⊙ (dP - Σ_i dP_i P_i).
      for (Index t = 0; t < T; ++t) {
        S* ds = dS.data() + t * T;
        const S* p = Ph.data() + t * T;
        S dot = 0;
        for (Index i = 0; i <= t; ++i) dot += ds[i] * p[i];
        for (Index i = 0; i <= t; ++i) ds[i] = p[i] * (ds[i] - dot);
        std::fill(ds + t + 1, ds + T, S(0));
      }
      // Scores were scale · Q_h K_gᵀ: dQ_h = scale dS K_g, dK_g += scale dSᵀ Q_h.
      gemm(Trans::No, Trans::No, T, hd, T, scale, dS.data(), T, K.data() + g * hd, kvd, S(0), dQ.data() + h * hd, qd);
      gemm(Trans::Yes, Trans::No, T, hd, T, scale, dS.data(), T, Q.data() + h * hd, qd, beta, dK.data() + g * hd, kvd);
    }
  });
}

// ---------------------------------------------------------------- SwiGLU

template <class S>
void swiglu_fwd(const MatT<S>& g, const MatT<S>& u, MatT<S>& a) {
  a.resize(g.rows(), g.cols());
  const Index n = g.size();
  for (Index i = 0; i < n; ++i) {
    const S gi = g.data()[i];
    a.data()[i] = gi / (S(1) + exp_one(-gi)) * u.data()[i];  // as ops.h's fused forward
  }
}

template <class S>
void swiglu_bwd(const MatT<S>& da, const MatT<S>& g, const MatT<S>& u, MatT<S>& dg, MatT<S>& du) {
  dg.resize(g.rows(), g.cols());
  du.resize(g.rows(), g.cols());
  const Index n = g.size();
  for (Index i = 0; i < n; ++i) {
    const S gi = g.data()[i], sig = S(1) / (S(1) + exp_one(-gi));
    // silu'(g) = σ(g) + g σ(g)(1 - σ(g)).
    dg.data()[i] = da.data()[i] * u.data()[i] * sig * (S(1) + gi * (S(1) - sig));
    du.data()[i] = da.data()[i] * gi * sig;
  }
}

// ---------------------------------------------------------------- the block

template <class S>
BlockParams<S> BlockParams<S>::from(const DecoderBlock& blk) {
  BlockParams p;
  p.input_norm = blk.input_norm.cast<S>();
  p.post_attn_norm = blk.post_attn_norm.cast<S>();
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    p.linear(kind) = blk.linear(kind).W.template cast<S>();
  }
  p.bq = blk.q.b.cast<S>();
  p.bk = blk.k.b.cast<S>();
  p.bv = blk.v.b.cast<S>();
  if (blk.o.b.size() || blk.gate.b.size() || blk.up.b.size() || blk.down.b.size())
    throw ShapeError("block_grad: only q/k/v may have biases (LLaMA/Qwen2 blocks)");
  return p;
}

template <class S>
BlockParams<S> BlockParams<S>::zeros_like(const BlockParams& p) {
  BlockParams z;
  z.input_norm = VecT<S>::Zero(p.input_norm.size());
  z.post_attn_norm = VecT<S>::Zero(p.post_attn_norm.size());
  for (int k = 0; k < kLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    z.linear(kind) = MatT<S>::Zero(p.linear(kind).rows(), p.linear(kind).cols());
  }
  z.bq = VecT<S>::Zero(p.bq.size());
  z.bk = VecT<S>::Zero(p.bk.size());
  z.bv = VecT<S>::Zero(p.bv.size());
  return z;
}

template <class S>
MatT<S>& BlockParams<S>::linear(LinearKind kind) {
  switch (kind) {
    case LinearKind::Q: return q;
    case LinearKind::K: return k;
    case LinearKind::V: return v;
    case LinearKind::O: return o;
    case LinearKind::Gate: return gate;
    case LinearKind::Up: return up;
    case LinearKind::Down: return down;
  }
  throw ShapeError("block_grad: unknown linear kind");
}

template <class S>
const MatT<S>& BlockParams<S>::linear(LinearKind kind) const {
  return const_cast<BlockParams*>(this)->linear(kind);
}

BlockShape BlockShape::of(const ModelConfig& c) {
  BlockShape s;
  s.n_heads = c.num_heads;
  s.n_kv_heads = c.num_kv_heads;
  s.head_dim = c.head_dim;
  s.eps = c.rms_norm_eps;
  s.rope_theta = c.rope_theta;
  return s;
}

template <class S>
void block_fwd(const BlockShape& s, const BlockParams<S>& p, const MatT<S>& x, int64_t pos0, RopeTables& tab,
               BlockTape<S>& t) {
  const Index T = x.rows();
  const S eps = static_cast<S>(static_cast<float>(s.eps));  // HF adds eps in the input's float32
  t.x = x;
  rmsnorm_fwd(x, p.input_norm, eps, t.xn1, t.rstd1);
  linear_fwd(t.xn1, p.q, &p.bq, t.q);
  linear_fwd(t.xn1, p.k, &p.bk, t.k);
  linear_fwd(t.xn1, p.v, &p.bv, t.v);
  if (tab.pos0 != pos0 || tab.rows < T) rope_tables(pos0, T, s.head_dim, s.rope_theta, tab);
  rope_fwd(t.q, s.n_heads, s.head_dim, tab);
  rope_fwd(t.k, s.n_kv_heads, s.head_dim, tab);
  attention_fwd(t.q, t.k, t.v, s.n_heads, s.n_kv_heads, s.head_dim, t.attn, t.P);
  linear_fwd<S>(t.attn, p.o, nullptr, t.h1);
  t.h1 += x;
  rmsnorm_fwd(t.h1, p.post_attn_norm, eps, t.xn2, t.rstd2);
  linear_fwd<S>(t.xn2, p.gate, nullptr, t.g);
  linear_fwd<S>(t.xn2, p.up, nullptr, t.u);
  swiglu_fwd(t.g, t.u, t.a);
  linear_fwd<S>(t.a, p.down, nullptr, t.y);
  t.y += t.h1;
}

template <class S>
void block_bwd(const BlockShape& s, const BlockParams<S>& p, const BlockTape<S>& t, const RopeTables& tab,
               const MatT<S>& dy, MatT<S>& dx, BlockParams<S>& gr) {
  // MLP branch: y = h1 + down(silu(gate(xn2)) ⊙ up(xn2)), xn2 = RMSNorm(h1).
  MatT<S> da, dg, du, dxn2;
  linear_bwd<S>(dy, t.a, p.down, &da, false, &gr.down, nullptr);
  swiglu_bwd(da, t.g, t.u, dg, du);
  linear_bwd<S>(dg, t.xn2, p.gate, &dxn2, false, &gr.gate, nullptr);
  linear_bwd<S>(du, t.xn2, p.up, &dxn2, true, &gr.up, nullptr);
  MatT<S> dh1 = dy;  // the residual path
  rmsnorm_bwd(dxn2, t.h1, p.post_attn_norm, t.rstd2, dh1, &gr.post_attn_norm);
  // Attention branch: h1 = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))), xn1 = RMSNorm(x).
  MatT<S> dattn, dq, dk, dv, dxn1;
  linear_bwd<S>(dh1, t.attn, p.o, &dattn, false, &gr.o, nullptr);
  attention_bwd(dattn, t.q, t.k, t.v, t.P, s.n_heads, s.n_kv_heads, s.head_dim, dq, dk, dv);
  rope_bwd(dq, s.n_heads, s.head_dim, tab);
  rope_bwd(dk, s.n_kv_heads, s.head_dim, tab);
  linear_bwd(dq, t.xn1, p.q, &dxn1, false, &gr.q, &gr.bq);
  linear_bwd(dk, t.xn1, p.k, &dxn1, true, &gr.k, &gr.bk);
  linear_bwd(dv, t.xn1, p.v, &dxn1, true, &gr.v, &gr.bv);
  dx = dh1;
  rmsnorm_bwd(dxn1, t.x, p.input_norm, t.rstd1, dx, &gr.input_norm);
}

#define QL_BLOCK_GRAD_INSTANTIATE(S)                                                                              \
  template void linear_fwd<S>(const MatT<S>&, const MatT<S>&, const VecT<S>*, MatT<S>&);                        \
  template void linear_bwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>&, MatT<S>*, bool, MatT<S>*,         \
                              VecT<S>*);                                                                        \
  template void rmsnorm_fwd<S>(const MatT<S>&, const VecT<S>&, S, MatT<S>&, VecT<S>&);                          \
  template void rmsnorm_bwd<S>(const MatT<S>&, const MatT<S>&, const VecT<S>&, const VecT<S>&, MatT<S>&,        \
                               VecT<S>*);                                                                       \
  template void rope_fwd<S>(MatT<S>&, int, int, const RopeTables&);                                             \
  template void rope_bwd<S>(MatT<S>&, int, int, const RopeTables&);                                             \
  template void attention_fwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>&, int, int, int, MatT<S>&,       \
                                 std::vector<MatT<S>>&);                                                        \
  template void attention_bwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>&, const MatT<S>&,                \
                                 const std::vector<MatT<S>>&, int, int, int, MatT<S>&, MatT<S>&, MatT<S>&);     \
  template void swiglu_fwd<S>(const MatT<S>&, const MatT<S>&, MatT<S>&);                                        \
  template void swiglu_bwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>&, MatT<S>&, MatT<S>&);              \
  template struct BlockParams<S>;                                                                               \
  template void block_fwd<S>(const BlockShape&, const BlockParams<S>&, const MatT<S>&, int64_t, RopeTables&,    \
                             BlockTape<S>&);                                                                    \
  template void block_bwd<S>(const BlockShape&, const BlockParams<S>&, const BlockTape<S>&, const RopeTables&,  \
                             const MatT<S>&, MatT<S>&, BlockParams<S>&);

QL_BLOCK_GRAD_INSTANTIATE(float)
QL_BLOCK_GRAD_INSTANTIATE(double)

}  // namespace ql
