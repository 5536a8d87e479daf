#include "core/quant_grad.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/detmath.h"
#include "core/error.h"

namespace ql {

namespace {

constexpr Index kRows = 64;  // rows per task (scheduling only: rows are independent)

template <class F>
void for_row_chunks(Index rows, const F& f) {
  const Index n = (rows + kRows - 1) / kRows;
  auto body = [&](Index c) {
    for (Index i = c * kRows; i < std::min(rows, (c + 1) * kRows); ++i) f(i);
  };
  if (n <= 1 || omp_in_parallel()) {
    for (Index c = 0; c < n; ++c) body(c);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (Index c = 0; c < n; ++c) body(c);
}

template <class S>
S sigmoid(S a) {
  return S(1) / (S(1) + static_cast<S>(detmath::exp(-static_cast<double>(a))));
}

/// Index of row i's logit pair: shared (one pair) or per row. -1: no clipping.
Index logit_index(Index n_logits, Index rows, Index i) {
  if (n_logits == 0) return -1;
  if (n_logits == 1) return 0;
  if (n_logits != rows)
    throw ShapeError("fake_quant: " + std::to_string(n_logits) + " clipping logits for " + std::to_string(rows) +
                     " rows (expected 0, 1 or one per row)");
  return i;
}

/// One row's clipping state and range, shared by the forward and the backward.
template <class S>
struct RowState {
  S sa = 1, sb = 1;           // σ(α), σ(β) (1 without clipping)
  S rmax = 0, rmin = 0;       // of x (ClampValues) 
  S hi_b = 0, lo_b = 0;       // ClampValues bounds
  S cmax = 0, cmin = 0;       // of x'
  S ratio_hi = 1, ratio_lo = 1;
  S hi = 0, lo = 0;           // the range after ratios and the zero clamp
  S scale = 1, zero = 0;
  bool fixed = false;         // scale independent of x
  S qmin = 0, qmax = 0;       // integer clamp bounds
  S qdiv = 1;                 // 2^(b-1) - 1 (sym) or 2^b - 1 (asym)
};

template <class S>
RowState<S> row_state(const S* x, Index n, const FakeQuantGrad& spec, Index li, const VecT<S>& lh, const VecT<S>& ll,
                      S* xc) {
  RowState<S> st;
  const bool clip = li >= 0;
  if (clip) {
    st.sa = sigmoid(lh[li]);
    st.sb = sigmoid(ll[li]);
  }
  const S* xs = x;
  if (spec.clip == ClipStyle::ClampValues && clip) {
    st.rmax = *std::max_element(x, x + n);
    st.rmin = *std::min_element(x, x + n);
    st.hi_b = st.rmax * st.sa;
    st.lo_b = st.rmin * st.sb;
    for (Index j = 0; j < n; ++j) xc[j] = std::min(std::max(x[j], st.lo_b), st.hi_b);  // torch.clamp(min, max)
    xs = xc;
  } else if (clip) {
    st.ratio_hi = st.sa;
    st.ratio_lo = st.sb;
  }
  st.cmax = *std::max_element(xs, xs + n);
  st.cmin = *std::min_element(xs, xs + n);
  st.hi = std::max(st.cmax, S(0)) * st.ratio_hi;
  st.lo = std::min(st.cmin, S(0)) * st.ratio_lo;
  const S floor = static_cast<S>(spec.min_range);
  if (spec.symmetric) {
    st.qdiv = static_cast<S>((1 << (spec.bits - 1)) - 1);
    st.qmax = st.qdiv;
    st.qmin = -st.qdiv - 1;
    S m = std::max(-st.lo, st.hi);
    if (floor > 0 && m < floor) {
      m = floor;
      st.fixed = true;
    }
    if (m == 0) {
      st.scale = 1;
      st.fixed = true;
    } else {
      st.scale = m / st.qdiv;
    }
  } else {
    st.qdiv = static_cast<S>((1 << spec.bits) - 1);
    st.qmax = st.qdiv;
    st.qmin = 0;
    S lo = st.lo, hi = st.hi;
    if (lo == 0 && hi == 0) {
      lo = -1;
      hi = 1;
      st.fixed = true;
    }
    S r = hi - lo;
    if (floor > 0 && r < floor) {
      r = floor;
      st.fixed = true;
    }
    st.scale = r / st.qdiv;
    st.zero = std::nearbyint(-lo / st.scale);  // torch.round: half to even, no gradient
  }
  return st;
}

/// Adds g to the elements of x equal to v, split evenly (amax / amin's backward).
template <class S>
void route_extreme(const S* x, Index n, S v, S g, S* dx) {
  if (g == 0) return;
  Index count = 0;
  for (Index j = 0; j < n; ++j) count += x[j] == v;
  const S share = g / static_cast<S>(count);
  for (Index j = 0; j < n; ++j)
    if (x[j] == v) dx[j] += share;
}

/// torch.maximum(a, 0)'s derivative in a (½ at the tie), likewise minimum.
template <class S>
S relu_grad(S a) {
  return a > 0 ? S(1) : (a == 0 ? S(0.5) : S(0));
}

}  // namespace

template <class S>
void fake_quant_fwd(const MatT<S>& X, const FakeQuantGrad& spec, const VecT<S>& logit_hi, const VecT<S>& logit_lo,
                    MatT<S>& Y, FakeQuantTape<S>& tape) {
  if (spec.bits < 2 || spec.bits > 16) throw ShapeError("fake_quant: bits must lie in [2, 16]");
  if (logit_hi.size() != logit_lo.size()) throw ShapeError("fake_quant: logit_hi and logit_lo differ in size");
  const Index rows = X.rows(), n = X.cols();
  Y.resize(rows, n);
  tape.scale.resize(rows);
  tape.zero.resize(rows);
  tape.scale_fixed.assign(static_cast<size_t>(rows), 0);
  const bool clamp_values = spec.clip == ClipStyle::ClampValues && logit_hi.size() > 0;
  if (clamp_values) tape.xc.resize(rows, n);
  else tape.xc.resize(0, 0);
  for_row_chunks(rows, [&](Index i) {
    const Index li = logit_index(logit_hi.size(), rows, i);
    const S* x = X.data() + i * n;
    S* xc = clamp_values ? tape.xc.data() + i * n : nullptr;
    const RowState<S> st = row_state(x, n, spec, li, logit_hi, logit_lo, xc);
    tape.scale[i] = st.scale;
    tape.zero[i] = st.zero;
    tape.scale_fixed[static_cast<size_t>(i)] = st.fixed;
    const S* xs = clamp_values ? xc : x;
    S* y = Y.data() + i * n;
    for (Index j = 0; j < n; ++j) {
      const S r = xs[j] / st.scale;
      const S q = std::min(std::max((spec.round_values ? std::nearbyint(r) : r) + st.zero, st.qmin), st.qmax);
      y[j] = st.scale * (q - st.zero);
    }
  });
}

template <class S>
void fake_quant_bwd(const MatT<S>& dY, const MatT<S>& X, const FakeQuantGrad& spec, const VecT<S>& logit_hi,
                    const VecT<S>& logit_lo, const FakeQuantTape<S>& tape, MatT<S>& dX, VecT<S>* dlogit_hi,
                    VecT<S>* dlogit_lo) {
  const Index rows = X.rows(), n = X.cols();
  if (dY.rows() != rows || dY.cols() != n || tape.scale.size() != rows)
    throw ShapeError("fake_quant: backward shapes differ from the forward's");
  dX.setZero(rows, n);
  const bool clip = logit_hi.size() > 0;
  const bool clamp_values = spec.clip == ClipStyle::ClampValues && clip;
  // Per-row logit gradients, summed in row order afterwards (thread-count independent).
  VecT<S> da = VecT<S>::Zero(clip ? rows : 0), db = VecT<S>::Zero(clip ? rows : 0);
  for_row_chunks(rows, [&](Index i) {
    const Index li = logit_index(logit_hi.size(), rows, i);
    const S* x = X.data() + i * n;
    std::vector<S> xc_row(clamp_values ? static_cast<size_t>(n) : 0);
    const RowState<S> st = row_state(x, n, spec, li, logit_hi, logit_lo, xc_row.data());
    const S* xs = clamp_values ? xc_row.data() : x;
    const S* g = dY.data() + i * n;
    std::vector<S> dxs(static_cast<size_t>(n), S(0));
    S ds = 0;
    for (Index j = 0; j < n; ++j) {
      const S r = xs[j] / st.scale;
      const S qi = (spec.round_values ? std::nearbyint(r) : r) + st.zero;
      const bool pass = qi >= st.qmin && qi <= st.qmax;
      const S q = std::min(std::max(qi, st.qmin), st.qmax);
      if (pass) dxs[j] = g[j];
      ds += g[j] * ((q - st.zero) - (pass ? r : S(0)));  // y = s(q - z): ∂y/∂s with round' = 1
    }
    if (!st.fixed) {
      S dhi = 0, dlo = 0;
      if (spec.symmetric) {  // s = max(|lo|, hi) / qdiv
        const S dm = ds / st.qdiv, abs_lo = -st.lo;
        if (st.hi > abs_lo) dhi = dm;
        else if (abs_lo > st.hi) dlo = -dm;
        else {
          dhi = dm / 2;
          dlo = st.lo < 0 ? -dm / 2 : S(0);
        }
      } else {  // s = (hi - lo) / qdiv
        dhi = ds / st.qdiv;
        dlo = -ds / st.qdiv;
      }
      if (clip && !clamp_values) {  // hi = max(cmax, 0) σ(α): LAC
        da[i] += dhi * std::max(st.cmax, S(0)) * st.sa * (S(1) - st.sa);
        db[i] += dlo * std::min(st.cmin, S(0)) * st.sb * (S(1) - st.sb);
      }
      route_extreme(xs, n, st.cmax, dhi * st.ratio_hi * relu_grad(st.cmax), dxs.data());
      route_extreme(xs, n, st.cmin, dlo * st.ratio_lo * relu_grad(-st.cmin), dxs.data());
    }
    S* dx = dX.data() + i * n;
    if (!clamp_values) {
      std::copy(dxs.begin(), dxs.end(), dx);
      return;
    }
    // x' = clamp(x, rmin σ(β), rmax σ(α)): clipped elements pass their gradient to the bound (LWC).
    S dhi_b = 0, dlo_b = 0;
    for (Index j = 0; j < n; ++j) {
      if (x[j] > st.hi_b) dhi_b += dxs[j];
      else if (x[j] < st.lo_b) dlo_b += dxs[j];
      else dx[j] += dxs[j];
    }
    da[i] += dhi_b * st.rmax * st.sa * (S(1) - st.sa);
    db[i] += dlo_b * st.rmin * st.sb * (S(1) - st.sb);
    route_extreme(x, n, st.rmax, dhi_b * st.sa, dx);
    route_extreme(x, n, st.rmin, dlo_b * st.sb, dx);
  });
  if (!clip) return;
  if ((dlogit_hi && dlogit_hi->size() != logit_hi.size()) || (dlogit_lo && dlogit_lo->size() != logit_lo.size()))
    throw ShapeError("fake_quant: logit gradients differ in size from the logits");
  for (Index i = 0; i < rows; ++i) {
    const Index li = logit_index(logit_hi.size(), rows, i);
    if (dlogit_hi) (*dlogit_hi)[li] += da[i];
    if (dlogit_lo) (*dlogit_lo)[li] += db[i];
  }
}

template <class S>
void clip_rows_fwd(const MatT<S>& X, const VecT<S>& logit_hi, const VecT<S>& logit_lo, MatT<S>& Y) {
  const Index rows = X.rows(), n = X.cols();
  Y.resize(rows, n);
  for_row_chunks(rows, [&](Index i) {
    const Index li = logit_index(logit_hi.size(), rows, i);
    const S* x = X.data() + i * n;
    S* y = Y.data() + i * n;
    if (li < 0) {
      std::copy(x, x + n, y);
      return;
    }
    const S hi = *std::max_element(x, x + n) * sigmoid(logit_hi[li]);
    const S lo = *std::min_element(x, x + n) * sigmoid(logit_lo[li]);
    for (Index j = 0; j < n; ++j) y[j] = std::min(std::max(x[j], lo), hi);
  });
}

template <class S>
void clip_rows_bwd(const MatT<S>& dY, const MatT<S>& X, const VecT<S>& logit_hi, const VecT<S>& logit_lo, MatT<S>& dX,
                   VecT<S>* dlogit_hi, VecT<S>* dlogit_lo) {
  const Index rows = X.rows(), n = X.cols();
  dX.setZero(rows, n);
  const bool clip = logit_hi.size() > 0;
  VecT<S> da = VecT<S>::Zero(clip ? rows : 0), db = VecT<S>::Zero(clip ? rows : 0);
  for_row_chunks(rows, [&](Index i) {
    const Index li = logit_index(logit_hi.size(), rows, i);
    const S* x = X.data() + i * n;
    const S* g = dY.data() + i * n;
    S* dx = dX.data() + i * n;
    if (li < 0) {
      std::copy(g, g + n, dx);
      return;
    }
    const S sa = sigmoid(logit_hi[li]), sb = sigmoid(logit_lo[li]);
    const S rmax = *std::max_element(x, x + n), rmin = *std::min_element(x, x + n);
    const S hi = rmax * sa, lo = rmin * sb;
    S dhi = 0, dlo = 0;
    for (Index j = 0; j < n; ++j) {
      if (x[j] > hi) dhi += g[j];
      else if (x[j] < lo) dlo += g[j];
      else dx[j] += g[j];
    }
    da[i] = dhi * rmax * sa * (S(1) - sa);
    db[i] = dlo * rmin * sb * (S(1) - sb);
    route_extreme(x, n, rmax, dhi * sa, dx);
    route_extreme(x, n, rmin, dlo * sb, dx);
  });
  for (Index i = 0; clip && i < rows; ++i) {
    const Index li = logit_index(logit_hi.size(), rows, i);
    if (dlogit_hi) (*dlogit_hi)[li] += da[i];
    if (dlogit_lo) (*dlogit_lo)[li] += db[i];
  }
}

#define QL_QUANT_GRAD_INSTANTIATE(S)                                                                              \
  template void fake_quant_fwd<S>(const MatT<S>&, const FakeQuantGrad&, const VecT<S>&, const VecT<S>&, MatT<S>&, \
                                  FakeQuantTape<S>&);                                                             \
  template void fake_quant_bwd<S>(const MatT<S>&, const MatT<S>&, const FakeQuantGrad&, const VecT<S>&,           \
                                  const VecT<S>&, const FakeQuantTape<S>&, MatT<S>&, VecT<S>*, VecT<S>*);        \
  template void clip_rows_fwd<S>(const MatT<S>&, const VecT<S>&, const VecT<S>&, MatT<S>&);                        \
  template void clip_rows_bwd<S>(const MatT<S>&, const MatT<S>&, const VecT<S>&, const VecT<S>&, MatT<S>&,         \
                                 VecT<S>*, VecT<S>*);

QL_QUANT_GRAD_INSTANTIATE(float)
QL_QUANT_GRAD_INSTANTIATE(double)

}  // namespace ql
