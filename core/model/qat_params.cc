#include "core/model/qat_params.h"

#include <cmath>
#include <limits>
#include <regex>

#include "core/detmath.h"
#include "core/error.h"

namespace ql {

const char* qat_kind_name(QatKind k) {
  switch (k) {
    case QatKind::ClipHi: return "clip_hi";
    case QatKind::ClipLo: return "clip_lo";
    case QatKind::Smooth: return "smooth";
    case QatKind::Weight: return "weight";
  }
  return "?";
}

/// One fake-quantized linear: the warm start's grid and latent weights, and where its
/// parameters sit in θ (-1: not trained).
struct QatParameters::Linear {
  int block = 0;
  LinearKind kind = LinearKind::Q;
  QuantSpec spec;
  std::vector<int32_t> g_idx;
  Matrix W0;      ///< latent weights at the warm start (its dequantized weights)
  Matrix s0, z0;  ///< the warm start's grid, the QuantizedTensor layout
  Index clip_hi = -1, clip_lo = -1, weight = -1;
  int smooth = -1;  ///< index into smooths_ of its input's smoothing scale
  bool asym() const { return spec.scheme == QuantScheme::Asym; }
  /// Flat index into s0 / z0 of weight (r, c).
  Index grid_index(Index r, Index c) const {
    switch (spec.granularity) {
      case Granularity::PerTensor: return 0;
      case Granularity::PerChannel: return r;
      case Granularity::PerGroup: {
        const Index g = g_idx.empty() ? c / spec.group_size : g_idx[static_cast<std::size_t>(c)];
        return r * s0.cols() + g;
      }
    }
    return 0;
  }
};

/// A smoothing scale c = exp(u) at a norm-produced input of one block.
struct QatParameters::Smooth {
  int block = 0;
  int group = 0;
  Vector gamma0;  ///< the norm's weight at the warm start
  Index offset = 0;
};

QatParameters::~QatParameters() = default;
QatParameters::QatParameters(QatParameters&&) noexcept = default;

namespace {

inline double sigmoid(double x) { return 1.0 / (1.0 + detmath::exp(-x)); }

/// The learned grid of one group from the warm start's (s0, z0) and the clip logits.
struct LearnedGrid {
  double s = 1, z = 0;
  double ds_dhi = 0, ds_dlo = 0;  ///< ∂s/∂γ_hi, ∂s/∂γ_lo
};

LearnedGrid learned_grid(double s0, double z0, int qmin, int qmax, bool asym, double g_hi, double g_lo) {
  LearnedGrid g;
  const double sh = sigmoid(g_hi), sl = sigmoid(g_lo);
  const double r_hi = 2 * sh, r_lo = 2 * sl;
  if (!asym) {  // one logit scales the symmetric range
    g.s = s0 * r_hi;
    g.z = z0;
    g.ds_dhi = s0 * 2 * sh * (1 - sh);
    return g;
  }
  const double A = qmax - z0, B = qmin - z0, D = qmax - qmin;
  const double f = (r_hi * A - r_lo * B) / D;
  g.s = s0 * f;
  g.z = qmin - std::nearbyint(r_lo * B / f);
  g.ds_dhi = s0 * A / D * 2 * sh * (1 - sh);
  g.ds_dlo = -s0 * B / D * 2 * sl * (1 - sl);
  return g;
}

}  // namespace

/// Whether `codes` are the nearest rounding of W on their own grids (the warm start was RTN of
/// W), checked element by element with quantize_value. An entry at most kNudgeUlps float steps
/// across its cell's boundary (the float re-rounding of a recovered fold) is moved into the cell.
bool QatParameters::rounds_to_codes(const Linear& L, Matrix& W, const QuantizedTensor& codes) {
  constexpr int kNudgeUlps = 8;
  if (W.rows() != codes.rows() || W.cols() != codes.cols()) return false;
  const int qmin = L.spec.qmin(), qmax = L.spec.qmax();
  for (Index r = 0; r < W.rows(); ++r)
    for (Index c = 0; c < W.cols(); ++c) {
      const Index gi = L.grid_index(r, c);
      const Grid g{L.s0.data()[gi], L.z0.data()[gi], qmin, qmax};
      const int want = codes.codes(r, c);
      int got = quantize_value(W(r, c), g);
      if (got == want) continue;
      const float toward = got > want ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
      float v = W(r, c);
      for (int i = 0; i < kNudgeUlps && got != want; ++i) got = quantize_value(v = std::nextafter(v, toward), g);
      if (got != want) return false;
      W(r, c) = v;
    }
  return true;
}

namespace {

/// The FP weights of block b's linear `kind` in the current model's space: the columns of a
/// norm-fed linear times γ_fp / γ_now (computed in double, rounded once), which is what a
/// channel-scale fold (norm γ / s, consumers W diag(s)) made of them.
Matrix fp_weights_now(const QuantizedModel& qm, int b, LinearKind kind) {
  Matrix W = qm.fp_block(b).linear(kind).W;
  const Architecture& arch = qm.architecture();
  const InputGroup& grp = arch.input_groups()[static_cast<std::size_t>(arch.group_of(kind))];
  if (!grp.norm) return W;
  const Vector& g_fp = norm_weight(const_cast<DecoderBlock&>(qm.fp_block(b)), grp);
  const Vector& g_now = norm_weight(const_cast<DecoderBlock&>(qm.block(b)), grp);
  if (g_fp == g_now) return W;
  for (Index j = 0; j < W.cols(); ++j) {
    const double ratio = static_cast<double>(g_fp[j]) / static_cast<double>(g_now[j]);
    for (Index r = 0; r < W.rows(); ++r) W(r, j) = static_cast<float>(static_cast<double>(W(r, j)) * ratio);
  }
  return W;
}

}  // namespace

QatParameters::QatParameters(const QuantizedModel& qm, const QatParamSpec& spec) : round_values_(spec.round_values) {
  std::regex re;
  const bool any_latent = !spec.latent_weights.empty();
  if (any_latent) {
    try {
      re = std::regex(spec.latent_weights, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      throw Error("latent_weights: invalid regex '" + spec.latent_weights + "': " + e.what());
    }
  }
  const Architecture& arch = qm.architecture();
  for (const InputGroup& g : arch.input_groups()) arch_groups_.push_back(g.site);
  auto add_segment = [&](const std::string& name, QatKind kind, int b, Index size) {
    segments_.push_back({name + "." + qat_kind_name(kind), kind, b, n_, size});
    n_ += size;
    return segments_.back().offset;
  };
  for (int b = 0; b < qm.num_blocks(); ++b) {
    std::vector<int> smooth_of_group(arch.input_groups().size(), -1);
    if (spec.smooth) {
      for (std::size_t g = 0; g < arch.input_groups().size(); ++g) {
        const InputGroup& grp = arch.input_groups()[g];
        if (!grp.norm) continue;
        bool quantized = false;
        for (LinearKind k : grp.members) quantized = quantized || qm.codes(b, k).has_value();
        if (!quantized) continue;
        for (const TransformSlotInfo& slot : arch.transform_slots())
          if (slot.input_group == static_cast<int>(g) && qm.transforms(b)[slot.slot])
            throw Error(arch.norm_name(b, static_cast<int>(g)) + ": the input carries an online transform (" +
                              slot.name + "), which a smoothing scale would have to commute with; use smooth: false");
        Smooth sm;
        sm.block = b;
        sm.group = static_cast<int>(g);
        sm.gamma0 = norm_weight(const_cast<DecoderBlock&>(qm.block(b)), grp);
        sm.offset = add_segment(arch.norm_name(b, static_cast<int>(g)), QatKind::Smooth, b, sm.gamma0.size());
        smooth_of_group[g] = static_cast<int>(smooths_.size());
        smooths_.push_back(std::move(sm));
      }
    }
    for (int k = 0; k < kLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      const std::string name = linear_name(b, kind);
      const auto& codes = qm.codes(b, kind);
      const bool latent = any_latent && std::regex_match(name, re);
      if (!codes) {
        if (latent) throw Error("latent_weights: " + name + " has no codes (no earlier step quantized it)");
        continue;
      }
      Linear L;
      L.block = b;
      L.kind = kind;
      L.spec = codes->spec;
      L.g_idx = codes->g_idx;
      L.s0 = codes->scales;
      L.z0 = codes->zeros;
      L.W0 = qm.block(b).linear(kind).W;
      Matrix fp_now = fp_weights_now(qm, b, kind);
      if (rounds_to_codes(L, fp_now, *codes)) {
        L.W0 = std::move(fp_now);  // the float weights the warm start rounded (RTN)
        ++fp_latent_;
      }
      if (spec.clip) {
        L.clip_hi = add_segment(name, QatKind::ClipHi, b, L.s0.size());
        if (L.asym()) L.clip_lo = add_segment(name, QatKind::ClipLo, b, L.s0.size());
      }
      if (latent) L.weight = add_segment(name, QatKind::Weight, b, L.W0.size());
      L.smooth = smooth_of_group[static_cast<std::size_t>(arch.group_of(kind))];
      linears_.push_back(std::move(L));
    }
  }
  if (linears_.empty()) throw ShapeError("qat: no linear has codes; quantize the model first (e.g. [rtn, zeroqat])");
  initial_.assign(static_cast<std::size_t>(n_), 0.0f);
  for (const Linear& L : linears_)
    if (L.weight >= 0) std::copy(L.W0.data(), L.W0.data() + L.W0.size(), initial_.begin() + L.weight);
}

std::vector<float> QatParameters::initial() const { return initial_; }

std::vector<float> QatParameters::grid_steps() const {
  std::vector<float> steps(static_cast<std::size_t>(n_), 0.0f);
  for (const Linear& L : linears_) {
    if (L.weight < 0) continue;
    for (Index r = 0; r < L.W0.rows(); ++r)
      for (Index c = 0; c < L.W0.cols(); ++c)
        steps[static_cast<std::size_t>(L.weight + r * L.W0.cols() + c)] = L.s0.data()[L.grid_index(r, c)];
  }
  return steps;
}

Index QatParameters::count(QatKind k) const {
  Index n = 0;
  for (const QatSegment& s : segments_) n += s.kind == k ? s.size : 0;
  return n;
}

namespace {

/// c = exp(u) of a smoothing segment (ones when there is none).
Vector smooth_scale(const float* theta, Index offset, Index n, bool present) {
  Vector c = Vector::Ones(n);
  if (present)
    for (Index j = 0; j < n; ++j) c[j] = static_cast<float>(detmath::exp(static_cast<double>(theta[offset + j])));
  return c;
}

}  // namespace

void QatParameters::materialize(const float* theta, QuantizedModel& qm, bool f16_scales) const {
  const Architecture& arch = qm.architecture();
  for (const Smooth& sm : smooths_) {
    const Vector c = smooth_scale(theta, sm.offset, sm.gamma0.size(), true);
    norm_weight(qm.block(sm.block), arch.input_groups()[static_cast<std::size_t>(sm.group)]) =
        sm.gamma0.cwiseQuotient(c);
  }
  for (const Linear& L : linears_) {
    const int qmin = L.spec.qmin(), qmax = L.spec.qmax();
    QuantizedTensor q;
    q.spec = L.spec;
    q.g_idx = L.g_idx;
    q.scales.resize(L.s0.rows(), L.s0.cols());
    q.zeros.resize(L.z0.rows(), L.z0.cols());
    for (Index i = 0; i < L.s0.size(); ++i) {
      const double ghi = L.clip_hi >= 0 ? theta[L.clip_hi + i] : 0.0, glo = L.clip_lo >= 0 ? theta[L.clip_lo + i] : 0.0;
      const LearnedGrid g = learned_grid(L.s0.data()[i], L.z0.data()[i], qmin, qmax, L.asym(), ghi, glo);
      float s = static_cast<float>(g.s);
      if (f16_scales) s = store_scale(s, L.spec.scale_dtype);
      q.scales.data()[i] = s;
      q.zeros.data()[i] = static_cast<float>(g.z);
    }
    const Index R = L.W0.rows(), C = L.W0.cols();
    const float* lat = L.weight >= 0 ? theta + L.weight : L.W0.data();
    const Vector c = L.smooth >= 0 ? smooth_scale(theta, smooths_[static_cast<std::size_t>(L.smooth)].offset, C, true)
                                   : Vector::Ones(C);
    Matrix& W = qm.block(L.block).linear(L.kind).W;
    q.codes.resize(R, C);
#pragma omp parallel for schedule(static)
    for (Index r = 0; r < R; ++r) {
      for (Index col = 0; col < C; ++col) {
        const Index gi = L.grid_index(r, col);
        const Grid grid{q.scales.data()[gi], q.zeros.data()[gi], qmin, qmax};
        const float v = lat[r * C + col] * c[col];
        if (round_values_) {
          const int32_t code = quantize_value(v, grid);
          q.codes(r, col) = code;
          W(r, col) = dequantize_value(code, grid);
        } else {  // the rounding-free surrogate (tests): s · (clamp(v/s + z) − z)
          const float u = std::min(std::max(v / grid.scale + grid.zero, float(qmin)), float(qmax));
          q.codes(r, col) = 0;
          W(r, col) = grid.scale * (u - grid.zero);
        }
      }
    }
    if (round_values_)
      qm.codes(L.block, L.kind) = std::move(q);
    else
      qm.codes(L.block, L.kind).reset();
  }
}

void QatParameters::backward(const float* theta, const ModelParams<float>& grads, float* dtheta) const {
  std::fill(dtheta, dtheta + n_, 0.0f);
  std::vector<Vector> dc(smooths_.size());
  for (std::size_t i = 0; i < smooths_.size(); ++i) dc[i] = Vector::Zero(smooths_[i].gamma0.size());
  for (const Linear& L : linears_) {
    const int qmin = L.spec.qmin(), qmax = L.spec.qmax();
    const Index R = L.W0.rows(), C = L.W0.cols(), G = L.s0.size();
    std::vector<LearnedGrid> grid(static_cast<std::size_t>(G));
    for (Index i = 0; i < G; ++i) {
      const double ghi = L.clip_hi >= 0 ? theta[L.clip_hi + i] : 0.0, glo = L.clip_lo >= 0 ? theta[L.clip_lo + i] : 0.0;
      grid[static_cast<std::size_t>(i)] = learned_grid(L.s0.data()[i], L.z0.data()[i], qmin, qmax, L.asym(), ghi, glo);
    }
    const float* lat = L.weight >= 0 ? theta + L.weight : L.W0.data();
    const Vector c = L.smooth >= 0 ? smooth_scale(theta, smooths_[static_cast<std::size_t>(L.smooth)].offset, C, true)
                                   : Vector::Ones(C);
    const Matrix& dW = grads.blocks.at(static_cast<std::size_t>(L.block)).linear(L.kind);
    Matrix dV(R, C);
    // ds per group: rows own their groups except per tensor, where one group spans every row,
    // so the per-row partial sums are added in row order afterwards.
    MatrixD ds_rows = MatrixD::Zero(R, L.spec.granularity == Granularity::PerTensor ? 1 : 0);
    std::vector<double> ds(static_cast<std::size_t>(G), 0.0);
#pragma omp parallel for schedule(static)
    for (Index r = 0; r < R; ++r) {
      for (Index col = 0; col < C; ++col) {
        const Index gi = L.grid_index(r, col);
        const LearnedGrid& g = grid[static_cast<std::size_t>(gi)];
        const float s = static_cast<float>(g.s), z = static_cast<float>(g.z);
        const float v = lat[r * C + col] * c[col];
        const float u = round_values_ ? std::nearbyint(v / s) + z : v / s + z;
        const bool passed = u >= qmin && u <= qmax;
        const float qz = std::min(std::max(u, float(qmin)), float(qmax)) - z;
        const double d = dW(r, col);
        dV(r, col) = passed ? dW(r, col) : 0.0f;
        const double contrib = d * (static_cast<double>(qz) - (passed ? static_cast<double>(v) / s : 0.0));
        if (L.spec.granularity == Granularity::PerTensor)
          ds_rows(r, 0) += contrib;
        else
          ds[static_cast<std::size_t>(gi)] += contrib;  // gi belongs to row r only
      }
    }
    if (L.spec.granularity == Granularity::PerTensor)
      for (Index r = 0; r < R; ++r) ds[0] += ds_rows(r, 0);
    for (Index i = 0; i < G; ++i) {
      const LearnedGrid& g = grid[static_cast<std::size_t>(i)];
      if (L.clip_hi >= 0) dtheta[L.clip_hi + i] = static_cast<float>(ds[static_cast<std::size_t>(i)] * g.ds_dhi);
      if (L.clip_lo >= 0) dtheta[L.clip_lo + i] = static_cast<float>(ds[static_cast<std::size_t>(i)] * g.ds_dlo);
    }
    if (L.weight >= 0)
      for (Index r = 0; r < R; ++r)
        for (Index col = 0; col < C; ++col) dtheta[L.weight + r * C + col] = dV(r, col) * c[col];
    if (L.smooth >= 0) {  // V = W ⊙ c: ∂L/∂c_j += Σ_r dV_rj W_rj, rows in order
      Vector& d = dc[static_cast<std::size_t>(L.smooth)];
      for (Index r = 0; r < R; ++r)
        for (Index col = 0; col < C; ++col) d[col] += dV(r, col) * lat[r * C + col];
    }
  }
  for (std::size_t i = 0; i < smooths_.size(); ++i) {
    const Smooth& sm = smooths_[i];
    const BlockParams<float>& gb = grads.blocks.at(static_cast<std::size_t>(sm.block));
    const InputSite site = arch_groups_[static_cast<std::size_t>(sm.group)];
    const VecT<float>& dgamma = site == InputSite::AttnIn ? gb.input_norm : gb.post_attn_norm;  // as norm_weight()
    const Vector c = smooth_scale(theta, sm.offset, sm.gamma0.size(), true);
    for (Index j = 0; j < c.size(); ++j) {
      // γ_eff = γ0 / c: ∂L/∂c += dγ_eff · (−γ0 / c²); u = log c: ∂L/∂u = c ∂L/∂c.
      const double dcj = static_cast<double>(dc[i][j]) - static_cast<double>(dgamma[j]) * sm.gamma0[j] / (double(c[j]) * c[j]);
      dtheta[sm.offset + j] = static_cast<float>(dcj * c[j]);
    }
  }
}

}  // namespace ql
