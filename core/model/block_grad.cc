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

/// Number of windows of `window` rows in `rows` (ShapeError unless it divides).
Index check_windows(Index rows, Index window) {
  if (window <= 0 || rows % window != 0)
    throw ShapeError("block_grad: " + std::to_string(rows) + " rows are not whole windows of " +
                     std::to_string(window));
  return rows / window;
}

/// Output columns per product tile of the training path. Wider than the inference forward's
/// kTileCols: every tile packs its input panel again, and a training batch has rows enough to
/// keep the threads busy. Fixed (it sets the summation blocking).
constexpr Index kGradTileCols = 256;

/// Rows per task of the row-wise elementwise ops (scheduling only: rows are independent).
constexpr Index kRowChunk = 64;

/// e^x elementwise: core/detmath in both precisions (same bits on every CPU).
void exp_row(float* x, Index n) { detmath::exp_inplace(x, n); }
void exp_row(double* x, Index n) {
  for (Index i = 0; i < n; ++i) x[i] = detmath::exp(x[i]);
}

template <class S>
void check_cols(const MatT<S>& A, Index cols, const char* what) {
  if (A.cols() != cols)
    throw ShapeError(std::string("block_grad: ") + what + " has " + std::to_string(A.cols()) + " columns, expected " +
                     std::to_string(cols));
}

}  // namespace

// ---------------------------------------------------------------- linear

template <class S>
void linear_fwd_group(const MatT<S>& X, const LinearRef<S>* lin, int n, MatT<S>* const* Y) {
  const Index T = X.rows(), k = X.cols();
  struct Tile {
    int job;
    Index r0, c0;
  };
  std::vector<Tile> tiles;
  for (int j = 0; j < n; ++j) {
    check_cols(X, lin[j].W->cols(), "linear input");
    Y[j]->resize(T, lin[j].W->rows());
    for (Index r0 = 0; r0 < T; r0 += kPanelRows)
      for (Index c0 = 0; c0 < lin[j].W->rows(); c0 += kGradTileCols) tiles.push_back({j, r0, c0});
  }
  for_tasks(static_cast<Index>(tiles.size()), [&](Index i) {
    const Tile& tl = tiles[static_cast<size_t>(i)];
    const MatT<S>& W = *lin[tl.job].W;
    const VecT<S>* b = lin[tl.job].b;
    const Index nout = W.rows();
    const Index rows = std::min(kPanelRows, T - tl.r0), cols = std::min(kGradTileCols, nout - tl.c0);
    S* C = Y[tl.job]->data() + tl.r0 * nout + tl.c0;
    const bool bias = b && b->size() > 0;
    if (bias)
      for (Index r = 0; r < rows; ++r) std::copy(b->data() + tl.c0, b->data() + tl.c0 + cols, C + r * nout);
    gemm(Trans::No, Trans::Yes, rows, cols, k, S(1), X.data() + tl.r0 * k, k, W.data() + tl.c0 * k, k,
         bias ? S(1) : S(0), C, nout);
  });
}

template <class S>
void linear_fwd(const MatT<S>& X, const MatT<S>& W, const VecT<S>* b, MatT<S>& Y) {
  const LinearRef<S> lin{&W, b};
  MatT<S>* out = &Y;
  linear_fwd_group(X, &lin, 1, &out);
}

