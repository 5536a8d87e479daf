// FlatQuant (algorithms/flatquant) on standalone layers (ALGORITHMS.md §5.6): under W4A4 on
// inputs with outlier channels the learned transform beats the random orthogonal one, which
// beats the SmoothQuant diagonal, which beats no transform; training lowers its own loss; the
// result does not depend on the thread count; the grids it cannot simulate are refused with an
// error that says so; the block graph it trains on models matches finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <string>
#include <tuple>
#include <vector>

#include "algorithms/algorithm.h"
#include "algorithms/flatquant/block_graph.h"
#include "algorithms/flatquant/trainer.h"
#include "core/parallel.h"
#include "core/rng.h"
#include "experiments/runner.h"
#include "tests/fd_util.h"
#include "tests/model/checkpoint_writer.h"

namespace ql {
namespace {

RunRecord run_yaml(const std::string& yaml, WorkloadCache& cache, RunStatus expect = RunStatus::Ok) {
  RunConfig rc = parse_run_config(ConfigNode::parse(yaml, "fq.yaml"), "fq", "fq.yaml", default_registry());
  RunRecord r = execute_run(rc, cache, default_registry());
  EXPECT_EQ(r.status, expect) << r.message;
  return r;
}

double summary(const RunRecord& r, const std::string& metric) {
  for (auto& s : r.summary)
    if (s.metric == metric) return s.value;
  ADD_FAILURE() << "no summary metric " << metric;
  return NAN;
}

/// ALGORITHMS.md §5.6's layer: d = 256 = 16 x 16, 3 outlier channels, heavy-tailed weights.
std::string layer_suite(int magnitude) {
  return R"(seed: 0
workload:
  kind: synthetic
  layers: [{name: attn.qkv, d_in: 256, d_out: 256}]
  weight_dist: student_t
  input_decay: 0.3
  outlier_channels: 3
  outlier_magnitude: )" +
         std::to_string(magnitude) + R"(
  populations: [{name: all, share: 1.0}]
calib: {tokens: 1024}
eval: {units: 32, unit_tokens: 32}
slices: {n_boot: 0}
)";
}
const std::string kBase = layer_suite(10);
const std::string kW4A4 = "bits: 4, scheme: sym, granularity: channel, scale_dtype: fp32, "
                          "act: {bits: 4, scheme: sym, granularity: token}";

// The §5.6 order (learned < orthogonal < diagonal < identity) at moderate outliers (10x), over
// three seeds of each random draw; at 60x the diagonal overtakes the random rotation (whose
// error does not shrink with the outliers' share of the energy) and the learned transform still
// beats both (README, "FlatQuant on the synthetic suite").
TEST(FlatQuant, LearnedBeatsOrthogonalAndDiagonalUnderW4A4) {
  WorkloadCache cache;
  for (int magnitude : {10, 60}) {
    auto err = [&](const std::string& steps) {
      return summary(run_yaml(layer_suite(magnitude) + "quant: [" + steps + "{algorithm: rtn, " + kW4A4 + "}]\n", cache),
                     "out_rel_err");
    };
    const double identity = err("");
    const double diagonal = err("{algorithm: smoothquant, alpha: 0.5}, ");
    double rot_best = 1e9, rot_worst = 0, fq_worst = 0;
    for (int seed : {0, 1, 2}) {
      const double rot = err("{algorithm: rotation, seed: " + std::to_string(seed) + "}, ");
      rot_best = std::min(rot_best, rot);
      rot_worst = std::max(rot_worst, rot);
      fq_worst = std::max(fq_worst, err("{algorithm: flatquant, epochs: 5, seed: " + std::to_string(seed) + "}, "));
    }
    std::printf("[ measured ] %dx W4A4 out_rel_err: identity %.4f, diagonal %.4f, rotation %.4f-%.4f, flatquant <= %.4f\n",
                magnitude, identity, diagonal, rot_best, rot_worst, fq_worst);
    EXPECT_LT(fq_worst, std::min(rot_best, diagonal)) << magnitude;
    EXPECT_LT(std::max(rot_worst, diagonal), identity) << magnitude;
    if (magnitude == 10) EXPECT_LT(rot_worst, diagonal);
    else EXPECT_LT(diagonal, rot_best);
  }
}

