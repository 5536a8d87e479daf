#include "algorithms/flatquant/trainer.h"

#include "algorithms/flatquant/block_graph.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/detmath.h"
#include "core/error.h"
#include "core/linalg.h"
#include "core/model/block_grad.h"
#include "core/optim.h"
#include "core/quant_grad.h"
#include "core/rng.h"

namespace ql {

FactorParam FactorParam::random(Index n, uint64_t seed, uint64_t stream, FactorForm form) {
  FactorParam p;
  p.form = form;
  p.xu = random_orthogonal(n, seed, mix_stream(stream, 0)).cast<float>();
  if (form == FactorForm::Svd) {
    p.xv = random_orthogonal(n, seed, mix_stream(stream, 1)).cast<float>();
    p.sigma = Vector::Ones(n);
  }
  p.zero_grad();
  return p;
}

void FactorParam::materialize() {
  if (form == FactorForm::DirectInverse) {
    M = xu.cast<double>();
    inverse_t_fwd(M, M_inv_t);
    return;
  }
  svd_factor_fwd(xu.cast<double>(), xv.cast<double>(), sigma.cast<double>(), M, M_inv_t, tape);
}

void FactorParam::zero_grad() {
  gxu.setZero(xu.rows(), xu.cols());
  gxv.setZero(xv.rows(), xv.cols());
  gsigma.setZero(sigma.size());
}

void FactorParam::backward(const Matrix& dM, const Matrix& dM_inv_t) {
  if (form == FactorForm::DirectInverse) {
    MatrixD d = dM.cast<double>();
    inverse_t_bwd(dM_inv_t.cast<double>(), M_inv_t, d);
    gxu += d.cast<float>();
    return;
  }
  const Index n = sigma.size();
  MatrixD dxu = MatrixD::Zero(n, n), dxv = MatrixD::Zero(n, n);
  VectorD ds = VectorD::Zero(n);
  svd_factor_bwd(dM.cast<double>(), dM_inv_t.cast<double>(), tape, dxu, dxv, ds);
  gxu += dxu.cast<float>();
  gxv += dxv.cast<float>();
  gsigma += ds.cast<float>();
}

double FactorParam::condition() const {
  if (form == FactorForm::DirectInverse) {
    const VectorD sv = Eigen::JacobiSVD<MatrixD>(M).singularValues();
    return sv[0] / sv[sv.size() - 1];
  }
  const VectorD a = sigma.cast<double>().cwiseAbs();
  return a.maxCoeff() / a.minCoeff();
}

namespace {

float sigmoidf(float a) { return static_cast<float>(1.0 / (1.0 + detmath::exp(-static_cast<double>(a)))); }

/// The weight grid the trainer simulates (FlatQuant's weight quantizer: per output row,
/// min-max range, clamped to >= 1e-5; LWC clamps the row's values first).
FakeQuantGrad weight_grid(const QuantSpec& s, bool lwc) {
  if (s.granularity != Granularity::PerChannel)
    throw ConfigError(SourceLoc{}, "weight",
                      "flatquant trains against per-channel weight grids (one range per output row); the weight step "
                      "that follows has another granularity");
  if (s.scheme == QuantScheme::SymOffset)
    throw ConfigError(SourceLoc{}, "weight", "flatquant simulates sym or asym weight grids, not sym_offset");
  if (lwc && s.range != RangeMethod::MinMax)
    throw ConfigError(SourceLoc{}, "weight",
                      "learned weight clipping replaces the range search: use range minmax in the weight step "
                      "(or lwc: false)");
  FakeQuantGrad g;
  g.bits = s.bits;
  g.symmetric = s.scheme == QuantScheme::Sym;
  g.clip = ClipStyle::ClampValues;
  g.min_range = 1e-5;
  return g;
}

/// The activation quantizer (per token, dynamic; LAC scales each token's range).
FakeQuantGrad act_grid(const ActQuantSpec& s) {
  if (s.granularity != ActGranularity::PerToken || s.mode != ActRangeMode::Dynamic)
    throw ConfigError(SourceLoc{}, "act", "flatquant trains against per-token dynamic activation quantizers");
  if (s.clip_ratio != 1.0)
    throw ConfigError(SourceLoc{}, "act.clip_ratio", "flatquant learns the activation clipping; leave clip_ratio at 1");
  FakeQuantGrad g;
  g.bits = s.bits;
  g.symmetric = s.scheme == QuantScheme::Sym;
  g.clip = ClipStyle::ScaleRange;
  return g;
}

/// The KV cache's grids (FlatQuant's K/V quantizers: asymmetric per token and channel group,
/// LAC scaling each range) on post-RoPE keys.
void set_kv_grids(const ScalarKvSpec& kv, const ModelConfig& cfg, FlatBlockGrids& grids) {
  if (kv.keys_per_channel || kv.key_stage != KvStage::PostRope)
    throw ShapeError("flatquant: simulates per-token post-RoPE KV grids only");
  const Index g = kv.group_size > 0 ? kv.group_size : cfg.head_dim;
  if (g <= 0 || (static_cast<Index>(cfg.num_kv_heads) * cfg.head_dim) % g != 0)
    throw ShapeError("flatquant: KV channel group " + std::to_string(g) + " does not divide the KV width");
  grids.kv = true;
  grids.kv_group = g;
  for (auto [grid, bits] : {std::pair{&grids.key, kv.key_bits}, {&grids.value, kv.value_bits}}) {
    grid->bits = bits;
    grid->symmetric = false;
    grid->clip = ClipStyle::ScaleRange;
  }
}

/// c_j = max(max|W_:j|^(1-α) / max|x_j|^α, 1e-5), max|x_j| over the calibration tokens (the
/// reference's running max starts at 1e-5).
Vector smooth_init(const Matrix& X, const Matrix& W, double alpha) {
  Vector c(X.cols());
  for (Index j = 0; j < X.cols(); ++j) {
    const double xm = std::max(static_cast<double>(X.col(j).cwiseAbs().maxCoeff()), 1e-5);
    const double wm = W.col(j).cwiseAbs().maxCoeff();
    c[j] = static_cast<float>(std::max(detmath::pow(wm, 1 - alpha) / detmath::pow(xm, alpha), 1e-5));
  }
  return c;
}

/// Trainable state of one layer and its two optimiser groups.
struct LayerParams {
  FactorParam f1, f2;
  Vector c, gc;
  Vector wc_hi, wc_lo, gwc_hi, gwc_lo;  // LWC, per output row
  Vector ac_hi, ac_lo, gac_hi, gac_lo;  // LAC, one pair
};

/// After training (ALGORITHMS.md §5.1): P = diag(c)(P1 ⊗ P2) online, W merged in double, then
/// the learned clipping of each of its first nw rows.
void materialize_layer(LayerParams& p, const Matrix& W, bool add_diag, Index nw, FlatLayerResult& res) {
  p.f1.materialize();
  p.f2.materialize();
  res.cond_p1 = p.f1.condition();
  res.cond_p2 = p.f2.condition();
  InputTransform P = InputTransform::kronecker(TransformFactor{p.f1.M, p.f1.M_inv_t}, TransformFactor{p.f2.M, p.f2.M_inv_t});
  if (add_diag) P = P.with_channel_scale(p.c.cast<double>());
  res.transform = std::make_shared<const InputTransform>(std::move(P));
  res.weight = W;
  merge_input_transform(res.weight, *res.transform);
  for (Index r = 0; r < nw; ++r) {
    auto row = res.weight.row(r);
    const float hi = row.maxCoeff() * sigmoidf(p.wc_hi[r]), lo = row.minCoeff() * sigmoidf(p.wc_lo[r]);
    row = row.cwiseMax(lo).cwiseMin(hi);
  }
}

}  // namespace

FlatLayerResult train_flat_layer(const Matrix& X, const Matrix& W, const QuantSpec* wspec, const ActQuantSpec* aspec,
                                 Index batch_tokens, const FlatTrainOptions& o) {
  const Index d = X.cols(), N = X.rows();
  if (W.cols() != d || N < 1 || batch_tokens < 1) throw ShapeError("flatquant: calibration inputs and weight disagree");
  const bool wq = wspec && wspec->quantized(), aq = aspec && aspec->quantized();
  const FakeQuantGrad wg = wq ? weight_grid(*wspec, o.lwc) : FakeQuantGrad{};
  const FakeQuantGrad ag = aq ? act_grid(*aspec) : FakeQuantGrad{};
  const auto [n1, n2] = kronecker_factor_sizes(d);
  LayerParams p;
  p.f1 = FactorParam::random(n1, o.seed, mix_stream(o.stream, 1), o.form);
  p.f2 = FactorParam::random(n2, o.seed, mix_stream(o.stream, 2), o.form);
  p.c = o.add_diag ? smooth_init(X, W, o.diag_alpha) : Vector::Ones(d);
  const Index nw = o.lwc && wq ? W.rows() : 0, na = o.lac && aq ? 1 : 0;
  p.wc_hi = p.wc_lo = Vector::Constant(nw, 4.0f);
  p.ac_hi = p.ac_lo = Vector::Constant(na, 4.0f);

  AdamWOptions main_opt, clip_opt;
  main_opt.lr = o.lr;
  main_opt.weight_decay = clip_opt.weight_decay = o.weight_decay;
  clip_opt.lr = o.lr * o.clip_lr_factor;
  AdamW opt_main(main_opt), opt_clip(clip_opt);
  std::vector<const float*> g_main, g_clip;
  if (o.train_transform)
    for (FactorParam* f : {&p.f1, &p.f2}) {
      opt_main.add(f->xu.data(), f->xu.size());
      g_main.push_back(f->gxu.data());
      if (f->form == FactorForm::Svd) {
        opt_main.add(f->xv.data(), f->xv.size());
        opt_main.add(f->sigma.data(), f->sigma.size());
        g_main.insert(g_main.end(), {f->gxv.data(), f->gsigma.data()});
      }
    }
  p.gc.setZero(d);
  if (o.add_diag) {
    opt_main.add(p.c.data(), d);
    g_main.push_back(p.gc.data());
  }
  p.gwc_hi.setZero(nw);
  p.gwc_lo.setZero(nw);
  p.gac_hi.setZero(na);
  p.gac_lo.setZero(na);
  for (auto [v, g] : {std::pair{&p.wc_hi, &p.gwc_hi}, {&p.wc_lo, &p.gwc_lo}, {&p.ac_hi, &p.gac_hi}, {&p.ac_lo, &p.gac_lo}})
    if (v->size() > 0) {
      opt_clip.add(v->data(), v->size());
      g_clip.push_back(g->data());
    }

  const Index n_batches = (N + batch_tokens - 1) / batch_tokens;
  const int64_t total = static_cast<int64_t>(o.epochs) * n_batches;
  FlatLayerResult res;
  Matrix Xb, Yref, Xs, Xt, Xq, Ws, Wt, Wq, Y, dY, dXq, dWq, dXt, dWt, dXs, dWs, dM1, dM2, dMi1, dMi2;
  FakeQuantTape<float> at, wt;
  int64_t t = 0;
  for (int epoch = 0; epoch < o.epochs; ++epoch) {
    double epoch_loss = 0;
    for (Index b = 0; b < n_batches; ++b, ++t) {
      const Index r0 = b * batch_tokens, m = std::min(batch_tokens, N - r0);
      Xb = X.middleRows(r0, m);
      Yref = matmul_nt(Xb, W);
      p.f1.materialize();
      p.f2.materialize();
      const Matrix M1 = p.f1.M.cast<float>(), M2 = p.f2.M.cast<float>();
      const Matrix Mi1 = p.f1.M_inv_t.cast<float>(), Mi2 = p.f2.M_inv_t.cast<float>();
      // Forward: x' = Q_a(((x ⊙ c)(P1 ⊗ P2)), W' = Q_w(clip((W / c)(P1⁻ᵀ ⊗ P2⁻ᵀ))), y = x' W'ᵀ.
      scale_cols_fwd<float>(Xb, p.c, false, Xs);
      kron_rows_fwd<float>(Xs, &M1, &M2, Xt);
      if (aq) fake_quant_fwd<float>(Xt, ag, p.ac_hi, p.ac_lo, Xq, at);
      else Xq = Xt;
      scale_cols_fwd<float>(W, p.c, true, Ws);
      kron_rows_fwd<float>(Ws, &Mi1, &Mi2, Wt);
      if (wq) fake_quant_fwd<float>(Wt, wg, p.wc_hi, p.wc_lo, Wq, wt);
      else Wq = Wt;
      linear_fwd<float>(Xq, Wq, nullptr, Y);
      dY = Y - Yref;
      const double loss = static_cast<double>(dY.squaredNorm()) / static_cast<double>(dY.size());
      epoch_loss += loss;
      // d(loss / loss.detach())/dY = 2 (Y - Yref) / (numel · loss).
      dY *= static_cast<float>(2.0 / (static_cast<double>(dY.size()) * std::max(loss, 1e-30)));
      dWq.setZero(Wq.rows(), Wq.cols());
      linear_bwd<float>(dY, Xq, Wq, &dXq, false, &dWq, nullptr);
      if (aq) fake_quant_bwd<float>(dXq, Xt, ag, p.ac_hi, p.ac_lo, at, dXt, &p.gac_hi, &p.gac_lo);
      else dXt = dXq;
      if (wq) fake_quant_bwd<float>(dWq, Wt, wg, p.wc_hi, p.wc_lo, wt, dWt, &p.gwc_hi, &p.gwc_lo);
      else dWt = dWq;
      dM1.setZero(n1, n1);
      dM2.setZero(n2, n2);
      dMi1.setZero(n1, n1);
      dMi2.setZero(n2, n2);
      kron_rows_bwd<float>(dXt, Xs, &M1, &M2, &dXs, &dM1, &dM2);
      kron_rows_bwd<float>(dWt, Ws, &Mi1, &Mi2, &dWs, &dMi1, &dMi2);
      scale_cols_bwd<float>(dXs, Xb, p.c, false, nullptr, &p.gc);
      scale_cols_bwd<float>(dWs, W, p.c, true, nullptr, &p.gc);
      p.f1.backward(dM1, dMi1);
      p.f2.backward(dM2, dMi2);
      if (!g_main.empty()) opt_main.step(g_main, cosine_lr(o.lr, t, total));
      if (!g_clip.empty()) opt_clip.step(g_clip, cosine_lr(o.lr * o.clip_lr_factor, t, total));
      p.f1.zero_grad();
      p.f2.zero_grad();
      for (Vector* g : {&p.gc, &p.gwc_hi, &p.gwc_lo, &p.gac_hi, &p.gac_lo}) g->setZero();
    }
    epoch_loss /= static_cast<double>(n_batches);
    if (epoch == 0) res.loss_first_epoch = epoch_loss;
    res.loss_last_epoch = epoch_loss;
  }
  res.steps = static_cast<int>(total);

  materialize_layer(p, W, o.add_diag, nw, res);
  if (na > 0) res.act_clip = ActClip{sigmoidf(p.ac_lo[0]), sigmoidf(p.ac_hi[0])};
  return res;
}

}  // namespace ql