template <class S>
void linear_bwd_group(const MatT<S>* const* dY, const MatT<S>& X, const LinearRef<S>* lin, int n, MatT<S>* dX,
                      bool accumulate_dx, MatT<S>* const* dW, VecT<S>* const* db) {
  const Index T = X.rows(), k = X.cols();
  for (int j = 0; j < n; ++j) {
    if (dY[j]->rows() != T || dY[j]->cols() != lin[j].W->rows())
      throw ShapeError("block_grad: linear dY shape differs from the output's");
    if (dW && dW[j] && (dW[j]->rows() != lin[j].W->rows() || dW[j]->cols() != k))
      throw ShapeError("block_grad: dW has the wrong shape");
  }
  if (dX) {
    if (!accumulate_dx) dX->resize(T, k);
    else if (dX->rows() != T || dX->cols() != k) throw ShapeError("block_grad: accumulated dX has the wrong shape");
  }
  // Tasks: the dX tiles (each sums its jobs' dY_j W_j in job order), then every job's dW tiles
  // (dW[r0.., c0..] += dY[:, r0..]ᵀ X[:, c0..], one product over all tokens).
  struct Tile {
    int job;  // -1: a dX tile
    Index r0, c0;
  };
  std::vector<Tile> tiles;
  if (dX)
    for (Index r0 = 0; r0 < T; r0 += kPanelRows)
      for (Index c0 = 0; c0 < k; c0 += kGradTileCols) tiles.push_back({-1, r0, c0});
  for (int j = 0; dW && j < n; ++j)
    if (dW[j])
      for (Index r0 = 0; r0 < lin[j].W->rows(); r0 += kPanelRows)
        for (Index c0 = 0; c0 < k; c0 += kGradTileCols) tiles.push_back({j, r0, c0});
  for_tasks(static_cast<Index>(tiles.size()), [&](Index i) {
    const Tile& tl = tiles[static_cast<size_t>(i)];
    if (tl.job < 0) {
      const Index rows = std::min(kPanelRows, T - tl.r0), cols = std::min(kGradTileCols, k - tl.c0);
      for (int j = 0; j < n; ++j) {
        const Index nout = lin[j].W->rows();
        gemm(Trans::No, Trans::No, rows, cols, nout, S(1), dY[j]->data() + tl.r0 * nout, nout,
             lin[j].W->data() + tl.c0, k, (accumulate_dx || j > 0) ? S(1) : S(0), dX->data() + tl.r0 * k + tl.c0, k);
      }
      return;
    }
    const Index nout = lin[tl.job].W->rows();
    const Index rows = std::min(kPanelRows, nout - tl.r0), cols = std::min(kGradTileCols, k - tl.c0);
    gemm(Trans::Yes, Trans::No, rows, cols, T, S(1), dY[tl.job]->data() + tl.r0, nout, X.data() + tl.c0, k, S(1),
         dW[tl.job]->data() + tl.r0 * k + tl.c0, k);
  });
  for (int j = 0; db && j < n; ++j) {
    VecT<S>* bj = db[j];
    if (!bj || bj->size() == 0) continue;
    if (bj->size() != lin[j].W->rows()) throw ShapeError("block_grad: db has the wrong size");
    for (Index t = 0; t < T; ++t)
      for (Index c = 0; c < bj->size(); ++c) (*bj)[c] += (*dY[j])(t, c);
  }
}

template <class S>
void linear_bwd(const MatT<S>& dY, const MatT<S>& X, const MatT<S>& W, MatT<S>* dX, bool accumulate_dx, MatT<S>* dW,
                VecT<S>* db) {
  const LinearRef<S> lin{&W, nullptr};
  const MatT<S>* dy = &dY;
  linear_bwd_group(&dy, X, &lin, 1, dX, accumulate_dx, &dW, &db);
}

// ---------------------------------------------------------------- RMSNorm