TEST(FlatQuant, TrainingLowersItsLossAndRecordsDiagnostics) {
  WorkloadCache cache;
  const RunRecord r = run_yaml(kBase + "quant: [{algorithm: flatquant, epochs: 4}, {algorithm: rtn, " + kW4A4 + "}]\n", cache);
  double first = NAN, last = NAN, steps = NAN, clip = NAN;
  for (auto& d : r.diagnostics) {
    if (d.name == "loss_first_epoch") first = d.value;
    if (d.name == "loss_last_epoch") last = d.value;
    if (d.name == "steps") steps = d.value;
    if (d.name == "act_clip_hi") clip = d.value;
  }
  EXPECT_LT(last, first);
  EXPECT_EQ(steps, 4 * 8);  // 1024 tokens in batches of 128
  EXPECT_LT(clip, 1.0);     // the learned activation clipping is in use
  bool recorded = false;
  for (auto& p : r.params)
    if (p.key == "attn.qkv.transform.input") recorded = p.value.find("diag · kronecker 16x16 (x) 16x16") != std::string::npos;
  EXPECT_TRUE(recorded) << "the learned transform is recorded with its structure";
}

TEST(FlatQuant, LayerTrainingIsBitwiseIndependentOfTheThreadCount) {
  const CounterRng rng(3, 0);
  Matrix X(512, 64), W(48, 64);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = static_cast<float>(rng.normal(static_cast<uint64_t>(i)) * (i % 64 < 2 ? 20 : 1));
  for (Index i = 0; i < W.size(); ++i) W.data()[i] = static_cast<float>(0.1 * rng.normal(static_cast<uint64_t>(i + X.size())));
  QuantSpec w4;
  w4.bits = 4;
  w4.scheme = QuantScheme::Sym;
  ActQuantSpec a4;
  a4.bits = 4;
  FlatTrainOptions o;
  o.epochs = 2;
  auto train = [&](int threads) {
    ThreadCountGuard g(threads);
    return train_flat_layer(X, W, &w4, &a4, 128, o);
  };
  const FlatLayerResult a = train(1), b = train(2);
  EXPECT_EQ(std::memcmp(a.weight.data(), b.weight.data(), sizeof(float) * a.weight.size()), 0);
  EXPECT_EQ(a.transform->matrix(), b.transform->matrix());
  EXPECT_EQ(a.act_clip.hi, b.act_clip.hi);
}

TEST(FlatQuant, RefusesGridsItCannotSimulate) {
  WorkloadCache cache;
  const RunRecord g = run_yaml(kBase + "quant: [{algorithm: flatquant, epochs: 1}, {algorithm: rtn, bits: 4, "
                                       "granularity: group, group_size: 32}]\n",
                               cache, RunStatus::Failed);
  EXPECT_NE(g.message.find("per-channel weight grids"), std::string::npos) << g.message;
}

// ---- on a model: the KV cache in the objective, the direct-inverse factors ----

/// A tiny LLaMA checkpoint (hidden 8, 2 blocks, 2 heads / 1 KV head of dim 4) and token ids.
const std::string& tiny_model() {
  static const std::string dir = [] {
    const std::string d = testutil::fresh_dir("flatquant_tiny");
    const auto cfg = testutil::tiny_config();
    testutil::write_checkpoint(d, cfg, testutil::tiny_model_tensors(cfg));
    std::ofstream ids(d + "/ids.txt");
    for (int w = 0; w < 8; ++w) {
      for (int t = 0; t < 24; ++t) ids << (t ? " " : "") << (7 * w + 3 * t + 1) % 16;
      ids << "\n";
    }
    return d;
  }();
  return dir;
}