// ---------------------------------------------------------------- block-wise training

namespace ql {

namespace {

/// The trainable state of one block: eight factors (nine with P_k), three channel scales, LWC
/// and LAC logits per linear, the KV grids' LAC logits, with their gradients.
struct BlockState {
  FactorParam a1, a2, u1, u2, d1, d2, v, o, k;
  bool has_k = false;  ///< P_k trains (a simulated KV cache)
  Vector ca, cu, cd, gca, gcu, gcd;
  std::array<Vector, kLinearKinds> lwc_hi, lwc_lo, lac_hi, lac_lo, glwc_hi, glwc_lo, glac_hi, glac_lo;
  std::array<Vector, 2> kv_hi, kv_lo, gkv_hi, gkv_lo;  ///< K [0] and V [1] cache grids' LAC

  std::vector<FactorParam*> factors() {
    std::vector<FactorParam*> f = {&a1, &a2, &u1, &u2, &d1, &d2, &v, &o};
    if (has_k) f.push_back(&k);
    return f;
  }
};

/// Column-wise max |x| over the rows of X.
Vector col_absmax(const Matrix& X) { return X.cwiseAbs().colwise().maxCoeff().transpose(); }

/// max over rows |W| of stacked weights, per input column.
Vector weight_absmax(std::initializer_list<const Matrix*> ws) {
  Vector m = Vector::Zero((*ws.begin())->cols());
  for (const Matrix* W : ws) m = m.cwiseMax(W->cwiseAbs().colwise().maxCoeff().transpose());
  return m;
}

Vector smooth_scale(const Vector& wmax, const Vector& xmax, double alpha) {
  Vector c(wmax.size());
  for (Index j = 0; j < c.size(); ++j)
    c[j] = static_cast<float>(std::max(detmath::pow(wmax[j], 1 - alpha) / detmath::pow(xmax[j], alpha), 1e-5));
  return c;
}

void fill_transforms(BlockState& st, FlatBlockTransforms<float>& t) {
  for (FactorParam* f : st.factors()) f->materialize();
  auto m = [](const FactorParam& f) { return f.M.cast<float>().eval(); };
  auto mi = [](const FactorParam& f) { return f.M_inv_t.cast<float>().eval(); };
  t.a1 = m(st.a1), t.a2 = m(st.a2), t.a1i = mi(st.a1), t.a2i = mi(st.a2), t.ca = st.ca;
  t.u1 = m(st.u1), t.u2 = m(st.u2), t.u1i = mi(st.u1), t.u2i = mi(st.u2), t.cu = st.cu;
  t.d1 = m(st.d1), t.d2 = m(st.d2), t.d1i = mi(st.d1), t.d2i = mi(st.d2), t.cd = st.cd;
  t.v = m(st.v), t.vi = mi(st.v), t.o = m(st.o), t.oi = mi(st.o);
  if (st.has_k) t.k = m(st.k), t.ki = mi(st.k);
  t.lwc_hi = st.lwc_hi, t.lwc_lo = st.lwc_lo, t.lac_hi = st.lac_hi, t.lac_lo = st.lac_lo;
  t.kv_hi = st.kv_hi, t.kv_lo = st.kv_lo;
}

void take_grads(BlockState& st, const FlatBlockTransforms<float>& g) {
  st.a1.backward(g.a1, g.a1i);
  st.a2.backward(g.a2, g.a2i);
  st.u1.backward(g.u1, g.u1i);
  st.u2.backward(g.u2, g.u2i);
  st.d1.backward(g.d1, g.d1i);
  st.d2.backward(g.d2, g.d2i);
  st.v.backward(g.v, g.vi);
  st.o.backward(g.o, g.oi);
  if (st.has_k) st.k.backward(g.k, g.ki);
  for (int i = 0; i < 2; ++i) st.gkv_hi[i] += g.kv_hi[i], st.gkv_lo[i] += g.kv_lo[i];
  st.gca += g.ca;
  st.gcu += g.cu;
  st.gcd += g.cd;
  for (int k = 0; k < kLinearKinds; ++k) {
    st.glwc_hi[k] += g.lwc_hi[k];
    st.glwc_lo[k] += g.lwc_lo[k];
    st.glac_hi[k] += g.lac_hi[k];
    st.glac_lo[k] += g.lac_lo[k];
  }
}

std::shared_ptr<const InputTransform> kron_transform(const FactorParam& f1, const FactorParam& f2,
                                                     const Vector& c) {
  return std::make_shared<const InputTransform>(
      InputTransform::kronecker(TransformFactor{f1.M, f1.M_inv_t}, TransformFactor{f2.M, f2.M_inv_t})
          .with_channel_scale(c.cast<double>()));
}

/// The start of training (ALGORITHMS.md §5.1): random orthogonal factors (the factor is Cayley
/// of them), σ = 1, SmoothQuant-style channel scales from the FP block's activations on the
/// calibration windows, clipping logits 4.
BlockState init_block_state(const ModelConfig& cfg, const DecoderBlock& w, const BlockParams<float>& fp,
                            const BlockShape& shape, const std::vector<Matrix>& inputs, const FlatTrainOptions& o,
                            bool wq, bool aq, bool kv) {
  const Index T = inputs.front().rows(), d = cfg.hidden_size, ff = cfg.intermediate_size;
  BlockState st;
  const auto [h1, h2] = kronecker_factor_sizes(d);
  const auto [f1, f2] = kronecker_factor_sizes(ff);
  uint64_t s = 0;
  auto draw = [&](Index n) { return FactorParam::random(n, o.seed, mix_stream(o.stream, ++s), o.form); };
  st.a1 = draw(h1), st.a2 = draw(h2), st.o = draw(cfg.num_heads), st.v = draw(cfg.head_dim);
  st.u1 = draw(h1), st.u2 = draw(h2), st.d1 = draw(f1), st.d2 = draw(f2);
  st.has_k = kv;
  if (kv) st.k = draw(cfg.head_dim);
  for (int i = 0; i < 2; ++i) {
    st.kv_hi[i] = st.kv_lo[i] = Vector::Constant(kv && o.lac ? 1 : 0, 4.0f);
    st.gkv_hi[i] = st.gkv_lo[i] = Vector::Zero(st.kv_hi[i].size());
  }
  st.ca = st.cu = Vector::Ones(d);
  st.cd = Vector::Ones(ff);
  if (o.add_diag) {
    // Running max |x| per channel (from 1e-5, as the reference) of each transform's FP input.
    Vector m1 = Vector::Constant(d, 1e-5f), m2 = m1, m3 = Vector::Constant(ff, 1e-5f);
    BlockTape<float> tape;
    RopeTables tab;
    for (const Matrix& x : inputs) {
      block_fwd<float>(shape, fp, x, T, 0, tab, tape);
      m1 = m1.cwiseMax(col_absmax(tape.xn1));
      m2 = m2.cwiseMax(col_absmax(tape.xn2));
      m3 = m3.cwiseMax(col_absmax(tape.a));
    }
    st.ca = smooth_scale(weight_absmax({&w.q.W, &w.k.W, &w.v.W}), m1, o.diag_alpha);
    st.cu = smooth_scale(weight_absmax({&w.up.W, &w.gate.W}), m2, o.diag_alpha);
    st.cd = smooth_scale(weight_absmax({&w.down.W}), m3, o.diag_alpha);
  }
  st.gca.setZero(d);
  st.gcu.setZero(d);
  st.gcd.setZero(ff);
  for (int k = 0; k < kLinearKinds; ++k) {
    const Index rows = w.linear(static_cast<LinearKind>(k)).W.rows();
    st.lwc_hi[k] = st.lwc_lo[k] = Vector::Constant(o.lwc && wq ? rows : 0, 4.0f);
    st.lac_hi[k] = st.lac_lo[k] = Vector::Constant(o.lac && aq ? 1 : 0, 4.0f);
    st.glwc_hi[k] = st.glwc_lo[k] = Vector::Zero(st.lwc_hi[k].size());
    st.glac_hi[k] = st.glac_lo[k] = Vector::Zero(st.lac_hi[k].size());
  }

  return st;
}

/// The trained state as the slots' transforms (scales included; QuantizedModel merges P⁻ᵀ and
/// 1/c into the weights in double), the row clipping of each weight and the activation clipping.
BlockTransforms materialize_block(BlockState& st, const ModelConfig& cfg) {
  for (FactorParam* f : st.factors()) f->materialize();
  BlockTransforms out;
  out[TransformSlot::QkvInput] = kron_transform(st.a1, st.a2, st.ca);
  out[TransformSlot::GateUpInput] = kron_transform(st.u1, st.u2, st.cu);
  out[TransformSlot::DownInput] = kron_transform(st.d1, st.d2, st.cd);
  out[TransformSlot::VOutputPerHead] = std::make_shared<const InputTransform>(
      InputTransform::per_head(TransformFactor{st.v.M, st.v.M_inv_t}, cfg.num_kv_heads));
  out[TransformSlot::OInputAcrossHeads] = std::make_shared<const InputTransform>(
      InputTransform::across_heads(TransformFactor{st.o.M, st.o.M_inv_t}, cfg.head_dim));
  if (st.has_k)
    out[TransformSlot::KeysPerHead] = std::make_shared<const InputTransform>(
        InputTransform::per_head(TransformFactor{st.k.M, st.k.M_inv_t}, cfg.num_kv_heads));
  if (st.kv_hi[0].size() > 0) {
    out.key_clip = ActClip{sigmoidf(st.kv_lo[0][0]), sigmoidf(st.kv_hi[0][0])};
    out.value_clip = ActClip{sigmoidf(st.kv_lo[1][0]), sigmoidf(st.kv_hi[1][0])};
  }
  auto sig = [](const Vector& l) { return l.unaryExpr([](float a) { return sigmoidf(a); }).eval(); };
  for (int k = 0; k < kLinearKinds; ++k) {
    if (st.lwc_hi[k].size() > 0) out.weight_clip[k] = RowClip{sig(st.lwc_lo[k]), sig(st.lwc_hi[k])};
    if (st.lac_hi[k].size() > 0) out.act_clip[k] = ActClip{sigmoidf(st.lac_lo[k][0]), sigmoidf(st.lac_hi[k][0])};
  }
  return out;
}

}  // namespace

FlatBlockResult train_flat_block(const ModelConfig& cfg, const DecoderBlock& w, const std::vector<Matrix>& inputs,
                                 const std::vector<Matrix>& targets, const QuantSpec* wspec, const ActQuantSpec* aspec,
                                 const ScalarKvSpec* kv, int batch_size, const FlatTrainOptions& o,
                                 const std::function<void(int, double)>& progress) {
  if (inputs.empty() || inputs.size() != targets.size() || batch_size < 1)
    throw ShapeError("flatquant: block training needs calibration inputs and their FP outputs");
  const Index T = inputs.front().rows(), d = cfg.hidden_size, ff = cfg.intermediate_size;
  for (std::size_t i = 0; i < inputs.size(); ++i)
    if (inputs[i].rows() != T || targets[i].rows() != T)
      throw ShapeError("flatquant: calibration windows differ in length (block training batches equal windows)");
  const bool wq = wspec && wspec->quantized(), aq = aspec && aspec->quantized();
  FlatBlockGrids grids;
  grids.weights = wq;
  grids.acts = aq;
  if (wq) grids.w = weight_grid(*wspec, o.lwc);
  if (aq) grids.a = act_grid(*aspec);
  if (kv) set_kv_grids(*kv, cfg, grids);
  const BlockShape shape = BlockShape::of(cfg);
  const BlockParams<float> fp = BlockParams<float>::from(w);

  BlockState st = init_block_state(cfg, w, fp, shape, inputs, o, wq, aq, kv != nullptr);
  AdamWOptions main_opt, clip_opt;
  main_opt.lr = o.lr;
  main_opt.weight_decay = clip_opt.weight_decay = o.weight_decay;
  clip_opt.lr = o.lr * o.clip_lr_factor;
  AdamW opt_main(main_opt), opt_clip(clip_opt);
  std::vector<const float*> g_main, g_clip;
  FlatBlockResult res;
  auto reg = [&](AdamW& opt, std::vector<const float*>& g, float* p, Index n, const float* grad) {
    if (n == 0) return;
    opt.add(p, n);
    g.push_back(grad);
    res.trained_params += n;
  };
  if (o.train_transform)
    for (FactorParam* f : st.factors()) {
      reg(opt_main, g_main, f->xu.data(), f->xu.size(), f->gxu.data());
      reg(opt_main, g_main, f->xv.data(), f->xv.size(), f->gxv.data());
      reg(opt_main, g_main, f->sigma.data(), f->sigma.size(), f->gsigma.data());
    }
  if (o.add_diag) {
    reg(opt_main, g_main, st.ca.data(), d, st.gca.data());
    reg(opt_main, g_main, st.cu.data(), d, st.gcu.data());
    reg(opt_main, g_main, st.cd.data(), ff, st.gcd.data());
  }
  for (int k = 0; k < kLinearKinds; ++k) {
    reg(opt_clip, g_clip, st.lwc_hi[k].data(), st.lwc_hi[k].size(), st.glwc_hi[k].data());
    reg(opt_clip, g_clip, st.lwc_lo[k].data(), st.lwc_lo[k].size(), st.glwc_lo[k].data());
    reg(opt_clip, g_clip, st.lac_hi[k].data(), st.lac_hi[k].size(), st.glac_hi[k].data());
    reg(opt_clip, g_clip, st.lac_lo[k].data(), st.lac_lo[k].size(), st.glac_lo[k].data());
  }
  for (int i = 0; i < 2; ++i) {
    reg(opt_clip, g_clip, st.kv_hi[i].data(), st.kv_hi[i].size(), st.gkv_hi[i].data());
    reg(opt_clip, g_clip, st.kv_lo[i].data(), st.kv_lo[i].size(), st.gkv_lo[i].data());
  }

  const Index n_win = static_cast<Index>(inputs.size());
  const Index n_batches = (n_win + batch_size - 1) / batch_size;
  const int64_t total = static_cast<int64_t>(o.epochs) * n_batches;
  FlatBlockTransforms<float> t, gr;
  FlatBlockTape<float> tape;
  RopeTables tab;
  Matrix X, Y, dy;
  int64_t step = 0;
  for (int epoch = 0; epoch < o.epochs; ++epoch) {
    double loss_sum = 0;
    for (Index b = 0; b < n_batches; ++b, ++step) {
      const Index w0 = b * batch_size, nw = std::min<Index>(batch_size, n_win - w0);
      X.resize(nw * T, d);
      Y.resize(nw * T, d);
      for (Index i = 0; i < nw; ++i) {
        X.middleRows(i * T, T) = inputs[static_cast<std::size_t>(w0 + i)];
        Y.middleRows(i * T, T) = targets[static_cast<std::size_t>(w0 + i)];
      }
      fill_transforms(st, t);
      flat_block_fwd<float>(shape, fp, t, grids, X, T, tab, tape);
      dy = tape.y - Y;
      const double loss = static_cast<double>(dy.squaredNorm()) / static_cast<double>(dy.size());
      loss_sum += loss;
      // The loss divided by its detached value: dL/dy = 2 (y - target) / (numel · loss).
      dy *= static_cast<float>(2.0 / (static_cast<double>(dy.size()) * std::max(loss, 1e-30)));
      gr = FlatBlockTransforms<float>::zeros_like(t);
      flat_block_bwd<float>(shape, fp, t, grids, tape, tab, dy, gr);
      take_grads(st, gr);
      if (!g_main.empty()) opt_main.step(g_main, cosine_lr(o.lr, step, total));
      if (!g_clip.empty()) opt_clip.step(g_clip, cosine_lr(o.lr * o.clip_lr_factor, step, total));
      for (FactorParam* f : st.factors()) f->zero_grad();
      st.gca.setZero();
      st.gcu.setZero();
      st.gcd.setZero();
      for (int k = 0; k < kLinearKinds; ++k)
        for (Vector* g : {&st.glwc_hi[k], &st.glwc_lo[k], &st.glac_hi[k], &st.glac_lo[k]}) g->setZero();
      for (int i = 0; i < 2; ++i) st.gkv_hi[i].setZero(), st.gkv_lo[i].setZero();
    }
    if (epoch == 0) res.loss_sum_first_epoch = loss_sum;
    res.loss_sum_last_epoch = loss_sum;
    if (progress) progress(epoch, loss_sum);
  }
  res.steps = static_cast<int>(total);

  res.transforms = materialize_block(st, cfg);
  res.cond_a = st.a1.condition() * st.a2.condition();
  res.cond_ug = st.u1.condition() * st.u2.condition();
  res.cond_d = st.d1.condition() * st.d2.condition();
  res.cond_v = st.v.condition();
  res.cond_o = st.o.condition();
  res.cond_k = st.has_k ? st.k.condition() : 0.0;
  return res;
}

}  // namespace ql
