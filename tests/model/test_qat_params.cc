// The latent QAT parameters of core/model/qat_params.h: θ at the warm start reproduces the warm
// start bit for bit (weights, codes, norms) for asymmetric groups, symmetric channels and
// GPTQ-like codes; the STE backward is the exact gradient of the rounding-free surrogate
// (finite differences); clipping shrinks the grid; errors name what is wrong.
#include <gtest/gtest.h>

#include <cmath>

#include "core/error.h"
#include "core/model/fold.h"
#include "core/model/qat_params.h"
#include "core/rng.h"
#include "tests/random_model.h"

namespace ql {
namespace {

/// A random 2-block model with every linear quantized by `spec`; with `perturb_codes` every
/// 7th code moves by one step (a GPTQ-like solution: codes that are not the nearest ones).
/// With `fold`, random channel scales s in [0.5, 2] are folded into both norms and their
/// consumers first (norm γ / s, W diag(s): SmoothQuant's fold), so RTN rounds smoothed weights.
std::unique_ptr<QuantizedModel> warm_start(const QuantSpec& spec, bool perturb_codes = false, bool fold = false) {
  testutil::RandomModelShape shape;
  shape.layers = 2;
  auto qm = std::make_unique<QuantizedModel>(testutil::random_model(shape));
  const CounterRng rng(17, 0);
  for (int b = 0; fold && b < 2; ++b) {
    DecoderBlock& blk = qm->block(b);
    VectorD s(blk.input_norm.size());
    for (Index j = 0; j < s.size(); ++j) s[j] = static_cast<float>(0.5 * std::exp2(2 * rng.uniform(100 * b + j)));
    fold_channel_scales(blk.input_norm, {&blk.q.W, &blk.k.W, &blk.v.W}, s);
    for (Index j = 0; j < s.size(); ++j) s[j] = static_cast<float>(0.5 * std::exp2(2 * rng.uniform(100 * b + 50 + j)));
    fold_channel_scales(blk.post_attn_norm, {&blk.gate.W, &blk.up.W}, s);
  }
  for (int b = 0; b < 2; ++b)
    for (int k = 0; k < kLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      QuantizedTensor q = quantize(qm->block(b).linear(kind).W, spec);
      if (perturb_codes)
        for (Index i = 0; i < q.codes.size(); i += 7)
          q.codes.data()[i] = q.codes.data()[i] < spec.qmax() ? q.codes.data()[i] + 1 : q.codes.data()[i] - 1;
      qm->block(b).linear(kind).W = dequantize(q);
      qm->codes(b, kind) = std::move(q);
    }
  return qm;
}

void expect_identity_at_start(const QuantSpec& spec, bool perturb, const std::string& latent, bool fold = false) {
  auto qm = warm_start(spec, perturb, fold);
  const ModelWeights before = qm->current();
  QatParamSpec ps;
  ps.latent_weights = latent;
  const QatParameters p(*qm, ps);
  p.materialize(p.initial().data(), *qm);
  for (int b = 0; b < 2; ++b) {
    EXPECT_EQ(qm->block(b).input_norm, before.blocks[b].input_norm);
    EXPECT_EQ(qm->block(b).post_attn_norm, before.blocks[b].post_attn_norm);
    for (int k = 0; k < kLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      EXPECT_EQ(qm->block(b).linear(kind).W, before.blocks[b].linear(kind).W) << linear_name(b, kind);
      ASSERT_TRUE(qm->codes(b, kind).has_value());
      EXPECT_EQ(dequantize(*qm->codes(b, kind)), qm->block(b).linear(kind).W);
    }
  }
  p.materialize(p.initial().data(), *qm, true);
  EXPECT_EQ(qm->block(1).linear(LinearKind::Down).W, before.blocks[1].down.W) << "f16 scales of the warm start";
}

TEST(QatParams, WarmStartIsReproducedBitwise) {
  QuantSpec g;
  g.bits = 3;
  g.granularity = Granularity::PerGroup;
  g.group_size = 16;
  expect_identity_at_start(g, false, "");
  expect_identity_at_start(g, true, ".*(q|v)_proj");
  QuantSpec c;
  c.bits = 4;
  c.scheme = QuantScheme::Sym;
  expect_identity_at_start(c, false, ".*");
  expect_identity_at_start(c, true, "");
}

TEST(QatParams, SegmentsAndCounts) {
  QuantSpec g;
  g.bits = 2;
  g.granularity = Granularity::PerGroup;
  g.group_size = 16;
  auto qm = warm_start(g);
  QatParamSpec ps;
  ps.latent_weights = "model\\.layers\\.1\\.self_attn\\.(q|v)_proj";
  const QatParameters p(*qm, ps);
  // per block: groups = (32·32·2 + 16·32·2 + 48·32·3) / 16 = 480; asym: two logits each.
  EXPECT_EQ(p.count(QatKind::ClipHi), 2 * 480);
  EXPECT_EQ(p.count(QatKind::ClipLo), 2 * 480);
  EXPECT_EQ(p.count(QatKind::Smooth), 2 * 2 * 32);
  EXPECT_EQ(p.count(QatKind::Weight), 32 * 32 + 16 * 32);
  Index total = 0;
  for (const QatSegment& s : p.segments()) {
    EXPECT_EQ(s.offset, total) << s.name;
    total += s.size;
  }
  EXPECT_EQ(total, p.size());
  EXPECT_EQ(p.segments().front().name, "model.layers.0.input_layernorm.smooth");
  ps.latent_weights = "(";
  EXPECT_THROW(QatParameters(*qm, ps), Error);
  QuantizedModel fp(testutil::random_model({}));
  EXPECT_THROW(QatParameters(fp, QatParamSpec{}), ShapeError);
}

// After a channel-scale fold (SmoothQuant's) the latent weights start at the smoothed FP
// weights, recovered from the norms (γ_fp / γ_now), not on the grid: every linear of the RTN
// warm start counts, the start still reproduces the warm start bitwise, and the latents are the
// smoothed weights to float rounding.
TEST(QatParams, LatentsRecoverAFoldedChannelScale) {
  QuantSpec c;
  c.bits = 4;
  c.scheme = QuantScheme::Sym;
  auto qm = warm_start(c, false, true);
  QatParamSpec ps;
  ps.latent_weights = ".*";
  const QatParameters p(*qm, ps);
  EXPECT_EQ(p.fp_latent_linears(), 2 * kLinearKinds);
  const std::vector<float> theta = p.initial();
  for (const QatSegment& seg : p.segments()) {
    if (seg.kind != QatKind::Weight || seg.name.find("layers.1.mlp.up_proj") == std::string::npos) continue;
    const Matrix& fp = qm->fp_block(1).up.W;
    const Vector& g_fp = qm->fp_block(1).post_attn_norm;
    const Vector& g_now = qm->block(1).post_attn_norm;
    double worst = 0;
    for (Index r = 0; r < fp.rows(); ++r)
      for (Index j = 0; j < fp.cols(); ++j) {
        const double want = double(fp(r, j)) * g_fp[j] / g_now[j];
        worst = std::max(worst, std::abs(theta[seg.offset + r * fp.cols() + j] - want) / std::abs(want));
      }
    EXPECT_LT(worst, 1e-6);
  }
  expect_identity_at_start(c, false, ".*", true);
  // Codes that are not the nearest rounding (GPTQ-like) still start on the grid.
  auto gptq = warm_start(c, true, true);
  EXPECT_EQ(QatParameters(*gptq, ps).fp_latent_linears(), 0);
}

// Clipping logits below 0 shrink the range: fewer distinct values, every weight still on the
// written grid, and larger |γ| moves more weights.
TEST(QatParams, ClippingShrinksTheGrid) {
  QuantSpec c;
  c.bits = 4;
  auto qm = warm_start(c);
  const QatParameters p(*qm, QatParamSpec{});
  std::vector<float> theta = p.initial();
  for (const QatSegment& s : p.segments())
    if (s.kind == QatKind::ClipHi || s.kind == QatKind::ClipLo)
      for (Index i = 0; i < s.size; ++i) theta[static_cast<std::size_t>(s.offset + i)] = -0.5f;
  const Matrix before = qm->block(0).gate.W;
  p.materialize(theta.data(), *qm);
  const Matrix& after = qm->block(0).gate.W;
  EXPECT_LT(after.cwiseAbs().maxCoeff(), before.cwiseAbs().maxCoeff());
  EXPECT_EQ(dequantize(*qm->codes(0, LinearKind::Gate)), after);
}

// L = Σ R ⊙ W_eff + Σ ρ ⊙ γ_eff over every linear and norm: the backward equals central
// differences of the rounding-free surrogate for every parameter kind.
TEST(QatParams, BackwardMatchesFiniteDifferencesOfTheSurrogate) {
  for (const QuantScheme scheme : {QuantScheme::Asym, QuantScheme::Sym}) {
    QuantSpec g;
    g.bits = 3;
    g.scheme = scheme;
    g.granularity = Granularity::PerGroup;
    g.group_size = 16;
    g.scale_dtype = ScaleDtype::F32;
    auto qm = warm_start(g);
    QatParamSpec ps;
    ps.round_values = false;
    ps.latent_weights = ".*\\.1\\.self_attn\\.v_proj";
    const QatParameters p(*qm, ps);
    ModelParams<float> R = ModelParams<float>::from(qm->current());
    uint64_t stream = 1;
    for (auto& b : R.blocks) {
      for (int k = 0; k < kLinearKinds; ++k) {
        MatT<float>& m = b.linear(static_cast<LinearKind>(k));
        const CounterRng rng(5, stream++);
        for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(rng.normal(static_cast<uint64_t>(i)));
      }
      const CounterRng rng(5, stream++);
      for (Index i = 0; i < b.input_norm.size(); ++i) b.input_norm[i] = static_cast<float>(rng.normal(i));
      for (Index i = 0; i < b.post_attn_norm.size(); ++i) b.post_attn_norm[i] = static_cast<float>(rng.normal(1000 + i));
    }
    std::vector<float> theta = p.initial();
    {  // move away from the start so every term is active: logits and log-scales random
      const CounterRng rng(6, 0);
      for (const QatSegment& s : p.segments())
        if (s.kind != QatKind::Weight)
          for (Index i = 0; i < s.size; ++i)
            theta[static_cast<std::size_t>(s.offset + i)] = static_cast<float>(0.3 * rng.normal(static_cast<uint64_t>(s.offset + i)));
    }
    auto loss = [&]() {
      p.materialize(theta.data(), *qm);
      double l = 0;
      for (int b = 0; b < 2; ++b) {
        for (int k = 0; k < kLinearKinds; ++k) {
          const LinearKind kind = static_cast<LinearKind>(k);
          l += (qm->block(b).linear(kind).W.cast<double>().array() * R.blocks[b].linear(kind).cast<double>().array()).sum();
        }
        l += qm->block(b).input_norm.cast<double>().dot(R.blocks[b].input_norm.cast<double>());
        l += qm->block(b).post_attn_norm.cast<double>().dot(R.blocks[b].post_attn_norm.cast<double>());
      }
      return l;
    };
    std::vector<float> grad(static_cast<std::size_t>(p.size()));
    p.backward(theta.data(), R, grad.data());
    for (const QatKind kind : {QatKind::ClipHi, QatKind::ClipLo, QatKind::Smooth, QatKind::Weight}) {
      double num = 0, den = 0;
      int checked = 0, kinks = 0;
      for (const QatSegment& s : p.segments()) {
        if (s.kind != kind) continue;
        for (Index i = 0; i < s.size; i += 5) {  // a strided subset keeps the test fast
          float& x = theta[static_cast<std::size_t>(s.offset + i)];
          const float keep = x;
          auto central = [&](float h) {
            x = keep + h;
            const double lp = loss();
            x = keep - h;
            const double lm = loss();
            x = keep;
            return (lp - lm) / (double(keep + h) - double(keep - h));
          };
          const double fd = central(1e-3f), fd_half = central(5e-4f);
          // The surrogate is piecewise smooth (the clamp): where a step crosses a kink, the two
          // step sizes disagree; such entries are counted, not compared.
          if (std::abs(fd - fd_half) > 1e-2 * std::abs(fd) + 1e-3) {  // 1e-3: float noise of the loss
            ++kinks;
            continue;
          }
          const double an = grad[static_cast<std::size_t>(s.offset + i)];
          num += (fd - an) * (fd - an);
          den += fd * fd;
          ++checked;
        }
      }
      if (kind == QatKind::ClipLo && scheme == QuantScheme::Sym) {
        EXPECT_EQ(checked, 0);
        continue;
      }
      ASSERT_GT(checked, 0) << qat_kind_name(kind);
      EXPECT_LT(kinks, checked / 10 + 1) << qat_kind_name(kind) << ": too many entries near a kink";
      EXPECT_LT(std::sqrt(num / den), 2e-2) << qat_kind_name(kind) << " " << (scheme == QuantScheme::Sym ? "sym" : "asym");
    }
  }
}

}  // namespace
}  // namespace ql