RunRecord run_tiny(const std::string& flatquant, const std::string& kv, WorkloadCache& cache) {
  const std::string d = tiny_model();
  return run_yaml("workload: {kind: model, path: " + d + "}\ncalib: {ids: " + d +
                      "/ids.txt, n_samples: 8, seq_len: 16, propagate: fp}\neval: {seq_len: 16, token_ids: [{name: t, "
                      "path: " + d + "/ids.txt}]}\nslices: {n_boot: 0}\nquant: [{algorithm: flatquant, epochs: 3" +
                      flatquant + "}, {algorithm: rtn, " + kW4A4 + "}" + (kv.empty() ? "" : ", " + kv) + "]\n",
                  cache);
}

double diag_of(const RunRecord& r, const std::string& layer, const std::string& name) {
  for (auto& d : r.diagnostics)
    if (d.layer == layer && d.name == name) return d.value;
  return NAN;
}

std::string param_of(const RunRecord& r, const std::string& key) {
  for (auto& p : r.params)
    if (p.key == key) return p.value;
  return "";
}

// FlatQuant's W4A4KV4: with a kv_rtn step of per-token post-RoPE grids after it, P_k (head_dim²
// x 2 + head_dim parameters) and the K and V grids' clipping logits (4) train with the block,
// the key transform is installed and kv_rtn quantizes with the learned clipping.
TEST(FlatQuant, TrainsTheKeyTransformAndTheCacheClippingAgainstAScalarKvCache) {
  WorkloadCache cache;
  const RunRecord plain = run_tiny("", "", cache);
  const RunRecord kv4 = run_tiny("", "{algorithm: kv_rtn, k_bits: 4, v_bits: 4}", cache);
  for (const char* block : {"model.layers.0", "model.layers.1"}) {
    EXPECT_EQ(diag_of(kv4, block, "kv_trained"), 1.0) << block;
    EXPECT_EQ(diag_of(kv4, block, "trained_params") - diag_of(plain, block, "trained_params"), 2 * 16 + 4 + 4) << block;
    EXPECT_TRUE(std::isfinite(diag_of(kv4, block, "cond_k_post_rope"))) << block;
    const double sig4 = 1.0 / (1.0 + std::exp(-4.0));
    EXPECT_NE(static_cast<float>(diag_of(kv4, block, "key_clip_hi")), static_cast<float>(sig4)) << "the key clipping trained";
    EXPECT_FALSE(param_of(kv4, std::string(block) + ".transform.k_post_rope").empty()) << block;
    EXPECT_NE(param_of(kv4, std::string(block) + ".self_attn.kv_cache").find("learned key clip"), std::string::npos)
        << param_of(kv4, std::string(block) + ".self_attn.kv_cache");
  }
  // learned_clip: false keeps kv_rtn's plain grids; per-channel keys cannot be simulated, so
  // P_k is drawn (not trained) and no clipping is learned.
  const RunRecord off = run_tiny("", "{algorithm: kv_rtn, k_bits: 4, v_bits: 4, learned_clip: false}", cache);
  EXPECT_EQ(param_of(off, "model.layers.0.self_attn.kv_cache").find("learned"), std::string::npos);
  const RunRecord chan =
      run_tiny("", "{algorithm: kv_rtn, k_bits: 4, v_bits: 4, keys: channel, token_group: 8}", cache);
  EXPECT_EQ(diag_of(chan, "model.layers.0", "kv_trained"), 0.0);
  EXPECT_FALSE(param_of(chan, "model.layers.0.transform.k_post_rope").empty());
  EXPECT_EQ(param_of(chan, "model.layers.0.self_attn.kv_cache").find("learned"), std::string::npos);
  const RunRecord untrained = run_tiny(", train_kv: false", "{algorithm: kv_rtn, k_bits: 4, v_bits: 4}", cache);
  EXPECT_EQ(diag_of(untrained, "model.layers.0", "kv_trained"), 0.0);
}