template <class S>
void rmsnorm_fwd(const MatT<S>& x, const VecT<S>& w, S eps, MatT<S>& y, VecT<S>& rstd) {
  const Index T = x.rows(), d = x.cols();
  if (w.size() != d) throw ShapeError("block_grad: RMSNorm weight size differs from the width");
  y.resize(T, d);
  rstd.resize(T);
  for_tasks(n_tiles(T, kRowChunk), [&](Index chunk) {
    for (Index t = chunk * kRowChunk; t < std::min(T, (chunk + 1) * kRowChunk); ++t) {
      const S* xr = x.data() + t * d;
      double ss = 0.0;  // mean of squares in double, rounded once (as ops.h's forward)
      for (Index j = 0; j < d; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      const S ms = static_cast<S>(ss / static_cast<double>(d));
      const S r = S(1) / std::sqrt(ms + eps);
      rstd[t] = r;
      S* yr = y.data() + t * d;
      for (Index j = 0; j < d; ++j) yr[j] = w[j] * (xr[j] * r);
    }
  });
}

template <class S>
void rmsnorm_bwd(const MatT<S>& dy, const MatT<S>& x, const VecT<S>& w, const VecT<S>& rstd, MatT<S>& dx,
                 VecT<S>* dw) {
  const Index T = x.rows(), d = x.cols();
  if (dx.rows() != T || dx.cols() != d) throw ShapeError("block_grad: RMSNorm dx has the wrong shape");
  for_tasks(n_tiles(T, kRowChunk), [&](Index chunk) {
    for (Index t = chunk * kRowChunk; t < std::min(T, (chunk + 1) * kRowChunk); ++t) {
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
    }
  });
  if (!dw) return;
  // dw_j += Σ_t dy_tj x_tj r_t, tokens in order (columns are independent).
  for (Index t = 0; t < T; ++t) {
    const S* xr = x.data() + t * d;
    const S* g = dy.data() + t * d;
    const S r = rstd[t];
    for (Index j = 0; j < d; ++j) (*dw)[j] += g[j] * (xr[j] * r);
  }
}

// ---------------------------------------------------------------- RoPE

namespace {

template <class S>
void rotate(MatT<S>& X, Index window, int n_heads, int head_dim, const RopeTables& tab, S sign) {
  const Index half = head_dim / 2;
  check_windows(X.rows(), window);
  if (tab.rows < window || tab.cos.cols() != half)
    throw ShapeError("block_grad: RoPE tables do not cover " + std::to_string(window) + " rows of head_dim " +
                     std::to_string(head_dim));
  for (Index t = 0; t < X.rows(); ++t)
    for (int h = 0; h < n_heads; ++h) {
      S* x = X.data() + t * X.cols() + static_cast<Index>(h) * head_dim;
      const Index pos = t % window;
      for (Index i = 0; i < half; ++i) {
        const S c = tab.cos(pos, i), s = sign * static_cast<S>(tab.sin(pos, i));
        const S x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c - x2 * s;
        x[i + half] = x2 * c + x1 * s;
      }
    }
}

}  // namespace

template <class S>
void rope_fwd(MatT<S>& X, Index window, int n_heads, int head_dim, const RopeTables& tab) {
  rotate<S>(X, window, n_heads, head_dim, tab, S(1));
}

template <class S>
void rope_bwd(MatT<S>& dX, Index window, int n_heads, int head_dim, const RopeTables& tab) {
  rotate<S>(dX, window, n_heads, head_dim, tab, S(-1));
}

// ---------------------------------------------------------------- attention

namespace {

/// Query rows per causal chunk: chunk c of a window only reads keys [0, end of chunk c), so the
/// products skip the upper triangle beyond each chunk (62% of the square at 256 tokens).
constexpr Index kCausalChunk = 64;

/// Row-wise causal softmax of rows [i0, i0 + rows) of a window's scores S (leading dimension
/// ld): row t keeps columns 0..t, the rest become 0 up to column n.
template <class S>
void causal_softmax(S* Sm, Index ld, Index i0, Index rows, Index n) {
  for (Index r = 0; r < rows; ++r) {
    const Index t = i0 + r;
    S* p = Sm + r * ld;
    const S m = *std::max_element(p, p + t + 1);
    for (Index i = 0; i <= t; ++i) p[i] -= m;
    exp_row(p, t + 1);
    S sum = 0;
    for (Index i = 0; i <= t; ++i) sum += p[i];
    const S inv = S(1) / sum;
    for (Index i = 0; i <= t; ++i) p[i] *= inv;
    std::fill(p + t + 1, p + n, S(0));
  }
}

}  // namespace

template <class S>
void attention_fwd(const MatT<S>& Q, const MatT<S>& K, const MatT<S>& V, Index window, int n_heads, int n_kv_heads,
                   int head_dim, MatT<S>& out, std::vector<MatT<S>>& P) {
  const Index T = window, qd = Q.cols(), kvd = K.cols(), hd = head_dim;
  const Index n_win = check_windows(Q.rows(), window);
  const int group = n_heads / n_kv_heads;
  const S scale = S(1) / std::sqrt(static_cast<S>(head_dim));
  out.resize(Q.rows(), qd);
  P.resize(static_cast<size_t>(n_win * n_heads));
  for_tasks(n_win * n_kv_heads, [&](Index task) {
    const Index win = task / n_kv_heads, g = task % n_kv_heads, r0 = win * T;
    const S* Kg = K.data() + r0 * kvd + g * hd;
    const S* Vg = V.data() + r0 * kvd + g * hd;
    for (int j = 0; j < group; ++j) {
      const Index h = g * group + j;
      MatT<S>& Ph = P[static_cast<size_t>(win * n_heads + h)];
      Ph.resize(T, T);
      for (Index i0 = 0; i0 < T; i0 += kCausalChunk) {
        const Index rows = std::min(kCausalChunk, T - i0), n = i0 + rows;
        S* Pc = Ph.data() + i0 * T;
        gemm(Trans::No, Trans::Yes, rows, n, hd, scale, Q.data() + (r0 + i0) * qd + h * hd, qd, Kg, kvd, S(0), Pc, T);
        causal_softmax(Pc, T, i0, rows, n);
        gemm(Trans::No, Trans::No, rows, hd, n, S(1), Pc, T, Vg, kvd, S(0), out.data() + (r0 + i0) * qd + h * hd, qd);
      }
    }
  });
}

template <class S>
void attention_bwd(const MatT<S>& dout, const MatT<S>& Q, const MatT<S>& K, const MatT<S>& V, Index window,
                   const std::vector<MatT<S>>& P, int n_heads, int n_kv_heads, int head_dim, MatT<S>& dQ, MatT<S>& dK,
                   MatT<S>& dV) {
  const Index T = window, qd = Q.cols(), kvd = K.cols(), hd = head_dim;
  const Index n_win = check_windows(Q.rows(), window);
  const int group = n_heads / n_kv_heads;
  const S scale = S(1) / std::sqrt(static_cast<S>(head_dim));
  dQ.resize(Q.rows(), qd);
  dK.setZero(Q.rows(), kvd);
  dV.setZero(Q.rows(), kvd);
  // One task per window and KV head: its query heads and their causal chunks in order, so dK_g
  // and dV_g are summed in a fixed order.
  for_tasks(n_win * n_kv_heads, [&](Index task) {
    const Index win = task / n_kv_heads, g = task % n_kv_heads, r0 = win * T;
    const S* Kg = K.data() + r0 * kvd + g * hd;
    const S* Vg = V.data() + r0 * kvd + g * hd;
    S* dKg = dK.data() + r0 * kvd + g * hd;
    S* dVg = dV.data() + r0 * kvd + g * hd;
    MatT<S> dS(kCausalChunk, T);
    for (int j = 0; j < group; ++j) {
      const Index h = g * group + j;
      const MatT<S>& Ph = P[static_cast<size_t>(win * n_heads + h)];
      for (Index i0 = 0; i0 < T; i0 += kCausalChunk) {
        const Index rows = std::min(kCausalChunk, T - i0), n = i0 + rows;
        const S* Pc = Ph.data() + i0 * T;
        const S* dO = dout.data() + (r0 + i0) * qd + h * hd;
        // dV_g[0, n) += P_cᵀ dout_c;  dP_c = dout_c V_g[0, n)ᵀ (into dS).
        gemm(Trans::Yes, Trans::No, n, hd, rows, S(1), Pc, T, dO, qd, S(1), dVg, kvd);
        gemm(Trans::No, Trans::Yes, rows, n, hd, S(1), dO, qd, Vg, kvd, S(0), dS.data(), T);
        // Softmax backward per row: dS = P ⊙ (dP - Σ_i dP_i P_i).
        for (Index r = 0; r < rows; ++r) {
          S* ds = dS.data() + r * T;
          const S* p = Pc + r * T;
          const Index t = i0 + r;
          S dot = 0;
          for (Index i = 0; i <= t; ++i) dot += ds[i] * p[i];
          for (Index i = 0; i <= t; ++i) ds[i] = p[i] * (ds[i] - dot);
          std::fill(ds + t + 1, ds + n, S(0));
        }
        // Scores were scale · Q_h K_gᵀ: dQ_c = scale dS K_g[0, n), dK_g[0, n) += scale dSᵀ Q_c.
        const S* Qc = Q.data() + (r0 + i0) * qd + h * hd;
        gemm(Trans::No, Trans::No, rows, hd, n, scale, dS.data(), T, Kg, kvd, S(0), dQ.data() + (r0 + i0) * qd + h * hd,
             qd);
        gemm(Trans::Yes, Trans::No, n, hd, rows, scale, dS.data(), T, Qc, qd, S(1), dKg, kvd);
      }
    }
  });
}

// ---------------------------------------------------------------- SwiGLU

template <class S>
void swiglu_fwd(const MatT<S>& g, const MatT<S>& u, MatT<S>& a, MatT<S>& sig) {
  a.resize(g.rows(), g.cols());
  sig.resize(g.rows(), g.cols());
  const Index T = g.rows(), n = g.cols();
  for_tasks(n_tiles(T, kRowChunk), [&](Index chunk) {
    for (Index t = chunk * kRowChunk; t < std::min(T, (chunk + 1) * kRowChunk); ++t) {
      const S* gr = g.data() + t * n;
      const S* ur = u.data() + t * n;
      S* e = sig.data() + t * n;
      S* ar = a.data() + t * n;
      for (Index i = 0; i < n; ++i) e[i] = -gr[i];
      exp_row(e, n);
      for (Index i = 0; i < n; ++i) {
        ar[i] = gr[i] / (S(1) + e[i]) * ur[i];  // as ops.h's fused forward
        e[i] = S(1) / (S(1) + e[i]);
      }
    }
  });
}

template <class S>
void swiglu_bwd(const MatT<S>& da, const MatT<S>& g, const MatT<S>& u, const MatT<S>& sig, MatT<S>& dg, MatT<S>& du) {
  dg.resize(g.rows(), g.cols());
  du.resize(g.rows(), g.cols());
  const Index T = g.rows(), n = g.cols();
  for_tasks(n_tiles(T, kRowChunk), [&](Index chunk) {
    for (Index i = chunk * kRowChunk * n; i < std::min(T, (chunk + 1) * kRowChunk) * n; ++i) {
      const S gi = g.data()[i], s = sig.data()[i], d = da.data()[i];
      // silu'(g) = σ(g) + g σ(g)(1 - σ(g)).
      dg.data()[i] = d * u.data()[i] * s * (S(1) + gi * (S(1) - s));
      du.data()[i] = d * gi * s;
    }
  });
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
  if (blk.q_norm.size() || blk.k_norm.size())
    throw ShapeError("block_grad: the block has per-head q/k norms (Qwen3), which the training graph does not "
                     "model yet; block- and model-level training (FlatQuant, VLMQ, first-order QAT) needs a "
                     "LLaMA/Mistral/Qwen2 block");
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
  s.rope = c.rope;
  return s;
}

template <class S>
void block_fwd(const BlockShape& s, const BlockParams<S>& p, const MatT<S>& x, Index window, int64_t pos0,
               RopeTables& tab, BlockTape<S>& t, const InputQuant<S>& iq) {
  const Index T = window;
  check_windows(x.rows(), window);
  t.window = window;
  const S eps = static_cast<S>(static_cast<float>(s.eps));  // HF adds eps in the input's float32
  t.x = x;
  rmsnorm_fwd(x, p.input_norm, eps, t.xn1, t.rstd1);
  if (iq) iq(LinearKind::Q, t.xn1);
  {
    const LinearRef<S> qkv[3] = {{&p.q, &p.bq}, {&p.k, &p.bk}, {&p.v, &p.bv}};
    MatT<S>* out[3] = {&t.q, &t.k, &t.v};
    linear_fwd_group(t.xn1, qkv, 3, out);
  }
  if (tab.pos0 != pos0 || tab.rows < T) rope_tables(pos0, T, s.head_dim, s.rope, tab);
  rope_fwd(t.q, T, s.n_heads, s.head_dim, tab);
  rope_fwd(t.k, T, s.n_kv_heads, s.head_dim, tab);
  attention_fwd(t.q, t.k, t.v, T, s.n_heads, s.n_kv_heads, s.head_dim, t.attn, t.P);
  if (iq) iq(LinearKind::O, t.attn);
  linear_fwd<S>(t.attn, p.o, nullptr, t.h1);
  t.h1 += x;
  rmsnorm_fwd(t.h1, p.post_attn_norm, eps, t.xn2, t.rstd2);
  if (iq) iq(LinearKind::Gate, t.xn2);
  {
    const LinearRef<S> gu[2] = {{&p.gate, nullptr}, {&p.up, nullptr}};
    MatT<S>* out[2] = {&t.g, &t.u};
    linear_fwd_group(t.xn2, gu, 2, out);
  }
  swiglu_fwd(t.g, t.u, t.a, t.sig);
  if (iq) iq(LinearKind::Down, t.a);
  linear_fwd<S>(t.a, p.down, nullptr, t.y);
  t.y += t.h1;
}

template <class S>
void block_bwd(const BlockShape& s, const BlockParams<S>& p, const BlockTape<S>& t, const RopeTables& tab,
               const MatT<S>& dy, MatT<S>& dx, BlockParams<S>& gr) {
  // MLP branch: y = h1 + down(silu(gate(xn2)) ⊙ up(xn2)), xn2 = RMSNorm(h1).
  auto& [da, dg, du, dxn2, dh1, dattn, dq, dk, dv, dxn1] = t.scratch;
  linear_bwd<S>(dy, t.a, p.down, &da, false, &gr.down, nullptr);
  swiglu_bwd(da, t.g, t.u, t.sig, dg, du);
  {
    const LinearRef<S> gu[2] = {{&p.gate, nullptr}, {&p.up, nullptr}};
    const MatT<S>* d[2] = {&dg, &du};
    MatT<S>* dw[2] = {&gr.gate, &gr.up};
    linear_bwd_group<S>(d, t.xn2, gu, 2, &dxn2, false, dw, nullptr);
  }
  dh1 = dy;  // the residual path
  rmsnorm_bwd(dxn2, t.h1, p.post_attn_norm, t.rstd2, dh1, &gr.post_attn_norm);
  // Attention branch: h1 = x + o(attn(rope(q(xn1)), rope(k(xn1)), v(xn1))), xn1 = RMSNorm(x).
  linear_bwd<S>(dh1, t.attn, p.o, &dattn, false, &gr.o, nullptr);
  attention_bwd(dattn, t.q, t.k, t.v, t.window, t.P, s.n_heads, s.n_kv_heads, s.head_dim, dq, dk, dv);
  rope_bwd(dq, t.window, s.n_heads, s.head_dim, tab);
  rope_bwd(dk, t.window, s.n_kv_heads, s.head_dim, tab);
  {
    const LinearRef<S> qkv[3] = {{&p.q, &p.bq}, {&p.k, &p.bk}, {&p.v, &p.bv}};
    const MatT<S>* d[3] = {&dq, &dk, &dv};
    MatT<S>* dw[3] = {&gr.q, &gr.k, &gr.v};
    VecT<S>* db[3] = {&gr.bq, &gr.bk, &gr.bv};
    linear_bwd_group<S>(d, t.xn1, qkv, 3, &dxn1, false, dw, db);
  }
  dx = dh1;
  rmsnorm_bwd(dxn1, t.x, p.input_norm, t.rstd1, dx, &gr.input_norm);
}

#define QL_BLOCK_GRAD_INSTANTIATE(S)                                                                              \
  template void linear_fwd<S>(const MatT<S>&, const MatT<S>&, const VecT<S>*, MatT<S>&);                        \
  template void linear_fwd_group<S>(const MatT<S>&, const LinearRef<S>*, int, MatT<S>* const*);                 \
  template void linear_bwd_group<S>(const MatT<S>* const*, const MatT<S>&, const LinearRef<S>*, int, MatT<S>*,  \
                                    bool, MatT<S>* const*, VecT<S>* const*);                                    \
  template void linear_bwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>&, MatT<S>*, bool, MatT<S>*,         \
                              VecT<S>*);                                                                        \
  template void rmsnorm_fwd<S>(const MatT<S>&, const VecT<S>&, S, MatT<S>&, VecT<S>&);                          \
  template void rmsnorm_bwd<S>(const MatT<S>&, const MatT<S>&, const VecT<S>&, const VecT<S>&, MatT<S>&,        \
                               VecT<S>*);                                                                       \
  template void rope_fwd<S>(MatT<S>&, Index, int, int, const RopeTables&);                                      \
  template void rope_bwd<S>(MatT<S>&, Index, int, int, const RopeTables&);                                      \
  template void attention_fwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>&, Index, int, int, int,          \
                                 MatT<S>&, std::vector<MatT<S>>&);                                              \
  template void attention_bwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>&, const MatT<S>&, Index,         \
                                 const std::vector<MatT<S>>&, int, int, int, MatT<S>&, MatT<S>&, MatT<S>&);     \
  template void swiglu_fwd<S>(const MatT<S>&, const MatT<S>&, MatT<S>&, MatT<S>&);                              \
  template void swiglu_bwd<S>(const MatT<S>&, const MatT<S>&, const MatT<S>&, const MatT<S>&, MatT<S>&,         \
                              MatT<S>&);                                                                        \
  template struct BlockParams<S>;                                                                               \
  template void block_fwd<S>(const BlockShape&, const BlockParams<S>&, const MatT<S>&, Index, int64_t,         \
                             RopeTables&, BlockTape<S>&, const InputQuant<S>&);                                                                    \
  template void block_bwd<S>(const BlockShape&, const BlockParams<S>&, const BlockTape<S>&, const RopeTables&,  \
                             const MatT<S>&, MatT<S>&, BlockParams<S>&);

QL_BLOCK_GRAD_INSTANTIATE(float)
QL_BLOCK_GRAD_INSTANTIATE(double)

}  // namespace ql