// The direct-inverse parameterisation trains the factor matrices themselves (n² parameters per
// factor instead of 2n² + n), ends with finite, invertible transforms, and on the §5.6 layer
// lowers its loss and beats the random rotation as the SVD form does.
TEST(FlatQuant, DirectInverseFactorsTrainTheMatricesThemselves) {
  WorkloadCache cache;
  auto layer = [&](const std::string& step) {
    const RunRecord r = run_yaml(kBase + "quant: [" + step + "{algorithm: rtn, " + kW4A4 + "}]\n", cache);
    return std::tuple{summary(r, "out_rel_err"), diag_of(r, "attn.qkv", "loss_first_epoch"),
                      diag_of(r, "attn.qkv", "loss_last_epoch")};
  };
  const auto [rot, r1, r2] = layer("{algorithm: rotation, seed: 0}, ");
  const auto [direct, first, last] = layer("{algorithm: flatquant, epochs: 5, parameterisation: direct_inverse}, ");
  const auto [svd_err, s1, s2] = layer("{algorithm: flatquant, epochs: 5}, ");
  std::printf("[ measured ] 10x W4A4 out_rel_err: rotation %.4f, flatquant svd %.6f, direct inverse %.6f (loss %.4g -> %.4g)\n",
              rot, svd_err, direct, first, last);
  EXPECT_LT(last, first);
  EXPECT_LT(direct, rot);

  const RunRecord svd = run_tiny("", "", cache);
  const RunRecord inv = run_tiny(", parameterisation: direct_inverse", "", cache);
  // Factors: P_a 2x4, P_ug 2x4, P_d 2x6, P_v 4, P_o 2: the SVD form has n² + n more per factor.
  const double extra = (4 + 2) + (16 + 4) + (4 + 2) + (16 + 4) + (4 + 2) + (36 + 6) + (16 + 4) + (4 + 2);
  EXPECT_EQ(diag_of(svd, "model.layers.0", "trained_params") - diag_of(inv, "model.layers.0", "trained_params"), extra);
  for (const char* c : {"cond_qkv_in", "cond_gate_up_in", "cond_down_in", "cond_v_out", "cond_o_in"}) {
    const double k = diag_of(inv, "model.layers.1", c);
    EXPECT_TRUE(std::isfinite(k) && k >= 1.0) << c << " " << k;
  }
}

// ---- the block graph (block_graph.h) ----

MatrixD rndd(Index r, Index c, uint64_t stream, double scale = 1.0, double diag = 0.0) {
  return fd::gaussian(r, c, 41, stream, scale, diag);
}

VectorD rndv(Index n, uint64_t stream, double scale, double offset) { return fd::gaussian_vec(n, 41, stream, scale, offset); }

/// A tiny block (hidden 8 = 2 x 4, 4 heads of 2 over 2 KV heads, intermediate 12 = 2 x 6) and
/// transforms near the identity.
void tiny_flat_block(BlockShape& s, BlockParams<double>& w, FlatBlockTransforms<double>& t, bool clipping) {
  s.n_heads = 4;
  s.n_kv_heads = 2;
  s.head_dim = 2;
  s.eps = 1e-5;
  s.rope = RopeSpec(10000.0);
  w.input_norm = rndv(8, 1, 0.2, 1.0);
  w.post_attn_norm = rndv(8, 2, 0.2, 1.0);
  w.q = rndd(8, 8, 3, 0.5);
  w.k = rndd(4, 8, 4, 0.5);
  w.v = rndd(4, 8, 5, 0.5);
  w.o = rndd(8, 8, 6, 0.4);
  w.gate = rndd(12, 8, 7, 0.5);
  w.up = rndd(12, 8, 8, 0.5);
  w.down = rndd(8, 12, 9, 0.4);
  uint64_t st = 20;
  auto f = [&](Index n) { return rndd(n, n, st++, 0.2, 1.0); };
  t.a1 = f(2), t.a2 = f(4), t.a1i = f(2), t.a2i = f(4), t.ca = rndv(8, st++, 0.2, 1.0);
  t.u1 = f(2), t.u2 = f(4), t.u1i = f(2), t.u2i = f(4), t.cu = rndv(8, st++, 0.2, 1.0);
  t.d1 = f(2), t.d2 = f(6), t.d1i = f(2), t.d2i = f(6), t.cd = rndv(12, st++, 0.2, 1.0);
  t.v = f(2), t.vi = f(2), t.o = f(4), t.oi = f(4);
  const Index rows[kLinearKinds] = {8, 4, 4, 8, 12, 12, 8};
  for (int k = 0; k < kLinearKinds; ++k) {
    t.lwc_hi[k] = VectorD::Constant(clipping ? rows[k] : 0, 1.0);
    t.lwc_lo[k] = VectorD::Constant(clipping ? rows[k] : 0, 0.8);
    t.lac_hi[k] = VectorD::Constant(clipping ? 1 : 0, 1.5);
    t.lac_lo[k] = VectorD::Constant(clipping ? 1 : 0, 1.2);
  }
}

TEST(FlatQuantBlock, IdentityTransformsWithoutGridsAreTheFpBlock) {
  BlockShape s;
  BlockParams<double> w;
  FlatBlockTransforms<double> t;
  tiny_flat_block(s, w, t, false);
  for (MatrixD* m : {&t.a1, &t.a2, &t.a1i, &t.a2i, &t.u1, &t.u2, &t.u1i, &t.u2i, &t.d1, &t.d2, &t.d1i, &t.d2i, &t.v,
                     &t.vi, &t.o, &t.oi})
    m->setIdentity();
  t.ca.setOnes();
  t.cu.setOnes();
  t.cd.setOnes();
  FlatBlockGrids off;
  off.weights = off.acts = false;
  const MatrixD x = rndd(10, 8, 60);
  RopeTables tab;
  FlatBlockTape<double> ft;
  flat_block_fwd(s, w, t, off, x, 5, tab, ft);
  BlockTape<double> bt;
  block_fwd(s, w, x, 5, 0, tab, bt);
  EXPECT_LT((ft.y - bt.y).norm(), 1e-12 * bt.y.norm());
}

/// FlatQuant's W4A4KV4 pieces on the tiny block: P_k per head and the K/V grids' LAC logits.
void add_kv(FlatBlockTransforms<double>& t, FlatBlockGrids& grids) {
  t.k = rndd(2, 2, 40, 0.2, 1.0);
  t.ki = rndd(2, 2, 41, 0.2, 1.0);
  for (int i = 0; i < 2; ++i) {
    t.kv_hi[i] = VectorD::Constant(1, 1.3 + 0.2 * i);
    t.kv_lo[i] = VectorD::Constant(1, 0.9 + 0.3 * i);
  }
  grids.kv = true;
  grids.kv_group = 2;
  for (FakeQuantGrad* g : {&grids.key, &grids.value}) {
    g->bits = 4;
    g->symmetric = false;
    g->round_values = false;
  }
}

TEST(FlatQuantBlock, AnIdentityKeyTransformWithoutACacheGridChangesNothing) {
  BlockShape s;
  BlockParams<double> w;
  FlatBlockTransforms<double> t;
  tiny_flat_block(s, w, t, true);
  FlatBlockGrids grids;
  grids.w.bits = grids.a.bits = 4;
  grids.w.clip = ClipStyle::ClampValues;
  const MatrixD x = rndd(10, 8, 63);
  RopeTables tab;
  FlatBlockTape<double> plain, with_k;
  flat_block_fwd(s, w, t, grids, x, 5, tab, plain);
  t.k = t.ki = MatrixD::Identity(2, 2);
  flat_block_fwd(s, w, t, grids, x, 5, tab, with_k);
  EXPECT_LT((plain.y - with_k.y).norm(), 1e-13 * plain.y.norm());
  // An orthogonal P_k (P_k⁻ᵀ = P_k) leaves the scores, so the block, unchanged too.
  const double c = std::cos(0.7), sn = std::sin(0.7);
  t.k << c, -sn, sn, c;
  t.ki = t.k;
  flat_block_fwd(s, w, t, grids, x, 5, tab, with_k);
  EXPECT_LT((plain.y - with_k.y).norm(), 1e-12 * plain.y.norm());
  // The cache grids do change it.
  add_kv(t, grids);
  grids.key.round_values = grids.value.round_values = true;
  flat_block_fwd(s, w, t, grids, x, 5, tab, with_k);
  EXPECT_GT((plain.y - with_k.y).norm(), 1e-4 * plain.y.norm());
}

TEST(FlatQuantBlock, GradientsMatchFiniteDifferencesOfTheRoundingFreeSurrogate) {
  for (bool kv : {false, true}) {
  SCOPED_TRACE(kv ? "with a quantized KV cache" : "exact KV cache");
  BlockShape s;
  BlockParams<double> w;
  FlatBlockTransforms<double> t;
  tiny_flat_block(s, w, t, true);
  FlatBlockGrids grids;
  if (kv) add_kv(t, grids);
  grids.w.bits = 4;
  grids.w.clip = ClipStyle::ClampValues;
  grids.w.min_range = 1e-5;
  grids.w.round_values = false;
  grids.a.bits = 4;
  grids.a.round_values = false;
  const MatrixD x = rndd(10, 8, 61), R = rndd(10, 8, 62);
  auto loss = [&] {
    RopeTables tab;
    FlatBlockTape<double> tp;
    flat_block_fwd(s, w, t, grids, x, 5, tab, tp);
    return (tp.y.array() * R.array()).sum();
  };
  RopeTables tab;
  FlatBlockTape<double> tp;
  flat_block_fwd(s, w, t, grids, x, 5, tab, tp);
  FlatBlockTransforms<double> g = FlatBlockTransforms<double>::zeros_like(t);
  flat_block_bwd(s, w, t, grids, tp, tab, R, g);
  auto check = [&](double* p, Index n, const double* an, const char* what) {
    EXPECT_GT(VectorD(Eigen::Map<const VectorD>(an, n)).norm(), 0.0) << what;
    EXPECT_LT(fd::error(loss, p, n, an), 1e-6) << what;
  };
  std::vector<std::tuple<MatrixD*, MatrixD*, const char*>> mats = {
      {&t.a1, &g.a1, "a1"}, {&t.a2, &g.a2, "a2"}, {&t.a1i, &g.a1i, "a1i"}, {&t.a2i, &g.a2i, "a2i"},
      {&t.u1, &g.u1, "u1"}, {&t.u2, &g.u2, "u2"}, {&t.u1i, &g.u1i, "u1i"}, {&t.u2i, &g.u2i, "u2i"},
      {&t.d1, &g.d1, "d1"}, {&t.d2, &g.d2, "d2"}, {&t.d1i, &g.d1i, "d1i"}, {&t.d2i, &g.d2i, "d2i"},
      {&t.v, &g.v, "v"},    {&t.vi, &g.vi, "vi"}, {&t.o, &g.o, "o"},       {&t.oi, &g.oi, "oi"}};
  for (auto& [p, an, what] : mats) check(p->data(), p->size(), an->data(), what);
  check(t.ca.data(), 8, g.ca.data(), "ca");
  check(t.cu.data(), 8, g.cu.data(), "cu");
  check(t.cd.data(), 12, g.cd.data(), "cd");
  for (int k = 0; k < kLinearKinds; ++k) {
    const std::string name = linear_suffix(static_cast<LinearKind>(k));
    check(t.lwc_hi[k].data(), t.lwc_hi[k].size(), g.lwc_hi[k].data(), ("lwc_hi " + name).c_str());
    check(t.lwc_lo[k].data(), t.lwc_lo[k].size(), g.lwc_lo[k].data(), ("lwc_lo " + name).c_str());
    check(t.lac_hi[k].data(), 1, g.lac_hi[k].data(), ("lac_hi " + name).c_str());
    check(t.lac_lo[k].data(), 1, g.lac_lo[k].data(), ("lac_lo " + name).c_str());
  }
  if (kv) {
    check(t.k.data(), 4, g.k.data(), "P_k");
    check(t.ki.data(), 4, g.ki.data(), "P_k inverse-transpose");
    for (int i = 0; i < 2; ++i) {
      check(t.kv_hi[i].data(), 1, g.kv_hi[i].data(), i ? "value lac_hi" : "key lac_hi");
      check(t.kv_lo[i].data(), 1, g.kv_lo[i].data(), i ? "value lac_lo" : "key lac_lo");
    }
  }
  }
}

}  // namespace
}  // namespace ql
